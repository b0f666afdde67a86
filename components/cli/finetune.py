"""`blipdiff finetune`: fine-tune a model on one subject's reference images (whole UNet or LoRA).

    blipdiff finetune --subject-image dog/*.jpg --subject dog --steps 80 --lora-rank 8 --out ft/dog
    blipdiff generate --finetuned ft/dog --prompt "on the beach" --out out/

The training itself is `components.training.finetune`; the folder it writes is
`components.model.finetuned`. The base model is the preset's (built with the preset's own
seed, 0, whatever `--seed` says: `--seed` only draws the fine-tuning's noise) or the
checkpoint; the folder records it with its weights' sha256, and `generate --finetuned`
builds that base by default and refuses another.

Each run is an MLflow run named `finetune`, like a stage's: params `finetune.*` (the
settings), `subject`, `subject_images` and `base.*`; the loss per step; metrics `seconds`,
`loss_first`, `loss_last`; `--samples` images of "a {subject}" under `samples/`; tag
`finetuned_folder` (the folder's path); a LoRA folder (megabytes) is also copied into the
run's artifacts under `finetuned/` (a whole UNet is not: gigabytes at full size).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

from components.core import tracking
from components.core.config import params_preset
from components.core.errors import BlipDiffError
from components.data.images import MAX_PIXELS, read_subject_images
from components.model import finetuned, sources
from components.model.device import resolve_device
from components.model.presets import PRESETS, from_preset
from components.training.finetune import FinetuneConfig, FinetuneResult, finetune, samples, save, summary

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject-image", nargs="+", type=Path, required=True, help="reference images")
    p.add_argument("--subject", required=True, help="the subject's class, e.g. dog")
    p.add_argument("--max-image-pixels", type=int, default=MAX_PIXELS,
                   help="refuse a reference image declaring more pixels, before decoding it")
    p.add_argument("--checkpoint", help="a folder in the released layout, or a hub id")
    p.add_argument("--preset", choices=PRESETS,
                   help="model preset when no --checkpoint (default: params.yaml's, else tiny)")
    p.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    p.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    p.add_argument("--learning-rate", type=float, default=FinetuneConfig.learning_rate)
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters only (peft)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fine-tuning's noise and timesteps (not of the base model)")
    p.add_argument("--samples", type=int, default=2,
                   help="images of 'a {subject}' logged to the MLflow run after fine-tuning (0: none)")
    p.add_argument("--sample-steps", type=int, default=25, help="denoising steps of those samples")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned subject")


def run(args: argparse.Namespace) -> FinetuneResult:
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         lora_rank=args.lora_rank, seed=args.seed)
    cfg.check()
    if args.samples < 0 or args.sample_steps < 1:
        raise BlipDiffError(f"--samples must be >= 0 and --sample-steps >= 1, got {args.samples} and "
                            f"{args.sample_steps}")
    if args.checkpoint:
        sources.check(args.checkpoint, "--checkpoint", kinds=("model", "hub"))
    refs = read_subject_images(args.subject_image, max_pixels=args.max_image_pixels)
    device = resolve_device(args.device)
    preset = args.preset or params_preset()
    # The base never depends on --seed: `generate --finetuned` must rebuild the same one.
    model = from_preset(preset, args.checkpoint)
    base = finetuned.describe_base(model, preset, args.checkpoint)  # before training changes it
    model.to(device)
    params = {"finetune": asdict(cfg), "subject": args.subject, "subject_images": len(refs), "base": base}
    with tracking.stage_run("finetune", params, Path.cwd()):
        tracking.set_tags({"finetuned_folder": args.out.resolve()})
        result = finetune(model, refs, args.subject, cfg)
        save(model, result, cfg, args.subject, args.out, base)
        tracking.log_metrics(summary(result))
        tracking.log_images(samples(model, result, args.subject, args.samples, args.sample_steps, cfg.seed))
        if cfg.lora_rank:
            tracking.log_artifacts(args.out, "finetuned")
    log.info("wall time for subject %r: %.1f s (%d steps); saved to %s", args.subject, result.seconds,
             cfg.steps, args.out)
    return result
