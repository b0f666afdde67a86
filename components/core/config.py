"""Typed view of params.yaml: one section per stage, unknown keys and bad values rejected.

params.yaml is the single source of configuration. DVC tracks its sections as stage
parameters; this module turns them into frozen pydantic objects so that a typo such as
`ingest.sorce` fails at once with a message naming the key, instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.core.errors import ConfigError

Preset = Literal["tiny", "blipdiffusion", "sd15-blip2"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- ingest
class SyntheticSourceConfig(_Section):
    num_subjects: int = Field(12, ge=1, le=14)
    min_views: int = Field(7, ge=1, le=32)
    max_views: int = Field(9, ge=1, le=32)
    image_size: int = Field(128, ge=32, le=2048)

    @model_validator(mode="after")
    def _views_ordered(self) -> "SyntheticSourceConfig":
        if self.min_views > self.max_views:
            raise ValueError(
                f"min_views ({self.min_views}) must not exceed max_views ({self.max_views})"
            )
        return self


class DreamBenchSourceConfig(_Section):
    # A local copy of the DreamBooth dataset layout; null downloads the public archive.
    path: str | None = None  # null: $BLIPDIFF_DREAMBENCH, else the verified download
    url: str = "https://github.com/google/dreambooth/archive/refs/heads/main.zip"
    cache_dir: str = "~/.cache/blipdiff/dreambench"


class FolderSourceConfig(_Section):
    path: str | None = None  # <path>/<subject>/<image files>
    classes_csv: str | None = None  # columns: subject,class


class IngestConfig(_Section):
    source: Literal["synthetic", "dreambench", "folder"] = "synthetic"
    seed: int = 0
    max_side: int = Field(512, ge=32, le=8192)
    # The stage fails when more than this share of candidate files is unreadable.
    max_skipped_fraction: float = Field(0.25, ge=0.0, le=1.0)
    # Images declaring more pixels are skipped (too_large) before they are decoded.
    max_image_pixels: int = Field(100_000_000, ge=1)
    # The last N images of each subject (in sorted order) form the held-out "test" split.
    test_views_per_subject: int = Field(3, ge=0)
    synthetic: SyntheticSourceConfig = SyntheticSourceConfig()
    dreambench: DreamBenchSourceConfig = DreamBenchSourceConfig()
    folder: FolderSourceConfig = FolderSourceConfig()

    @model_validator(mode="after")
    def _source_has_path(self) -> "IngestConfig":
        if self.source == "folder" and not self.folder.path:
            raise ValueError("source 'folder' needs folder.path (a directory of subject folders)")
        return self


# -------------------------------------------------------------------------- context
class ContextConfig(_Section):
    seed: int = 0
    # auto = ground-truth alpha where the source has one (synthetic), CLIPSeg elsewhere.
    mask_source: Literal["clipseg", "ground_truth", "auto"] = "auto"
    # null = the preset's CLIPSeg (tiny: built locally; others: CIDAS/clipseg-rd64-refined);
    # a local directory or hub id overrides it.
    clipseg_model: str | None = None
    clipseg_batch_size: int = Field(8, ge=1, le=256)
    # Rescale each probability map to [0, 1] before thresholding. auto: only for the tiny
    # preset's random CLIPSeg, whose maps are meaningless in scale; a real CLIPSeg's map that
    # finds nothing must stay empty (a skipped, degenerate trimap), not be stretched into a
    # confident one.
    normalize_probs: bool | Literal["auto"] = "auto"
    fg_threshold: float = Field(0.7, gt=0.0, lt=1.0)
    bg_threshold: float = Field(0.3, gt=0.0, lt=1.0)
    erode: int = Field(2, ge=0, le=64)  # shrink the known regions by this many pixels
    gt_band: int = Field(3, ge=0, le=64)  # unknown band half-width of ground-truth trimaps
    min_region_fraction: float = Field(0.005, ge=0.0, lt=0.5)  # less fg or bg = degenerate
    backgrounds_per_image: int = Field(2, ge=1, le=64)
    background_source: Literal["procedural", "folder"] = "procedural"
    background_dir: str | None = None
    background_pool_size: int = Field(32, ge=1, le=10000)
    # Matting runs with the longest side at most this, alpha upsampled back; null = full size.
    matting_max_side: int | None = Field(256, ge=32)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> "ContextConfig":
        if self.bg_threshold >= self.fg_threshold:
            raise ValueError(
                f"bg_threshold ({self.bg_threshold}) must be below fg_threshold ({self.fg_threshold})"
            )
        if self.background_source == "folder" and not self.background_dir:
            raise ValueError("background_source 'folder' needs background_dir")
        return self


# ----------------------------------------------------------------------------- base
class BaseAutoencoderConfig(_Section):
    steps: int = Field(800, ge=0)  # 0: keep the seeded random VAE (tests only: it does not reconstruct)
    learning_rate: float = Field(2e-3, gt=0.0)
    kl_weight: float = Field(1e-5, ge=0.0)  # per latent element, against the per-pixel MSE


class BaseImageEncoderConfig(_Section):
    steps: int = Field(1000, ge=0)  # 0: keep the random image encoder
    learning_rate: float = Field(1e-3, gt=0.0)
    temperature: float = Field(0.07, gt=0.0)


class BasePriorConfig(_Section):
    steps: int = Field(1500, ge=0)  # 0: keep the random UNet and text encoder
    learning_rate: float = Field(3e-3, gt=0.0)
    warmup_steps: int = Field(50, ge=0)
    caption_drop: float = Field(0.1, ge=0.0, lt=1.0)  # share of empty captions (classifier-free guidance)
    augmented_copies: int = Field(16, ge=1)  # flipped/cropped versions of each image, encoded once


class BaseCheckConfig(_Section):
    images_per_subject: int = Field(4, ge=1)
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(5.0, ge=0.0)


class BaseConfig(_Section):
    """Stage `base`: the model every later stage starts from, in models/base/. Tiny: trained
    here on the ingested train split (autoencoder, image encoder, text-to-image prior); full
    presets: the preset's hub snapshot at a pinned revision, or a local folder."""

    seed: int = 0
    source: str | None = None  # null: the preset's (tiny: train here; full: its hub id); or a local model folder
    revision: str | None = None  # full presets: the hub revision (null: the preset's pinned one)
    resolution: int = Field(32, ge=16)  # tiny: training and sampling size (the model's native size)
    batch_size: int = Field(32, ge=2)
    autoencoder: BaseAutoencoderConfig = BaseAutoencoderConfig()
    image_encoder: BaseImageEncoderConfig = BaseImageEncoderConfig()
    prior: BasePriorConfig = BasePriorConfig()
    check: BaseCheckConfig = BaseCheckConfig()

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"resolution ({value}) must be a multiple of 8")
        return value


