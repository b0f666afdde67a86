"""Benchmark of the training stages on the CPU.

Prints, for the tiny preset on the default synthetic data: samples/s and peak memory of
`pretrain_qformer`, `train_subject` and `blipdiff finetune` (whole UNet and LoRA), each
measured in its own process so that peak memory is that stage's. Then one training step
of the full-size stage 2 architecture (CLIP ViT-L image encoder + BERT-base Q-Former, SD
v1.5 text encoder and UNet, random weights) at 512 px: seconds and peak memory, with every
stage 2 part trained as in `train_subject` and gradient checkpointing on.

    python benchmarks/train_bench.py [--steps 100] [--skip-full-size] [--optimizer sgd|adamw]

The full-size step uses AdamW, as train_subject does: measured here at 20.5 GB peak (fp32
weights and gradients of the 1.2 B trained parameters ~ 11 GB, AdamW's two moment
buffers ~ 9.5 GB); `--optimizer sgd` leaves the buffers out for smaller machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    from components.training.loop import peak_memory_mb

    return peak_memory_mb()


# ------------------------------------------------------------------- child processes
def child_stage(stage: str, root: Path, steps: int) -> dict:
    from components.core.config import load_params

    os.chdir(root)
    if stage == "pretrain_qformer":
        from components.stages import pretrain_qformer as module
    else:
        from components.stages import train_subject as module
    params = load_params(root / "params.yaml", [f"{stage}.steps={steps}", f"{stage}.checkpoint_every={steps + 1}",
                                                f"{stage}.log_every={steps}"])
    metrics, _ = module.run(params, root)
    batch = getattr(params, stage).batch_size
    return {"samples_per_s": metrics["samples_per_s"], "seconds_per_step": metrics["seconds_training"] / steps,
            "batch": batch, "peak_memory_mb": _peak_mb()}


def child_finetune(root: Path, steps: int, lora_rank: int) -> dict:
    from components.core import paths
    from components.data.images import read_rgb
    from components.data.manifests import SUBJECTS_SCHEMA, read_manifest
    from components.model.tiny.blip_diffusion import build_tiny
    from components.training.finetune import FinetuneConfig, finetune

    frame = read_manifest(root / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    rows = frame[frame["subject_id"] == frame["subject_id"].iloc[0]]
    images = [read_rgb(root / p) for p in rows["image_path"]][:3]
    cfg = FinetuneConfig(steps=steps, batch_size=3, lora_rank=lora_rank)
    result = finetune(build_tiny(0), images, rows["class_name"].iloc[0], cfg)
    return {"samples_per_s": steps * cfg.batch_size / result.seconds, "seconds_per_step": result.seconds / steps,
            "batch": cfg.batch_size, "peak_memory_mb": _peak_mb()}


def child_full_size(optimizer_name: str, steps: int) -> dict:
    """One stage 2 training step of the released architecture at 512 px, batch 1."""
    import torch
    from diffusers import DDPMScheduler

    from components.model.full_size import build_full_size
    from components.training.subject_objective import Stage2

    torch.manual_seed(0)
    t0 = time.perf_counter()
    parts = build_full_size("cpu")
    build_s = time.perf_counter() - t0

    from components.model.blip_diffusion import BlipDiffusion
    from components.model.tiny.blip_diffusion import build_tiny

    tiny = build_tiny(0)  # its tokenizers: ids within the full-size vocabularies
    model = BlipDiffusion(qformer=parts["qformer"], text_encoder=parts["text_encoder"], tokenizer=tiny.tokenizer,
                          qformer_tokenizer=tiny.qformer_tokenizer, unet=parts["unet"], vae=parts["vae"],
                          scheduler=tiny.scheduler)
    parts["qformer"].visual_encoder.requires_grad_(False)
    parts["unet"].enable_gradient_checkpointing()
    parts["text_encoder"].gradient_checkpointing_enable()
    stage2 = Stage2(model).train()
    trainable = [p for p in stage2.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW(trainable, lr=2e-6) if optimizer_name == "adamw"
                 else torch.optim.SGD(trainable, lr=2e-6))
    # one pair as the stage's loader gives it, with cached latent moments (the VAE is frozen)
    batch = {"pixels": torch.randn(1, 3, 224, 224), "class_text": ["dog"], "prompt": ["a dog"],
             "moments": torch.stack([torch.randn(1, 4, 64, 64), torch.full((1, 4, 64, 64), 0.01)], 1)}
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    drop = torch.tensor([False])
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss = stage2(batch, drop, torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 4, 64, 64),
                      scheduler)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"seconds_per_step": sum(times[1:]) / steps, "first_step_s": times[0], "build_s": build_s,
            "trained_params_m": sum(p.numel() for p in trainable) / 1e6, "peak_memory_mb": _peak_mb()}


def _child(args) -> None:
    if args.child == "full_size":
        out = child_full_size(args.optimizer, args.steps)
    elif args.child.startswith("finetune"):
        out = child_finetune(Path(args.root), args.steps, 8 if args.child == "finetune_lora" else 0)
    else:
        out = child_stage(args.child, Path(args.root), args.steps)
    print("RESULT " + json.dumps(out))


# ----------------------------------------------------------------------------- parent
def _run_child(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per tiny stage")
    parser.add_argument("--full-size-steps", type=int, default=2)
    parser.add_argument("--skip-full-size", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw", help="full-size step's optimizer")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_tiny:
        tiny_stages(args.steps)
    if not args.skip_full_size:
        r = _run_child("--child", "full_size", "--optimizer", args.optimizer, "--steps", str(args.full_size_steps))
        print(f"full-size stage 2, 512 px, batch 1, fp32 CPU, {args.optimizer}, gradient checkpointing: "
              f"{r['seconds_per_step']:.1f} s/step (first {r['first_step_s']:.1f} s), "
              f"{r['trained_params_m']:.0f} M trained parameters, peak memory {r['peak_memory_mb'] / 1024:.1f} GB "
              f"(building the networks: {r['build_s']:.0f} s)")


def tiny_stages(steps: int) -> None:
    print(f"tiny preset, default synthetic data (params.yaml), {steps} steps per stage")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
        for stage in ("ingest", "context"):
            subprocess.run([sys.executable, "-m", "components.cli", stage], cwd=root, check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        for name, argv in (("pretrain_qformer", ["--child", "pretrain_qformer"]),
                           ("train_subject", ["--child", "train_subject"]),
                           ("finetune (whole UNet)", ["--child", "finetune"]),
                           ("finetune (LoRA rank 8)", ["--child", "finetune_lora"])):
            r = _run_child(*argv, "--root", str(root), "--steps", str(steps))
            print(f"{name:<24} batch {r['batch']:>2}: {r['samples_per_s']:7.1f} samples/s, "
                  f"{1000 * r['seconds_per_step']:6.1f} ms/step, peak memory {r['peak_memory_mb']:6.0f} MB")


if __name__ == "__main__":
    main()
