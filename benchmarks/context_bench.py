"""Benchmark of the context stage's parts on synthetic subjects (CPU, tiny CLIPSeg).

Prints: context images/s at 256 and 512 px; the share of time in CLIPSeg, matting,
foreground estimation and blending; our matting wrapper against a bare
pymatting.estimate_alpha_cf on the same image and trimap; and the time saved and alpha
error added by matting at reduced resolution.

With --dask: the whole stage (`context.run`, CLIPSeg trimaps) on the same synthetic inputs,
in-process and on a Dask LocalCluster of 1 and 2 workers (`dask.workers`); its images/s
(the stage's `samples_per_s`: the per-image work, CLIPSeg built on each worker included),
the wall time with the cluster's start, and whether the outputs are the in-process bytes.

    python benchmarks/context_bench.py [--images 8] [--band 3]
    python benchmarks/context_bench.py --dask [--images 32] [--size 256] [--workers 1 2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pymatting import estimate_alpha_cf

from components.context import matting
from components.context.clipseg import ClipSeg
from components.data import synthetic
from components.data.backgrounds import procedural_background


def timed(fn, *args, repeat=1, **kwargs):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def bench_size(size: int, n: int, band: int, segmenter: ClipSeg, max_side: int | None) -> dict:
    views = synthetic.generate(8, 4, 4, size, seed=1)[: n]
    parts = dict(clipseg=0.0, matting=0.0, foreground=0.0, blending=0.0)
    start = time.perf_counter()
    for view in views:
        _, t = timed(segmenter, [view.image], [view.subject.class_name])
        parts["clipseg"] += t
        # The trimap from ground truth: a random tiny CLIPSeg's maps say nothing real.
        trimap = matting.trimap_from_alpha(view.alpha, band)
        alpha, t = timed(matting.estimate_alpha, view.image, trimap, max_side)
        parts["matting"] += t
        fg, t = timed(matting.estimate_foreground, view.image, alpha)
        parts["foreground"] += t
        bg = procedural_background(np.random.default_rng(0), size, size)
        _, t = timed(matting.blend, fg, alpha, bg)
        parts["blending"] += t
    total = time.perf_counter() - start
    return {"images_per_s": n / total, **{k: v / sum(parts.values()) for k, v in parts.items()}}


def wrapper_vs_bare(size: int, band: int, repeat: int = 5) -> tuple[float, float, float]:
    view = synthetic.generate(8, 4, 4, size, seed=1)[0]
    trimap = matting.trimap_from_alpha(view.alpha, band)
    image = view.image.astype(np.float64) / 255.0
    bare, t_bare = timed(estimate_alpha_cf, image, trimap, repeat=repeat)
    ours, t_ours = timed(matting.estimate_alpha, view.image, trimap, None, repeat=repeat)
    return t_bare, t_ours, float(np.abs(ours - bare).max())


def reduced_resolution(size: int, max_side: int, band: int, n: int) -> dict:
    full_t, red_t, full_mse, red_mse = 0.0, 0.0, [], []
    for view in synthetic.generate(8, 4, 4, size, seed=1)[:n]:
        trimap = matting.trimap_from_alpha(view.alpha, band)
        a, t = timed(matting.estimate_alpha, view.image, trimap, None)
        full_t += t
        full_mse.append(matting.alpha_errors(a, view.alpha, trimap)["mse"])
        a, t = timed(matting.estimate_alpha, view.image, trimap, max_side)
        red_t += t
        red_mse.append(matting.alpha_errors(a, view.alpha, trimap)["mse"])
    return dict(full_s=full_t / n, reduced_s=red_t / n,
                full_mse=float(np.mean(full_mse)), reduced_mse=float(np.mean(red_mse)))


def _outputs_hash(root: Path) -> str:
    from components.core import paths

    digest = hashlib.sha256()
    for path in sorted((root / paths.CONTEXT_DIR).rglob("*")) + [root / paths.PAIRS_MANIFEST]:
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def bench_dask(images: int, size: int, workers: list[int], repeat: int) -> None:
    """The stage itself, in-process and on LocalClusters, on the same ingested inputs."""
    from components.core.config import Params
    from components.stages import context, ingest

    views = max(1, images // 8)
    params = Params(ingest={"synthetic": {"num_subjects": 8, "min_views": views, "max_views": views,
                                          "image_size": size}},
                    context={"mask_source": "clipseg", "erode": 0})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ingest.ingest_subjects(params.ingest, root)
        context.run(params, root)  # warm-up: numba's compiled kernels (cached on disk for the workers), torch
        reference = _outputs_hash(root)
        print(f"context stage, {8 * views} synthetic images at {size} px, CLIPSeg trimaps (tiny), "
              f"batch {params.context.clipseg_batch_size}, median of {repeat}:")
        print(f"{'executor':>22} {'img/s':>7} {'wall s':>7} {'start s':>8} {'CLIPSeg builds':>15} {'same bytes':>11}")
        for n in [0, *workers]:
            run_params = params.model_copy(update={"dask": params.dask.model_copy(update={"workers": n})})
            rates, walls, starts, loads, same = [], [], [], [], True
            for _ in range(repeat):
                start = time.perf_counter()
                metrics, _ = context.run(run_params, root)
                walls.append(time.perf_counter() - start)
                rates.append(metrics["samples_per_s"])
                starts.append(metrics["seconds_executor_start"])
                loads.append(metrics["run_clipseg_loads"])
                same &= _outputs_hash(root) == reference
            name = "in-process" if n == 0 else f"LocalCluster {n} worker" + ("s" if n > 1 else "")
            print(f"{name:>22} {statistics.median(rates):7.2f} {statistics.median(walls):7.1f} "
                  f"{statistics.median(starts):8.1f} {max(loads):>15} {'yes' if same else 'NO':>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=None, help="default: 8 (parts), 32 (--dask)")
    parser.add_argument("--band", type=int, default=3, help="unknown band half-width, px")
    parser.add_argument("--dask", action="store_true", help="the stage in-process and on Dask LocalClusters")
    parser.add_argument("--size", type=int, default=256, help="--dask: image size, px")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--dask: LocalCluster sizes")
    parser.add_argument("--repeat", type=int, default=1, help="--dask: runs per executor (median)")
    args = parser.parse_args()
    if args.dask:
        bench_dask(args.images or 32, args.size, args.workers, args.repeat)
        return
    args.images = args.images or 8

    segmenter = ClipSeg("tiny", None, seed=0, device="cpu")
    # Warm up numba's compiled kernels (pymatting) and torch once.
    view = synthetic.generate(1, 1, 1, 64, seed=0)[0]
    matting.estimate_foreground(view.image, matting.estimate_alpha(view.image, matting.trimap_from_alpha(view.alpha, 2)))
    segmenter([view.image], ["toy"])

    print(f"context stage, {args.images} images, unknown band {args.band} px, CPU:")
    print(f"{'size':>6} {'img/s':>7} {'clipseg':>8} {'matting':>8} {'fg est':>8} {'blend':>8}")
    for size in (256, 512):
        r = bench_size(size, args.images, args.band, segmenter, None)
        print(f"{size:>6} {r['images_per_s']:7.2f} {r['clipseg']:8.1%} {r['matting']:8.1%} "
              f"{r['foreground']:8.1%} {r['blending']:8.1%}")

    print("\nmatting wrapper vs bare estimate_alpha_cf (same image and trimap, median of 5):")
    for size, band in ((256, args.band), (512, args.band), (512, 25)):
        t_bare, t_ours, diff = wrapper_vs_bare(size, band)
        print(f"  {size} px, band {band:>2}: bare {t_bare*1000:8.1f} ms, ours {t_ours*1000:8.1f} ms "
              f"({t_ours / t_bare - 1:+.1%}), max |alpha diff| {diff:.1e}")

    print("\nreduced-resolution matting (alpha upsampled), 512 px images:")
    for band in (args.band, 25):
        for max_side in (384, 256):
            r = reduced_resolution(512, max_side, band, args.images)
            print(f"  band {band:>2}, max side {max_side}: {r['reduced_s']*1000:6.1f} ms vs full "
                  f"{r['full_s']*1000:6.1f} ms; alpha MSE in the unknown region {r['reduced_mse']:.4f} "
                  f"vs full {r['full_mse']:.4f}")


if __name__ == "__main__":
    main()