# -------------------------------------------------------------------- controlnet
class ControlNetCheckConfig(_Section):
    """The control check: each held-out view's caption drawn with and without its edge map."""

    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(5.0, ge=1.0)


class ControlNetConfig(_Section):
    """Stage `controlnet`: a canny-edge ControlNet for the base model, in models/controlnet/.
    Tiny: trained here (diffusers' ControlNetModel.from_unet of the base UNet) on the ingested
    train split's edge maps; full presets: a ControlNet folder or hub id (`source`)."""

    seed: int = 0
    base: str | None = "models/base"  # the UNet it is made for; null: the preset's own networks (tests)
    source: str | None = None  # null: tiny trains here, full presets take their canny ControlNet (hub)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-3, gt=0.0)
    warmup_steps: int = Field(50, ge=0)
    caption_drop: float = Field(0.5, ge=0.0, le=1.0)  # empty captions: the ControlNet learns from the edges alone
    canny_low: int = Field(100, ge=0)
    canny_high: int = Field(200, ge=0)
    check: ControlNetCheckConfig = ControlNetCheckConfig()


# -------------------------------------------------------------------- train_subject
class PretrainQFormerConfig(_Section):
    """Stage 1, Q-Former pre-training with BLIP-2's three objectives (frozen image encoder)."""

    seed: int = 0
    base: str | None = "models/base"  # the base stage's model; null: the preset's own networks (tests)
    steps: int = Field(400, ge=1)
    batch_size: int = Field(32, ge=2)  # per process; ITC and ITM need in-batch negatives
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-3, gt=0.0)  # tiny preset; BLIP-2 used 1e-4 at full scale
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.05, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    embed_dim: int = Field(256, ge=8)  # ITC projection size (BLIP-2: 256)
    max_text_length: int = Field(64, ge=8)  # tokens; also capped by the Q-Former's positions
    itc_weight: float = Field(1.0, ge=0.0)
    itm_weight: float = Field(1.0, ge=0.0)
    itg_weight: float = Field(1.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # ITG cross-entropy (BLIP-2: 0.1)
    itc_label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # ITC cross-entropy (BLIP-2: 0.1)
    # ITC gradient through the other side's features too (image-to-text rows into the texts,
    # and back); BLIP-2 gathers them without gradient (false): each direction trains one side.
    itc_full_gradient: bool = False
    augment: bool = True  # random flips and crops of the training images
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    num_workers: int = Field(0, ge=0, le=64)  # DataLoader workers reading images from disk
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "PretrainQFormerConfig":
        if not (self.itc_weight or self.itm_weight or self.itg_weight):
            raise ValueError("all objective weights are 0: set itc_weight, itm_weight or itg_weight")
        return self


class TrainSubjectConfig(_Section):
    """Stage 2, subject representation learning (paper Sec. 4.2)."""

    seed: int = 0
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(16, ge=1)  # per process, per micro-batch
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)  # the paper: 2e-6 at full scale
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    resolution: int = Field(32, ge=16)  # training image size (multiple of 8)
    subject_prompt_drop: float = Field(0.15, ge=0.0, le=1.0)
    # The text is `generate`'s prompt, subject embeddings after "a": caption = "a [class]
    # [caption]"; neutral = "a [class]". Synthetic captions name every attribute of a
    # subject, so with them the UNet can ignore the subject embeddings; neutral is the default.
    prompt_text: Literal["caption", "neutral"] = "neutral"
    # Start from this pre-trained Q-Former folder (stage pretrain_qformer's output); null =
    # the preset's own Q-Former (the released one for blipdiffusion).
    base: str | None = "models/base"  # the base stage's model; null: the preset's own networks (tests)
    qformer: str | None = "models/qformer"
    train_qformer: bool = True  # Q-Former + projection (the image encoder stays frozen)
    train_text_encoder: bool = True
    train_unet: bool = True
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: fp16 on GPU
    gradient_checkpointing: bool = False
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)  # null = no EMA
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(0, ge=0)  # 0 = only at the end
    num_workers: int = Field(0, ge=0, le=64)  # DataLoader workers reading samples from disk
    cache: bool = False  # keep VAE latent moments and image-encoder features on disk
    cache_dir: str = "models/.cache/train_subject"  # relative to the repository, or absolute
    # Learning check: subject identification by denoising error on held-out views.
    id_draws: int = Field(8, ge=1)  # noise draws per held-out image
    id_min_timestep: int = Field(500, ge=0, le=999)
    # Learning check: generation. Each held-out view's subject embeddings (with its class) and
    # the text "a [class]", shared by every subject of the class, draw gen_images_per_view
    # images (seeds seed + 0, 1, ...) at `resolution`; a fixed colour-and-shape
    # classifier fitted on the training views names the subject of each
    # (components/evaluation/subject_classifier.py). 0: no check.
    gen_images_per_view: int = Field(4, ge=0)
    gen_steps: int = Field(25, ge=1)  # sampler steps (PNDM)
    gen_guidance_scale: float = Field(5.0, ge=0.0)  # classifier-free guidance (<= 1: none)
    gen_batch_size: int = Field(64, ge=1)  # images per generate call

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSubjectConfig":
        if self.resolution % 8:
            raise ValueError(f"resolution ({self.resolution}) must be a multiple of 8")
        if not (self.train_qformer or self.train_text_encoder or self.train_unet):
            raise ValueError("nothing to train: set one of train_qformer, train_text_encoder, train_unet")
        return self


