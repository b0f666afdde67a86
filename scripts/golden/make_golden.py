"""Generate golden reference outputs from the deprecated diffusers BlipDiffusionPipeline.

This script builds a TINY, randomly initialised (seeded) BLIP-Diffusion checkpoint in the
exact folder layout of the released ``Salesforce/blipdiffusion`` checkpoint, runs the
reference implementation from diffusers 0.32.2 on it with fixed inputs, and writes the
tensors a reimplementation must reproduce.

Nothing is downloaded from any model hub: every tokenizer vocabulary is generated locally.

Reference environment (separate from the project's venv; only PyPI is needed)
---------------------------------------------------------------------------
    python3.11 -m venv /work/refenv
    /work/refenv/bin/pip install --upgrade pip
    /work/refenv/bin/pip install torch==2.13.0 diffusers==0.32.2 transformers==4.44.2 \
        'huggingface-hub<0.26' numpy pillow safetensors --only-binary=tokenizers

(`torch==2.13.0` resolves to the CPU build on the project machines. If a numpy-2
incompatibility ever shows up, add 'numpy<2'. The fixtures in the repo were produced with
numpy 2.4.6 / pillow 13.0.0 / tokenizers 0.19.1 / safetensors 0.8.0 - see inputs.json.)

Run (from the repository root)
------------------------------
    /work/refenv/bin/python scripts/golden/make_golden.py            # writes tests/fixtures/golden/
    /work/refenv/bin/python scripts/golden/make_golden.py --out DIR  # somewhere else

Outputs (in --out, default tests/fixtures/golden/)
---------------------------------------------------
* ``blipdiffusion-tiny/``  tiny checkpoint, released layout: model_index.json, qformer/,
  text_encoder/, tokenizer/, unet/, vae/, scheduler/, image_processor/.
  ``qformer/vocab.txt`` is the tiny BERT WordPiece vocabulary the Q-Former tokenizer was
  built from (the released checkpoint has NO tokenizer files for the Q-Former: the
  reference code calls ``BertTokenizer.from_pretrained("bert-base-uncased")`` at
  construction time, then adds a "[DEC]" bos token -> vocab_size 30523).
* ``golden.safetensors``   reference tensors (see GOLDEN_TENSORS below for the list).
* ``inputs.json``          every input value, the built prompt, token ids, timesteps,
  scheduler config, library versions, checksums of the tensors.
* ``reference.png``        the deterministic 64x64 reference (subject) image.

Determinism: single-threaded torch, deterministic algorithms, fixed seeds; two runs give
byte-identical golden.safetensors (``--check-determinism`` runs the whole generation twice
in temporary directories and compares).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import PIL.Image  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline  # noqa: E402
from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor  # noqa: E402
from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel  # noqa: E402
from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import BertTokenizer, Blip2Config, CLIPTextConfig, CLIPTokenizer  # noqa: E402
from transformers.models.clip.tokenization_clip import bytes_to_unicode  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "golden"
CKPT_NAME = "blipdiffusion-tiny"
# Variants of the checkpoint, as other code saves it:
# - released: model_index.json with explicit mean/std (as the released checkpoint), the
#   Q-Former's vocab.txt copied into qformer/;
# - external: the pipeline constructed with its default mean/std (model_index.json: null, so
#   the image processor's own values apply; here ImageNet's, not CLIP's) and the Q-Former's
#   tokenizer named by qformer/config.json `tokenizer` (a folder beside qformer/), none in qformer/.
VARIANTS = {"released": DEFAULT_OUT, "external": REPO_ROOT / "tests" / "fixtures" / "golden_external"}
EXTERNAL_TOKENIZER_DIR = "qformer_tokenizer"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

EXPECTED_VERSIONS = {"diffusers": "0.32.2", "transformers": "4.44.2"}

# --------------------------------------------------------------------------------------
# Tiny model hyper-parameters. Dimensions are deliberately all different where the
# architecture allows it, so a reimplementation that mixes them up fails loudly.
# --------------------------------------------------------------------------------------
SEED = 0
OUT_SIZE = 64  # generated image height == width (pixels)
VISION_IMAGE_SIZE = 32  # Q-Former vision tower input (released: 224)
VISION_PATCH = 8  # (released: 14)
VISION_HIDDEN = 48  # (released: 1024)
QFORMER_HIDDEN = 32  # must equal the CLIP text hidden size (released: 768)
NUM_QUERY_TOKENS = 16  # same as released
CLIP_MAX_POS = 77  # same as released
PERTURB_STD = 0.05  # every float parameter gets + N(0, PERTURB_STD) after default init

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

PIPE_INPUTS = dict(
    prompt=["swimming underwater"],
    source_subject_category=["dog"],
    target_subject_category=["dog"],
    guidance_scale=7.5,
    num_inference_steps=3,
    neg_prompt="",  # pipeline default
    prompt_strength=1.0,
    prompt_reps=20,
    height=OUT_SIZE,
    width=OUT_SIZE,
    generator_seed=0,
    output_type="np",
)

BERT_WORDS = """
a an the in on at of to with and or is are dog dogs cat cats toy toys snow beach water
swimming underwater sitting running grass city park red blue green yellow black white
photo picture painting style sofa table car house mountain forest sky sun night of
""".split()

GOLDEN_TENSORS = {
    "reference_pixel_values": "image_processor output for reference.png, (1,3,32,32) float32",
    "qformer_input_ids": "BertTokenizer(source_subject_category, padding=True) ids, int64",
    "query_embeds": "pipe.get_query_embeddings(pixel_values, ['dog']) == Q-Former + proj_layer, (1,16,32)",
    "text_input_ids_cond": "CLIP ids of the built prompt, max_length=77-16=61, truncated, int64",
    "text_embeds_cond": "pipe.encode_prompt(query_embeds, built_prompt), (1,77,32)",
    "text_input_ids_uncond": "CLIP ids of [neg_prompt], padding to 77, int64",
    "text_embeds_uncond": "text_encoder(input_ids=uncond_ids, ctx_embeddings=None)[0], (1,77,32)",
    "init_latents": "randn((1,4,32,32), generator=Generator().manual_seed(0)) * init_noise_sigma(=1)",
    "timesteps": "scheduler.timesteps after set_timesteps(3) (PNDM/PLMS repeats one: 4 entries)",
    "unet_noise_pred_t0": "unet(cat([init_latents]*2), timesteps[0], cat([uncond, cond])).sample, (2,4,32,32) "
    "- row 0 = uncond, row 1 = cond",
    "unet_noise_pred_t0_guided": "uncond + 7.5 * (cond - uncond) of the above, (1,4,32,32)",
    "latents_per_step": "scheduler.step(...).prev_sample after every step, (4,1,4,32,32)",
    "final_latents": "latents fed to vae.decode (before / scaling_factor), (1,4,32,32)",
    "image": "pipeline output, output_type='np', (1,64,64,3) float32 in [0,1]",
}


# --------------------------------------------------------------------------------------
# Local tokenizers (no hub)
# --------------------------------------------------------------------------------------
def write_bert_vocab(path: Path) -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punct = list(".,!?'-:;()\"")
    pieces = ["##" + ch for ch in letters + digits]
    words = []
    for w in BERT_WORDS:
        if w not in words and w not in letters:
            words.append(w)
    vocab = specials + letters + digits + punct + pieces + words
    assert len(vocab) == len(set(vocab))
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return vocab


def write_clip_vocab(vocab_path: Path, merges_path: Path) -> dict[str, int]:
    """Character-level byte-BPE vocabulary in the same order as the real CLIP vocab
    (256 byte chars, the same with '</w>', [merges: none], <|startoftext|>, <|endoftext|>)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == 514
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab


