"""Benchmark of subject-driven editing (`blipdiff edit`): what an edit costs against generation.

Prints, on the CPU:
- the default profile's model (models/blip_diffusion when `dvc repro` made it, else the tiny
  preset) at its native size, 50 steps: seconds for one generated image, one edit of a
  generated source, one edit of a photo (DDIM inversion included), and their ratios;
- the full-size architecture (SD 1.5 UNet, random weights) at 512 px: one UNet call of
  generation (1 image, 2 rows with guidance) against one call of an edit (4 rows) with the
  prompt-to-prompt processors acting (cross-attention refined, self-attention replaced);
- the attention memory of a full-size 512 px edit, computed from the UNet's config: LAVIS's
  layout (explicit probabilities in every layer, its attention store) against this one
  (explicit probabilities only for cross-attention, and only where the edit needs them);
- half precision: bf16 against fp32 (mean absolute image difference) for both modes;
and on a CUDA GPU (when there is one): time and peak memory of a full-size 512 px edit in fp16.

    python benchmarks/edit_bench.py [--steps 50] [--skip-full-size]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from components.model import editing
from components.model.editing import Edit, EditSettings

GiB = 2 ** 30


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def photo(h: int = 300, w: int = 400) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, ((xx // 40 + yy // 40) % 2) * 200], -1).astype(np.uint8)


def default_model(dtype=torch.float32):
    from components.model import presets

    folder = Path("models/blip_diffusion")
    source = {"checkpoint": str(folder)} if (folder / "model_index.json").is_file() else {"preset": "tiny", "seed": 0}
    return presets.from_base(source).to("cpu", dtype), source


def tiny(steps: int) -> None:
    model, source = default_model()
    size = model.native_size
    torch.manual_seed(0)
    embeds = torch.randn(1, model.qformer.config.num_query_tokens, model.text_encoder.config.hidden_size)
    settings = EditSettings(steps=steps, height=size, width=size)
    gen = lambda: model.generate(embeds, ["on a striped background"], "toy", [0], num_inference_steps=steps,  # noqa: E731
                                 height=size, width=size, prompt_reps=1)
    gen()  # warm up
    t_gen = timed(gen)
    t_edit = timed(lambda: editing.edit(model, embeds, [Edit("on a striped background", "pillow", "toy")], settings))
    t_real = timed(lambda: editing.edit(model, embeds, [Edit("on a striped background", "pillow", "toy",
                                                             photo=photo())], settings))
    four = [Edit("on a striped background", "pillow", "toy", seed=s) for s in range(4)]
    t_four = timed(lambda: editing.edit(model, embeds, four, settings))
    print(f"{source}: {size} px, {steps} steps, torch CPU fp32: generate {t_gen:.2f} s, edit (generated source) "
          f"{t_edit:.2f} s ({t_edit / t_gen:.2f}x), edit (photo, inversion included) {t_real:.2f} s "
          f"({t_real / t_gen:.2f}x); 4 edits in one batch {t_four:.2f} s ({t_four / 4 / t_edit:.2f}x per edit)")


def half_precision(steps: int) -> None:
    full, _ = default_model(torch.float32)
    half, _ = default_model(torch.bfloat16)
    size = full.native_size
    torch.manual_seed(0)
    embeds = torch.randn(1, full.qformer.config.num_query_tokens, full.text_encoder.config.hidden_size)
    settings = EditSettings(steps=steps, height=size, width=size, blend_threshold=0.8)  # the default profile's
    for name, e in (("generated", Edit("on a striped background", "pillow", "toy", seed=1)),
                    ("photo", Edit("on a striped background", "pillow", "toy", photo=photo()))):
        a = editing.edit(full, embeds, [e], settings)
        b = editing.edit(half, embeds.to(torch.bfloat16), [e], settings)
        print(f"bf16 vs fp32, {name}: source {np.abs(a.sources - b.sources).mean():.4f}, edited "
              f"{np.abs(a.edited - b.edited).mean():.4f} mean |difference| (images in [0, 1]); masks differ on "
              f"{(a.masks != b.masks).mean():.1%} of pixels")
    g = [m.generate(x, ["on a striped background"], "toy", [1], num_inference_steps=steps, height=size, width=size,
                    prompt_reps=1) for m, x in ((full, embeds), (half, embeds.to(torch.bfloat16)))]
    print(f"bf16 vs fp32, plain generation: {np.abs(g[0] - g[1]).mean():.4f}")


def attention_memory(unet_config: dict, height: int, width: int, edits: int = 1, itemsize: int = 2,
                     text_length: int = 77) -> dict[str, float]:
    """Bytes of attention probabilities for one edit's UNet call, per layout.

    LAVIS: every layer computes its probabilities explicitly (scores and softmax output,
    (4E x heads, q, k) each) and its attention store keeps, per layer with q <= 32**2, the
    probabilities of the step being run and their running sum (views of the whole (4E x heads)
    tensor, so the whole tensor stays alive). Here: only cross-attention layers (k = 77)
    compute probabilities, self-attention runs as SDPA (no q x q tensor), and the blend store
    is one (E, q) float32 sum.
    """
    factor = 8
    h, w = height // factor, width // factor
    channels = unet_config["block_out_channels"]
    layers = []  # (q, heads, cross)
    n = len(channels)
    for i, kind in enumerate(unet_config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            q = (h >> i) * (w >> i)
            layers += [(q, i)] * unet_config["layers_per_block"]
    mid_q = (h >> (n - 1)) * (w >> (n - 1))
    layers.append((mid_q, n - 1))
    for i, kind in enumerate(unet_config["up_block_types"]):
        if kind.startswith("CrossAttn"):
            level = n - 1 - i
            q = (h >> level) * (w >> level)
            layers += [(q, level)] * (unet_config["layers_per_block"] + 1)
    heads = unet_config["attention_head_dim"]  # diffusers reads SD 1.5's attention_head_dim as the heads (8)
    rows = 4 * edits
    biggest = max(q for q, _ in layers)
    lavis_transient = 2 * rows * heads * biggest * biggest * itemsize  # scores + probabilities
    store = 0
    for q, _ in layers:
        if q <= 32 ** 2:
            store += rows * heads * (q * q + q * text_length) * itemsize  # self + cross, whole tensors
    lavis_store = 2 * store  # the step's maps and the running sum
    ours_transient = 2 * rows * heads * biggest * text_length * itemsize  # cross-attention scores + probs
    ours_store = edits * min(q for q, lv in layers if lv < n - 1) * 4  # the blend maps (16x16 at 512 px)
    return {"lavis_transient": lavis_transient, "lavis_store": lavis_store, "ours_transient": ours_transient,
            "ours_store": ours_store}


def full_size_cpu() -> None:
    from components.model.full_size import build_full_size, full_size_configs

    unet = build_full_size("cpu")["unet"].eval()
    latents2, text2 = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    latents4, text4 = torch.randn(4, 4, 64, 64), torch.randn(4, 77, 768)
    settings = EditSettings(steps=50)
    length = 77
    mapper, alphas = editing.align_tokens([0, 5, 7, 8, 1], [0, 5] + [-1] * 16 + [6, 8, 1], length)
    weights = torch.zeros(1, length)
    weights[0, 2] = 1
    with torch.inference_mode():
        unet(latents2, 999, encoder_hidden_states=text2)  # warm up
        t_gen = timed(lambda: unet(latents2, 999, encoder_hidden_states=text2))
        t_gen4 = timed(lambda: unet(latents4, 999, encoder_hidden_states=text4))
        controller = editing.Controller(1, mapper[None], alphas[None], weights, settings, (64, 64),
                                        editing.blend_factor(unet), torch.device("cpu"))
        controller.begin(0)
        with editing.attention_control(unet, controller):
            t_edit = timed(lambda: unet(latents4, 999, encoder_hidden_states=text4))
    print(f"full size 512 px, one UNet call, torch CPU fp32: generation (1 image, 2 rows) {t_gen:.1f} s, "
          f"4 rows without editing {t_gen4:.1f} s, an edit (4 rows, refine + self-replace + blend store) "
          f"{t_edit:.1f} s: {t_edit / t_gen:.2f}x a generated image's step, {t_edit / t_gen4:.2f}x the same rows")
    mem = attention_memory(full_size_configs()["unet"], 512, 512)
    print(f"attention memory of one full-size 512 px edit (fp16): LAVIS {mem['lavis_transient'] / GiB:.2f} GiB "
          f"transient (largest layer's scores + probabilities) + {mem['lavis_store'] / GiB:.2f} GiB attention store; "
          f"here {mem['ours_transient'] / GiB * 1024:.1f} MiB transient + {mem['ours_store'] / 1024:.1f} KiB blend store")


def full_size_gpu() -> None:
    from components.model.full_size import build_full_size

    unet = build_full_size("cuda")["unet"].to(torch.float16).eval()
    latents4 = torch.randn(4, 4, 64, 64, device="cuda", dtype=torch.float16)
    text4 = torch.randn(4, 77, 768, device="cuda", dtype=torch.float16)
    length = 77
    mapper, alphas = editing.align_tokens([0, 5, 7, 8, 1], [0, 5] + [-1] * 16 + [6, 8, 1], length)
    weights = torch.zeros(1, length)
    weights[0, 2] = 1
    with torch.inference_mode():
        unet(latents4, 999, encoder_hidden_states=text4)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        unet(latents4, 999, encoder_hidden_states=text4)
        torch.cuda.synchronize()
        plain, plain_mem = time.perf_counter() - t0, torch.cuda.max_memory_allocated()
        controller = editing.Controller(1, mapper[None], alphas[None], weights, EditSettings(steps=50), (64, 64),
                                        editing.blend_factor(unet), torch.device("cuda"))
        controller.begin(0)
        with editing.attention_control(unet, controller):
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            unet(latents4, 999, encoder_hidden_states=text4)
            torch.cuda.synchronize()
            edit, edit_mem = time.perf_counter() - t0, torch.cuda.max_memory_allocated()
    print(f"GPU {torch.cuda.get_device_name()}, full size 512 px fp16, one call of 4 rows: plain {plain * 1e3:.0f} ms, "
          f"{plain_mem / GiB:.2f} GiB peak; edit {edit * 1e3:.0f} ms, {edit_mem / GiB:.2f} GiB peak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--skip-full-size", action="store_true")
    args = parser.parse_args()
    tiny(args.steps)
    half_precision(args.steps)
    if not args.skip_full_size:
        full_size_cpu()
    if torch.cuda.is_available():
        full_size_gpu()


if __name__ == "__main__":
    main()