# ------------------------------------------------------------------------- evaluate
# LAVIS's default negative prompt for BLIP-Diffusion sampling.
NEGATIVE_PROMPT = ("over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped, "
                   "worst quality, low quality, jpeg artifacts, morbid, mutilated, out of frame, ugly, "
                   "bad anatomy, bad proportions, deformed, blurry, duplicate")


class EvalFinetuneConfig(_Section):
    """Fine-tuned mode: `blipdiff finetune` on each subject's real images before generating."""

    steps: int = Field(40, ge=1)
    batch_size: int = Field(3, ge=1)
    learning_rate: float = Field(5e-6, gt=0.0)
    lora_rank: int = Field(0, ge=0)  # 0: the whole UNet; > 0: LoRA adapters only


class EvaluateConfig(_Section):
    """DreamBench evaluation (DreamBooth protocol): generate, then score with DINO and CLIP."""

    # The benchmark the protocol runs on: `dreambench` (the DreamBooth dataset's photos and
    # prompts), `heldout` (the ingested subjects' held-out views, split test, laid out as
    # DreamBench with background-scene prompts; `synthetic` is accepted for it: on the default
    # profile they are the synthetic subjects), or `auto`: heldout on the tiny preset, whose
    # model never saw DreamBench-like photos, else dreambench.
    benchmark: Literal["auto", "dreambench", "heldout"] = "auto"
    seed: int = 0  # base of the per-image seeds (a hash of subject, prompt and image index)
    model: str = "models/blip_diffusion"  # the trained folder (train_subject), models:/NAME@ALIAS, or a hub id
    # Subset: `all` or a count (object and live subjects alternating) or a list of names.
    subjects: int | Literal["all"] | list[str] = 2
    prompts_per_subject: int | Literal["all"] = 2  # the first N of the subject's list (25 in all)
    images_per_prompt: int = Field(2, ge=1)  # the protocol: 4
    mode: Literal["zero_shot", "finetuned", "both"] = "zero_shot"
    # Zero-shot subject embeddings: `average` of all reference images, or the index of one.
    reference: Literal["average"] | int = "average"
    scheduler: Literal["pndm", "ddim", "dpmsolver++"] = "pndm"
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0)
    negative_prompt: str = NEGATIVE_PROMPT
    prompt_strength: float = Field(1.0, gt=0.0)
    prompt_reps: int = Field(20, ge=1)
    resolution: int | None = Field(None, ge=8)  # null: the model's native size
    batch_size: int = Field(8, ge=1)  # images per UNet batch
    finetune: EvalFinetuneConfig = EvalFinetuneConfig()
    # Evaluators: `auto` = the preset's (tiny: small random ViT and CLIP built here; full
    # presets: the hub ids); `tiny`; or a hub id or local directory.
    dino_model: str = "auto"  # facebook/dino-vits16
    clip_model: str = "auto"  # openai/clip-vit-base-patch32
    evaluator_batch_size: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("benchmark", mode="before")
    @classmethod
    def _benchmark_alias(cls, value: Any) -> Any:
        return "heldout" if value == "synthetic" else value

    def benchmark_for(self, preset: str) -> str:
        """The benchmark this evaluation runs on: `dreambench` or `heldout` (`auto` resolved)."""
        if self.benchmark != "auto":
            return self.benchmark
        return "heldout" if preset == "tiny" else "dreambench"

    @model_validator(mode="after")
    def _consistent(self) -> "EvaluateConfig":
        for name in ("subjects", "prompts_per_subject"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{name} must be >= 1 or 'all', got {value}")
        if isinstance(self.subjects, list) and not self.subjects:
            raise ValueError("subjects: an empty list; give names, a count or 'all'")
        if isinstance(self.reference, int) and self.reference < 0:
            raise ValueError(f"reference must be 'average' or an image index >= 0, got {self.reference}")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution ({self.resolution}) must be a multiple of 8")
        return self


# --------------------------------------------------------------------------- export
class ExportConfig(_Section):
    """ONNX graphs (subject encoder, text encoder, UNet, VAE decoder) with ONNX Runtime parity;
    TensorRT engines on a GPU."""

    # The model folder (train_subject's) or a hub id; null = the preset's model.
    model: str | None = "models/blip_diffusion"
    # A ControlNet (diffusers ControlNetModel folder, a checkpoint with controlnet/, or a hub id)
    # added to the model: the export then has the controlnet and unet_control graphs too.
    controlnet: str | None = "models/controlnet"
    opset: Literal[18, 19] = 18
    fp16: bool = True  # also <graph>.fp16.onnx (fp32 inputs and outputs), for GPUs
    batch: int = Field(2, ge=2, le=64)  # example batch of the export (a dynamic dim exported at 1 is specialised)
    tensorrt: Literal["auto", "on", "off"] = "auto"  # auto: engines when CUDA and tensorrt are there
    tensorrt_profile: Literal["static512", "dynamic"] = "static512"
    workspace_gb: float = Field(8.0, gt=0, le=1024)  # TensorRT builder workspace
    parity_seed: int = 0  # the random inputs of the parity check
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where the graphs are traced

    @field_validator("tensorrt", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `on`/`off` as true/false.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# ------------------------------------------------------------- per-preset defaults
# Training settings that depend on the model's size. In params.yaml these keys say `auto`
# (or are left out) and take the preset's value; an explicit value always wins. The full
# presets get the papers' settings: BLIP-Diffusion stage 2 (Sec. 4.1: 512 px, AdamW at a
# constant 2e-6 after warmup, total batch 16, fp16 on GPUs; `mixed_precision: auto` gives
# fp16 on a GPU) with an EMA of the weights; BLIP-2 stage 1 (peak lr 1e-4, 2000 warmup
# steps, cosine). The tiny preset's are tuned for its 32 px random networks on a CPU.
PRESET_TRAINING: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "pretrain_qformer": {"learning_rate": 2e-3, "warmup_steps": 50},
        "train_subject": {"resolution": 32, "learning_rate": 1e-4, "warmup_steps": 20, "batch_size": 16,
                          "gradient_accumulation_steps": 1, "ema_decay": None},
    },
    **{full: {
        "pretrain_qformer": {"learning_rate": 1e-4, "warmup_steps": 2000},
        "train_subject": {"resolution": 512, "learning_rate": 2e-6, "warmup_steps": 500, "batch_size": 1,
                          "gradient_accumulation_steps": 16, "ema_decay": 0.9999},
    } for full in ("blipdiffusion", "sd15-blip2")},
}
AUTO = "auto"


