"""Benchmark of the DreamBench evaluation stage (`blipdiff evaluate`) on the CPU.

Prints:
1. images (texts) per second scored on the CPU, fp32, one batch of `--images`, preprocessing
   included (random 512x512 RGB images, DreamBench CLIP-T texts): the tiny evaluators, and the
   real evaluators' architectures (DINO ViT-S/16, CLIP ViT-B/32) with random weights;
2. seconds per generated image: the tiny preset at its native size with the stage's default
   sampler (50 PNDM steps, guidance 7.5, LAVIS negative prompt, batch 8), and the full-size
   architecture (random weights): one UNet step at 512 px with guidance (batch 2) and one VAE
   decode;
3. the full protocol (30 subjects x 25 prompts x 4 images) extrapolated on this CPU, in hours;
4. the FLOPs of one full-size image (50 guided UNet steps + VAE decode), counted with
   `torch.utils.flop_counter` on the meta device (attention included: SDPA runs its math path,
   batched matmuls, there), and the protocol's time on an H100 at an assumed utilisation.

    python benchmarks/eval_bench.py [--images 16] [--skip-full-size] [--threads N]

Another busy process on the machine slows multi-threaded timings badly (OpenMP threads wait
for each other): the header prints the load average; `--threads 1` is steadier then.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image

from components.core.config import NEGATIVE_PROMPT
from components.evaluation.evaluators import Evaluators, _clip_image_processor, tiny_clip
from components.model.full_size import build_full_size
from components.model.tiny.blip_diffusion import build_tiny

TEXTS = ["a dog in the jungle", "a dog in the snow", "a dog on the beach", "a dog on a cobblestone street",
         "a dog on top of pink fabric", "a dog on top of a wooden floor", "a dog with a city in the background",
         "a dog with a mountain in the background", "a dog with a blue house in the background",
         "a dog on top of a purple rug in a forest", "a dog wearing a red hat", "a dog wearing a santa hat",
         "a dog wearing a rainbow scarf", "a dog wearing a black top hat and a monocle",
         "a dog in a chef outfit", "a dog in a firefighter outfit"]
CONTEXTS = ["in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
            "on top of a wooden floor", "with a city in the background", "with a mountain in the background"]
PROTOCOL_IMAGES = 30 * 25 * 4  # subjects x prompts x images per prompt
REAL_IMAGES = 158  # DreamBench's real images, embedded once (DINO, CLIP-I)
STEPS, GUIDANCE = 50, 7.5
H100_PEAK = 989e12  # dense fp16/bf16 tensor-core FLOP/s, H100 SXM
UTILISATION = 0.40


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rate(fn, n: int, repeats: int = 3) -> float:
    """Items per second: one warm-up call, then the median of `repeats` timed calls."""
    fn()
    return n / statistics.median(timed(fn) for _ in range(repeats))


def real_evaluators(batch: int) -> Evaluators:
    """DINO ViT-S/16 and CLIP ViT-B/32 from their configs, random weights; CLIP takes the tiny
    character-level tokenizer (no hub) and CLIP's own image processor."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    dino = ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                              intermediate_size=1536, image_size=224, patch_size=16, qkv_bias=True,
                              layer_norm_eps=1e-6), add_pooling_layer=False)
    _, tokenizer, _ = tiny_clip(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
                         max_position_embeddings=77, vocab_size=49408, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           image_size=224, patch_size=32),
        projection_dim=512))
    return Evaluators(dino, (clip, tokenizer, _clip_image_processor()), ("ViT-S/16 random", "ViT-B/32 random"),
                      "cpu", batch)


def score_rates(ev: Evaluators, images: list, texts: list[str]) -> dict[str, float]:
    return {"dino": rate(lambda: ev.dino_features(images), len(images)),
            "clip_i": rate(lambda: ev.clip_image_features(images), len(images)),
            "clip_t": rate(lambda: ev.clip_text_features(texts), len(texts))}


