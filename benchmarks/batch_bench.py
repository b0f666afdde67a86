"""Benchmark of `blipdiff batch` in this process and on a local Dask cluster (CPU).

Prints images/s of the same manifest made in this process and on local Dask clusters of 1 and
2 worker processes, on the default-preset tiny model (models/blip_diffusion from `dvc repro`;
a random tiny model where there is none): cold (a whole run, as `blipdiff batch` does it: the
cluster's start, the model's loads, generation, writes) and warm (the cluster up and the
generator loaded on its workers; in this process: a second run). Checks that every run wrote
the same PNG bytes. Each local worker runs with this process's torch threads
(components.cluster.torch_worker_env: the bytes of an in-process run), so on N cores run it with
OMP_NUM_THREADS=1 to compare one process on one core with N workers on N cores.

    OMP_NUM_THREADS=1 python benchmarks/batch_bench.py [--images 32] [--batch-size 4] [--steps 25] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from components.cluster import open_cluster, torch_worker_env
from components.core.config import DaskConfig
from components.core.paths import BLIP_DIFFUSION_DIR
from components.data import synthetic
from components.data.images import save_png
from serving import batch

PROMPTS = ["in the jungle", "in the snow", "on the beach", "on a cobblestone street",
           "on top of pink fabric", "on top of a wooden floor", "with a city in the background",
           "with a mountain in the background"]


def write_manifest(folder: Path, images: int) -> Path:
    """Rows of 2 images each (seeds 10*i, 10*i+1) over 4 subjects and 8 prompts."""
    for i, view in enumerate(synthetic.generate(4, 2, 2, 64, seed=0)):
        save_png(view.image, folder / f"s{i}.png")
    subjects = sorted(p.name for p in folder.glob("s*.png"))
    rows = [f"r{i},{subjects[i % len(subjects)]},dog,{PROMPTS[i % len(PROMPTS)]},2,{10 * i}"
            for i in range((images + 1) // 2)]
    manifest = folder / "jobs.csv"
    manifest.write_text("id,subject_images,source_subject,prompt,num_images,seed\n" + "\n".join(rows) + "\n")
    return manifest


def model_folder(path: Path, tmp: Path) -> tuple[Path, str]:
    if (path / "model_index.json").is_file():
        return path, str(path)
    from components.model import layout
    from components.model.tiny.blip_diffusion import build_tiny

    layout.save(build_tiny(0), tmp / "tiny")
    return tmp / "tiny", f"a random tiny model ({path} not found: `dvc repro` makes it)"


def timed_run(manifest: Path, out: Path, spec: batch.GeneratorSpec, args, dask: DaskConfig | None) -> float:
    sampler = batch.Sampler(args.steps, 7.5, "pndm", "", None, None, 1.0, 20)
    start = time.perf_counter()
    summary = batch.run(manifest, out, spec, sampler, batch_size=args.batch_size, progress=False, dask=dask)
    seconds = time.perf_counter() - start
    assert summary.generated == summary.images, summary
    return seconds


def png_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", type=Path, default=BLIP_DIFFUSION_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, described = model_folder(args.model, tmp)
        manifest = write_manifest(tmp, args.images)
        spec = batch.GeneratorSpec(str(model.resolve()), device="cpu")
        images = 2 * ((args.images + 1) // 2)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads per process, {os.cpu_count()} CPUs "
              f"(load average {os.getloadavg()[0]:.1f}); {images} images in batches of {args.batch_size}, "
              f"{args.steps} PNDM steps, guidance 7.5; model: {described}")
        results, outputs = [], {}
        cold = timed_run(manifest, tmp / "here-cold", spec, args, None)
        warm = timed_run(manifest, tmp / "here-warm", spec, args, None)
        results.append(("in this process", cold, warm))
        outputs["in this process"] = png_bytes(tmp / "here-warm")
        for n in args.workers:
            name = f"Dask, {n} worker{'s' * (n != 1)}"
            cold = timed_run(manifest, tmp / f"dask{n}-cold", spec, args, DaskConfig(workers=n))
            with open_cluster(None, n, worker_env=torch_worker_env()) as cluster:
                address = cluster.client.scheduler.address
                timed_run(manifest, tmp / f"dask{n}-load", spec, args, DaskConfig(address=address))  # loads
                warm = timed_run(manifest, tmp / f"dask{n}-warm", spec, args, DaskConfig(address=address))
            results.append((name, cold, warm))
            outputs[name] = png_bytes(tmp / f"dask{n}-cold")
            assert png_bytes(tmp / f"dask{n}-warm") == outputs[name]

        print(f"{'':18} {'cold images/s':>14} {'warm images/s':>14}")
        for name, cold, warm in results:
            print(f"{name:18} {images / cold:14.2f} {images / warm:14.2f}   ({cold:.2f} s, {warm:.2f} s)")
        reference = outputs["in this process"]
        same = all(o == reference for o in outputs.values()) and len(reference) == images
        print(f"the same PNG bytes in every mode: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