# ----------------------------------------------------------------------------- dask
class DaskConfig(_Section):
    """Where the context stage runs its per-image work and evaluate makes its images
    (components/cluster.py).
    Not a stage's params in dvc.yaml: where it runs never changes the outputs."""

    workers: int = Field(0, ge=0, le=256)  # 0: in the stage's process; N: a LocalCluster of N processes
    threads_per_worker: int = Field(1, ge=1, le=64)
    # An existing scheduler (e.g. tcp://10.0.0.5:8786); overrides workers. BLIPDIFF_DASK_ADDRESS overrides it.
    address: str | None = None
    connect_timeout_s: float = Field(30.0, gt=0.0)  # for the scheduler, and for its first worker


# --------------------------------------------------------------------------- params
class Params(_Section):
    # Model preset shared by every stage; only the default (tiny) runs offline.
    preset: Preset = "tiny"
    ingest: IngestConfig = IngestConfig()
    context: ContextConfig = ContextConfig()
    base: BaseConfig = BaseConfig()
    controlnet: ControlNetConfig = ControlNetConfig()
    pretrain_qformer: PretrainQFormerConfig = PretrainQFormerConfig()
    train_subject: TrainSubjectConfig = TrainSubjectConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    dask: DaskConfig = DaskConfig()  # where `context` runs; not in dvc.yaml

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        """Fill `auto` (or absent) size-dependent training keys from the preset's defaults."""
        if not isinstance(data, dict):
            return data
        defaults = PRESET_TRAINING.get(data.get("preset", "tiny"))
        if defaults is None:
            return data  # an unknown preset: the field validation names it
        data = dict(data)
        for section, values in defaults.items():
            given = data.get(section)
            if given is not None and not isinstance(given, dict):
                continue
            given = dict(given or {})
            for key, value in values.items():
                if given.get(key, AUTO) == AUTO:
                    given[key] = value
            data[section] = given
        return data


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        return f"{loc}: unknown key; allowed keys: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" or not err["loc"]:
        return f"{loc or '<top level>'}: {msg}"
    return f"{loc}: {msg} (got {err['input']!r})"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return list(model.model_fields)


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e, Params) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. ingest.seed=3")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for override in overrides or []:
        apply_override(raw, override)
    return parse_params(raw, str(path))


def params_preset(path: str | Path = "params.yaml") -> str:
    """The preset of a params file, for commands run outside DVC; `tiny` when there is none."""
    return load_params(path).preset if Path(path).is_file() else "tiny"
