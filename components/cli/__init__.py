"""`blipdiff`: one subcommand per pipeline stage (what dvc.yaml runs), plus `generate`, `edit`, `finetune`,
`register`, `score`, `batch` and `doctor`.

A user error prints one line `blipdiff <command>: error: ...` and exits with status 2.
Only the chosen subcommand's arguments are built, so `blipdiff ingest --help` imports no
model code: a stage's work starts in `components.stages.runner`, generation in
`components.cli.generate`, fine-tuning in `components.cli.finetune`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from components.core.errors import BlipDiffError, StageReport
from components.core.paths import RESUME_ENV
from components.stages import RESUMABLE, STAGES

TOOLS = {
    "generate": "zero-shot subject-driven generation (batched)",
    "edit": "put the subject in place of an object in a generated scene or a photo (prompt-to-prompt)",
    "finetune": "fine-tune on one subject (full UNet or LoRA)",
    "register": "register a trained model folder in the MLflow registry (no retraining)",
    "score": "DINO, CLIP-I and CLIP-T of any generated images against real subject images",
    "batch": "batch generation from a manifest on torch, ONNX Runtime or TensorRT (resumable)",
    "doctor": "check that the driver, torch, cuDNN, ONNX Runtime and TensorRT can use the GPU",
}


def _tool(name: str):
    """The module of a non-stage command: add_arguments(parser) and run(args)."""
    if name == "generate":
        from components.cli import generate

        return generate
    if name == "register":
        from components.cli import register

        return register
    if name == "score":
        from components.cli import score

        return score
    if name == "edit":
        from components.cli import edit

        return edit
    if name == "batch":
        from components.cli import batch

        return batch
    if name == "doctor":
        from components.cli import doctor

        return doctor
    from components.cli import finetune

    return finetune


def _add_stage_arguments(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    p.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a param for this run, e.g. -S ingest.source=dreambench (repeatable)",
    )
    if stage in RESUMABLE:
        p.add_argument("--resume", metavar="latest|DIR",
                       help="continue from a checkpoint of a run with the same params")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s arguments are added (all of them when None)."""
    parser = argparse.ArgumentParser(prog="blipdiff", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage (as dvc.yaml does)")
        if command in (None, stage):
            _add_stage_arguments(p, stage)
    for name, help_text in TOOLS.items():
        p = sub.add_parser(name, help=help_text)
        if command in (None, name):
            module = _tool(name)
            p.description = module.__doc__.split("\n")[0]
            module.add_arguments(p)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (the first word that is one), if any."""
    return next((a for a in argv if a in STAGES or a in TOOLS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "urllib3", "httpx", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command in TOOLS:
        try:
            _tool(args.command).run(args)
        except BlipDiffError as exc:
            print(f"blipdiff {args.command}: error: {exc}", file=sys.stderr)
            return 2
        return 0
    from components.stages.runner import run_stage

    report = StageReport(args.command)
    # --resume, else $BLIPDIFF_RESUME (a flow retrying a stage sets "auto": resume a matching
    # checkpoint if there is one)
    resume = getattr(args, "resume", None) or (os.environ.get(RESUME_ENV) if args.command in RESUMABLE else None)
    try:
        run_stage(args.command, args.params, args.overrides, Path.cwd(), **({"resume": resume} if resume else {}))
    except BlipDiffError as exc:
        report.failed(exc)
        print(f"blipdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        report.failed(exc)
        raise
    report.done()
    return 0
