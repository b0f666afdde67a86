"""Benchmark of zero-shot generation on the CPU.

Prints: tiny-preset images/s at 64 and 128 px for batch 1 and batch 8; 8 prompts in one
batched call against the same 8 prompts one by one (the reference pipeline's way); and one
UNet step of the full-size architecture (random weights) at 512 px, with guidance (batch 2).

    python benchmarks/generate_bench.py [--steps 10] [--skip-full-size]
"""

from __future__ import annotations

import argparse
import time

import torch

from components.model.full_size import build_full_size
from components.model.tiny.blip_diffusion import build_tiny

PROMPTS = ["in the jungle", "in the snow", "on the beach", "on a cobblestone street",
           "on top of pink fabric", "on top of a wooden floor", "with a city in the background",
           "with a mountain in the background"]


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-full-size", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} PNDM steps, guidance 7.5")

    for size in (64, 128):
        model = build_tiny(seed=0, image_size=size)
        embeds = torch.randn(1, 16, model.text_encoder.config.hidden_size)
        model.generate(embeds, ["warm up"], "dog", [0], num_inference_steps=2, height=size, width=size)
        for batch in (1, 8):
            t = timed(lambda: model.generate(embeds, PROMPTS[:batch], "dog", list(range(batch)),
                                             num_inference_steps=args.steps, height=size, width=size))
            print(f"tiny {size:>3} px, batch {batch}: {batch / t:6.2f} images/s ({t:.2f} s)")
        if size == 64:
            batched = timed(lambda: model.generate(embeds, PROMPTS, "dog", list(range(8)),
                                                   num_inference_steps=args.steps, height=size, width=size))
            single = timed(lambda: [model.generate(embeds, [p], "dog", [i], num_inference_steps=args.steps,
                                                   height=size, width=size) for i, p in enumerate(PROMPTS)])
            print(f"8 prompts at 64 px: one batched call {batched:.2f} s, one by one {single:.2f} s "
                  f"({single / batched:.1f}x)")

    if not args.skip_full_size:
        unet = build_full_size("cpu")["unet"].eval()
        latents = torch.randn(2, 4, 64, 64)
        text = torch.randn(2, 77, 768)
        with torch.inference_mode():
            unet(latents, 999, encoder_hidden_states=text)  # warm up
            t = timed(lambda: unet(latents, 999, encoder_hidden_states=text))
        print(f"full-size UNet, one step at 512 px (batch 2, guidance), fp32 CPU: {t:.2f} s")


if __name__ == "__main__":
    main()
