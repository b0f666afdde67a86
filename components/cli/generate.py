"""`blipdiff generate`: zero-shot subject-driven generation, batched, with a record of every input.

    blipdiff generate --subject-image dog1.jpg dog2.jpg --source-subject dog \
        --prompt "swimming underwater" --prompt "in the snow" --images-per-prompt 4 --out out/

Writes out/images/NNNN.png and out/records.json (one entry per image: prompt, seed and
every other input that made it). Subject embeddings can be saved (`--save-embeddings`)
and reused (`--embeddings`) instead of the reference images.

ControlNet guidance: `--control-image edges_or_photo.png` with a model that has a ControlNet
(a checkpoint in the `Salesforce/blipdiffusion-controlnet` layout, or `--controlnet DIR|HUB_ID`
added to any checkpoint); `--control-type canny` (default) makes the photo's edge map first,
`none` takes the image as the condition map itself. Several ControlNets: repeat `--controlnet`
and give one `--control-image` (and `--controlnet-scale`) per ControlNet. The condition maps
the ControlNets saw are written to out/control/.

With `--finetuned`, the model is the base the folder records (`blipdiff finetune` writes it)
unless `--checkpoint` or `--preset` names another; either way its weights must hash as the
recorded base's, else generation stops naming both.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from components.core.config import params_preset
from components.core.errors import BlipDiffError
from components.core.io import atomic_path
from components.data.images import MAX_PIXELS, read_subject_images, save_png
from components.model import controlnet, finetuned, layout, presets, sources
from components.export.graphs import SERVING_BATCH
from components.model.blip_diffusion import SCHEDULERS
from components.model.device import DTYPES, placement
from components.model.embeddings import load_embeddings, save_embeddings
from components.model.presets import PRESETS

log = logging.getLogger(__name__)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model to load and where it runs (`generate` and `edit`)."""
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", help="a folder in the released layout, or a hub id")
    src.add_argument("--preset", choices=PRESETS,
                     help="model preset when no --checkpoint (default: params.yaml's, else tiny)")
    src.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    src.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                     help="auto: fp16 on GPU, fp32 on CPU")


