"""Generate golden reference outputs of LAVIS's BLIP-Diffusion prompt-to-prompt editing.

LAVIS (``salesforce/LAVIS``, ``lavis/models/blip_diffusion_models/``) edits a subject in an
image with prompt-to-prompt attention control: ``BlipDiffusion.generate_then_edit`` (the source
image is generated from noise with PNDM) and ``BlipDiffusion.edit`` (a real photo is DDIM-inverted
first, then regenerated with DDIM). Both register an ``AttentionRefine`` controller with a
``LocalBlend`` on the UNet. This script runs LAVIS's OWN code on a tiny, seeded checkpoint with
SD-1.5's UNet block layout (LAVIS hard-codes SD-1.5 geometry: LocalBlend reshapes the 16x16
cross-attention maps of ``down_cross[2:4] + up_cross[:3]``) and records what it computes.

LAVIS's files are not copied here: ``blip_diffusion.py``, ``ptp_utils.py``,
``modeling_ctx_clip.py`` and ``utils.py`` are read at run time from a LAVIS git repository
(default: the mirror at /work/.mirror/salesforce+LAVIS/repo, ``--lavis-rev`` HEAD) or from a
LAVIS checkout (``--lavis DIR``) and imported as real modules. Only what editing never uses is
stubbed in ``sys.modules`` before the import: ``lavis.common.registry`` (identity decorator),
``lavis.common.utils``, ``lavis.models.base_model.BaseModel`` (an nn.Module with a ``device``
property), ``Blip2Qformer``, the canny annotator, ``IPython.display.display`` and
``diffusers.models.cross_attention.CrossAttention`` (= diffusers' ``Attention``). transformers
4.44 lacks ``modeling_clip._expand_mask`` (imported by ``modeling_ctx_clip.py``); it is shimmed
with the old semantics (never called here: no attention mask is passed).

The LAVIS model object is assembled without ``__init__`` (which would download SD-1.5 and
BLIP-2): the tiny pipeline's UNet, VAE and tokenizer, LAVIS's ``CtxCLIPTextModel`` loaded with
the pipeline's text-encoder weights (checked equal to diffusers' ``ContextCLIPTextModel``), the
subject embeddings as ``ctx_embeddings_cache`` (``_use_embeddings_cache=True``, so the Q-Former
is never called), and the schedulers made from the checkpoint's scheduler config.

Environment: the reference environment of make_golden.py (/work/refenv: torch 2.13.0+cpu,
diffusers 0.32.2, transformers 4.44.2) plus

    /work/refenv/bin/pip install opencv-python-headless    # ptp_utils imports cv2
    /work/refenv/bin/pip install --no-deps --target /work/refenv-torchvision torchvision==0.28.0

edit() imports torchvision.transforms. PyPI's torchvision wheels are CUDA builds: next to the CPU
torch their C extension does not load and ``import torchvision`` fails in
``torchvision._meta_registrations`` ("operator torchvision::nms does not exist"). Installed INTO
/work/refenv, that failure breaks ``import diffusers`` (transformers imports torchvision when it
is installed) and with it make_golden.py. So torchvision lives in its own folder
(``--torchvision-path``, default /work/refenv-torchvision), put on sys.path only after diffusers
and transformers are imported; the script stubs ``torchvision._meta_registrations`` (fake
kernels for torchvision's C ops, which ``transforms`` never uses) and imports it again;
inputs.json records it.

Run (from the repository root):

    /work/refenv/bin/python scripts/golden/make_edit_golden.py                      # tests/fixtures/golden_edit/
    /work/refenv/bin/python scripts/golden/make_edit_golden.py --out DIR
    /work/refenv/bin/python scripts/golden/make_edit_golden.py --check-determinism  # 2 runs, bit-compare

A run takes a few minutes on 2 CPU cores (the P2P attention processor materialises every
attention map, 64x64 self-attention included).

Outputs (in --out, default tests/fixtures/golden_edit/)
-------------------------------------------------------
* ``blipdiffusion-edit-tiny/``  checkpoint, released layout (as make_golden's ``released``):
  make_golden's text encoder, Q-Former, tokenizers, scheduler and image processor, with an
  SD-1.5-layout tiny UNet and a 4-block (factor 8) tiny VAE.
* ``golden.safetensors``  reference tensors (GOLDEN_TENSORS below), keys ``generated/...``,
  ``real/...`` and ``subject_embeds``.
* ``inputs.json``         every input, the prompts as LAVIS built them, token ids, configs, seeds,
  LAVIS commit and file hashes, versions, tensor checksums, per-step statistics.
* ``reference.png``       the 64x64 subject image (make_golden's) behind ``subject_embeds``.
* ``photo.png``           the 640x480 photo edited in real mode.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import types
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
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

REPO_ROOT = mg.REPO_ROOT
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "golden_edit"
CKPT_NAME = "blipdiffusion-edit-tiny"
DEFAULT_LAVIS_GIT = Path("/work/.mirror/salesforce+LAVIS/repo")
DEFAULT_TORCHVISION_PATH = Path("/work/refenv-torchvision")  # pip install --no-deps --target ... torchvision==0.28.0
LAVIS_SUBDIR = "lavis/models/blip_diffusion_models"
LAVIS_FILES = ("__init__.py", "blip_diffusion.py", "ptp_utils.py", "modeling_ctx_clip.py", "utils.py")

# ----------------------------------------------------------------------------------------------
# Tiny networks with SD-1.5's geometry (UNet block layout, VAE factor 8)
# ----------------------------------------------------------------------------------------------
UNET_SEED, UNET_PERTURB_SEED, UNET_PERTURB_STD = mg.SEED + 20, mg.SEED + 21, 0.05
# With random weights the cross-attention maps are nearly uniform over positions, so LocalBlend's
# normalised map never drops below LAVIS's default threshold 0.3 (mask all ones at every step: a
# weak golden). The cross-attention query/key projections (attn2.to_q / attn2.to_k) therefore get
# an extra seeded N(0, ATTN_SHARPEN_STD) in sorted-name order, and the threshold is raised.
# The std stays small: at 3.0 the attention logits were so large that the same UNet call with
# diffusers' explicit AttnProcessor and its SDPA AttnProcessor2_0 differed by 0.1 (of 2.9) in the
# noise, so no reimplementation could match to 1e-4; at 0.5 they differ by 3e-6.
ATTN_SHARPEN_SEED, ATTN_SHARPEN_STD = mg.SEED + 22, 0.5
VAE_SEED, VAE_PERTURB_SEED, VAE_PERTURB_STD = mg.SEED + 30, mg.SEED + 31, 0.02
UNET_KWARGS = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=2,
    norm_num_groups=8,
    attention_head_dim=8,
    cross_attention_dim=mg.QFORMER_HIDDEN,
)
VAE_KWARGS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=512,
)

# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
SAMPLES = dict(cond_subject="dog", src_subject="cat", tgt_subject="dog", prompt=["on sand"])
COMMON = dict(guidance_scale=7.5, height=512, width=512, seed=0, neg_prompt="")
LAVIS_DEFAULT_LB_THRESHOLD = 0.3
EDIT_KW = dict(cross_replace_steps=0.8, self_replace_steps=0.4, lb_threshold=0.8)  # 0.3 gives an all-ones mask
NUM_STEPS = 6  # generated mode: PNDM (PLMS) -> 7 UNet calls; real mode: DDIM, 6 inversion + 6 edit calls
NUM_INVERSION_STEPS = 6
VAE_SAMPLE_SEED = 1234  # torch.manual_seed right before edit(): LAVIS samples the VAE posterior unseeded
PHOTO_SIZE_WH = (640, 480)

GOLDEN_TENSORS = {
    "subject_embeds": "pipe.get_query_embeddings(image_processor(reference.png), ['dog']) = LAVIS's "
    "ctx_embeddings_cache, (1,16,32)",
    # per mode (prefix generated/ or real/)
    "mapper": "AttentionRefine.mapper (get_refinement_mapper of the 2 prompts), (1,77) int64",
    "alphas": "AttentionRefine.alphas, (1,1,1,77) flattened to (1,77)",
    "cross_replace_alpha": "AttentionRefine.cross_replace_alpha, (steps+1,1,1,1,77) flattened to (steps+1,1,77)",
    "num_self_replace": "AttentionRefine.num_self_replace, (2,) int64 [start, end) UNet-call indices",
    "alpha_layers": "LocalBlend.alpha_layers, (2,1,1,1,1,77) flattened to (2,77)",
    "token_ids_src": "ids of prompt[0] (with_query=False, padded to 77), (1,77) int64",
    "token_ids_tgt": "ids of prompt[1] (with_query=True, padded to 77-16=61), (1,61) int64",
    "token_ids_uncond": "ids of [neg_prompt] padded to 77, (1,77) int64",
    "text_embeds": "encoder_hidden_states of the first UNet call of the edit: "
    "cat([uncond, uncond, src, tgt(+subject at 2)]), (4,77,32)",
    "unet_timesteps": "timestep of every UNet call of the edit, int64",
    "scheduler_timesteps": "scheduler.timesteps of the edit, int64",
    "latents_per_step": "latents returned by controller.step_callback (after LocalBlend) per UNet call, "
    "(calls,2,4,64,64); row 0 = source prompt, row 1 = edited",
    "masks": "LocalBlend mask per call (its output on x_t=stack([0,1]), row 1, channel 0), (calls,64,64)",
    "image": "generate_then_edit / edit output (list of 2 PIL images) as uint8, the centre 128 x 128 "
    "(rows and columns 192:320 of 512), (2,128,128,3); /255 gives the float image in [0,1]",
    # real mode only
    "pixels_uint8": "_inversion_transform(photo.png) = Resize(512)+CenterCrop(512)+ToTensor, *2-1, (1,3,512,512), "
    "stored as the uint8 u with pixels == 2.0 * (u.float() / 255) - 1.0 exactly (checked)",
    "vae_latents": "get_image_latents(pixels) = vae posterior sample (after manual_seed(1234)) * 0.18215, (1,4,64,64)",
    "vae_posterior_mean": "vae.encode(pixels).latent_dist.mean, (1,4,64,64)",
    "vae_posterior_std": "vae.encode(pixels).latent_dist.std, (1,4,64,64)",
    "vae_eps": "(vae_latents/0.18215 - mean)/std recomputed, ~= randn(generator=manual_seed(1234)), (1,4,64,64)",
    "inversion_token_ids": "ids of LAVIS's inversion prompt 'a c on sand' (with_query=False), (1,77) int64",
    "inversion_text_embeds": "encoder_hidden_states of the inversion UNet calls, (1,77,32)",
    "inversion_unet_timesteps": "timestep of every inversion UNet call (reversed DDIM timesteps), int64",
    "inversion_latents_per_step": "latents after every _noise_latent_step of the inversion, (6,1,4,64,64)",
    "inverted_latents": "_ddim_inverse output, (1,4,64,64)",
}


# ----------------------------------------------------------------------------------------------
# torchvision (edit() imports torchvision.transforms)
# ----------------------------------------------------------------------------------------------
_TORCHVISION_INFO: dict | None = None


def import_torchvision(extra_path: Path | None) -> dict:
    """Import torchvision (edit() needs torchvision.transforms), from extra_path if given.

    Called after diffusers/transformers are imported, so they keep seeing no torchvision. If its C
    extension cannot load (PyPI's CUDA wheel next to the CPU torch), torchvision._meta_registrations
    (fake kernels for the C ops, which transforms never uses) is stubbed and the import retried."""
    global _TORCHVISION_INFO
    if _TORCHVISION_INFO is not None:  # a second generate() in this process (--check-determinism)
        return _TORCHVISION_INFO
    if extra_path is not None and str(extra_path) not in sys.path:
        sys.path.insert(0, str(extra_path))
    try:
        import torchvision  # noqa: F401
        from torchvision import transforms  # noqa: F401
        info = {"meta_registrations_stubbed": False}
    except RuntimeError as e:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
        from torchvision import transforms  # noqa: F401
        info = {"meta_registrations_stubbed": True, "import_error": str(e)}
    _TORCHVISION_INFO = {"version": torchvision.__version__, "path": str(Path(torchvision.__file__).parent.parent),
                         **info}
    return _TORCHVISION_INFO


# ----------------------------------------------------------------------------------------------
# LAVIS import
# ----------------------------------------------------------------------------------------------
def extract_lavis(dest: Path, lavis_dir: Path | None, git_dir: Path, rev: str) -> dict:
    """Write LAVIS's blip_diffusion_models files into dest/lavis/models/blip_diffusion_models."""
    pkg = dest / LAVIS_SUBDIR
    pkg.mkdir(parents=True)
    info = {"files": {}}
    if lavis_dir is not None:
        info["source"] = str(lavis_dir)
        for f in LAVIS_FILES:
            shutil.copyfile(lavis_dir / LAVIS_SUBDIR / f, pkg / f)
        try:
            info["commit"] = subprocess.run(["git", "-C", str(lavis_dir), "rev-parse", "HEAD"], check=True,
                                            capture_output=True, text=True).stdout.strip()
        except Exception:  # noqa: BLE001
            info["commit"] = None
    else:
        commit = subprocess.run(["git", "-C", str(git_dir), "rev-parse", rev], check=True,
                                capture_output=True, text=True).stdout.strip()
        info["source"] = f"git {git_dir} {rev}"
        info["commit"] = commit
        for f in LAVIS_FILES:
            blob = subprocess.run(["git", "-C", str(git_dir), "show", f"{commit}:{LAVIS_SUBDIR}/{f}"], check=True,
                                  capture_output=True).stdout
            (pkg / f).write_bytes(blob)
        info["last_commit_per_file"] = {
            f: subprocess.run(["git", "-C", str(git_dir), "log", "-1", "--format=%H", commit, "--",
                               f"{LAVIS_SUBDIR}/{f}"], check=True, capture_output=True, text=True).stdout.strip()
            for f in LAVIS_FILES}
    for f in LAVIS_FILES:
        info["files"][f] = hashlib.sha256((pkg / f).read_bytes()).hexdigest()
    return info


def _module(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    if path is not None:
        m.__path__ = [str(path)]
    for k, v in attrs.items():
        setattr(m, k, v)
    sys.modules[name] = m
    return m


def _expand_mask(mask: torch.Tensor, dtype: torch.dtype, tgt_len: int | None = None) -> torch.Tensor:
    """transformers < 4.35 modeling_clip._expand_mask: (bsz, src) -> additive (bsz, 1, tgt, src)."""
    bsz, src_len = mask.size()
    tgt_len = tgt_len if tgt_len is not None else src_len
    expanded = mask[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)
    inverted = 1.0 - expanded
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


class _StubBaseModel(nn.Module):
    """lavis.models.base_model.BaseModel, as far as editing uses it."""

    @property
    def device(self):
        return list(self.parameters())[0].device


class _Unused:
    def __init__(self, *a, **kw):
        raise RuntimeError("stubbed LAVIS component called")


def import_lavis(root: Path) -> dict:
    """Stub what editing does not use, then import LAVIS's real modules from root/lavis/..."""
    stubs = []
    for name in [m for m in sys.modules if m == "lavis" or m.startswith("lavis.")]:
        del sys.modules[name]  # a previous generate() in this process imported them from another folder
    _module("lavis", root / "lavis")
    _module("lavis.common", root / "lavis" / "common")
    _module("lavis.common.registry", registry=types.SimpleNamespace(register_model=lambda name: (lambda cls: cls)))
    _module("lavis.common.utils", download_and_untar=_Unused, is_url=lambda s: False)
    _module("lavis.common.annotator", root / "lavis" / "common" / "annotator")
    _module("lavis.common.annotator.canny", CannyDetector=lambda *a, **kw: None)
    _module("lavis.common.annotator.util", HWC3=_Unused, resize_image=_Unused)
    _module("lavis.models", root / "lavis" / "models")
    _module("lavis.models.base_model", BaseModel=_StubBaseModel)
    _module("lavis.models.blip2_models", root / "lavis" / "models" / "blip2_models")
    _module("lavis.models.blip2_models.blip2_qformer", Blip2Qformer=_Unused)
    stubs += ["lavis", "lavis.common.registry", "lavis.common.utils", "lavis.common.annotator.canny",
              "lavis.common.annotator.util", "lavis.models.base_model", "lavis.models.blip2_models.blip2_qformer"]
    _module("IPython", None)
    _module("IPython.display", display=lambda *a, **kw: None)
    stubs.append("IPython.display")
    from diffusers.models.attention_processor import Attention
    importlib.import_module("diffusers.models")
    _module("diffusers.models.cross_attention", CrossAttention=Attention)
    stubs.append("diffusers.models.cross_attention")

    import transformers.models.clip.modeling_clip as mc
    shimmed = not hasattr(mc, "_expand_mask")
    if shimmed:
        mc._expand_mask = _expand_mask

    bd = importlib.import_module("lavis.models.blip_diffusion_models.blip_diffusion")
    ptp = importlib.import_module("lavis.models.blip_diffusion_models.ptp_utils")
    ctx = importlib.import_module("lavis.models.blip_diffusion_models.modeling_ctx_clip")
    for m in (bd, ptp, ctx):
        assert Path(m.__file__).resolve().is_relative_to(root.resolve()), m.__file__
    return {"blip_diffusion": bd, "ptp_utils": ptp, "modeling_ctx_clip": ctx,
            "stubbed_modules": stubs, "expand_mask_shimmed": shimmed}


# ----------------------------------------------------------------------------------------------
# Checkpoint and images
# ----------------------------------------------------------------------------------------------
def build_edit_pipeline(work: Path) -> BlipDiffusionPipeline:
    """make_golden's released pipeline with the UNet and VAE replaced by SD-1.5-geometry ones."""
    pipe = mg.build_pipeline(work, "released")
    torch.manual_seed(UNET_SEED)
    unet = UNet2DConditionModel(**UNET_KWARGS)
    mg.perturb_(unet, UNET_PERTURB_SEED, std=UNET_PERTURB_STD)
    gen = torch.Generator().manual_seed(ATTN_SHARPEN_SEED)
    with torch.no_grad():
        for name, p in sorted(unet.named_parameters(), key=lambda kv: kv[0]):
            if ".attn2.to_q." in name or ".attn2.to_k." in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * ATTN_SHARPEN_STD)
    torch.manual_seed(VAE_SEED)
    vae = AutoencoderKL(**VAE_KWARGS)
    assert vae.config.scaling_factor == 0.18215
    mg.perturb_(vae, VAE_PERTURB_SEED, std=VAE_PERTURB_STD)
    pipe.register_modules(unet=unet, vae=vae)
    return pipe


def make_photo() -> PIL.Image.Image:
    """Deterministic 640x480 RGB 'photo': gradient sky, ground, sun, shapes (no randomness)."""
    w, h = PHOTO_SIZE_WH
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    sky = y < 0.55 * h
    r = np.where(sky, 90 + 80 * y / h, 200 - 60 * (y / h))
    g = np.where(sky, 140 + 90 * y / h, 170 - 50 * (y / h) + 15 * np.sin(x / 11.0))
    b = np.where(sky, 235 - 40 * y / h, 110 + 20 * np.cos((x + y) / 17.0))
    img = np.clip(np.round(np.stack([r, g, b], -1)), 0, 255).astype(np.uint8)
    im = PIL.Image.fromarray(img, mode="RGB")
    d = PIL.ImageDraw.Draw(im)
    d.ellipse((500, 40, 590, 130), fill=(250, 220, 90))  # sun (partly cropped by CenterCrop)
    d.ellipse((250, 210, 420, 360), fill=(120, 80, 50), outline=(40, 25, 15), width=4)  # body
    d.ellipse((380, 170, 470, 260), fill=(135, 90, 55), outline=(40, 25, 15), width=4)  # head
    d.polygon([(390, 185), (400, 140), (420, 180)], fill=(90, 60, 35))  # ear
    d.polygon([(430, 175), (455, 135), (462, 185)], fill=(90, 60, 35))  # ear
    d.ellipse((420, 200, 432, 212), fill=(10, 10, 10))  # eye
    d.rectangle((270, 340, 290, 400), fill=(100, 65, 40))  # legs
    d.rectangle((370, 340, 390, 400), fill=(100, 65, 40))
    d.rectangle((20, 300, 120, 380), fill=(60, 120, 200), outline=(255, 255, 255), width=3)  # box at the left edge
    d.line((0, 470, 640, 430), fill=(230, 230, 230), width=5)
    return im


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _flat_tail(t: torch.Tensor, keep: int) -> torch.Tensor:
    """Drop singleton dims between the first `keep` dims and the last one."""
    return t.reshape(*t.shape[:keep], t.shape[-1])


# ----------------------------------------------------------------------------------------------
# LAVIS model assembly
# ----------------------------------------------------------------------------------------------
def assemble_lavis_model(lv: dict, pipe: BlipDiffusionPipeline, subject_embeds: torch.Tensor):
    LavisBlipDiffusion = lv["blip_diffusion"].BlipDiffusion
    CtxCLIPTextModel = lv["modeling_ctx_clip"].CtxCLIPTextModel

    te_cfg = copy.deepcopy(pipe.text_encoder.config)
    text_encoder = CtxCLIPTextModel(te_cfg)
    msg = text_encoder.load_state_dict(pipe.text_encoder.state_dict(), strict=False)
    bad = [k for k in list(msg.missing_keys) + list(msg.unexpected_keys) if not k.endswith("position_ids")]
    assert not bad, msg
    text_encoder.eval()

    model = object.__new__(LavisBlipDiffusion)
    nn.Module.__init__(model)
    model.unet = pipe.unet
    model.vae = pipe.vae
    model.text_encoder = text_encoder
    model.tokenizer = pipe.tokenizer
    model.num_query_token = mg.NUM_QUERY_TOKENS
    model._CTX_BEGIN_POS = 2
    model.ctx_embeddings_cache = nn.Parameter(subject_embeds.clone(), requires_grad=False)
    model._use_embeddings_cache = True
    model._pndm_scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    ddim_default = DDIMScheduler.from_config(pipe.scheduler.config)
    # the PNDM config has no clip_sample key -> DDIM's default (True); SD-1.5's config says False
    model._ddim_scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    model.eval()
    assert model.ddim_scheduler is model._ddim_scheduler and model.pndm_scheduler is model._pndm_scheduler
    assert model.ddim_scheduler.config.clip_sample is False
    assert model.ddim_scheduler.config.steps_offset == 1 and model.ddim_scheduler.config.set_alpha_to_one is False

    # LAVIS's text encoder == diffusers' on one prompt (with and without the subject)
    ids = pipe.tokenizer(["a dog on sand"], padding="max_length", truncation=True,
                         max_length=77 - mg.NUM_QUERY_TOKENS, return_tensors="pt").input_ids
    with torch.no_grad():
        a = text_encoder(input_ids=ids, ctx_embeddings=subject_embeds, ctx_begin_pos=[2])[0]
        b = pipe.text_encoder(input_ids=ids, ctx_embeddings=subject_embeds, ctx_begin_pos=[2])[0]
        ids77 = pipe.tokenizer(["a dog on sand"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        a0 = text_encoder(input_ids=ids77)[0]
        b0 = pipe.text_encoder(input_ids=ids77, ctx_embeddings=None)[0]
    te_check = {"with_subject_max_abs_diff": float((a - b).abs().max()),
                "without_subject_max_abs_diff": float((a0 - b0).abs().max()),
                "missing_keys": list(msg.missing_keys), "unexpected_keys": list(msg.unexpected_keys),
                "lavis_attn_implementation": getattr(text_encoder.config, "_attn_implementation", None)}
    assert te_check["with_subject_max_abs_diff"] < 1e-5 and te_check["without_subject_max_abs_diff"] < 1e-5, te_check

    def config(sched) -> dict:  # diffusers lists the defaulted keys from a set: sorted, for byte-stable files
        c = dict(sched.config)
        if "_use_default_values" in c:
            c["_use_default_values"] = sorted(c["_use_default_values"])
        return c

    sched_info = {
        "pndm_config": config(model._pndm_scheduler),
        "ddim_config": config(model._ddim_scheduler),
        "ddim_from_config_default_clip_sample": bool(ddim_default.config.clip_sample),
        "lavis_own_pndm_property_config": config(PNDMScheduler(beta_start=0.00085, beta_end=0.012,
                                                               beta_schedule="scaled_linear", set_alpha_to_one=False,
                                                               skip_prk_steps=True)),
    }
    return model, te_check, sched_info


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def recorder(model, lv: dict, rec: dict):
    """Wrap LAVIS's methods (the originals are always called) and record what they compute."""
    bd_cls = type(model)
    LocalBlend = lv["ptp_utils"].LocalBlend
    saved = []

    def patch(obj, name, new):
        saved.append((obj, name, obj.__dict__.get(name, None) if isinstance(obj, type) else None,
                      name in obj.__dict__))
        setattr(obj, name, new)

    orig_register = bd_cls._register_attention_refine

    def register_wrapper(self, *a, **kw):
        controller = orig_register(self, *a, **kw)
        rec["controller"] = controller
        rec["register_kwargs"] = kw
        orig_step_cb = controller.step_callback

        def step_callback(x_t):
            rec["before_blend"].append(x_t.clone())
            out = orig_step_cb(x_t)
            rec["after_blend"].append(out.clone())
            return out

        controller.step_callback = step_callback
        return controller

    orig_lb_call = LocalBlend.__call__

    def lb_call(self, x_t, attention_store):
        out = orig_lb_call(self, x_t, attention_store)
        probe = torch.cat([torch.zeros_like(x_t[:1]), torch.ones_like(x_t[:1])])
        m = orig_lb_call(self, probe, attention_store)
        assert torch.equal(m[0], torch.zeros_like(m[0]))
        assert all(torch.equal(m[1, 0], m[1, c]) for c in range(1, m.shape[1]))
        rec["masks"].append(m[1, 0].clone())
        return out

    orig_tokenize = bd_cls._tokenize_text

    def tokenize_wrapper(self, text_input, with_query=True):
        out = orig_tokenize(self, text_input, with_query=with_query)
        rec["tokenized"].append((list(text_input), with_query, out.input_ids.clone()))
        return out

    orig_inv_tf = bd_cls._inversion_transform

    def inv_tf_wrapper(self, image, *a, **kw):
        out = orig_inv_tf(self, image, *a, **kw)
        rec["pixels"] = out.clone()
        return out

    orig_latents = bd_cls.get_image_latents

    def latents_wrapper(self, image, *a, **kw):
        out = orig_latents(self, image, *a, **kw)
        rec["vae_latents"] = out.clone()
        return out

    orig_inverse = bd_cls._ddim_inverse

    def inverse_wrapper(self, *a, **kw):
        rec["phase"] = "inversion"
        out = orig_inverse(self, *a, **kw)
        rec["phase"] = "edit"
        rec["inverted_latents"] = out.clone()
        return out

    orig_noise_step = bd_cls._noise_latent_step

    def noise_step_wrapper(self, *a, **kw):
        out = orig_noise_step(self, *a, **kw)
        rec["inversion_latents"].append(out.clone())
        return out

    def unet_hook(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        rec["unet"].append((rec["phase"], int(t), sample.clone(), kwargs["encoder_hidden_states"].clone()))

    patch(bd_cls, "_register_attention_refine", register_wrapper)
    patch(LocalBlend, "__call__", lb_call)
    patch(bd_cls, "_tokenize_text", tokenize_wrapper)
    patch(bd_cls, "_inversion_transform", inv_tf_wrapper)
    patch(bd_cls, "get_image_latents", latents_wrapper)
    patch(bd_cls, "_ddim_inverse", inverse_wrapper)
    patch(bd_cls, "_noise_latent_step", noise_step_wrapper)
    hook = model.unet.register_forward_hook(unet_hook, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        for obj, name, old, had in reversed(saved):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


def _new_rec() -> dict:
    return {"before_blend": [], "after_blend": [], "masks": [], "tokenized": [], "unet": [],
            "inversion_latents": [], "phase": "edit"}


IMAGE_CROP = (192, 320)  # the decoded images' centre 128 x 128 (the whole of them: 3.1 MB)


def _pil_to_uint8(images) -> torch.Tensor:
    assert isinstance(images, list) and all(isinstance(im, PIL.Image.Image) for im in images)
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).contiguous()


def _controller_tensors(rec: dict, steps: int) -> dict:
    c = rec["controller"]
    lb = c.local_blend
    assert c.mapper.shape == (1, 77) and c.alphas.shape == (1, 1, 1, 77)
    assert c.cross_replace_alpha.shape == (steps + 1, 1, 1, 1, 77)
    assert lb.alpha_layers.shape == (2, 1, 1, 1, 1, 77)
    return {
        "mapper": c.mapper.to(torch.int64),
        "alphas": c.alphas.reshape(1, 77).float(),
        "cross_replace_alpha": _flat_tail(c.cross_replace_alpha, 2).float(),
        "num_self_replace": torch.tensor(list(c.num_self_replace), dtype=torch.int64),
        "alpha_layers": lb.alpha_layers.reshape(2, 77).float(),
    }


def _mode_tensors(rec: dict, images, steps: int) -> tuple[dict, dict]:
    edit_calls = [u for u in rec["unet"] if u[0] == "edit"]
    assert len(edit_calls) == len(rec["after_blend"]) == len(rec["masks"])
    t = _controller_tensors(rec, steps)
    tok = [x for x in rec["tokenized"]]
    # last two _tokenize_text calls of generate_then_edit: prompt[:1] (no query), prompt[1:] (query)
    (src_txt, src_q, src_ids), (tgt_txt, tgt_q, tgt_ids) = tok[-2], tok[-1]
    assert src_q is False and tgt_q is True
    t.update({
        "token_ids_src": src_ids.to(torch.int64),
        "token_ids_tgt": tgt_ids.to(torch.int64),
        "text_embeds": edit_calls[0][3],
        "unet_sample_t0": edit_calls[0][2],  # checked by the caller, not saved (seeded noise / inverted latents)
        "unet_timesteps": torch.tensor([u[1] for u in edit_calls], dtype=torch.int64),
        "latents_per_step": torch.stack(rec["after_blend"]),
        "masks": torch.stack(rec["masks"]).float(),
        "image": _pil_to_uint8(images)[:, IMAGE_CROP[0]:IMAGE_CROP[1], IMAGE_CROP[0]:IMAGE_CROP[1]].contiguous(),
    })
    # every edit UNet call got the same text embeddings
    assert all(torch.equal(u[3], edit_calls[0][3]) for u in edit_calls)
    info = {"prompts": [src_txt[0], tgt_txt[0]],
            "num_unet_calls": len(edit_calls),
            "per_step_max_abs_latent": [float(x.abs().max()) for x in rec["after_blend"]],
            "per_step_max_abs_latent_rows": [[float(x[i].abs().max()) for i in range(2)] for x in rec["after_blend"]],
            "per_step_mask_coverage": [float(m.mean()) for m in rec["masks"]],
            "per_step_edit_row_changed_by_blend": [float((a[1] - b[1]).abs().max()) for a, b in
                                                   zip(rec["after_blend"], rec["before_blend"])],
            "per_step_source_row_unchanged_by_blend": all(torch.equal(a[0], b[0]) for a, b in
                                                          zip(rec["after_blend"], rec["before_blend"]))}
    return t, info


def run_lavis(ckpt_dir: Path, bert_vocab: Path, ref_png: Path, photo_png: Path, lavis_root: Path):
    lv = import_lavis(lavis_root)
    with mg._PatchedBertFromPretrained(bert_vocab):
        pipe = BlipDiffusionPipeline.from_pretrained(str(ckpt_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    for name in ("qformer", "text_encoder", "unet", "vae"):
        getattr(pipe, name).eval()

    ref_image = PIL.Image.open(ref_png).convert("RGB")
    photo = PIL.Image.open(photo_png).convert("RGB")
    ref_image.load()
    photo.load()
    with torch.no_grad():
        pixel_values = pipe.image_processor.preprocess(
            ref_image, image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt")["pixel_values"]
        subject_embeds = pipe.get_query_embeddings(pixel_values, [SAMPLES["cond_subject"]])
    assert subject_embeds.shape == (1, mg.NUM_QUERY_TOKENS, mg.QFORMER_HIDDEN)

    model, te_check, sched_info = assemble_lavis_model(lv, pipe, subject_embeds)

    # the target prompt must fit the 77 - 16 = 61 tokens LAVIS tokenizes it to
    src_prompt, tgt_prompt = model._build_prompts_edit(SAMPLES["src_subject"], SAMPLES["tgt_subject"],
                                                       SAMPLES["prompt"][0])
    n_tgt = len(pipe.tokenizer(tgt_prompt).input_ids)
    assert n_tgt <= 77 - mg.NUM_QUERY_TOKENS, (tgt_prompt, n_tgt)

    samples = {"cond_images": pixel_values, "cond_subject": SAMPLES["cond_subject"],
               "src_subject": SAMPLES["src_subject"], "tgt_subject": SAMPLES["tgt_subject"],
               "prompt": list(SAMPLES["prompt"])}
    tensors = {"subject_embeds": subject_embeds}
    info: dict = {"text_encoder_check": te_check, "schedulers": sched_info,
                  "lavis_stubbed_modules": lv["stubbed_modules"], "expand_mask_shimmed": lv["expand_mask_shimmed"],
                  "target_prompt_num_tokens": n_tgt, "source_prompt_num_tokens": len(pipe.tokenizer(src_prompt).input_ids)}

    # ---------------- 1. generated mode ----------------
    own_processors = dict(model.unet.attn_processors)
    rec = _new_rec()
    with recorder(model, lv, rec):
        images = model.generate_then_edit(
            samples, cross_replace_steps=EDIT_KW["cross_replace_steps"],
            self_replace_steps=EDIT_KW["self_replace_steps"], guidance_scale=COMMON["guidance_scale"],
            height=COMMON["height"], width=COMMON["width"], seed=COMMON["seed"],
            num_inference_steps=NUM_STEPS, neg_prompt=COMMON["neg_prompt"], use_inversion=False,
            lb_threshold=EDIT_KW["lb_threshold"])
    gt, ginfo = _mode_tensors(rec, images, NUM_STEPS)
    gt["scheduler_timesteps"] = model.pndm_scheduler.timesteps.to(torch.int64).clone()
    assert ginfo["num_unet_calls"] == NUM_STEPS + 1  # PLMS: one extra call
    assert torch.equal(gt["unet_sample_t0"][0], gt["unet_sample_t0"][1])
    init = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(COMMON["seed"]))
    assert all(torch.equal(gt["unet_sample_t0"][i], init[0]) for i in range(4))
    ginfo["initial_latents"] = "randn((1,4,64,64), generator=Generator().manual_seed(0)), expanded to the 2 rows"
    del gt["unet_sample_t0"]
    tensors.update({f"generated/{k}": v for k, v in gt.items()})
    info["generated"] = ginfo

    # ---------------- 2. real mode ----------------
    # LAVIS leaves generate_then_edit's P2PCrossAttnProcessors installed (one of its defects): the
    # inversion below would run through the generated edit's controller, which splits the single
    # row's heads into a "source" and a "target" half and rewrites the second. A user calling edit()
    # on a fresh model gets the UNet's own processors there, so they are put back first.
    info["processors_left_by_generate_then_edit"] = sorted({type(p).__name__ for p in model.unet.attn_processors.values()})
    model.unet.set_attn_processor(own_processors)
    rec = _new_rec()
    samples_real = dict(samples, raw_image=photo)
    with recorder(model, lv, rec):
        torch.manual_seed(VAE_SAMPLE_SEED)
        images = model.edit(
            samples_real, lb_threshold=EDIT_KW["lb_threshold"], guidance_scale=COMMON["guidance_scale"],
            height=COMMON["height"], width=COMMON["width"], seed=COMMON["seed"],
            num_inference_steps=NUM_STEPS, num_inversion_steps=NUM_INVERSION_STEPS,
            neg_prompt=COMMON["neg_prompt"])
    rt, rinfo = _mode_tensors(rec, images, NUM_STEPS)
    rt["scheduler_timesteps"] = model.ddim_scheduler.timesteps.to(torch.int64).clone()
    inv_calls = [u for u in rec["unet"] if u[0] == "inversion"]
    assert len(inv_calls) == NUM_INVERSION_STEPS == len(rec["inversion_latents"])
    inv_txt, inv_q, inv_ids = rec["tokenized"][0]
    assert inv_q is False
    with torch.no_grad():
        dist = model.vae.encode(rec["pixels"]).latent_dist
    eps = (rec["vae_latents"] / 0.18215 - dist.mean) / dist.std
    eps_ref = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(VAE_SAMPLE_SEED))
    rinfo["vae_eps_vs_randn_seed_max_abs_diff"] = float((eps - eps_ref).abs().max())
    assert rinfo["vae_eps_vs_randn_seed_max_abs_diff"] < 1e-3, rinfo["vae_eps_vs_randn_seed_max_abs_diff"]
    assert all(torch.equal(u[3], inv_calls[0][3]) for u in inv_calls)
    pixels_u8 = torch.round((rec["pixels"] + 1.0) / 2.0 * 255.0).to(torch.uint8)
    assert torch.equal(2.0 * (pixels_u8.float() / 255) - 1.0, rec["pixels"]), "pixels are not k/255 values"
    assert torch.equal(rec["inversion_latents"][-1], rec["inverted_latents"])
    assert all(torch.equal(rt["unet_sample_t0"][i], rec["inverted_latents"][0]) for i in range(4))
    del rt["unet_sample_t0"]
    rt.update({
        "pixels_uint8": pixels_u8,
        "vae_latents": rec["vae_latents"],
        "vae_posterior_mean": dist.mean,
        "vae_posterior_std": dist.std,
        "vae_eps": eps,
        "inversion_token_ids": inv_ids.to(torch.int64),
        "inversion_text_embeds": inv_calls[0][3],
        "inversion_unet_timesteps": torch.tensor([u[1] for u in inv_calls], dtype=torch.int64),
        "inversion_latents_per_step": torch.stack(rec["inversion_latents"]),
        "inverted_latents": rec["inverted_latents"],
    })
    rinfo["inversion_prompt"] = inv_txt
    rinfo["inversion_tokens"] = pipe.tokenizer.convert_ids_to_tokens(inv_ids[0].tolist())
    tensors.update({f"real/{k}": v for k, v in rt.items()})
    info["real"] = rinfo

    for mode in ("generated", "real"):
        info[mode]["tokens_src"] = pipe.tokenizer.convert_ids_to_tokens(tensors[f"{mode}/token_ids_src"][0].tolist())
        info[mode]["tokens_tgt"] = pipe.tokenizer.convert_ids_to_tokens(tensors[f"{mode}/token_ids_tgt"][0].tolist())
        info[mode]["unet_timesteps"] = tensors[f"{mode}/unet_timesteps"].tolist()
        info[mode]["scheduler_timesteps"] = tensors[f"{mode}/scheduler_timesteps"].tolist()
        info[mode]["mapper"] = tensors[f"{mode}/mapper"][0].tolist()
        info[mode]["alphas"] = tensors[f"{mode}/alphas"][0].tolist()
        info[mode]["alpha_layers_nonzero"] = [torch.nonzero(r).flatten().tolist()
                                              for r in tensors[f"{mode}/alpha_layers"]]
        info[mode]["num_self_replace"] = tensors[f"{mode}/num_self_replace"].tolist()
        info[mode]["cross_replace_alpha_per_step"] = tensors[f"{mode}/cross_replace_alpha"][:, 0, 0].tolist()
    info["real"]["inversion_unet_timesteps"] = tensors["real/inversion_unet_timesteps"].tolist()

    uncond_ids = pipe.tokenizer([COMMON["neg_prompt"]], padding="max_length", max_length=77,
                                return_tensors="pt").input_ids.to(torch.int64)
    for mode in ("generated", "real"):
        tensors[f"{mode}/token_ids_uncond"] = uncond_ids.clone()
    info["unet_attn_processors_after"] = sorted({type(p).__name__ for p in model.unet.attn_processors.values()})
    info["unet_num_attn_processors"] = len(model.unet.attn_processors)
    info["model_device"] = str(model.device)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for k, v in tensors.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    return tensors, info


# ----------------------------------------------------------------------------------------------
# Main generation
# ----------------------------------------------------------------------------------------------
def generate(out_dir: Path, lavis_dir: Path | None, lavis_git: Path, lavis_rev: str,
             torchvision_path: Path | None) -> tuple[dict, dict]:
    ckpt_dir = mg.start_run(out_dir, CKPT_NAME)
    tv_info = import_torchvision(torchvision_path)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe = build_edit_pipeline(tmp)
        pipe.save_pretrained(str(ckpt_dir), safe_serialization=True)
        shutil.copyfile(tmp / "_tok" / "vocab.txt", ckpt_dir / "qformer" / "vocab.txt")
        del pipe

        ref_png = out_dir / "reference.png"
        mg.make_reference_image().save(ref_png, format="PNG", optimize=False)
        photo_png = out_dir / "photo.png"
        make_photo().save(photo_png, format="PNG", optimize=False)

        lavis_root = tmp / "lavis_src"
        lavis_info = extract_lavis(lavis_root, lavis_dir, lavis_git, lavis_rev)
        tensors, info = run_lavis(ckpt_dir, ckpt_dir / "qformer" / "vocab.txt", ref_png, photo_png, lavis_root)

    save_file(tensors, str(out_dir / "golden.safetensors"),
              metadata={"generator": "scripts/golden/make_edit_golden.py"})

    def describe(k):
        return GOLDEN_TENSORS[k.split("/", 1)[-1]]

    inputs = {
        "description": "Golden outputs of LAVIS's BLIP-Diffusion prompt-to-prompt editing "
        "(BlipDiffusion.generate_then_edit and .edit, AttentionRefine + LocalBlend) on a tiny seeded checkpoint. "
        "Regenerate with: /work/refenv/bin/python scripts/golden/make_edit_golden.py",
        "checkpoint_dir": CKPT_NAME,
        "reference_image": "reference.png",
        "photo": "photo.png",
        "photo_size_wh": list(PHOTO_SIZE_WH),
        "samples": {**SAMPLES, "cond_images": "image_processor(reference.png) (unused: ctx_embeddings_cache is on)",
                    "raw_image (real mode)": "photo.png (PIL RGB)"},
        "generate_then_edit_call (generated mode)": {
            **EDIT_KW, **COMMON, "num_inference_steps": NUM_STEPS, "use_inversion": False, "latents": None},
        "edit_call (real mode)": {
            "lb_threshold": EDIT_KW["lb_threshold"], **COMMON, "num_inference_steps": NUM_STEPS,
            "num_inversion_steps": NUM_INVERSION_STEPS,
            "implied (edit() passes defaults to generate_then_edit)": {"cross_replace_steps": 0.8,
                                                                       "self_replace_steps": 0.4},
            "inversion guidance_scale (hard-coded by edit)": 1.0},
        "vae_sample_seed": VAE_SAMPLE_SEED,
        "lb_threshold_note": f"LAVIS's default lb_threshold is {LAVIS_DEFAULT_LB_THRESHOLD}; with it the tiny model's "
        f"mask is all ones at every step, so {EDIT_KW['lb_threshold']} is used",
        "vae_sample_note": "torch.manual_seed(1234) right before edit(); get_image_latents samples the posterior "
        "with the global RNG, i.e. eps == randn((1,4,64,64), generator=Generator().manual_seed(1234))",
        "lavis_model": {
            "ctx_begin_pos": 2, "num_query_token": mg.NUM_QUERY_TOKENS, "use_embeddings_cache": True,
            "ctx_embeddings_cache": "subject_embeds", "dtype": "float32", "device": "cpu",
            "text_encoder": "LAVIS CtxCLIPTextModel(pipe.text_encoder.config) + load_state_dict(pipe.text_encoder)",
            "pndm_scheduler": "PNDMScheduler.from_config(checkpoint scheduler config)",
            "ddim_scheduler": "DDIMScheduler.from_config(checkpoint scheduler config, clip_sample=False)",
        },
        "unet_kwargs": UNET_KWARGS,
        "vae_kwargs": VAE_KWARGS,
        "build_seeds": {
            "base pipeline": "make_golden.build_pipeline(work, 'released') (text encoder, Q-Former, tokenizers, "
                             "scheduler, image processor)",
            "unet": {"torch.manual_seed": UNET_SEED, "perturb seed": UNET_PERTURB_SEED, "perturb std": UNET_PERTURB_STD,
                     "attn2.to_q/to_k extra noise": {"generator seed": ATTN_SHARPEN_SEED, "std": ATTN_SHARPEN_STD,
                                                     "order": "sorted parameter names"}},
            "vae": {"torch.manual_seed": VAE_SEED, "perturb seed": VAE_PERTURB_SEED, "perturb std": VAE_PERTURB_STD},
        },
        "torch_threads": 1,
        "deterministic_algorithms": True,
        "lavis": lavis_info,
        "torchvision": tv_info,
        **info,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "sha256": _sha256(v),
                "description": describe(k)}
            for k, v in tensors.items()
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": tv_info["version"],
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "safetensors": safetensors.__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "opencv": __import__("cv2").__version__,
        },
    }
    (out_dir / "inputs.json").write_text(json.dumps(inputs, indent=2, default=mg._json_default) + "\n",
                                         encoding="utf-8")
    return tensors, info


def _summary(info: dict) -> None:
    for mode in ("generated", "real"):
        m = info[mode]
        print(f"[{mode}] prompts: {m['prompts']}")
        if mode == "real":
            print(f"[{mode}] inversion prompt: {m['inversion_prompt']}  timesteps: {m['inversion_unet_timesteps']}")
        print(f"[{mode}] unet timesteps: {m['unet_timesteps']}")
        for i, (lat, cov) in enumerate(zip(m["per_step_max_abs_latent"], m["per_step_mask_coverage"])):
            print(f"[{mode}]   call {i}: max|latent|={lat:.4f}  mask coverage={cov:.4f}  "
                  f"blend changed edit row by {m['per_step_edit_row_changed_by_blend'][i]:.4f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--lavis", type=Path, default=None, help="a LAVIS checkout (default: read the git mirror)")
    ap.add_argument("--lavis-git", type=Path, default=DEFAULT_LAVIS_GIT, help="LAVIS git dir read when --lavis is unset")
    ap.add_argument("--lavis-rev", default="HEAD")
    ap.add_argument("--torchvision-path", type=Path,
                    default=DEFAULT_TORCHVISION_PATH if DEFAULT_TORCHVISION_PATH.is_dir() else None,
                    help="folder holding torchvision (pip install --target); default: %(default)s if it exists, "
                         "else the environment's own")
    ap.add_argument("--check-determinism", action="store_true",
                    help="generate twice into temp dirs and compare all golden tensors bit-for-bit")
    args = ap.parse_args(argv)
    mg.warn_versions()
    if args.check_determinism:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            ta, _ = generate(Path(a), args.lavis, args.lavis_git, args.lavis_rev, args.torchvision_path)
            tb, info = generate(Path(b), args.lavis, args.lavis_git, args.lavis_rev, args.torchvision_path)
            if not mg.same_runs(Path(a), Path(b), ta, tb):
                return 1
            _summary(info)
        return 0

    tensors, info = generate(args.out, args.lavis, args.lavis_git, args.lavis_rev, args.torchvision_path)
    _summary(info)
    mg.report_written(args.out, tensors, width=36)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
