"""`blipdiff finetune`: fine-tune a model on one subject's reference images (whole UNet or LoRA).

    blipdiff finetune --subject-image dog/*.jpg --subject dog --steps 80 --lora-rank 8 --out ft/dog
    blipdiff generate --finetuned ft/dog --prompt "on the beach" --out out/

The training itself is `components.training.finetune`; the folder it writes is
`components.model.finetuned`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from components.core.config import params_preset
from components.data.images import MAX_PIXELS, read_subject_images
from components.model.device import resolve_device
from components.model.presets import PRESETS, from_preset
from components.training.finetune import FinetuneConfig, FinetuneResult, finetune, save

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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned subject")


def run(args: argparse.Namespace) -> FinetuneResult:
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         lora_rank=args.lora_rank, seed=args.seed)
    cfg.check()
    refs = read_subject_images(args.subject_image, max_pixels=args.max_image_pixels)
    model = from_preset(args.preset or params_preset(), args.checkpoint, args.seed).to(resolve_device(args.device))
    result = finetune(model, refs, args.subject, cfg)
    save(model, result, cfg, args.subject, args.out)
    log.info("wall time for subject %r: %.1f s (%d steps); saved to %s", args.subject, result.seconds,
             cfg.steps, args.out)
    return result