def add_subject_arguments(p: argparse.ArgumentParser) -> None:
    """The subject: reference images, saved embeddings or a fine-tuned folder (`generate` and `edit`)."""
    subj = p.add_argument_group("subject")
    subj.add_argument("--subject-image", nargs="+", type=Path, default=[],
                      help="reference image(s) of the subject; their embeddings are averaged")
    subj.add_argument("--embeddings", type=Path, help="saved subject embeddings (safetensors) instead")
    subj.add_argument("--finetuned", type=Path,
                      help="a `blipdiff finetune` folder: its UNet or LoRA and its subject embeddings")
    subj.add_argument("--save-embeddings", type=Path, help="save the subject embeddings here")
    subj.add_argument("--max-image-pixels", type=int, default=MAX_PIXELS,
                      help="refuse an image declaring more pixels, before decoding it")
    subj.add_argument("--source-subject", help="class of the subject in the reference images")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    ctl = p.add_argument_group("control (ControlNet)")
    ctl.add_argument("--controlnet", action="append", default=[], metavar="DIR|HUB_ID",
                     help="add a diffusers ControlNetModel (a folder, a checkpoint with controlnet/, or a hub id); "
                          "repeatable: several ControlNets, residuals summed")
    ctl.add_argument("--control-image", action="append", default=[], type=Path, metavar="PATH",
                     help="the structure to follow. One ControlNet: once (all prompts) or once per --prompt; "
                          "several: once per ControlNet, in order")
    ctl.add_argument("--control-type", default="canny", metavar="canny|none",
                     help="canny: the image's edge map (OpenCV); none: the image is already a condition map "
                          "(e.g. a depth or HED map made elsewhere: their estimators need hub weights, so only "
                          "canny and none work offline)")
    ctl.add_argument("--canny-low", type=int, default=controlnet.CANNY_LOW,
                     help="canny's low threshold (default 100; LAVIS uses 30/70 for dense edges)")
    ctl.add_argument("--canny-high", type=int, default=controlnet.CANNY_HIGH, help="canny's high threshold")
    ctl.add_argument("--controlnet-scale", type=float, nargs="+", default=[1.0],
                     help="the residuals' scale: one, or one per ControlNet (0: as without ControlNet)")
    ctl.add_argument("--control-start", type=float, default=0.0,
                     help="the ControlNets act from this fraction of the steps ...")
    ctl.add_argument("--control-end", type=float, default=1.0, help="... up to this one")
    add_subject_arguments(p)
    p.add_argument("--target-subject", help="class to draw (default: the source subject)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", action="append", default=[], help="repeatable")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--images-per-prompt", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    gen.add_argument("--seeds", type=int, nargs="+", help="one seed per image, instead of --seed")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--scheduler", default="pndm", choices=SCHEDULERS)
    gen.add_argument("--height", type=int, help="default: the model's native size")
    gen.add_argument("--width", type=int)
    gen.add_argument("--prompt-strength", type=float, default=1.0)
    gen.add_argument("--prompt-reps", type=int, default=20)
    gen.add_argument("--batch-size", type=int, default=SERVING_BATCH,
                     help="images per UNet batch (default: the batch the TensorRT profiles are tuned to)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _validate(args) -> None:
    prompts = [p.strip() for p in args.prompt]
    if not prompts:
        raise BlipDiffError("give at least one --prompt")
    if any(not p for p in prompts):
        raise BlipDiffError("empty --prompt")
    if args.images_per_prompt < 1:
        raise BlipDiffError(f"--images-per-prompt must be >= 1, got {args.images_per_prompt}")
    if args.seeds is not None and len(args.seeds) != len(prompts) * args.images_per_prompt:
        raise BlipDiffError(f"--seeds has {len(args.seeds)} values for {len(prompts)} prompts x "
                            f"{args.images_per_prompt} images = {len(prompts) * args.images_per_prompt}")
    validate_subject(args)
    if args.steps < 1:
        raise BlipDiffError(f"--steps must be >= 1, got {args.steps}")
    validate_output(args)
    _validate_control(args, len(prompts))


def validate_output(args) -> None:
    """The image size, batch size and output folder flags (`generate` and `edit`)."""
    for size in (args.height, args.width):
        if size is not None and (size <= 0 or size % 8):
            raise BlipDiffError(f"height and width must be positive multiples of 8, got {size}")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise BlipDiffError(f"{args.out}: exists and is not empty; pass --overwrite to replace it")
    if args.batch_size < 1:
        raise BlipDiffError(f"--batch-size must be >= 1, got {args.batch_size}")


def validate_subject(args) -> None:
    """The model and subject flags (`generate` and `edit`)."""
    given = [n for n in ("subject_image", "embeddings", "finetuned") if getattr(args, n)]
    if len(given) != 1:
        raise BlipDiffError("give exactly one of --subject-image (one or more), --embeddings, --finetuned")
    if args.subject_image and not args.source_subject:
        raise BlipDiffError("--source-subject (the class in the reference images) is required")
    if args.finetuned and not (args.finetuned / finetuned.EMBEDDINGS_FILE).is_file():
        raise BlipDiffError(f"{args.finetuned}: not a fine-tuned subject folder (no {finetuned.EMBEDDINGS_FILE})")
    if args.checkpoint:
        sources.check(args.checkpoint, "--checkpoint", kinds=("model", "hub"))


def _checkpoint_controlnets(args) -> int | None:
    """ControlNets a local --checkpoint brings (None: not known before loading it)."""
    if not args.checkpoint:
        return 0
    index = Path(args.checkpoint).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    return int(layout.CONTROLNET in json.loads(index.read_text()))


def _validate_control(args, prompts: int) -> None:
    """Everything about the control flags that can be judged before a model is loaded."""
    controlnet.check_control_type(args.control_type)
    controlnet.check_canny_thresholds(args.canny_low, args.canny_high, "--canny-low/--canny-high")
    if not 0.0 <= args.control_start < args.control_end <= 1.0:
        raise BlipDiffError(f"--control-start {args.control_start} / --control-end {args.control_end}: need "
                            "0 <= start < end <= 1")
    own = _checkpoint_controlnets(args)
    nets = None if own is None else own + len(args.controlnet)
    if not args.control_image:
        if args.controlnet:
            raise BlipDiffError("--controlnet without --control-image: give the structure to follow")
        return
    if nets == 0:
        raise BlipDiffError("--control-image needs a ControlNet: add one with --controlnet DIR|HUB_ID, or use a "
                            "checkpoint with a controlnet/ folder")
    if nets is not None:
        _control_counts(nets, len(args.control_image), len(args.controlnet_scale), prompts)


def _control_counts(nets: int, images: int, scales: int, prompts: int) -> None:
    if nets == 1 and images not in (1, prompts):
        raise BlipDiffError(f"{images} --control-image for {prompts} prompts: give one, or one per --prompt")
    if nets > 1 and images != nets:
        raise BlipDiffError(f"{images} --control-image for {nets} ControlNets: give one per ControlNet")
    if scales not in (1, nets):
        raise BlipDiffError(f"{scales} --controlnet-scale values for {nets} ControlNets: give one, or one per "
                            "ControlNet")


def model_source(args) -> dict:
    """The model to build: `--checkpoint` or `--preset` when given, else the base a
    `--finetuned` folder records, else params.yaml's preset (presets with their seed 0)."""
    if args.checkpoint:
        return {"checkpoint": args.checkpoint}
    if args.preset:
        return {"preset": args.preset, "seed": 0}
    recorded = finetuned.read_base(args.finetuned) if args.finetuned else None
    if recorded:
        return finetuned.base_source(recorded)
    return {"preset": params_preset(), "seed": 0}


def load_model(args, controlnets=()) -> tuple:
    """The model the flags name (with `controlnets` attached), checked against a `--finetuned`
    folder's recorded base and placed: (model, its source, device, dtype)."""
    device, dtype = placement(args.device, args.dtype)
    base = model_source(args)
    start = time.perf_counter()
    model = presets.from_base(base)
    if args.finetuned:  # on the weights as built, before a cast changes their bytes
        finetuned.check_base(model, args.finetuned, base)
    controlnet.attach(model, list(controlnets), finetuned.base_name(base))
    model.to(device, dtype)
    log.info("model %s on %s (%s) in %.1f s", finetuned.base_name(base), device, dtype,
             time.perf_counter() - start)
    return model, base, device, dtype


def subject(args, model, refs) -> tuple:
    """The subject embeddings (from reference images, saved embeddings or a fine-tuned
    folder) and the source subject's class."""
    if args.embeddings or args.finetuned:
        if args.finetuned:
            embeds, meta = finetuned.apply(model, args.finetuned)
        else:
            embeds, meta = load_embeddings(args.embeddings)
        source = args.source_subject or meta.get("source_subject", "")
        expected = (model.qformer.config.num_query_tokens, model.text_encoder.config.hidden_size)
        if tuple(embeds.shape[1:]) != expected:
            raise BlipDiffError(f"{args.embeddings or args.finetuned}: embeddings of shape {tuple(embeds.shape)} "
                                f"do not fit this model (expects (1, {expected[0]}, {expected[1]}))")
    else:
        source = args.source_subject
        embeds = model.subject_embeddings(refs, source)
        if args.save_embeddings:
            save_embeddings(args.save_embeddings, embeds, {
                "source_subject": source, "images": json.dumps([str(p) for p in args.subject_image])})
            log.info("saved subject embeddings to %s", args.save_embeddings)
    return embeds, source


def _control(args, model, photos: list, height: int, width: int) -> tuple[controlnet.Control | None, list]:
    """The `Control` of this run (condition images per ControlNet, at the output size, one per
    image) and the condition maps, made from the control images as read (`photos`), as the
    ControlNets see them before the resize."""
    if not photos:
        return None, []
    nets = len(model.controlnets)
    _control_counts(nets, len(args.control_image), len(args.controlnet_scale), len(args.prompt))
    maps = [controlnet.condition_map(im, args.control_type, args.canny_low, args.canny_high,
                                     controlnet.canny_side(height, width)) for im in photos]
    pixels = controlnet.control_pixels(maps, height, width)
    if nets == 1:  # one image for all, or one per --prompt, repeated for its images
        images = [pixels if len(maps) == 1 else pixels.repeat_interleave(args.images_per_prompt, dim=0)]
    else:
        images = [pixels[k:k + 1] for k in range(nets)]
    scales = args.controlnet_scale * (nets if len(args.controlnet_scale) == 1 else 1)
    return controlnet.Control(images, scales, args.control_start, args.control_end), maps


def run(args) -> list[dict]:
    _validate(args)
    # the user's images first: a bad one stops the run before any model is built
    refs = read_subject_images(args.subject_image, max_pixels=args.max_image_pixels) if args.subject_image else []
    # the control images too (unreadable or oversized: stop before loading anything)
    photos = read_subject_images(args.control_image, max_side=4096, max_pixels=args.max_image_pixels,
                                 what="control image") if args.control_image else []
    model, base, device, dtype = load_model(args, args.controlnet)

    embeds, source = subject(args, model, refs)
    target = args.target_subject or source

    height, width = args.height or model.native_size, args.width or model.native_size
    prompts = [p.strip() for p in args.prompt for _ in range(args.images_per_prompt)]
    seeds = args.seeds or [args.seed + i for i in range(len(prompts))]
    control, maps = _control(args, model, photos, height, width)
    records = []
    with atomic_path(args.out) as tmp:
        (tmp / "images").mkdir(parents=True)
        if maps:
            (tmp / "control").mkdir()
            for k, condition in enumerate(maps):
                save_png(condition, tmp / "control" / f"{k:02d}.png")
        for lo in range(0, len(prompts), args.batch_size):
            t = time.perf_counter()
            images = model.generate(
                embeds, prompts[lo:lo + args.batch_size], target, seeds[lo:lo + args.batch_size],
                negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale,
                num_inference_steps=args.steps, height=height, width=width, scheduler=args.scheduler,
                prompt_strength=args.prompt_strength, prompt_reps=args.prompt_reps, progress=True,
                control=control and control.rows(lo, lo + args.batch_size),
            )
            log.info("%d images in %.2f s", len(images), time.perf_counter() - t)
            for offset, image in enumerate(images):
                i = lo + offset
                name = f"images/{i:04d}.png"
                save_png((image * 255).round().astype("uint8"), tmp / name)
                records.append({
                    "image": name, "prompt": prompts[i], "seed": seeds[i],
                    "built_prompt": model.build_prompt(prompts[i], target, args.prompt_strength,
                                                       args.prompt_reps),
                    "source_subject": source, "target_subject": target,
                    "subject_images": [str(p) for p in args.subject_image],
                    "embeddings": str(args.embeddings) if args.embeddings else None,
                    "finetuned": str(args.finetuned) if args.finetuned else None,
                    "negative_prompt": args.negative_prompt, "guidance_scale": args.guidance_scale,
                    "steps": args.steps, "scheduler": args.scheduler, "height": height, "width": width,
                    "prompt_strength": args.prompt_strength, "prompt_reps": args.prompt_reps,
                    "model": base.get("checkpoint") or base["preset"], "device": str(device), "dtype": str(dtype),
                    **_control_record(args, model, control, i),
                })
        (tmp / "records.json").write_text(json.dumps(records, indent=2) + "\n")
    log.info("wrote %d images%s and records.json to %s", len(records), " and control maps" if maps else "",
             args.out)
    return records


def _control_record(args, model, control, i: int) -> dict:
    """An image's control inputs: the ControlNets (the checkpoint's first), its control
    images (one per ControlNet), the condition map's settings, scales and window."""
    names = [f"{args.checkpoint}/{layout.CONTROLNET}"] * (len(model.controlnets) - len(args.controlnet))
    names += [str(c) for c in args.controlnet]
    if control is None:
        return {"controlnets": names or None}
    per_prompt = len(control.images) == 1 and len(args.control_image) > 1
    images = [str(args.control_image[i // args.images_per_prompt])] if per_prompt else \
        [str(p) for p in args.control_image]
    return {"controlnets": names, "control_images": images,
            "control_type": args.control_type, "canny_low": args.canny_low, "canny_high": args.canny_high,
            "controlnet_scale": [float(s) for s in control.scales], "control_start": control.start,
            "control_end": control.end}