def bench_evaluators(n: int) -> dict[str, float]:
    """Scoring rates of the tiny and the real-architecture evaluators; returns the real ones."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(n)]
    texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
    print(f"\n== scoring, CPU fp32, batch {n}, 512x512 RGB images, preprocessing included (median of 3) ==")
    tiny = score_rates(Evaluators.build(None, None, tiny=True, batch_size=n), images, texts)
    ev = real_evaluators(n)
    real = score_rates(ev, images, texts)
    for label, r in (("tiny", tiny), ("real arch, random weights", real)):
        print(f"{label}: DINO image features {r['dino']:8.1f} images/s")
        print(f"{label}: CLIP image features {r['clip_i']:8.1f} images/s")
        print(f"{label}: CLIP text features  {r['clip_t']:8.1f} texts/s")
    tokens = ev.tokenizer(texts, padding=True, return_tensors="pt").input_ids.shape[1]
    print(f"note: the random-weight CLIP uses the tiny character-level tokenizer ({tokens} tokens padded; "
          "CLIP's BPE gives ~10), so its text rate is pessimistic")
    return real


def bench_tiny_generation() -> float:
    model = build_tiny(0)
    size, batch = model.native_size, len(CONTEXTS)
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(4)]
    embeds = model.subject_embeddings(refs, "dog")
    kwargs = dict(negative_prompt=NEGATIVE_PROMPT, guidance_scale=GUIDANCE, height=size, width=size,
                  scheduler="pndm", prompt_strength=1.0, prompt_reps=20)
    model.generate(embeds, CONTEXTS[:2], "dog", [0, 1], num_inference_steps=2, **kwargs)  # warm up
    t = timed(lambda: model.generate(embeds, CONTEXTS, "dog", list(range(batch)),
                                     num_inference_steps=STEPS, **kwargs))
    print(f"\n== generation ==\ntiny preset {size} px, {STEPS} PNDM steps, guidance {GUIDANCE}, batch {batch}: "
          f"{t / batch:.3f} s/image ({t:.2f} s per batch)")
    return t / batch


def bench_full_size() -> tuple[float, float]:
    """Seconds of one guided UNet step (batch 2) and of one VAE decode at 512 px, fp32 CPU."""
    nets = build_full_size("cpu")
    unet, vae = nets["unet"].eval(), nets["vae"].eval()
    del nets
    latents, text, latent1 = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768), torch.randn(1, 4, 64, 64)
    with torch.inference_mode():
        unet(latents, 999, encoder_hidden_states=text)  # warm up
        t_unet = timed(lambda: unet(latents, 999, encoder_hidden_states=text))
        vae.decode(latent1)  # warm up
        t_vae = timed(lambda: vae.decode(latent1))
    print(f"full-size UNet, one step at 512 px (batch 2 = one image with guidance), fp32 CPU: {t_unet:.2f} s")
    print(f"full-size VAE decode, one 512 px image, fp32 CPU: {t_vae:.2f} s")
    per_image = STEPS * t_unet + t_vae
    print(f"full-size image, {STEPS} guided steps + decode, fp32 CPU: {per_image:.0f} s/image")
    return t_unet, t_vae


def extrapolate(rates: dict[str, float], full: tuple[float, float] | None) -> None:
    print(f"\n== full protocol on this CPU: {PROTOCOL_IMAGES} images (30 subjects x 25 prompts x 4), "
          f"{STEPS} steps, guidance ==")
    score_s = ((PROTOCOL_IMAGES + REAL_IMAGES) * (1 / rates["dino"] + 1 / rates["clip_i"])
               + PROTOCOL_IMAGES / rates["clip_t"])
    print(f"scoring (DINO + CLIP-I of {PROTOCOL_IMAGES} + {REAL_IMAGES} real images, CLIP-T of "
          f"{PROTOCOL_IMAGES} texts): {score_s / 3600:.2f} h")
    if full is None:
        print("generation: skipped (--skip-full-size)")
        return
    gen_s = PROTOCOL_IMAGES * (STEPS * full[0] + full[1])
    print(f"generation ({PROTOCOL_IMAGES} x ({STEPS} x UNet step at batch 2 + VAE decode)): {gen_s / 3600:.1f} h "
          f"= {gen_s / 86400:.1f} days")
    print(f"total: {(gen_s + score_s) / 3600:.1f} h (batching images changes little on a CPU: the UNet "
          "is compute-bound already at batch 2)")


class AttentionCount:
    """Hand count of the attention matmuls (QK^T and AV: 4 * B * N * M * inner dim FLOPs) from
    forward pre-hooks on diffusers' `Attention` modules."""

    def __init__(self, module: torch.nn.Module):
        from diffusers.models.attention_processor import Attention

        self.flops = 0
        self.hooks = [m.register_forward_pre_hook(self.hook, with_kwargs=True)
                      for m in module.modules() if isinstance(m, Attention)]

    def hook(self, attn, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        n = x.shape[1] if x.ndim == 3 else x.shape[2] * x.shape[3]
        m = n if ctx is None else ctx.shape[1]
        self.flops += 4 * x.shape[0] * n * m * attn.inner_dim

    def close(self):
        for h in self.hooks:
            h.remove()


def count_flops(module: torch.nn.Module, fn) -> tuple[int, int, int]:
    """(total FLOPs, FLOPs the counter gives attention (bmm or SDPA ops), hand count of attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    hand = AttentionCount(module)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    hand.close()
    return counter.get_total_flops(), attention_flops(counter.get_flop_counts()), hand.flops


def attention_flops(by_module: dict[str, dict]) -> int:
    """The counter's FLOPs of batched matmuls and SDPA ops, less those of the q/k/v/out
    projections (a Linear on a 3-D input can dispatch to bmm as well)."""
    def matmuls(ops: dict) -> int:
        return sum(v for k, v in ops.items() if "bmm" in str(k) or "scaled_dot_product" in str(k))

    projections = sum(matmuls(ops) for name, ops in by_module.items()
                      if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")))
    return matmuls(by_module["Global"]) - projections


def gpu_estimate() -> None:
    device = "meta"
    try:
        nets = build_full_size("meta")
        unet, vae = nets["unet"].eval(), nets["vae"].eval()
        unet_flops = count_flops(unet, lambda: unet(torch.randn(2, 4, 64, 64, device=device), 999,
                                                    encoder_hidden_states=torch.randn(2, 77, 768, device=device)))
        vae_flops = count_flops(vae, lambda: vae.decode(torch.randn(1, 4, 64, 64, device=device)))
    except Exception as exc:  # noqa: BLE001 - a meta-device gap: count on the CPU instead
        print(f"meta device failed ({exc.__class__.__name__}: {exc}); counting on the CPU")
        device = "cpu"
        nets = build_full_size("cpu")
        unet, vae = nets["unet"].eval(), nets["vae"].eval()
        unet_flops = count_flops(unet, lambda: unet(torch.randn(2, 4, 64, 64), 999,
                                                    encoder_hidden_states=torch.randn(2, 77, 768)))
        vae_flops = count_flops(vae, lambda: vae.decode(torch.randn(1, 4, 64, 64)))
    print(f"\n== FLOPs (torch.utils.flop_counter on {device}) and H100 estimate ==")
    totals = []
    for name, (total, attn, hand) in (("UNet forward, batch 2, 64x64 latents", unet_flops),
                                      ("VAE decode, (1,4,64,64) -> 512 px", vae_flops)):
        counted = attn >= 0.9 * hand
        if not counted:  # the CPU's fused SDPA kernel has no flop formula: add the hand count
            total += hand
        totals.append(total)
        print(f"{name}: {total / 1e12:.3f} TFLOP (attention matmuls: counter {attn / 1e9:.1f} GFLOP, "
              f"hand count {hand / 1e9:.1f} GFLOP, {'included by the counter' if counted else 'added by hand'})")
    per_image = STEPS * totals[0] + totals[1]
    protocol = PROTOCOL_IMAGES * per_image
    print(f"per image ({STEPS} guided UNet steps + VAE decode): {per_image / 1e12:.1f} TFLOP")
    print(f"protocol ({PROTOCOL_IMAGES} images): {protocol / 1e15:.0f} PFLOP")
    print(f"H100 SXM at {UTILISATION:.0%} of {H100_PEAK / 1e12:.0f} TFLOP/s (fp16/bf16 dense, assumed "
          f"utilisation): {per_image / (UTILISATION * H100_PEAK):.2f} s/image, "
          f"{protocol / (UTILISATION * H100_PEAK) / 3600:.2f} h for the protocol")
    print(f"H100 SXM at 100% (lower bound): {per_image / H100_PEAK:.3f} s/image, "
          f"{protocol / H100_PEAK / 3600:.2f} h for the protocol")
    print("not counted: text encoding, subject embeddings, scoring (small next to the UNet)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images (and texts) per scoring batch")
    parser.add_argument("--skip-full-size", action="store_true", help="skip the full-size UNet and VAE timings")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; {os.cpu_count()} cores, "
          f"load average {load} at start (other processes slow the timings)")
    rates = bench_evaluators(args.images)
    bench_tiny_generation()
    full = None if args.skip_full_size else bench_full_size()
    extrapolate(rates, full)
    gpu_estimate()
    print(f"\nload average {', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