class _PatchedBertFromPretrained:
    """Context manager: BertTokenizer.from_pretrained('bert-base-uncased') -> tiny local vocab."""

    def __init__(self, vocab_file: Path):
        self.vocab_file = str(vocab_file)
        self._orig = None

    def __enter__(self):
        self._orig = BertTokenizer.__dict__["from_pretrained"] if "from_pretrained" in BertTokenizer.__dict__ else None
        orig_bound = BertTokenizer.from_pretrained
        vocab_file = self.vocab_file

        def fake_from_pretrained(cls, name, *args, **kwargs):
            if name == "bert-base-uncased":
                # mirrors the kwargs the reference passes (truncation_side="right")
                return cls(vocab_file=vocab_file, do_lower_case=True, **kwargs)
            return orig_bound(name, *args, **kwargs)

        BertTokenizer.from_pretrained = classmethod(fake_from_pretrained)
        return self

    def __exit__(self, *exc):
        if self._orig is None:
            del BertTokenizer.from_pretrained
        else:
            BertTokenizer.from_pretrained = self._orig
        return False


# --------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------
@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, std: float = PERTURB_STD) -> None:
    """Add seeded N(0, std) noise to every floating parameter, so that no weight keeps a
    trivial default (zero biases, unit LayerNorm gains, zero query_tokens ...)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.is_floating_point():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def build_pipeline(work: Path, variant: str = "released") -> BlipDiffusionPipeline:
    tok_dir = work / "_tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    bert_vocab = tok_dir / "vocab.txt"
    bert_tokens = write_bert_vocab(bert_vocab)
    clip_vocab = write_clip_vocab(tok_dir / "vocab.json", tok_dir / "merges.txt")

    tokenizer = CLIPTokenizer(
        vocab_file=str(tok_dir / "vocab.json"),
        merges_file=str(tok_dir / "merges.txt"),
        model_max_length=CLIP_MAX_POS,
    )
    bos_id = clip_vocab["<|startoftext|>"]
    eos_id = clip_vocab["<|endoftext|>"]

    torch.manual_seed(SEED)
    text_encoder_config = CLIPTextConfig(
        vocab_size=len(clip_vocab),
        hidden_size=QFORMER_HIDDEN,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_POS,
        hidden_act="quick_gelu",
        projection_dim=QFORMER_HIDDEN,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,  # CLIPTokenizer pads with <|endoftext|>
    )
    text_encoder = ContextCLIPTextModel(text_encoder_config)
    perturb_(text_encoder, SEED + 1)

    torch.manual_seed(SEED + 10)
    vision_config = {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 56,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": VISION_IMAGE_SIZE,
        "patch_size": VISION_PATCH,
        "hidden_act": "quick_gelu",
    }
    qformer_config = {
        "vocab_size": len(bert_tokens) + 1,  # + "[DEC]" added by the reference, like 30522 + 1
        "hidden_size": QFORMER_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 44,
        "max_position_embeddings": 512,
        "cross_attention_frequency": 1,
    }
    blip2_config = Blip2Config(
        vision_config=vision_config,
        qformer_config=qformer_config,
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    with _PatchedBertFromPretrained(bert_vocab):
        qformer = Blip2QFormerModel(blip2_config)
    perturb_(qformer, SEED + 11)

    torch.manual_seed(SEED + 20)
    unet = UNet2DConditionModel(
        sample_size=OUT_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=QFORMER_HIDDEN,
        attention_head_dim=4,
    )
    perturb_(unet, SEED + 21, std=0.02)

    torch.manual_seed(SEED + 30)
    # 2 blocks -> downsample factor 2, which matches the pipeline's latent scale factor
    # 2 ** (len(unet.block_out_channels) - 1) = 2, so the decoded image is OUT_SIZE x OUT_SIZE.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=OUT_SIZE,
    )
    perturb_(vae, SEED + 31, std=0.02)

    # Same settings as the original conversion script / SD-1.5 PNDM config.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )

    external = variant == "external"
    image_processor = BlipImageProcessor(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        image_mean=IMAGENET_MEAN if external else CLIP_MEAN,
        image_std=IMAGENET_STD if external else CLIP_STD,
    )
    if external:
        # saved into qformer/config.json; the reference resolves it when it constructs the Q-Former
        qformer.config.tokenizer = EXTERNAL_TOKENIZER_DIR

    pipe = BlipDiffusionPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        qformer=qformer,
        image_processor=image_processor,
        ctx_begin_pos=2,
        mean=None if external else CLIP_MEAN,
        std=None if external else CLIP_STD,
    )
    return pipe


def make_reference_image() -> PIL.Image.Image:
    """Deterministic 64x64 RGB pattern (smooth gradients + rings + checker), uint8."""
    h = w = 64
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(x / 5.0) * np.cos(y / 7.0)
    g = 255.0 * (x + y) / (h + w - 2)
    rad = np.sqrt((x - 40.0) ** 2 + (y - 24.0) ** 2)
    b = 127.5 + 127.5 * np.cos(rad / 3.0)
    checker = (((x // 8) + (y // 8)) % 2) * 40.0
    img = np.stack([r, g, np.clip(b - checker, 0, 255)], axis=-1)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(img, mode="RGB")


# --------------------------------------------------------------------------------------
# Golden generation
# --------------------------------------------------------------------------------------
def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def recorded_steps_and_decode(pipe, cap: dict):
    """Inside the block, every scheduler step appends (model output, timestep, prev_sample) to
    cap["step"] and every VAE decode its latents to cap["decode"]; restored on exit."""
    orig_step, orig_decode = pipe.scheduler.step, pipe.vae.decode

    def step_wrapper(model_output, timestep, sample, *a, **kw):
        out = orig_step(model_output, timestep, sample, *a, **kw)
        cap["step"].append((model_output.clone(), int(timestep), out["prev_sample"].clone()))
        return out

    def decode_wrapper(z, *a, **kw):
        cap["decode"].append(z.clone())
        return orig_decode(z, *a, **kw)

    pipe.scheduler.step, pipe.vae.decode = step_wrapper, decode_wrapper
    try:
        yield
    finally:
        pipe.scheduler.step, pipe.vae.decode = orig_step, orig_decode


def call_pipeline(pipe, ref_image, control_image=None):
    """The reference pipeline on PIPE_INPUTS (with a condition image: the ControlNet pipeline);
    its images."""
    p = PIPE_INPUTS
    args = [p["prompt"], ref_image] + ([control_image] if control_image is not None else [])
    return pipe(
        *args,
        p["source_subject_category"],
        p["target_subject_category"],
        guidance_scale=p["guidance_scale"],
        height=p["height"],
        width=p["width"],
        num_inference_steps=p["num_inference_steps"],
        generator=torch.Generator(device="cpu").manual_seed(p["generator_seed"]),
        neg_prompt=p["neg_prompt"],
        prompt_strength=p["prompt_strength"],
        prompt_reps=p["prompt_reps"],
        output_type=p["output_type"],
    ).images


@torch.no_grad()
def run_reference(ckpt_dir: Path, ref_png: Path, bert_vocab: Path, variant: str = "released"):
    if variant == "external":
        # qformer/config.json names the tokenizer folder relative to the checkpoint; the
        # reference resolves it against the working directory
        cwd = os.getcwd()
        os.chdir(ckpt_dir)
        try:
            pipe = BlipDiffusionPipeline.from_pretrained(str(ckpt_dir))
        finally:
            os.chdir(cwd)
        assert pipe.config.mean is None and pipe.config.std is None
    else:
        with _PatchedBertFromPretrained(bert_vocab):
            pipe = BlipDiffusionPipeline.from_pretrained(str(ckpt_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    for name in ("qformer", "text_encoder", "unet", "vae"):
        m = getattr(pipe, name)
        m.eval()
        assert not any(mod.training for mod in m.modules()), name

    ref_image = PIL.Image.open(ref_png).convert("RGB")
    ref_image.load()
    p = PIPE_INPUTS

    # ---------------- capture what the pipeline itself computes (hooks) ----------------
    cap: dict[str, list] = {"qformer": [], "text_encoder": [], "unet": [], "step": [], "decode": []}
    hooks = []
    hooks.append(pipe.qformer.register_forward_hook(
        lambda m, args, kwargs, out: cap["qformer"].append((kwargs, out)), with_kwargs=True))
    hooks.append(pipe.text_encoder.register_forward_hook(
        lambda m, args, kwargs, out: cap["text_encoder"].append((kwargs, out[0].clone())), with_kwargs=True))
    hooks.append(pipe.unet.register_forward_hook(
        lambda m, args, kwargs, out: cap["unet"].append((args, kwargs, out["sample"].clone())), with_kwargs=True))

    with recorded_steps_and_decode(pipe, cap):
        image = call_pipeline(pipe, ref_image)
    for h in hooks:
        h.remove()
    assert isinstance(image, np.ndarray), type(image)
    assert image.shape == (1, p["height"], p["width"], 3), image.shape
    assert np.isfinite(image).all()
    image_t = torch.from_numpy(np.ascontiguousarray(image)).float()

    # ---------------- recompute each stage through the pipeline internals ----------------
    pixel_values = pipe.image_processor.preprocess(
        ref_image, image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt"
    )["pixel_values"]
    built = pipe._build_prompt(
        prompts=p["prompt"], tgt_subjects=p["target_subject_category"],
        prompt_strength=p["prompt_strength"], prompt_reps=p["prompt_reps"],
    )
    qformer_ids = pipe.qformer.tokenizer(p["source_subject_category"], return_tensors="pt", padding=True).input_ids
    query_embeds = pipe.get_query_embeddings(pixel_values, p["source_subject_category"])
    text_embeds_cond = pipe.encode_prompt(query_embeds, built, torch.device("cpu"))

    max_len_cond = pipe.text_encoder.text_model.config.max_position_embeddings - pipe.qformer.config.num_query_tokens
    ids_cond = pipe.tokenizer(built, padding="max_length", truncation=True, max_length=max_len_cond,
                              return_tensors="pt").input_ids
    max_len_uncond = pipe.text_encoder.text_model.config.max_position_embeddings
    ids_uncond = pipe.tokenizer([p["neg_prompt"]] * len(p["prompt"]), padding="max_length",
                                max_length=max_len_uncond, return_tensors="pt").input_ids
    text_embeds_uncond = pipe.text_encoder(input_ids=ids_uncond, ctx_embeddings=None)[0]

    scale_down = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    latent_shape = (len(p["prompt"]), pipe.unet.config.in_channels, p["height"] // scale_down, p["width"] // scale_down)
    init_latents = randn_tensor(latent_shape, generator=torch.Generator().manual_seed(p["generator_seed"]),
                                device=torch.device("cpu"), dtype=torch.float32)
    init_latents = init_latents * pipe.scheduler.init_noise_sigma
    sched = PNDMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(p["num_inference_steps"])
    timesteps = sched.timesteps.clone()
    emb = torch.cat([text_embeds_uncond, text_embeds_cond])
    noise_pred_t0 = pipe.unet(torch.cat([init_latents] * 2), timestep=timesteps[0],
                              encoder_hidden_states=emb)["sample"]
    u, c = noise_pred_t0.chunk(2)
    noise_pred_t0_guided = u + p["guidance_scale"] * (c - u)

    # ---------------- cross-check recomputation against what the pipeline did ----------------
    q_kwargs, q_out = cap["qformer"][0]
    assert len(cap["qformer"]) == 1
    assert torch.equal(q_kwargs["image_input"], pixel_values), "pixel_values differ"
    assert torch.equal(q_out, query_embeds), "query_embeds differ"
    assert len(cap["text_encoder"]) == 2
    (te_kw0, te_cond), (te_kw1, te_uncond) = cap["text_encoder"]
    assert torch.equal(te_kw0["input_ids"], ids_cond) and te_kw0["ctx_begin_pos"] == [pipe.config.ctx_begin_pos]
    assert te_kw1["ctx_embeddings"] is None and torch.equal(te_kw1["input_ids"], ids_uncond)
    assert torch.equal(te_cond, text_embeds_cond), "cond text embeds differ"
    assert torch.equal(te_uncond, text_embeds_uncond), "uncond text embeds differ"
    assert len(cap["unet"]) == len(timesteps)
    u_args, u_kw, u_out = cap["unet"][0]
    assert torch.equal(u_args[0], torch.cat([init_latents] * 2)), "initial latents differ"
    assert torch.equal(u_kw["encoder_hidden_states"], emb)
    assert int(u_kw["timestep"]) == int(timesteps[0])
    assert torch.equal(u_out, noise_pred_t0), "unet noise pred differs"
    assert torch.equal(cap["step"][0][0], noise_pred_t0_guided), "guided noise pred differs"
    assert [s[1] for s in cap["step"]] == [int(t) for t in timesteps]
    assert len(cap["decode"]) == 1
    final_latents = cap["step"][-1][2]
    assert torch.equal(cap["decode"][0], final_latents / pipe.vae.config.scaling_factor)
    # decoding the captured latents again reproduces the image
    img2 = pipe.vae.decode(final_latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    img2 = (img2 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.equal(img2, image_t)

    tensors = {
        "reference_pixel_values": pixel_values.float(),
        "qformer_input_ids": qformer_ids.to(torch.int64),
        "query_embeds": query_embeds,
        "text_input_ids_cond": ids_cond.to(torch.int64),
        "text_embeds_cond": text_embeds_cond,
        "text_input_ids_uncond": ids_uncond.to(torch.int64),
        "text_embeds_uncond": text_embeds_uncond,
        "init_latents": init_latents,
        "timesteps": timesteps.to(torch.int64),
        "unet_noise_pred_t0": noise_pred_t0,
        "unet_noise_pred_t0_guided": noise_pred_t0_guided,
        "latents_per_step": torch.stack([s[2] for s in cap["step"]]),
        "final_latents": final_latents,
        "image": image_t,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for k, v in tensors.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k

    te_cfg = pipe.text_encoder.config
    info = {
        "built_prompt": built,
        "max_length_cond": max_len_cond,
        "max_length_uncond": max_len_uncond,
        "latent_shape": list(latent_shape),
        "latent_scale_down_factor": scale_down,
        "timesteps": [int(t) for t in timesteps],
        "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items()},
        "qformer_tokens": pipe.qformer.tokenizer.convert_ids_to_tokens(qformer_ids[0].tolist()),
        "qformer_tokenizer_len": len(pipe.qformer.tokenizer),
        "cond_tokens": pipe.tokenizer.convert_ids_to_tokens(ids_cond[0].tolist()),
        "text_encoder_attn_implementation": getattr(te_cfg, "_attn_implementation", None),
        "qformer_attn_implementation": getattr(pipe.qformer.config, "_attn_implementation", None),
        "unet_attn_processors": sorted({type(pr).__name__ for pr in pipe.unet.attn_processors.values()}),
        # config.json files only store non-default values; these are the fully resolved configs
        "qformer_config_resolved": _resolved_blip2_config(pipe.qformer.config),
        "text_encoder_config_resolved": _strip_generic(te_cfg.to_dict()),
    }
    return tensors, info


_GENERIC_CONFIG_KEYS = set(transformers.PretrainedConfig().to_dict().keys()) - {
    "bos_token_id", "eos_token_id", "pad_token_id", "architectures", "model_type"}


def _strip_generic(d: dict) -> dict:
    """Drop the generation/bookkeeping keys every PretrainedConfig carries."""
    return {k: v for k, v in d.items() if k not in _GENERIC_CONFIG_KEYS and not k.startswith("_")}


def _resolved_blip2_config(cfg) -> dict:
    d = cfg.to_dict()
    return {
        "num_query_tokens": d["num_query_tokens"],
        "vision_config": _strip_generic(d["vision_config"]),
        "qformer_config": _strip_generic(d["qformer_config"]),
    }


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def start_run(out_dir: Path, ckpt_name: str) -> Path:
    """A golden script's set-up: single-threaded deterministic torch, the output folder, and
    its checkpoint folder removed (save_pretrained writes it anew); returns that folder."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / ckpt_name
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    return ckpt_dir


