"""Subject-driven editing: prompt-to-prompt with attention refinement and local blend (the
paper's editing application), on a generated image or on a real photo inverted with DDIM.

An edit draws two rows from the same start latents: the source ("a {source class} {prompt}",
plain text encoder) and the target ("a {target class} {prompt}" with the subject
embeddings spliced in at `ctx_begin_pos`). While they denoise:

- cross-attention refine: for the first `int(cross_replace_steps * (steps + 1))` UNet calls
  the target's cross-attention on every token it shares with the source (a global alignment
  of the two token sequences, `align_tokens`) is the source's;
- self-attention replace: for the first `int(self_replace_steps * steps)` calls the target's
  self-attention is the source's on the maps no larger than the blend maps;
- local blend: the source's cross-attention on its blend words (default: the source class)
  on the blend maps (the coarsest cross-attention maps of the down and up blocks: 16x16 at
  512 px on Stable Diffusion), summed over layers, heads and steps so far, 3x3 max-pooled,
  upsampled to the latents, normalised to its maximum and thresholded, is the mask outside
  which the target's latents are set to the source's after every step.

On a real photo the start latents are the photo's (resized to cover, centre-cropped, VAE
sample seeded) inverted with DDIM (`diffusers.DDIMInverseScheduler`, guidance 1, on the
source text); editing then runs DDIM on the same grid and the source row takes its
conditional prediction without guidance, so it reconstructs the photo.

Attention runs through `EditProcessor`s installed on the UNet for the edit only (restored
afterwards, also on error). Only cross-attention layers that the controller edits or reads
compute explicit probabilities (queries x 77 keys); self-attention stays
`scaled_dot_product_attention`, the replacement included (the target's output is the
source's probabilities applied to the target's values: SDPA(q_src, k_src, v_tgt)), so no
queries x queries matrix is ever materialised.

`lavis_compat=True` reproduces LAVIS's `generate_then_edit` / `edit` for the parity test
only: its target text carries 16 literal "sks" placeholders besides the spliced subject
embeddings (so the token mapper is 16 positions off the real target), and its inversion
prompt takes the first letter of the source class ("a c sit on sofa").

Editing needs the attention maps, so it runs on the PyTorch modules only: ONNX Runtime and
TensorRT graphs do not expose them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from components.core.errors import BlipDiffError
from components.model.blip_diffusion import BlipDiffusion, TorchNetworks

log = logging.getLogger(__name__)

PLACEHOLDER = "sks"  # LAVIS's literal subject placeholder (lavis_compat only)
MAX_PHOTO_SIDE = 8192  # a photo to edit is refused above this side, before it is resized


# ----------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class EditSettings:
    """How every edit of a batch is made."""

    steps: int = 50
    inversion_steps: int | None = None  # real photos: DDIM inversion steps (None: = steps)
    guidance_scale: float = 7.5
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    blend_threshold: float = 0.3
    blend: bool = True  # False: no local blend (the target's latents are never reset)
    negative_prompt: str = ""
    scheduler: str = "pndm"  # generated sources; real photos always use DDIM
    height: int = 512
    width: int = 512
    lavis_compat: bool = False

    def check(self) -> None:
        if self.guidance_scale <= 1.0:
            raise BlipDiffError(f"guidance scale {self.guidance_scale}: editing needs guidance > 1 (the edit acts "
                                "on the conditional half of the batch)")
        if self.steps < 1:
            raise BlipDiffError(f"steps must be >= 1, got {self.steps}")
        if self.inversion_steps is not None and self.inversion_steps < 1:
            raise BlipDiffError(f"inversion steps must be >= 1, got {self.inversion_steps}")
        for name in ("cross_replace_steps", "self_replace_steps"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise BlipDiffError(f"{name.replace('_', '-')} {value}: a fraction of the steps, in [0, 1]")
        if self.blend_threshold < 0.0:
            raise BlipDiffError(f"blend threshold {self.blend_threshold} must be >= 0")
        if self.height <= 0 or self.width <= 0 or self.height % 8 or self.width % 8:
            raise BlipDiffError(f"height and width must be positive multiples of 8, got {self.height}x{self.width}")


@dataclass
class Edit:
    """One edit: replace `source_class` in the source image by the subject, drawn as
    `target_class`. `photo` (RGB uint8) is a real photo to edit; None: the source is
    generated from `seed`. On a photo `seed` seeds the VAE posterior sample."""

    prompt: str
    source_class: str
    target_class: str
    seed: int = 0
    photo: np.ndarray | None = None
    blend_words: tuple[str, ...] = ()  # default: the source class's words

    @property
    def words(self) -> tuple[str, ...]:
        """The blend words, one word each ("teddy bear" blends on "teddy" and "bear")."""
        return tuple(w for phrase in (self.blend_words or (self.source_class,)) for w in phrase.split())


@dataclass
class EditResult:
    sources: np.ndarray  # (E, H, W, 3) float in [0, 1]
    edited: np.ndarray  # (E, H, W, 3)
    masks: np.ndarray  # (E, H, W) the final blend mask at image size, 0/1
    source_texts: list[str]
    target_texts: list[str]
    inversion_texts: list[str] | None = None
    mapper: torch.Tensor | None = None  # (E, T) int64
    alphas: torch.Tensor | None = None  # (E, T)
    blend_positions: list[list[int]] = field(default_factory=list)
    inverted: torch.Tensor | None = None  # (E, C, h, w) real photos: the inverted start latents


# ----------------------------------------------------------------------------- texts and tokens
def source_text(edit: Edit) -> str:
    return f"a {edit.source_class.strip()} {edit.prompt.strip()}".strip()


def target_text(edit: Edit, num_query: int, lavis_compat: bool) -> str:
    placeholder = " ".join([PLACEHOLDER] * num_query) + " " if lavis_compat else ""
    return f"a {placeholder}{edit.target_class.strip()} {edit.prompt.strip()}".strip()


def inversion_text(edit: Edit, lavis_compat: bool) -> str:
    # LAVIS zips the prompt list with the class *string*, so only its first letter is used
    cls = edit.source_class.strip()[:1] if lavis_compat else edit.source_class.strip()
    return f"a {cls} {edit.prompt.strip()}".strip()


def _encode(tokenizer, text: str, max_length: int) -> list[int]:
    return tokenizer(text, truncation=True, max_length=max_length).input_ids


def word_positions(tokenizer, text: str, word: str, max_length: int) -> list[int]:
    """Token positions (the start token is position 0) of every occurrence of `word` among
    the space-separated words of `text`, each word tokenized on its own (CLIP's tokenizer
    splits on words before BPE, so the pieces line up with the whole text's tokens)."""
    positions, cursor = [], 1
    pieces = [tokenizer(w, add_special_tokens=False).input_ids for w in text.split(" ")]
    whole = _encode(tokenizer, text, 10 ** 6)[1:-1]
    if [t for p in pieces for t in p] != whole:
        raise BlipDiffError(f"cannot place the words of {text!r} on its tokens")
    for w, ids in zip(text.split(" "), pieces):
        if w.lower() == word.lower():
            positions += [p for p in range(cursor, cursor + len(ids)) if p < max_length - 1]
        cursor += len(ids)
    return positions


def align_tokens(source: Sequence[int], target: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-to-prompt's refinement mapper: a global alignment (match +1, mismatch -1, gap 0)
    of the source and target token ids. Returns, for each of the `length` target positions,
    the source position whose attention it takes (`mapper`, -1: none) and `alphas` (1 where
    it takes one; positions past the target's tokens map to themselves). On equal scores the
    alignment prefers a target-only token, then a source-only token, then a pair."""
    x, y = list(source)[:length], list(target)[:length]
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), dtype=np.int64)
    move = np.zeros((n + 1, m + 1), dtype=np.int8)  # 1: target-only, 2: source-only, 3: pair
    score[0, 1:], move[0, 1:] = 0, 1
    score[1:, 0], move[1:, 0] = 0, 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            pair = score[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, pair)
            score[i, j] = best
            move[i, j] = 1 if best == left else 2 if best == up else 3
    mapper = torch.arange(length, dtype=torch.int64)
    mapper[:m] = -1
    i, j = n, m
    while i > 0 or j > 0:
        step = move[i, j]
        if step == 3:
            mapper[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif step == 1:
            j -= 1
        else:
            i -= 1
    alphas = torch.ones(length)
    alphas[:m] = mapper[:m].ne(-1).float()
    return mapper, alphas


# ----------------------------------------------------------------------------- the controller
def _layer_factor(name: str, down: int, up: int) -> int:
    """The downsampling factor of an attention layer's maps, from its processor name."""
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", name)
    if match is None:
        return 2 ** (down - 1)  # mid block
    index = int(match.group(2))
    return 2 ** index if match.group(1) == "down_blocks" else 2 ** (up - 1 - index)


class Controller:
    """The prompt-to-prompt state of one batch of E edits: per edit the token mapper, alphas
    and blend word weights; the UNet call index; the blend maps summed so far. The UNet batch
    is [negative x 2E, sources (E), targets (E)]."""

    def __init__(self, edits: int, mapper: torch.Tensor, alphas: torch.Tensor, blend_weights: torch.Tensor,
                 settings: EditSettings, latent_hw: tuple[int, int], blend_factor: int, device: torch.device):
        self.edits = edits
        self.mapper = mapper.to(device)
        self.alphas = alphas.to(device)
        self.blend_weights = blend_weights.to(device)
        self.cross_calls = int(settings.cross_replace_steps * (settings.steps + 1))
        self.self_calls = int(settings.self_replace_steps * settings.steps)
        self.threshold = settings.blend_threshold
        self.blend = settings.blend
        h, w = latent_hw
        self.latent_hw = latent_hw
        self.blend_hw = (-(-h // blend_factor), -(-w // blend_factor))
        self.blend_length = self.blend_hw[0] * self.blend_hw[1]
        self.blend_sum = torch.zeros(edits, self.blend_length, device=device, dtype=torch.float32)
        self.call = 0
        self.mask: torch.Tensor | None = None  # (E, 1, h, w) the last blend mask

    # the sampling loop's callback
    def begin(self, i: int) -> None:
        self.call = i

    def end(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        if not self.blend:
            return latents
        self.mask = self.blend_mask().to(latents.dtype)
        source, target = latents[:self.edits], latents[self.edits:]
        return torch.cat([source, source + self.mask * (target - source)])

    def blend_mask(self) -> torch.Tensor:
        maps = self.blend_sum.reshape(self.edits, 1, *self.blend_hw)
        maps = F.max_pool2d(maps, 3, stride=1, padding=1)
        maps = F.interpolate(maps, size=self.latent_hw)  # nearest
        peak = maps.amax(dim=(2, 3), keepdim=True)
        return (maps / peak).gt(self.threshold).float()

    # what each layer does at the current call
    @property
    def refining(self) -> bool:
        return self.call < self.cross_calls

    @property
    def replacing_self(self) -> bool:
        return self.call < self.self_calls

    def cross(self, probs: torch.Tensor, blend_layer: bool) -> torch.Tensor:
        """Conditional-half cross-attention probabilities (2E, H, L, T): store the sources'
        blend maps, refine the targets' (in place)."""
        e = self.edits
        source, target = probs[:e], probs[e:]
        if blend_layer and self.blend:
            weights = self.blend_weights[:, None, None, :].to(source.dtype)
            self.blend_sum += (source * weights).sum(-1).float().sum(1)
        if self.refining:
            index = self.mapper[:, None, None, :].expand(-1, *source.shape[1:3], -1)
            mapped = source.gather(-1, index.clamp(min=0))
            alphas = self.alphas[:, None, None, :].to(source.dtype)
            probs[e:] = mapped * alphas + target * (1 - alphas)
        return probs


class EditProcessor:
    """A diffusers attention processor that lets the `Controller` act on one layer; the
    layer's math is diffusers' `AttnProcessor2_0` for everything the controller leaves."""

    def __init__(self, controller: Controller, cross: bool, blend_layer: bool):
        self.controller = controller
        self.is_cross = cross
        self.blend_layer = blend_layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        ctl = self.controller
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        split = (lambda t: t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2))
        query, key, value = split(query), split(key), split(value)
        if getattr(attn, "norm_q", None) is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        half = batch - 2 * ctl.edits  # the conditional half starts here
        if self.is_cross and (ctl.refining or (self.blend_layer and ctl.blend)):
            scores = (query @ key.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.float().softmax(dim=-1).to(query.dtype)
            probs[half:] = ctl.cross(probs[half:], self.blend_layer)
            out = probs @ value
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
            if not self.is_cross and ctl.replacing_self and length <= ctl.blend_length:
                e = ctl.edits
                src, tgt = slice(half, half + e), slice(half + e, batch)
                out[tgt] = F.scaled_dot_product_attention(query[src], key[src], value[tgt], scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _blend_layers(unet) -> tuple[int, set[str]]:
    """The blend maps' downsampling factor (the coarsest cross-attention maps of the UNet's
    down and up blocks: 4 on Stable Diffusion, 16x16 maps at 512 px) and the processor names
    of the cross-attention layers at that factor."""
    down, up = len(unet.config.down_block_types), len(unet.config.up_block_types)
    factors = {n: _layer_factor(n, down, up) for n in unet.attn_processors
               if n.endswith("attn2.processor") and not n.startswith("mid_block")}
    if not factors:
        raise BlipDiffError("editing needs cross-attention in the UNet's down or up blocks; this UNet has none")
    factor = max(factors.values())
    return factor, {n for n, f in factors.items() if f == factor}


def blend_factor(unet) -> int:
    """The downsampling factor of the blend maps (`_blend_layers`)."""
    return _blend_layers(unet)[0]


@contextlib.contextmanager
def attention_control(unet, controller: Controller):
    """Install an `EditProcessor` on every attention layer of `unet` for the block's duration;
    the processors that were there are put back afterwards, also on error."""
    saved = unet.attn_processors
    _, blend_layers = _blend_layers(unet)
    unet.set_attn_processor({name: EditProcessor(controller, name.endswith("attn2.processor"), name in blend_layers)
                             for name in saved})
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


# ----------------------------------------------------------------------------- photos and inversion
def photo_pixels(photo: np.ndarray, height: int, width: int) -> torch.Tensor:
    """The VAE's input for a photo: resized (bilinear) to cover height x width, centre-cropped,
    scaled to [-1, 1]; (3, H, W). For a square output this is torchvision's
    Resize(size) + CenterCrop(size) on the PIL image, as LAVIS prepares photos."""
    h, w = photo.shape[:2]
    if w * height >= h * width:  # wider than the output: fit the height
        new_h, new_w = height, int(height * w / h)
    else:
        new_h, new_w = int(width * h / w), width
    new_h, new_w = max(new_h, height), max(new_w, width)
    image = Image.fromarray(photo).convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()) / 255.0
    return pixels * 2.0 - 1.0


def editing_grid(model: BlipDiffusion, steps: int, inversion_steps: int, device: torch.device | None = None):
    """The DDIM scheduler that edits a photo (timesteps set, on `device`) and the inverse
    scheduler that inverts it, with the inverse timesteps to run: the inversion grid must hold
    every editing timestep, and stops at the first one (equal step counts always do)."""
    from diffusers import DDIMInverseScheduler

    sched = model.make_scheduler("ddim")
    sched.set_timesteps(steps, device=device)
    accepted = set(inspect.signature(DDIMInverseScheduler.__init__).parameters)
    config = {k: v for k, v in model.scheduler.config.items() if k in accepted}  # a PNDM config has more
    inverse = DDIMInverseScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    inverse.set_timesteps(inversion_steps)
    grid = set(inverse.timesteps.tolist())
    editing = sched.timesteps.tolist()
    if not set(editing) <= grid:
        missing = sorted(set(editing) - grid)[:4]
        raise BlipDiffError(f"--inversion-steps {inversion_steps} cannot align with --steps {steps}: editing timesteps "
                            f"{missing} are not on the inversion grid (use --steps, or a multiple of it that keeps "
                            "its timesteps, e.g. 2x for 50 steps)")
    start = max(editing)
    return sched, inverse, [t for t in inverse.timesteps if int(t) <= start]


@torch.inference_mode()
def invert(model: BlipDiffusion, latents: torch.Tensor, text: torch.Tensor, inverse, timesteps) -> torch.Tensor:
    """DDIM inversion at guidance 1: clean latents -> the noise they came from at the last of
    `timesteps`, predicting noise with `text` (the source prompt)."""
    nets = TorchNetworks(model)
    for t in timesteps:
        noise = nets.unet(latents, t, text)
        latents = inverse.step(noise, t, latents).prev_sample
    return latents


# ----------------------------------------------------------------------------- the edit
def check_edits(model: BlipDiffusion, edits: Sequence[Edit], settings: EditSettings) -> None:
    """Everything about a batch of edits that can be judged before the UNet runs."""
    if not edits:
        raise BlipDiffError("no edit given")
    settings.check()
    if len({e.photo is None for e in edits}) > 1:
        raise BlipDiffError("a batch of edits is either all on real photos or all on generated sources")
    for e in edits:
        if not e.prompt.strip() or not e.source_class.strip() or not e.target_class.strip():
            raise BlipDiffError("an edit needs a prompt, a source class and a target class")
        text = source_text(e)
        for word in e.words:
            if not word_positions(model.tokenizer, text, word, model.text_length):
                raise BlipDiffError(f"blend word {word!r} is not a word of the source prompt {text!r}")
        if e.photo is not None and max(e.photo.shape[:2]) > MAX_PHOTO_SIDE:
            raise BlipDiffError(f"photo of {e.photo.shape[1]}x{e.photo.shape[0]} px: larger than "
                                f"{MAX_PHOTO_SIDE} px on a side")
    if edits[0].photo is not None:
        editing_grid(model, settings.steps, settings.inversion_steps or settings.steps)


@torch.inference_mode()
def edit(model: BlipDiffusion, subject_embeds: torch.Tensor | None, edits: Sequence[Edit],
         settings: EditSettings, progress: bool = False) -> EditResult:
    """Run a batch of edits in one UNet batch (4 rows per edit). `subject_embeds`: (1, Q, D)
    shared or (E, Q, D) one per edit; None edits with the target text alone (plain
    prompt-to-prompt). The UNet's attention processors are the same before and after."""
    check_edits(model, edits, settings)
    nets = TorchNetworks(model)
    e = len(edits)
    num_query = model.qformer.config.num_query_tokens if subject_embeds is None else subject_embeds.shape[1]
    length = model.text_length
    with_subject = subject_embeds is not None
    sources = [source_text(x) for x in edits]
    targets = [target_text(x, num_query, settings.lavis_compat) for x in edits]

    # the token mapper: the target's positions as the text encoder lays them out
    mapper, alphas, weights, positions = [], [], torch.zeros(e, length), []
    for k, x in enumerate(edits):
        src_ids = _encode(model.tokenizer, sources[k], length)
        if with_subject and not settings.lavis_compat:
            ids = _encode(model.tokenizer, targets[k], length - num_query)
            pos = model.ctx_begin_pos
            tgt_ids = ids[:pos] + [-1] * num_query + ids[pos:]
        else:  # the target text's own tokens (no subject; or lavis_compat: LAVIS's mapper on its placeholders)
            tgt_ids = _encode(model.tokenizer, targets[k], 10 ** 6)
        m, a = align_tokens(src_ids, tgt_ids, length)
        mapper.append(m)
        alphas.append(a)
        found = sorted({p for w in x.words for p in word_positions(model.tokenizer, sources[k], w, length)})
        weights[k, found] = 1.0
        positions.append(found)
    mapper, alphas = torch.stack(mapper), torch.stack(alphas)

    text = model.text_conditioning(nets, subject_embeds, sources + targets, settings.negative_prompt,
                                   has_subject=[False] * e + [with_subject] * e)
    factor = nets.vae_scale_factor
    latent_hw = (settings.height // factor, settings.width // factor)
    real = edits[0].photo is not None
    inverted, inversion_texts = None, None
    if real:
        sched, inverse, inv_steps = editing_grid(model, settings.steps, settings.inversion_steps or settings.steps,
                                                 nets.device)
        pixels = torch.stack([photo_pixels(x.photo, settings.height, settings.width) for x in edits])
        moments = model.latent_moments(pixels)
        eps = torch.cat([torch.randn((1, *moments.shape[2:]), generator=torch.Generator().manual_seed(int(x.seed)))
                         for x in edits])
        start = model.latents_from_moments(moments, eps).to(nets.device, nets.dtype)
        inversion_texts = [inversion_text(x, settings.lavis_compat) for x in edits]
        inv_text = model.text_conditioning(nets, None, inversion_texts, None)
        inverted = invert(model, start, inv_text, inverse, inv_steps)
        latents = torch.cat([inverted, inverted])
    else:
        sched = model.make_scheduler(settings.scheduler)
        sched.set_timesteps(settings.steps, device=nets.device)
        noise = model.initial_latents(nets, [x.seed for x in edits], settings.height, settings.width)
        latents = torch.cat([noise, noise]) * sched.init_noise_sigma

    controller = Controller(e, mapper, alphas, weights, settings, latent_hw, blend_factor(model.unet), nets.device)
    with attention_control(model.unet, controller):
        latents = model.denoise(nets, sched, latents, text, settings.guidance_scale, unguided=e if real else 0,
                                callback=controller, progress=progress)
        images = model.decode(nets, latents)
    if controller.mask is not None:
        mask = F.interpolate(controller.mask.float(), size=(settings.height, settings.width))[:, 0]
    else:
        mask = torch.ones(e, settings.height, settings.width)
    return EditResult(sources=images[:e], edited=images[e:], masks=mask.cpu().numpy(), source_texts=sources,
                      target_texts=targets, inversion_texts=inversion_texts, mapper=mapper, alphas=alphas,
                      blend_positions=positions, inverted=None if inverted is None else inverted.float().cpu())

