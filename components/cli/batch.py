"""`blipdiff batch`: generate every image of a manifest on torch, ONNX Runtime or TensorRT, resumably.

    blipdiff batch --manifest jobs.csv --backend onnxruntime --model models/onnx --out out/
    blipdiff batch --manifest jobs.parquet --model models:/blip-diffusion@champion --out out/

Manifest columns: id, prompt, source_subject, subject_images (CSV: `;`-separated) or
embeddings; optional target_subject, num_images, seed, steps, guidance_scale, scheduler,
negative_prompt, height, width, and for the model's ControlNet control_image, control_type
(canny|none), controlnet_scale (defaults: the flags below). Writes out/images/<id>_<k>.png,
out/records.parquet, out/errors.jsonl (bad rows) and out/batches.jsonl (finished batches: a
re-run after an interruption makes only what is missing, with the same bytes).

On a Dask cluster (the same bytes; without these flags no Dask is imported):

    blipdiff batch --manifest jobs.csv --out out/ --dask-workers 2                     # a local cluster
    blipdiff batch --manifest jobs.csv --out out/ --dask-address tcp://10.0.0.5:8786   # an existing scheduler

--dask-workers N: a LocalCluster of N worker processes on loopback (a LocalCUDACluster, one
worker per GPU, when dask-cuda is installed and the backend runs on a GPU). --dask-address (or
the environment variable BLIPDIFF_DASK_ADDRESS): an existing scheduler, whose workers need the
same code and the model and manifest files at the same paths (a shared filesystem); the address
wins over --dask-workers. --dask-timeout: seconds to reach the scheduler, then its first worker.
Each worker loads the model once; this process loads none and alone writes every file.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from components.cluster import ADDRESS_ENV
from components.core.errors import BlipDiffError
from components.core.paths import BLIP_DIFFUSION_DIR, EXPORT_DIR
from components.data.images import MAX_PIXELS
from components.export.graphs import SERVING_BATCH
from components.model.blip_diffusion import SCHEDULERS
from components.model.controlnet import CANNY_HIGH, CANNY_LOW
from components.model.device import DTYPES

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", type=Path, required=True, help="jobs: .csv, .jsonl or .parquet")
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--model", help="a model folder, an export folder (onnxruntime, tensorrt), or a registered model "
                                   f"models:/NAME@ALIAS or models:/NAME/VERSION (default: {BLIP_DIFFUSION_DIR} for "
                                   f"torch, {EXPORT_DIR} otherwise)")
    p.add_argument("--out", type=Path, required=True, help="output folder; an existing one is resumed")
    p.add_argument("--batch-size", type=int, default=SERVING_BATCH,
                   help="images per UNet batch (default: the batch the TensorRT profiles are tuned to)")
    gen = p.add_argument_group("defaults of the manifest's optional columns")
    gen.add_argument("--seed", type=int, default=0, help="image k of a row uses seed + k")
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--scheduler", default="pndm", choices=SCHEDULERS)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--height", type=int, help="default: the model's native size")
    gen.add_argument("--width", type=int)
    gen.add_argument("--prompt-strength", type=float, default=1.0)
    gen.add_argument("--prompt-reps", type=int, default=20)
    gen.add_argument("--max-image-pixels", type=int, default=MAX_PIXELS,
                     help="refuse a subject or control image declaring more pixels, before decoding it")
    ctl = p.add_argument_group("defaults of the control columns (rows with a control_image; the model's ControlNet)")
    ctl.add_argument("--control-type", default="canny", metavar="canny|none",
                     help="canny: the control image's edge map (OpenCV); none: the image is already a condition map")
    ctl.add_argument("--canny-low", type=int, default=CANNY_LOW, help="canny's low threshold (all rows)")
    ctl.add_argument("--canny-high", type=int, default=CANNY_HIGH, help="canny's high threshold (all rows)")
    ctl.add_argument("--controlnet-scale", type=float, default=1.0,
                     help="the ControlNet residuals' scale (0: as without ControlNet)")
    run_on = p.add_argument_group("where it runs")
    run_on.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="torch backend")
    run_on.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="torch: auto = fp16 on GPU, fp32 on CPU; onnxruntime: fp32 or fp16 graphs "
                             "(auto = fp16 on CUDA)")
    run_on.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers, in order of preference "
                                                       "(default: CUDA then CPU when there is a GPU, else CPU)")
    run_on.add_argument("--engine-dir", type=Path, help="TensorRT engines (default: models/tensorrt beside the export)")
    run_on.add_argument("--trt-profile", help="the engines' optimisation profile (default: the only one there)")
    run_on.add_argument("--build-engines", action="store_true",
                        help="build (or reuse up-to-date) TensorRT engines from the export's fp16 graphs first")
    on_dask = p.add_argument_group("on a Dask cluster (default: in this process)")
    on_dask.add_argument("--dask-workers", type=int, default=0, metavar="N",
                         help="a local cluster of N worker processes (one per GPU with dask-cuda on a GPU)")
    on_dask.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                         help=f"an existing scheduler (default: ${ADDRESS_ENV}); wins over --dask-workers")
    on_dask.add_argument("--dask-timeout", type=float, default=30.0, metavar="S",
                         help="seconds to reach the scheduler, and then its first worker")


def _control_defaults(args):
    import math

    from components.model import controlnet
    from serving.batch import ControlDefaults

    controlnet.check_control_type(args.control_type)
    controlnet.check_canny_thresholds(args.canny_low, args.canny_high, "--canny-low/--canny-high")
    if not math.isfinite(args.controlnet_scale):
        raise BlipDiffError(f"--controlnet-scale must be a finite number, got {args.controlnet_scale}")
    return ControlDefaults(control_type=args.control_type, canny_low=args.canny_low, canny_high=args.canny_high,
                           controlnet_scale=args.controlnet_scale)


def _defaults(args):
    from serving.batch import Sampler

    for name in ("height", "width"):
        size = getattr(args, name)
        if size is not None and (size <= 0 or size % 8):
            raise BlipDiffError(f"--{name} must be a positive multiple of 8, got {size}")
    if args.steps < 1:
        raise BlipDiffError(f"--steps must be >= 1, got {args.steps}")
    if args.prompt_reps < 1:
        raise BlipDiffError(f"--prompt-reps must be >= 1, got {args.prompt_reps}")
    return Sampler(steps=args.steps, guidance_scale=args.guidance_scale, scheduler=args.scheduler,
                   negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                   prompt_strength=args.prompt_strength, prompt_reps=args.prompt_reps)


def _dask(args):
    """(the Dask cluster the flags ask for, None: this process; how errors name its address)."""
    import math
    import os

    from pydantic import ValidationError

    from components.core.config import DaskConfig

    if args.dask_workers < 0:
        raise BlipDiffError(f"--dask-workers must be >= 0 (0: in this process), got {args.dask_workers}")
    if not (math.isfinite(args.dask_timeout) and args.dask_timeout > 0):
        raise BlipDiffError(f"--dask-timeout must be a positive number of seconds, got {args.dask_timeout}")
    if args.dask_address is not None:
        address, setting = args.dask_address.strip(), "--dask-address"
        if not address:
            raise BlipDiffError("--dask-address is empty: give tcp://HOST:PORT, or leave it out")
    else:
        address, setting = os.environ.get(ADDRESS_ENV, "").strip() or None, ADDRESS_ENV
    if address is None and args.dask_workers == 0:
        return None, setting
    if address is not None and args.dask_workers:
        log.warning("--dask-workers %d ignored: %s names a scheduler (%s)", args.dask_workers, setting, address)
    try:
        return DaskConfig(workers=0 if address is not None else args.dask_workers, address=address,
                          connect_timeout_s=args.dask_timeout), setting
    except ValidationError as exc:  # dask.workers' bound in params.yaml
        raise BlipDiffError(f"--dask-workers {args.dask_workers}: {exc.errors()[0]['msg']}") from None


def run(args):
    from components.core.paths import REGISTRY_PREFIX
    from serving import batch

    defaults, control_defaults = _defaults(args), _control_defaults(args)
    dask, dask_setting = _dask(args)
    source = args.model or str(BLIP_DIFFUSION_DIR if args.backend == "torch" else EXPORT_DIR)
    tracking_uri = None
    if source.startswith(REGISTRY_PREFIX):
        from components.core import tracking

        tracking_uri = tracking.tracking_uri(Path.cwd())
    # Loaded once the manifest has been checked: here, or once on each Dask worker.
    spec = batch.GeneratorSpec(source, args.backend, device=args.device, dtype=args.dtype,
                               providers=tuple(args.providers) if args.providers else None,
                               engine_dir=args.engine_dir, trt_profile=args.trt_profile,
                               build_engines=args.build_engines, tracking_uri=tracking_uri)
    summary = batch.run(args.manifest, args.out, spec, defaults, batch_size=args.batch_size, seed=args.seed,
                        max_image_pixels=args.max_image_pixels, control_defaults=control_defaults, dask=dask,
                        dask_setting=dask_setting)
    if summary.failed_rows:
        log.warning("%d bad rows: see %s", summary.failed_rows, args.out / batch.ERRORS)
    print(f"{args.out}: {summary.generated} images generated, {summary.skipped} already there, "
          f"{summary.failed_rows} bad rows")
    return summary
