"""Benchmark: does stage 2's memory grow with the data? Peak RSS and samples/s of
`train_subject` on the default synthetic data and on 4x as many images.

For each scale it ingests synthetic subjects (views per subject x1 or x4), builds the
context pairs, then trains stage 2 for a few steps in a fresh process and prints that
process's peak RSS (ru_maxrss) and samples/s. `--code DIR` runs the training from another
checkout (e.g. a `git worktree` of an older commit) on the same data, for before/after.

    python benchmarks/stream_bench.py [--steps 30] [--num-workers 0] [--code DIR] [--cache]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCALES = {"1x": {"min_views": 4, "max_views": 6}, "4x": {"min_views": 16, "max_views": 24}}


def prepare(root: Path, views: dict) -> int:
    from components.core import paths
    from components.core.config import Params
    from components.data.manifests import PAIRS_SCHEMA, read_manifest
    from components.stages import context, ingest

    params = Params(ingest={"synthetic": views})
    ingest.ingest_subjects(params.ingest, root)
    context.run(params, root)
    return len(read_manifest(root / paths.PAIRS_MANIFEST, PAIRS_SCHEMA))


def child(root: Path, steps: int, num_workers: int, cache: bool) -> dict:
    import inspect

    from components.core.config import Params
    from components.stages import train_subject

    extra = {"num_workers": num_workers, "cache": cache} if "num_workers" in Params().train_subject.model_fields else {}
    params = Params(train_subject={"steps": steps, "log_every": steps, "checkpoint_every": steps + 1,
                                   "qformer": None, **extra})
    assert "root" in inspect.signature(train_subject.run).parameters
    os.chdir(root)
    metrics, _ = train_subject.run(params, root)
    return {"samples_per_s": metrics["samples_per_s"], "train_pairs": metrics["train_pairs"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--cache", action="store_true")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose train_subject runs")
    parser.add_argument("--data", type=Path, default=None, help="reuse prepared data folders here")
    parser.add_argument("--child", nargs=4, metavar=("ROOT", "STEPS", "WORKERS", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, steps, workers, cache = args.child
        print(json.dumps(child(Path(root), int(steps), int(workers), cache == "1")))
        return
    base = args.data or Path(tempfile.mkdtemp(prefix="stream-bench-"))
    results = {}
    for name, views in SCALES.items():
        root = base / name
        if not (root / "data").is_dir():
            root.mkdir(parents=True, exist_ok=True)
            pairs = prepare(root, views)
            print(f"{name}: {pairs} pairs in {root}", flush=True)
        env = {**os.environ, "PYTHONPATH": str(args.code.resolve()), "MLFLOW_TRACKING_URI": f"sqlite:///{base}/mlflow.db"}
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(root), str(args.steps),
                              str(args.num_workers), "1" if args.cache else "0"],
                             cwd=args.code, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", flush=True)
    growth = results["4x"]["peak_rss_mb"] / results["1x"]["peak_rss_mb"] - 1
    print(json.dumps({"code": str(args.code), "num_workers": args.num_workers, "cache": args.cache, **results,
                      "rss_growth_4x": round(growth, 4)}, indent=2))


if __name__ == "__main__":
    main()
