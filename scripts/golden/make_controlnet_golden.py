"""Generate golden reference outputs from diffusers' BlipDiffusionControlNetPipeline.

Builds the tiny seeded BLIP-Diffusion checkpoint of ``make_golden.py`` (its ``released``
build, which is deterministic), adds a tiny ``ControlNetModel`` made with
``ControlNetModel.from_unet`` whose zero-initialised layers are re-drawn with seeded noise,
saves it in the layout of the released ``Salesforce/blipdiffusion-controlnet`` checkpoint,
runs the reference ``BlipDiffusionControlNetPipeline`` (diffusers 0.32.2) on it and writes
the tensors a reimplementation must reproduce.

Run from the repository root, in the reference environment (see scripts/golden/README.md):

    /work/refenv/bin/python scripts/golden/make_controlnet_golden.py            # tests/fixtures/golden_controlnet/
    /work/refenv/bin/python scripts/golden/make_controlnet_golden.py --out DIR
    /work/refenv/bin/python scripts/golden/make_controlnet_golden.py --check-determinism

Outputs (in --out, default tests/fixtures/golden_controlnet/)
-------------------------------------------------------------
* ``blipdiffusion-controlnet-tiny/``  checkpoint: the same folders as
  ``tests/fixtures/golden/blipdiffusion-tiny/`` (base weights byte-for-byte identical, checked)
  plus ``controlnet/``; ``model_index.json`` with ``mean``/``std`` null (the pipeline's
  defaults), so the image processor's own (CLIP) mean/std apply.
* ``golden.safetensors``  reference tensors (GOLDEN_TENSORS below).
* ``inputs.json``         every input, ControlNet config, seeds, versions, tensor checksums.
* ``reference.png``       the subject image (the same as tests/fixtures/golden/reference.png).
* ``control.png``         the 48x40 condition image (resized by the pipeline to 64x64).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_golden as mg  # noqa: E402  (sets the offline env variables before diffusers is imported)

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import PIL.Image  # noqa: E402
import PIL.ImageDraw  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import ControlNetModel, PNDMScheduler  # noqa: E402
from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline  # noqa: E402
from diffusers.pipelines.controlnet.pipeline_controlnet_blip_diffusion import (  # noqa: E402
    BlipDiffusionControlNetPipeline,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO_ROOT = mg.REPO_ROOT
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "golden_controlnet"
CKPT_NAME = "blipdiffusion-controlnet-tiny"
BASE_GOLDEN = REPO_ROOT / "tests" / "fixtures" / "golden"  # released variant of make_golden.py
BASE_CKPT = BASE_GOLDEN / mg.CKPT_NAME
BASE_SUBFOLDERS = ("qformer", "text_encoder", "tokenizer", "unet", "vae", "scheduler", "image_processor")

CONTROLNET_SEED = mg.SEED + 40  # torch.manual_seed before ControlNetModel.from_unet
REDRAW_SEED = mg.SEED + 41  # generator for the re-drawn zero-initialised layers
REDRAW_STD = 0.1  # controlnet_down_blocks.*, controlnet_mid_block (1x1 convs)
# controlnet_cond_embedding.conv_out: larger, so the condition embedding (std ~0.9) is of the size of
# conv_in(latents) (std ~0.6) it is added to; with 0.1 the control image hardly mattered
COND_OUT_STD = 1.0
# two entries: one stride-2 conv -> the condition is down-sampled by 2 == the VAE's scale factor
COND_EMBEDDING_CHANNELS = (8, 16)
ZERO_INIT_PREFIXES = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
MIN_CONTROLNET_EFFECT = 0.05  # max |image_with - image_without| must exceed this
MIN_CONTROL_CONTENT_EFFECT = 0.005  # max |image(control.png) - image(black control)| must exceed this

CONTROL_SIZE_WH = (48, 40)
PIPE_INPUTS = dict(mg.PIPE_INPUTS)  # same prompt/seeds/steps/guidance/sizes as the released golden

GOLDEN_TENSORS = {
    "control_image": "prepare_control_image(control.png): BlipImageProcessor resize to (64,64) bicubic, "
    "rescale 1/255, no normalisation, no centre crop; torch.cat([img]*2) for guidance, (2,3,64,64) float32",
    "text_embeds": "encoder_hidden_states of the ControlNet and the UNet (the same at every step), "
    "cat([uncond, cond]), (2,77,32)",
    "init_latents": "randn((1,4,32,32), generator=Generator().manual_seed(0)) * init_noise_sigma(=1)",
    "timesteps": "scheduler.timesteps after set_timesteps(3) (PNDM/PLMS repeats one: 4 entries)",
    "controlnet_down_t0_{i}": "ControlNet down_block_res_samples[i] at timesteps[0] (both guidance halves: "
    "row 0 uncond, row 1 cond), as the UNet receives them",
    "controlnet_mid_t0": "ControlNet mid_block_res_sample at timesteps[0], (2,32,16,16)",
    "unet_noise_pred_t0": "unet(cat([init_latents]*2), timesteps[0], text_embeds, residuals).sample, (2,4,32,32)",
    "unet_noise_pred_t0_guided": "uncond + 7.5 * (cond - uncond) of the above, (1,4,32,32)",
    "latents_per_step": "scheduler.step(...).prev_sample after every step, (4,1,4,32,32)",
    "final_latents": "latents fed to vae.decode (before / scaling_factor), (1,4,32,32)",
    "image": "pipeline output, output_type='np', (1,64,64,3) float32 in [0,1]",
    "image_without_controlnet": "BlipDiffusionPipeline (same components, no ControlNet) on the same inputs, "
    "(1,64,64,3) float32",
}


# --------------------------------------------------------------------------------------
# Inputs and model construction
# --------------------------------------------------------------------------------------
def make_control_image() -> PIL.Image.Image:
    """Deterministic 48x40 (w x h) RGB edge-like drawing; the channels differ, so an RGB/BGR
    mix-up shows, and the size is not the output size, so the resize is exercised."""
    img = PIL.Image.new("RGB", CONTROL_SIZE_WH, (0, 0, 0))
    d = PIL.ImageDraw.Draw(img)
    d.rectangle((4, 3, 21, 17), outline=(255, 255, 255), width=1)
    d.ellipse((24, 6, 43, 29), outline=(255, 64, 0), width=2)
    d.line((0, 39, 47, 20), fill=(0, 255, 128), width=1)
    d.polygon([(6, 36), (16, 22), (26, 36)], outline=(64, 128, 255))
    d.line((30, 2, 46, 2), fill=(200, 200, 40), width=1)
    d.point([(2, 30), (40, 36), (45, 10)], fill=(255, 255, 255))
    return img


@torch.no_grad()
def redraw_zero_layers_(controlnet: ControlNetModel, seed: int, std: float, cond_out_std: float) -> list[str]:
    """Replace every zero-initialised parameter (the 1x1 output convs: N(0, std); the condition
    embedding's last conv: N(0, cond_out_std)) with seeded noise, one generator, parameters in
    sorted-name order; returns the names, in draw order."""
    gen = torch.Generator().manual_seed(seed)
    names = []
    for name, p in sorted(controlnet.named_parameters(), key=lambda kv: kv[0]):
        if name.startswith(ZERO_INIT_PREFIXES):
            assert torch.count_nonzero(p) == 0, f"{name} was expected to be zero-initialised"
            s = cond_out_std if name.startswith("controlnet_cond_embedding.") else std
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * s)
            names.append(name)
    # every parameter left at exactly zero would make its contribution vanish
    zero = [n for n, p in controlnet.named_parameters() if torch.count_nonzero(p) == 0]
    assert not zero, f"parameters still all-zero: {zero}"
    return names


def build_controlnet_pipeline(work: Path):
    base = mg.build_pipeline(work, "released")
    vae_factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    assert 2 ** (len(COND_EMBEDDING_CHANNELS) - 1) == vae_factor, \
        "the condition embedding must downsample by the VAE factor"
    torch.manual_seed(CONTROLNET_SEED)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=COND_EMBEDDING_CHANNELS)
    redrawn = redraw_zero_layers_(controlnet, REDRAW_SEED, REDRAW_STD, COND_OUT_STD)
    pipe = BlipDiffusionControlNetPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        unet=base.unet,
        scheduler=base.scheduler,
        qformer=base.qformer,
        controlnet=controlnet,
        image_processor=base.image_processor,
        ctx_begin_pos=base.config.ctx_begin_pos,
        # mean / std left at their defaults (None), as the released controlnet checkpoint
    )
    return pipe, redrawn


def check_base_identical(ckpt_dir: Path, base_dir: Path) -> dict:
    """The base networks must be the released golden's, byte for byte (tensors compared)."""
    if not base_dir.is_dir():
        raise SystemExit(f"missing {base_dir}: run scripts/golden/make_golden.py first")
    report = {}
    for sub in BASE_SUBFOLDERS:
        a_files = sorted(p.relative_to(ckpt_dir / sub) for p in (ckpt_dir / sub).rglob("*") if p.is_file())
        b_files = sorted(p.relative_to(base_dir / sub) for p in (base_dir / sub).rglob("*") if p.is_file())
        if a_files != b_files:
            raise SystemExit(f"{sub}/: file lists differ: {a_files} vs {b_files}")
        for rel in a_files:
            fa, fb = ckpt_dir / sub / rel, base_dir / sub / rel
            if rel.suffix == ".safetensors":
                ta, tb = load_file(str(fa)), load_file(str(fb))
                if ta.keys() != tb.keys():
                    raise SystemExit(f"{sub}/{rel}: tensor names differ from {fb}")
                bad = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
                if bad:
                    raise SystemExit(f"{sub}/{rel}: {len(bad)} tensors differ from {fb}, e.g. {bad[:5]}")
                report[f"{sub}/{rel}"] = f"{len(ta)} tensors equal"
            elif fa.read_bytes() != fb.read_bytes():
                raise SystemExit(f"{sub}/{rel} differs from {fb}")
            else:
                report[f"{sub}/{rel}"] = "bytes equal"
    return report


# --------------------------------------------------------------------------------------
# Golden generation
# --------------------------------------------------------------------------------------
@torch.no_grad()
def run_reference(ckpt_dir: Path, ref_png: Path, control_png: Path, bert_vocab: Path):
    with mg._PatchedBertFromPretrained(bert_vocab):
        pipe = BlipDiffusionControlNetPipeline.from_pretrained(str(ckpt_dir))
    assert pipe.config.mean is None and pipe.config.std is None
    assert list(pipe.image_processor.image_mean) == mg.CLIP_MEAN
    assert list(pipe.image_processor.image_std) == mg.CLIP_STD
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    for name in ("qformer", "text_encoder", "unet", "vae", "controlnet"):
        m = getattr(pipe, name)
        m.eval()
        assert not any(mod.training for mod in m.modules()), name

    ref_image = PIL.Image.open(ref_png).convert("RGB")
    ref_image.load()
    control_image = PIL.Image.open(control_png).convert("RGB")
    control_image.load()
    p = PIPE_INPUTS

    # ---------------- capture what the pipeline computes ----------------
    cap: dict[str, list] = {"controlnet": [], "unet": [], "step": [], "decode": []}

    def cn_hook(m, args, kwargs, out):
        down, mid = out
        cap["controlnet"].append((args, kwargs, [d.clone() for d in down], mid.clone(), out))

    def unet_hook(m, args, kwargs, out):
        cap["unet"].append((args, kwargs, out["sample"].clone()))

    hooks = [pipe.controlnet.register_forward_hook(cn_hook, with_kwargs=True),
             pipe.unet.register_forward_hook(unet_hook, with_kwargs=True)]
    scale_calls = []
    orig_scale = pipe.scheduler.scale_model_input
    pipe.scheduler.scale_model_input = lambda s, *a, **kw: (scale_calls.append(1), orig_scale(s, *a, **kw))[1]

    with mg.recorded_steps_and_decode(pipe, cap):
        image = mg.call_pipeline(pipe, ref_image, control_image)

    for h in hooks:
        h.remove()
    pipe.scheduler.scale_model_input = orig_scale

    assert isinstance(image, np.ndarray) and image.dtype == np.float32, (type(image), getattr(image, "dtype", None))
    assert image.shape == (1, p["height"], p["width"], 3), image.shape
    image_t = torch.from_numpy(np.ascontiguousarray(image))

    # ---------------- recompute through the pipeline internals ----------------
    pixel_values = pipe.image_processor.preprocess(
        ref_image, image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt")["pixel_values"]
    built = pipe._build_prompt(prompts=p["prompt"], tgt_subjects=p["target_subject_category"],
                               prompt_strength=p["prompt_strength"], prompt_reps=p["prompt_reps"])
    query_embeds = pipe.get_query_embeddings(pixel_values, p["source_subject_category"])
    text_embeds_cond = pipe.encode_prompt(query_embeds, built, torch.device("cpu"))
    ids_uncond = pipe.tokenizer([p["neg_prompt"]] * len(p["prompt"]), padding="max_length",
                                max_length=pipe.text_encoder.text_model.config.max_position_embeddings,
                                return_tensors="pt").input_ids
    text_embeds_uncond = pipe.text_encoder(input_ids=ids_uncond, ctx_embeddings=None)[0]
    emb = torch.cat([text_embeds_uncond, text_embeds_cond])

    scale_down = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    latent_shape = (len(p["prompt"]), pipe.unet.config.in_channels, p["height"] // scale_down, p["width"] // scale_down)
    init_latents = randn_tensor(latent_shape, generator=torch.Generator().manual_seed(p["generator_seed"]),
                                device=torch.device("cpu"), dtype=torch.float32) * pipe.scheduler.init_noise_sigma
    sched = PNDMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(p["num_inference_steps"])
    timesteps = sched.timesteps.clone()

    cond_image = pipe.prepare_control_image(control_image, width=p["width"], height=p["height"],
                                            batch_size=len(p["prompt"]), num_images_per_prompt=1,
                                            device=torch.device("cpu"), dtype=pipe.controlnet.dtype,
                                            do_classifier_free_guidance=True)
    latent_in = torch.cat([init_latents] * 2)
    down, mid = pipe.controlnet(latent_in, timesteps[0], encoder_hidden_states=emb,
                                controlnet_cond=cond_image, return_dict=False)
    noise_pred_t0 = pipe.unet(latent_in, timestep=timesteps[0], encoder_hidden_states=emb,
                              down_block_additional_residuals=down, mid_block_additional_residual=mid)["sample"]
    u, c = noise_pred_t0.chunk(2)
    noise_pred_t0_guided = u + p["guidance_scale"] * (c - u)

    # ---------------- cross-check against what the pipeline did ----------------
    n = len(timesteps)
    assert len(cap["controlnet"]) == n and len(cap["unet"]) == n and len(cap["step"]) == n, \
        (len(cap["controlnet"]), len(cap["unet"]), len(cap["step"]))
    assert [s[1] for s in cap["step"]] == [int(t) for t in timesteps]
    for i in range(n):
        c_args, c_kw, c_down, c_mid, c_out = cap["controlnet"][i]
        u_args, u_kw, _ = cap["unet"][i]
        # the same text embeddings (same object) reach the ControlNet and the UNet at every step
        assert c_kw["encoder_hidden_states"] is u_kw["encoder_hidden_states"], i
        assert torch.equal(c_kw["encoder_hidden_states"], emb), f"text embeds differ at step {i}"
        assert torch.equal(c_kw["controlnet_cond"], cond_image), f"control image differs at step {i}"
        assert c_args[0] is u_args[0] and int(c_args[1]) == int(u_kw["timestep"]) == int(timesteps[i])
        # the residuals the UNet receives are the ControlNet's outputs, unscaled
        assert u_kw["down_block_additional_residuals"] is c_out[0]
        assert u_kw["mid_block_additional_residual"] is c_out[1]
        assert "conditioning_scale" not in c_kw and "guess_mode" not in c_kw
    c_args0, _, c_down0, c_mid0, _ = cap["controlnet"][0]
    assert torch.equal(c_args0[0], latent_in), "initial latents differ"
    assert len(c_down0) == len(down) and all(torch.equal(a, b) for a, b in zip(c_down0, down)), "down residuals differ"
    assert torch.equal(c_mid0, mid), "mid residual differs"
    assert torch.equal(cap["unet"][0][2], noise_pred_t0), "unet noise pred differs"
    assert torch.equal(cap["step"][0][0], noise_pred_t0_guided), "guided noise pred differs"
    assert len(cap["decode"]) == 1
    final_latents = cap["step"][-1][2]
    assert torch.equal(cap["decode"][0], final_latents / pipe.vae.config.scaling_factor)
    img2 = pipe.vae.decode(final_latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    assert torch.equal((img2 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), image_t)

    # ---------------- the same inputs through the plain pipeline ----------------
    plain = BlipDiffusionPipeline(**{k: v for k, v in pipe.components.items() if k != "controlnet"},
                                  ctx_begin_pos=pipe.config.ctx_begin_pos, mean=None, std=None)
    plain.set_progress_bar_config(disable=True)
    image_plain = torch.from_numpy(np.ascontiguousarray(mg.call_pipeline(plain, ref_image)))
    max_diff = float((image_t - image_plain).abs().max())
    mean_diff = float((image_t - image_plain).abs().mean())
    print(f"max |image - image_without_controlnet| = {max_diff:.4f} (mean {mean_diff:.4f})")
    assert max_diff > MIN_CONTROLNET_EFFECT, f"the ControlNet barely changes the image: {max_diff}"
    # the condition's content must matter too (a black image of the same size instead)
    black = PIL.Image.new("RGB", control_image.size)
    image_blank = torch.from_numpy(np.ascontiguousarray(mg.call_pipeline(pipe, ref_image, black)))
    blank_diff = float((image_t - image_blank).abs().max())
    print(f"max |image - image with a black control image| = {blank_diff:.4f}")
    assert blank_diff > MIN_CONTROL_CONTENT_EFFECT, f"the control image barely matters: {blank_diff}"
    base_golden = BASE_GOLDEN / "golden.safetensors"
    plain_equals_golden = None
    if base_golden.is_file():
        plain_equals_golden = bool(torch.equal(load_file(str(base_golden))["image"], image_plain))
        if not plain_equals_golden:
            print(f"WARNING: image_without_controlnet != {base_golden} 'image'", file=sys.stderr)

    tensors = {
        "control_image": cond_image,
        "text_embeds": emb,
        "init_latents": init_latents,
        "timesteps": timesteps.to(torch.int64),
        **{f"controlnet_down_t0_{i}": d for i, d in enumerate(down)},
        "controlnet_mid_t0": mid,
        "unet_noise_pred_t0": noise_pred_t0,
        "unet_noise_pred_t0_guided": noise_pred_t0_guided,
        "latents_per_step": torch.stack([s[2] for s in cap["step"]]),
        "final_latents": final_latents,
        "image": image_t,
        "image_without_controlnet": image_plain,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for k, v in tensors.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), k

    info = {
        "built_prompt": built,
        "latent_shape": list(latent_shape),
        "latent_scale_down_factor": scale_down,
        "timesteps": [int(t) for t in timesteps],
        "scheduler_scale_model_input_calls": len(scale_calls),
        "controlnet_dtype": str(pipe.controlnet.dtype).replace("torch.", ""),
        "controlnet_residual_abs_max_t0": {
            **{f"down_{i}": float(d.abs().max()) for i, d in enumerate(down)}, "mid": float(mid.abs().max())},
        "max_abs_diff_image_with_vs_without_controlnet": max_diff,
        "mean_abs_diff_image_with_vs_without_controlnet": mean_diff,
        "max_abs_diff_image_control_png_vs_black_control": blank_diff,
        "image_without_controlnet_equals_golden_image": plain_equals_golden,
    }
    return tensors, info, dict(pipe.controlnet.config)


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate(out_dir: Path) -> dict[str, torch.Tensor]:
    ckpt_dir = mg.start_run(out_dir, CKPT_NAME)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe, redrawn = build_controlnet_pipeline(tmp)
        pipe.save_pretrained(str(ckpt_dir), safe_serialization=True)
        shutil.copyfile(tmp / "_tok" / "vocab.txt", ckpt_dir / "qformer" / "vocab.txt")
        del pipe

    model_index = json.loads((ckpt_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "BlipDiffusionControlNetPipeline", model_index
    assert model_index["controlnet"] == ["diffusers", "ControlNetModel"], model_index["controlnet"]
    assert model_index["mean"] is None and model_index["std"] is None
    base_check = check_base_identical(ckpt_dir, BASE_CKPT)

    ref_png = out_dir / "reference.png"
    mg.make_reference_image().save(ref_png, format="PNG", optimize=False)
    if (BASE_GOLDEN / "reference.png").is_file():
        a = np.asarray(PIL.Image.open(ref_png).convert("RGB"))
        b = np.asarray(PIL.Image.open(BASE_GOLDEN / "reference.png").convert("RGB"))
        assert np.array_equal(a, b), "reference.png differs from the released golden's"
    control_png = out_dir / "control.png"
    make_control_image().save(control_png, format="PNG", optimize=False)

    tensors, info, cn_config = run_reference(ckpt_dir, ref_png, control_png, ckpt_dir / "qformer" / "vocab.txt")
    save_file(tensors, str(out_dir / "golden.safetensors"),
              metadata={"generator": "scripts/golden/make_controlnet_golden.py"})

    def describe(k):
        return GOLDEN_TENSORS.get(k) or GOLDEN_TENSORS["controlnet_down_t0_{i}"]

    p = PIPE_INPUTS
    inputs = {
        "description": "Golden outputs of diffusers 0.32.2 BlipDiffusionControlNetPipeline on a tiny seeded "
        "checkpoint. Regenerate with: /work/refenv/bin/python scripts/golden/make_controlnet_golden.py",
        "checkpoint_dir": CKPT_NAME,
        "base_checkpoint": f"tests/fixtures/golden/{mg.CKPT_NAME} (make_golden.py released build; identical "
        "weights, tokenizers, scheduler and image processor)",
        "base_checkpoint_check": base_check,
        "reference_image": "reference.png",
        "reference_image_size_wh": [64, 64],
        "control_image": "control.png",
        "control_image_size_wh": list(CONTROL_SIZE_WH),
        "control_image_sha256": _sha256_file(control_png),
        "pipeline_call": {
            "prompt": p["prompt"],
            "reference_image": "reference.png (PIL RGB)",
            "condtioning_image": "control.png (PIL RGB) - the parameter is spelled so in diffusers 0.32.2",
            "source_subject_category": p["source_subject_category"],
            "target_subject_category": p["target_subject_category"],
            "guidance_scale": p["guidance_scale"],
            "num_inference_steps": p["num_inference_steps"],
            "neg_prompt": p["neg_prompt"],
            "prompt_strength": p["prompt_strength"],
            "prompt_reps": p["prompt_reps"],
            "height": p["height"],
            "width": p["width"],
            "generator": f"torch.Generator('cpu').manual_seed({p['generator_seed']})",
            "generator_seed": p["generator_seed"],
            "latents": None,
            "output_type": p["output_type"],
        },
        "ctx_begin_pos": 2,
        "model_index_mean_std": None,
        "image_mean": mg.CLIP_MEAN,
        "image_std": mg.CLIP_STD,
        "controlnet": {
            "construction": f"torch.manual_seed({CONTROLNET_SEED}); ControlNetModel.from_unet(unet, "
                            f"conditioning_embedding_out_channels={list(COND_EMBEDDING_CHANNELS)})",
            "redrawn_zero_init_parameters": redrawn,
            "redraw": f"gen = Generator().manual_seed({REDRAW_SEED}); for each parameter above, in this "
                      "(sorted-name) order: p.copy_(torch.randn(p.shape, generator=gen) * std)",
            "redraw_seed": REDRAW_SEED,
            "redraw_std": {"controlnet_down_blocks.*, controlnet_mid_block.*": REDRAW_STD,
                           "controlnet_cond_embedding.conv_out.*": COND_OUT_STD},
            "num_down_residuals": sum(k.startswith("controlnet_down_t0_") for k in tensors),
            "down_residual_shapes": [list(v.shape) for k, v in tensors.items() if k.startswith("controlnet_down_t0_")],
            "mid_residual_shape": list(tensors["controlnet_mid_t0"].shape),
            "config": {k: v for k, v in cn_config.items() if not k.startswith("_")},
        },
        "torch_threads": 1,
        "deterministic_algorithms": True,
        **info,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "sha256": mg._sha256(v),
                "description": describe(k)}
            for k, v in tensors.items()
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "safetensors": safetensors.__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "huggingface_hub": __import__("huggingface_hub").__version__,
        },
        "notes": [
            "The pipeline never calls scheduler.scale_model_input (PNDM's is the identity anyway).",
            "The ControlNet is called with conditioning_scale=1.0 (its default) and no guess_mode; its "
            "residuals go to the UNet unchanged, for both guidance halves.",
            "prepare_control_image repeats the condition with repeat_interleave(batch_size) when it has one "
            "image, then torch.cat([image] * 2) for guidance (uncond half first, the same image).",
        ],
    }
    (out_dir / "inputs.json").write_text(json.dumps(inputs, indent=2, default=mg._json_default) + "\n",
                                         encoding="utf-8")
    return tensors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: tests/fixtures/golden_controlnet")
    ap.add_argument("--check-determinism", action="store_true",
                    help="generate twice into temp dirs and compare all golden tensors bit-for-bit")
    args = ap.parse_args(argv)
    mg.warn_versions()
    if args.check_determinism:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            ta, tb = generate(Path(a)), generate(Path(b))
            return 0 if mg.same_runs(Path(a), Path(b), ta, tb) else 1

    tensors = generate(args.out)
    mg.report_written(args.out, tensors)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
