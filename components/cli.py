"""`blipdiff`: one subcommand per pipeline stage (what dvc.yaml runs).

Every stage: load params.yaml (typed), open its MLflow run, do the work, write the
metrics JSON that dvc.yaml declares, log what it read and wrote and how long it took.
A user error prints one line `blipdiff <stage>: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from components.errors import BlipDiffError

log = logging.getLogger("blipdiff")
METRICS_DIR = Path("metrics")
MACHINE_DEPENDENT = ("seconds_", "samples_per_s", "peak_memory_mb")  # metric name prefixes


def _ingest(params, root: Path):
    from components import ingest

    return ingest.run(params.ingest, root)


def _context(params, root: Path):
    from components import context

    return context.run(params, root)


def _pretrain_qformer(params, root: Path, resume: str | None = None):
    from components import pretrain_qformer

    return pretrain_qformer.run(params, root, resume=resume)


def _train_subject(params, root: Path, resume: str | None = None):
    from components import train_subject

    return train_subject.run(params, root, resume=resume)


# stage name -> (function, params sections it reads)
STAGES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "ingest": (_ingest, ("ingest",)),
    "context": (_context, ("preset", "context")),
    "pretrain_qformer": (_pretrain_qformer, ("preset", "pretrain_qformer")),
    "train_subject": (_train_subject, ("preset", "train_subject")),
}


def run_stage(stage: str, params_path: Path, overrides: list[str], root: Path, **options) -> dict:
    from components import tracking
    from components.config import load_params
    from components.io import write_json

    params = load_params(params_path, overrides)
    fn, sections = STAGES[stage]
    stage_params = params.model_dump(include=set(sections))
    start = time.perf_counter()
    if int(os.environ.get("RANK", "0")) != 0:
        # Other processes of a multi-process run (accelerate launch) only train.
        fn(params, root, **options)
        return {}
    with tracking.stage_run(stage, stage_params, root):
        metrics, samples = fn(params, root, **options)
        metrics["seconds_wall"] = round(time.perf_counter() - start, 3)
        # Timings, throughput and memory go to MLflow only: the DVC metrics file stays the
        # same bytes for the same params, like every other output.
        stable = {k: v for k, v in metrics.items() if not k.startswith(MACHINE_DEPENDENT)}
        write_json(stable, root / METRICS_DIR / f"{stage}.json")
        tracking.log_metrics(metrics)
        tracking.log_images(samples)
        if stage == "train_subject":
            from components import registry, train_subject

            registry.log_and_register(root / train_subject.MODEL_DIR)
    log.info("%s done in %.1f s; metrics in %s", stage, metrics["seconds_wall"],
             METRICS_DIR / f"{stage}.json")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blipdiff", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage (as dvc.yaml does)")
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
        p.add_argument(
            "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a param for this run, e.g. -S ingest.source=dreambench (repeatable)",
        )
        if stage in ("pretrain_qformer", "train_subject"):
            p.add_argument("--resume", metavar="latest|DIR",
                           help="continue from a checkpoint of a run with the same params")
    from components import generate

    gen = sub.add_parser("generate", help="zero-shot subject-driven generation (batched)",
                         description=generate.__doc__.split("\n")[0])
    generate.add_arguments(gen)
    from components import finetune

    ft = sub.add_parser("finetune", help="fine-tune on one subject (full UNet or LoRA)",
                        description=finetune.__doc__.split("\n")[0])
    finetune.add_arguments(ft)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "urllib3", "httpx", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "generate":
            from components import generate

            generate.run(args)
        elif args.command == "finetune":
            from components import finetune

            finetune.run(args)
        else:
            options = {"resume": args.resume} if getattr(args, "resume", None) else {}
            run_stage(args.command, args.params, args.overrides, Path.cwd(), **options)
    except BlipDiffError as exc:
        print(f"blipdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
