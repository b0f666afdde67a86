"""Benchmark of ControlNet-guided generation: what the ControlNet costs per denoising step.

Prints, on the CPU:
- the tiny preset (64 px, batch 2 with guidance = 4 UNet rows): seconds per step of plain
  generation and of ControlNet generation (torch), and their ratio;
- the full-size architecture (SD 1.5 UNet + its ControlNet, random weights) at 512 px,
  batch 2 (guidance: 4 rows): one UNet call against one ControlNet + UNet-with-residuals call;
- the exported pair on ONNX Runtime (CPU, fp32) against torch for the tiny model: seconds per
  step with control, and the largest image difference;
and on a CUDA GPU with TensorRT (when there is one): the same pair as TensorRT engines
(`--tensorrt`, built from a temporary export's fp16 graphs).

    python benchmarks/controlnet_bench.py [--steps 10] [--skip-full-size] [--tensorrt]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from components.model.controlnet import Control, control_pixels
from components.model.tiny.blip_diffusion import build_tiny
from components.model.tiny.controlnet import build_tiny_controlnet

PROMPTS = ["in the jungle", "on the beach"]


def timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def tiny_pair(steps: int, size: int = 64):
    model = build_tiny(seed=0, image_size=size)
    model.controlnets.append(build_tiny_controlnet(model, seed=1))
    embeds = torch.randn(1, 16, model.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    edges = [(rng.random((size, size, 3)) > 0.85).astype(np.uint8) * 255 for _ in PROMPTS]
    control = Control([control_pixels(edges, size, size)], [1.0])
    kw = dict(num_inference_steps=steps, height=size, width=size, guidance_scale=7.5)
    return model, embeds, control, kw


def tiny_cpu(steps: int) -> None:
    model, embeds, control, kw = tiny_pair(steps)
    model.generate(embeds, PROMPTS, "dog", [0, 1], **{**kw, "num_inference_steps": 2}, control=control)  # warm up
    plain = timed(lambda: model.generate(embeds, PROMPTS, "dog", [0, 1], **kw), 3) / steps
    guided = timed(lambda: model.generate(embeds, PROMPTS, "dog", [0, 1], control=control, **kw), 3) / steps
    print(f"tiny 64 px, batch 2 (4 UNet rows), torch CPU: plain {plain * 1e3:.1f} ms/step, ControlNet "
          f"{guided * 1e3:.1f} ms/step ({guided / plain:.2f}x)")


def full_size_cpu() -> None:
    from diffusers import ControlNetModel

    from components.model.full_size import build_full_size

    unet = build_full_size("cpu")["unet"].eval()
    net = ControlNetModel.from_unet(unet).eval()
    latents, text = torch.randn(4, 4, 64, 64), torch.randn(4, 77, 768)
    cond = torch.rand(4, 3, 512, 512)
    with torch.inference_mode():
        unet(latents, 999, encoder_hidden_states=text)  # warm up
        plain = timed(lambda: unet(latents, 999, encoder_hidden_states=text))

        def controlled():
            down, mid = net(latents, 999, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
            unet(latents, 999, encoder_hidden_states=text, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)

        guided = timed(controlled)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"full size 512 px, batch 2 (4 UNet rows), torch CPU fp32: UNet {plain:.1f} s/step, ControlNet + UNet "
          f"{guided:.1f} s/step ({guided / plain:.2f}x); ControlNet {params:.0f} M parameters")


def exported(steps: int, tensorrt: bool) -> None:
    from components.core.io import write_json
    from components.export import onnx_export, parity
    from components.stages import export as stage
    from serving.generator import Generator

    model, embeds, control, kw = tiny_pair(steps)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "onnx"
        folder.mkdir()
        graphs = onnx_export.export_all(model, folder, opset=18, batch=2, fp16=tensorrt)
        parity.gate(parity.check_parity(model, folder, graphs, batch=3))
        files = stage.write_serving_files(model, folder)
        write_json(stage.manifest(model, types.SimpleNamespace(opset=18), "preset tiny", "preset:tiny:seed0",
                                  graphs, files, {"source": "tiny controlnet", "hash": None}), folder / "export.json")
        ref = model.generate(embeds, PROMPTS, "dog", [0, 1], control=control, **kw)
        torch_s = timed(lambda: model.generate(embeds, PROMPTS, "dog", [0, 1], control=control, **kw), 3) / steps
        backends = [("onnxruntime", {"dtype": "fp32", "providers": ["CPUExecutionProvider"]})]
        if tensorrt:
            backends.append(("tensorrt", {"engine_dir": Path(tmp) / "engines", "build_engines": True,
                                          "trt_profile": "dynamic"}))
        for backend, options in backends:
            gen = Generator.load(folder, backend=backend, **options)
            out = gen.generate(embeds, PROMPTS, "dog", [0, 1], control=control, **kw)
            seconds = timed(lambda: gen.generate(embeds, PROMPTS, "dog", [0, 1], control=control, **kw), 3) / steps
            print(f"tiny 64 px ControlNet, batch 2: {backend} ({gen.provider}) {seconds * 1e3:.1f} ms/step vs torch "
                  f"CPU {torch_s * 1e3:.1f} ms/step; max image difference {np.abs(out - ref).max() * 255:.2f}/255")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-full-size", action="store_true")
    parser.add_argument("--tensorrt", action="store_true", help="also TensorRT engines (needs a CUDA GPU)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} PNDM steps, guidance 7.5")
    tiny_cpu(args.steps)
    exported(args.steps, args.tensorrt)
    if not args.skip_full_size:
        full_size_cpu()


if __name__ == "__main__":
    main()
