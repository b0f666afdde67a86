"""`blipdiff edit`: put the subject in place of an object, in a generated scene or in a photo (prompt-to-prompt).

    # a generated scene: "a cat sitting on a sofa" drawn from --seed, the cat replaced by the dog
    blipdiff edit --subject-image dog1.jpg dog2.jpg --source-subject dog \\
        --prompt "sitting on a sofa" --source-class cat --out edits/

    # a real photo (inverted with DDIM): the cat in my photo replaced by the dog
    blipdiff edit --subject-image dog1.jpg --source-subject dog \\
        --image my_cat.jpg --prompt "sitting on a sofa" --source-class cat --out edits/

One edit per --prompt, per --seed, per --image; they run in UNet batches of --batch-size
edits. Each edit gets a folder out/NNNN/ with source.png (the image as it was drawn or
reconstructed), edited.png, mask.png (the final local-blend mask at image size: white
where the subject was drawn) and record.json (every input). The target's cross-attention
follows the source's for the first --cross-replace-steps of the steps, its self-attention
for the first --self-replace-steps; outside the blend mask the source stays as it was.

Editing reads the UNet's attention maps, so it runs on the PyTorch modules only.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from components.core.errors import BlipDiffError
from components.core.io import atomic_path
from components.data.images import read_subject_images, save_png
from components.model import editing
from components.model.blip_diffusion import SCHEDULERS

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from components.cli import generate

    generate.add_model_arguments(p)
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="only torch: the exported graphs do not expose attention maps")
    generate.add_subject_arguments(p)
    e = p.add_argument_group("edit")
    e.add_argument("--prompt", action="append", default=[],
                   help="the scene without its class word, e.g. 'sitting on a sofa' (repeatable)")
    e.add_argument("--source-class", required=True, help="the object to replace, as the source prompt names it")
    e.add_argument("--target-class", help="the class word drawn for the subject (default: --source-subject)")
    e.add_argument("--image", action="append", default=[], type=Path, metavar="PHOTO",
                   help="a real photo to edit (repeatable); without it the source is generated from --seed")
    e.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="generated sources: the start noise; photos: the VAE sample (one edit per seed)")
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--inversion-steps", type=int,
                   help="photos: DDIM inversion steps (default: --steps; a multiple of it whose grid holds "
                        "every editing timestep also works)")
    e.add_argument("--guidance-scale", type=float, default=7.5, help="must be > 1")
    e.add_argument("--cross-replace-steps", type=float, default=0.8,
                   help="fraction of the steps during which the target's cross-attention follows the source's")
    e.add_argument("--self-replace-steps", type=float, default=0.4,
                   help="fraction of the steps during which its self-attention is the source's (coarse maps)")
    e.add_argument("--blend-threshold", type=float, default=0.3,
                   help="local blend: the mask is where the blend words' attention exceeds this share of its "
                        "maximum (>= 1: nothing changes)")
    e.add_argument("--blend-words", nargs="+", default=[],
                   help="words of the source prompt whose attention makes the mask (default: --source-class)")
    e.add_argument("--no-blend", action="store_true", help="no local blend: the whole image may change")
    e.add_argument("--negative-prompt", default="")
    e.add_argument("--scheduler", default="pndm", choices=SCHEDULERS,
                   help="generated sources (photos always use DDIM, as their inversion)")
    e.add_argument("--height", type=int, help="default: the model's native size")
    e.add_argument("--width", type=int)
    e.add_argument("--batch-size", type=int, default=4, help="edits per UNet batch (4 rows each)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _validate(args) -> None:
    from components.cli import generate

    if args.backend != "torch":
        raise BlipDiffError(f"--backend {args.backend}: editing needs the UNet's attention maps, which the exported "
                            "ONNX/TensorRT graphs do not expose; use --backend torch")
    prompts = [p.strip() for p in args.prompt]
    if not prompts or any(not p for p in prompts):
        raise BlipDiffError("give at least one non-empty --prompt")
    generate.validate_subject(args)
    if args.inversion_steps is not None and not args.image:
        raise BlipDiffError("--inversion-steps is for --image (a real photo)")
    _settings(args, 8, 8).check()  # sizes: validate_output (the model's native size is not known yet)
    generate.validate_output(args)


def _settings(args, height: int, width: int) -> editing.EditSettings:
    return editing.EditSettings(
        steps=args.steps, inversion_steps=args.inversion_steps, guidance_scale=args.guidance_scale,
        cross_replace_steps=args.cross_replace_steps, self_replace_steps=args.self_replace_steps,
        blend_threshold=args.blend_threshold, blend=not args.no_blend, negative_prompt=args.negative_prompt,
        scheduler=args.scheduler, height=height, width=width)


def run(args) -> list[dict]:
    from components.cli import generate

    _validate(args)
    refs = read_subject_images(args.subject_image, max_pixels=args.max_image_pixels) if args.subject_image else []
    photos = read_subject_images(args.image, max_side=editing.MAX_PHOTO_SIDE, max_pixels=args.max_image_pixels,
                                 what="photo") if args.image else []
    model, base, device, dtype = generate.load_model(args)
    embeds, source_subject = generate.subject(args, model, refs)
    target = (args.target_class or source_subject).strip()
    if not target:
        raise BlipDiffError("--target-class is required (the subject's class is not recorded)")
    height, width = args.height or model.native_size, args.width or model.native_size
    settings = _settings(args, height, width)
    edits, inputs = [], []
    for prompt in args.prompt:
        for seed in args.seed:
            for k, photo in enumerate(photos or [None]):
                edits.append(editing.Edit(prompt.strip(), args.source_class.strip(), target, seed, photo,
                                          tuple(args.blend_words)))
                inputs.append(str(args.image[k]) if photos else None)
    editing.check_edits(model, edits, settings)  # bad blend words or grids: before anything is written
    records = []
    with atomic_path(args.out) as tmp:
        for lo in range(0, len(edits), args.batch_size):
            batch = edits[lo:lo + args.batch_size]
            t = time.perf_counter()
            result = editing.edit(model, embeds, batch, settings, progress=True)
            log.info("%d edits in %.2f s", len(batch), time.perf_counter() - t)
            for j, e in enumerate(batch):
                i = lo + j
                folder = tmp / f"{i:04d}"
                folder.mkdir(parents=True)
                save_png((result.sources[j] * 255).round().astype("uint8"), folder / "source.png")
                save_png((result.edited[j] * 255).round().astype("uint8"), folder / "edited.png")
                save_png((result.masks[j] * 255).round().astype("uint8"), folder / "mask.png")
                record = {
                    "prompt": e.prompt, "source_class": e.source_class, "target_class": e.target_class,
                    "source_text": result.source_texts[j], "target_text": result.target_texts[j],
                    "subject_position": model.ctx_begin_pos,
                    "inversion_text": result.inversion_texts[j] if result.inversion_texts else None,
                    "image": inputs[i], "seed": e.seed, "blend_words": list(e.words),
                    "blend_token_positions": result.blend_positions[j],
                    "mask_fraction": float(result.masks[j].mean()),
                    "subject_images": [str(p) for p in args.subject_image], "source_subject": source_subject,
                    "embeddings": str(args.embeddings) if args.embeddings else None,
                    "finetuned": str(args.finetuned) if args.finetuned else None,
                    "steps": settings.steps,
                    "inversion_steps": (settings.inversion_steps or settings.steps) if photos else None,
                    "scheduler": "ddim" if photos else settings.scheduler,
                    "guidance_scale": settings.guidance_scale, "negative_prompt": settings.negative_prompt,
                    "cross_replace_steps": settings.cross_replace_steps,
                    "self_replace_steps": settings.self_replace_steps,
                    "blend": settings.blend, "blend_threshold": settings.blend_threshold,
                    "height": height, "width": width,
                    "model": base.get("checkpoint") or base["preset"], "device": str(device), "dtype": str(dtype),
                }
                (folder / "record.json").write_text(json.dumps(record, indent=2) + "\n")
                records.append(record)
                if settings.blend and record["mask_fraction"] == 1.0:
                    log.warning("edit %04d: the blend mask covers the whole image (the blend words' attention is flat "
                                "above --blend-threshold %g), so the background changed too; a higher threshold "
                                "keeps more of the source (0.8 on the tiny model)", i, settings.blend_threshold)
    log.info("wrote %d edits to %s", len(records), args.out)
    return records