def generate(out_dir: Path, variant: str = "released") -> dict[str, torch.Tensor]:
    ckpt_dir = start_run(out_dir, CKPT_NAME)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe = build_pipeline(tmp, variant)
        pipe.save_pretrained(str(ckpt_dir), safe_serialization=True)
        tokenizer_dir = ckpt_dir / (EXTERNAL_TOKENIZER_DIR if variant == "external" else "qformer")
        tokenizer_dir.mkdir(exist_ok=True)
        shutil.copyfile(tmp / "_tok" / "vocab.txt", tokenizer_dir / "vocab.txt")
        del pipe

    ref_png = out_dir / "reference.png"
    make_reference_image().save(ref_png, format="PNG", optimize=False)

    tokenizer_dir = ckpt_dir / (EXTERNAL_TOKENIZER_DIR if variant == "external" else "qformer")
    tensors, info = run_reference(ckpt_dir, ref_png, tokenizer_dir / "vocab.txt", variant)

    save_file(tensors, str(out_dir / "golden.safetensors"), metadata={"generator": "scripts/golden/make_golden.py"})

    p = PIPE_INPUTS
    inputs = {
        "description": "Golden outputs of diffusers 0.32.2 BlipDiffusionPipeline on a tiny seeded checkpoint. "
        "Regenerate with: /work/refenv/bin/python scripts/golden/make_golden.py",
        "checkpoint_dir": CKPT_NAME,
        "reference_image": "reference.png",
        "reference_image_size_wh": [64, 64],
        "pipeline_call": {
            "prompt": p["prompt"],
            "reference_image": "reference.png (PIL RGB)",
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
        "variant": variant,
        "ctx_begin_pos": 2,
        "image_mean": IMAGENET_MEAN if variant == "external" else CLIP_MEAN,
        "image_std": IMAGENET_STD if variant == "external" else CLIP_STD,
        "model_index_mean_std": None if variant == "external" else "explicit (CLIP's)",
        "qformer_tokenizer": (f"qformer/config.json tokenizer={EXTERNAL_TOKENIZER_DIR!r} (relative to the checkpoint)"
                              if variant == "external" else "qformer/vocab.txt"),
        "vision_image_size": VISION_IMAGE_SIZE,
        "num_query_tokens": NUM_QUERY_TOKENS,
        "build_seeds": {"torch.manual_seed before each component": [SEED, SEED + 10, SEED + 20, SEED + 30],
                        "perturbation generator seeds (text_encoder, qformer, unet, vae)":
                            [SEED + 1, SEED + 11, SEED + 21, SEED + 31],
                        "perturbation std (text_encoder, qformer, unet, vae)": [PERTURB_STD, PERTURB_STD, 0.02, 0.02]},
        "torch_threads": 1,
        "deterministic_algorithms": True,
        **info,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "sha256": _sha256(v),
                "description": GOLDEN_TENSORS[k]}
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
            "qformer/vocab.txt is a tiny generated WordPiece vocab; the released checkpoint uses "
            "bert-base-uncased's tokenizer (loaded from the hub by the reference code) + '[DEC]'.",
            "tokenizer/ is a character-level byte BPE (514 tokens, no merges); the released one is the SD-1.5 "
            "CLIP BPE tokenizer (49408 tokens).",
            "Weights are default-initialised under torch.manual_seed and then perturbed with seeded Gaussian noise.",
        ],
    }
    (out_dir / "inputs.json").write_text(json.dumps(inputs, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return tensors


def warn_versions() -> None:
    """A warning when the reference environment is not the one the fixtures were made with."""
    for lib, want in EXPECTED_VERSIONS.items():
        have = {"diffusers": diffusers.__version__, "transformers": transformers.__version__}[lib]
        if have != want:
            print(f"WARNING: {lib} {have} != expected {want}", file=sys.stderr)


def same_runs(a: Path, b: Path, ta: dict, tb: dict, all_files: bool = True) -> bool:
    """--check-determinism: two runs' tensors and golden.safetensors (and, with `all_files`,
    every file they wrote) byte-identical; prints the verdict."""
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    ha = hashlib.sha256((a / "golden.safetensors").read_bytes()).hexdigest()
    hb = hashlib.sha256((b / "golden.safetensors").read_bytes()).hexdigest()
    print("golden.safetensors sha256:", ha, hb)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    bad_files = [str(f) for f in files_a if all_files and (f not in files_b or (a / f).read_bytes() != (b / f).read_bytes())]
    if bad or ha != hb or (all_files and files_a != files_b) or bad_files:
        print("NOT deterministic:", bad, bad_files, file=sys.stderr)
        return False
    print(f"deterministic: OK ({len(files_a) if all_files else 'golden.safetensors and tensors'} "
          f"{'files byte-identical' if all_files else 'identical'})")
    return True


def report_written(out: Path, tensors: dict, width: int = 28) -> None:
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    for k, v in tensors.items():
        extra = f" min={v.min().item():.4f} max={v.max().item():.4f}" if v.is_floating_point() else ""
        print(f"  {k:{width}s} {str(tuple(v.shape)):22s} {str(v.dtype):14s}{extra}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="released",
                    help="released: explicit mean/std, tokenizer in qformer/; external: default (null) "
                         "mean/std and the tokenizer named by qformer/config.json")
    ap.add_argument("--out", type=Path, help="default: tests/fixtures/golden (released) or golden_external")
    ap.add_argument("--check-determinism", action="store_true",
                    help="generate twice into temp dirs and compare all golden tensors bit-for-bit")
    args = ap.parse_args(argv)
    warn_versions()
    if args.check_determinism:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            ta, tb = generate(Path(a), args.variant), generate(Path(b), args.variant)
            return 0 if same_runs(Path(a), Path(b), ta, tb, all_files=False) else 1

    args.out = args.out or VARIANTS[args.variant]
    tensors = generate(args.out, args.variant)
    report_written(args.out, tensors)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
