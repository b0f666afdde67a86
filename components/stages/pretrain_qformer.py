"""Stage `pretrain_qformer`: BLIP-2 stage 1, vision-language representation learning.

LAVIS never released BLIP-Diffusion's pre-training code; this follows the BLIP-2 paper
(Li et al. 2023, Sec. 3.2). The image encoder is frozen; the Q-Former (its query tokens,
layers and text embeddings) learns three objectives on image-caption pairs, each with
its own attention mask over [queries | text]:

- ITC, image-text contrastive: query outputs and the text's [CLS] output are projected
  and L2-normalised; an image-text similarity is the best of its query similarities;
  in-batch softmax with a learnable temperature. Queries and text do not see each other.
- ITM, image-text matching: queries and text attend to each other; a binary head on the
  query outputs, averaged, tells matched from unmatched. Negatives are hard ones, drawn
  in proportion to the ITC similarities (one text per image and one image per text).
- ITG, image-grounded text generation: the text, [DEC] first, is predicted token by
  token (causal mask) while it attends to all queries; the queries see only each other,
  so everything the text learns about the image must pass through them.

Captions come from the manifest's caption column, else from class templates ("a photo of
a dog"); synthetic subjects carry captions built from their colour, shape and texture.
Rows that share a caption are positives of each other in ITC and never drawn as ITM
negatives. The ITC softmax runs over each process's own batch.

Output `models/qformer/`: the Q-Former folder in the released layout (the subject
encoder loads it, and `train_subject` starts from it), plus the pre-training heads in
`heads/` to continue from. Learning check: image-to-text retrieval R@1 by ITC on the
held-out (split "test") images, against the chance of picking the caption at random.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.core.config import Params, PretrainQFormerConfig
from components.core.errors import BlipDiffError
from components.core.io import atomic_path
from components.core.paths import QFORMER_DIR, SUBJECTS_MANIFEST, checkpoint_dir, curve_file
from components.data.images import read_listed_rgb
from components.data.manifests import SUBJECTS_SCHEMA, read_manifest
from components.model.presets import from_preset
from components.training import loop as training

log = logging.getLogger(__name__)

SECTIONS = ("preset", "pretrain_qformer")  # the params this stage reads (dvc.yaml `params`)
OUTPUTS = (QFORMER_DIR,)
PLOTS = (curve_file("pretrain_qformer"),)
HEADS_FILE = "heads/pretrain_heads.safetensors"
CHECKPOINT_DIR = checkpoint_dir("pretrain_qformer")
CLASS_TEMPLATES = ("a photo of a {}", "a picture of the {}", "a close-up photo of a {}", "a {} on its own")


# ----------------------------------------------------------------------------- data
def row_captions(caption: str | None, class_name: str) -> list[str]:
    """The texts one image may be paired with: its caption, else the class templates."""
    if isinstance(caption, str) and caption.strip():
        return [caption.strip()]
    return [t.format(class_name) for t in CLASS_TEMPLATES]


class CaptionData:
    """Images (processed once; the image encoder is frozen) and their tokenized candidate texts."""

    def __init__(self, frame, root: Path, image_processor, tokenizer, max_length: int):
        per_row = [row_captions(c, k) for c, k in zip(frame["caption"], frame["class_name"])]
        self.texts = list(dict.fromkeys(t for texts in per_row for t in texts))
        self.row_texts = [[self.texts.index(t) for t in texts] for texts in per_row]
        images = [read_listed_rgb(root, p, SUBJECTS_MANIFEST, "ingest") for p in frame["image_path"]]
        self.pixels = image_processor(images)
        self.ids, self.mask = tokenize(tokenizer, self.texts, max_length)

    def __len__(self) -> int:
        return len(self.pixels)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def candidate_captions(frame, tokenizer, max_length: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The retrieval candidates: each image's first text (its caption, or "a photo of a
    [class]"), once each, tokenized. Texts only: no image is read for them."""
    captions = list(dict.fromkeys(row_captions(c, k)[0] for c, k in zip(frame["caption"], frame["class_name"])))
    return (captions, *tokenize(tokenizer, captions, max_length))


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random crop of 70-100% of each side, resized back."""
    out = []
    size = pixels.shape[-1]
    for image in pixels:
        if torch.rand(1, generator=generator).item() < 0.5:
            image = image.flip(-1)
        side = int(size * (0.7 + 0.3 * torch.rand(1, generator=generator).item()))
        y, x = (int(torch.randint(0, size - side + 1, (1,), generator=generator)) for _ in range(2))
        crop = image[None, :, y : y + side, x : x + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)


def draw(cfg: PretrainQFormerConfig, data: CaptionData, step: int, micro: int, rank: int):
    """Rows, their texts and the generator for ITM negatives: a function of the position in the run."""
    g = training.step_generator(cfg.seed, step, micro, rank)
    rows = torch.randint(0, len(data), (cfg.batch_size,), generator=g)
    texts = torch.tensor([data.row_texts[r][int(torch.randint(0, len(data.row_texts[r]), (1,), generator=g))]
                          for r in rows.tolist()])
    pixels = data.pixels[rows]
    if cfg.augment:
        pixels = augment(pixels, g)
    return pixels, texts, g


# ---------------------------------------------------------------------------- model
def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, [Q,] K) "may attend" -> additive mask (B, 1, Q or 1, K)."""
    if allowed.dim() == 2:
        allowed = allowed[:, None, :]
    return (~allowed[:, None]).to(dtype) * torch.finfo(dtype).min


class Stage1(nn.Module):
    """The Q-Former with BLIP-2's pre-training heads; the image encoder inside it stays frozen."""

    def __init__(self, qformer, embed_dim: int, bos_token_id: int):
        super().__init__()
        self.qformer = qformer
        qcfg = qformer.config.qformer_config
        hidden = qcfg.hidden_size
        self.bos_token_id = bos_token_id
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        # BERT's LM head: transform, then the decoder tied to the word embeddings.
        self.lm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(),
                                          nn.LayerNorm(hidden, eps=qcfg.layer_norm_eps))
        self.lm_bias = nn.Parameter(torch.zeros(qcfg.vocab_size))

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("qformer.")}

    @property
    def num_query(self) -> int:
        return self.qformer.query_tokens.shape[1]

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.qformer.visual_encoder(pixels.to(self.temp.device))

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised projected query outputs (B, Q, E): the queries read the image, no text."""
        queries = self.qformer.query_tokens.expand(len(image_embeds), -1, -1)
        hidden = self.qformer.embeddings(torch.zeros(len(image_embeds), 0, dtype=torch.long,
                                                     device=image_embeds.device), queries)
        out = self.qformer.encoder(hidden, encoder_hidden_states=image_embeds,
                                   query_length=self.num_query).last_hidden_state
        return F.normalize(self.vision_proj(out), dim=-1)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised projected [CLS] outputs (B, E) of the text alone."""
        hidden = self.qformer.embeddings(ids, self.qformer.query_tokens[:, :0].expand(len(ids), -1, -1))
        out = self.qformer.encoder(hidden, attention_mask=_additive(mask.bool(), hidden.dtype)).last_hidden_state
        return F.normalize(self.text_proj(out[:, 0]), dim=-1)

    def similarity(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """(images, texts): each pair's best query similarity."""
        return torch.einsum("iqe,te->iqt", image_feats, text_feats).amax(1)

    def _joint(self, ids, image_embeds, allowed_text) -> torch.Tensor:
        batch = len(ids)
        queries = self.qformer.query_tokens.expand(batch, -1, -1)
        hidden = self.qformer.embeddings(ids, queries)
        return self.qformer.encoder(hidden, attention_mask=_additive(allowed_text, hidden.dtype),
                                    encoder_hidden_states=image_embeds, query_length=self.num_query).last_hidden_state

    def itm_logits(self, ids, mask, image_embeds) -> torch.Tensor:
        ones = torch.ones(len(ids), self.num_query, dtype=torch.bool, device=ids.device)
        out = self._joint(ids, image_embeds, torch.cat([ones, mask.bool()], 1))
        return self.itm_head(out[:, : self.num_query]).mean(1)

    def itg_loss(self, ids, mask, image_embeds, label_smoothing: float) -> torch.Tensor:
        dec = ids.clone()
        dec[:, 0] = self.bos_token_id
        nq, length = self.num_query, ids.shape[1]
        total = nq + length
        rows = torch.arange(total, device=ids.device)[:, None]
        cols = torch.arange(total, device=ids.device)[None, :]
        # queries see queries; text sees every query and the text up to itself.
        allowed = (cols < nq) | ((rows >= nq) & (cols <= rows))
        keys = torch.cat([torch.ones(len(ids), nq, dtype=torch.bool, device=ids.device), mask.bool()], 1)
        out = self._joint(dec, image_embeds, allowed[None] & keys[:, None, :])
        hidden = self.lm_transform(out[:, nq:])
        logits = F.linear(hidden, self.qformer.embeddings.word_embeddings.weight, self.lm_bias)
        labels = dec.masked_fill(~mask.bool(), -100)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=label_smoothing)

    def forward(self, pixels, text_idx, data: CaptionData, cfg: PretrainQFormerConfig,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        device = self.temp.device
        ids, mask = data.ids[text_idx].to(device), data.mask[text_idx].to(device)
        image_embeds = self.image_embeds(pixels)
        same = (text_idx[:, None] == text_idx[None, :]).to(device)
        losses: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_feats = self.image_features(image_embeds)
        text_feats = self.text_features(ids, mask)
        sim = self.similarity(image_feats, text_feats) / self.temp
        targets = same.float() / same.sum(1, keepdim=True)
        losses["itc"] = -0.5 * ((F.log_softmax(sim, 1) * targets).sum(1).mean()
                                + (F.log_softmax(sim.t(), 1) * targets).sum(1).mean())
        if cfg.itm_weight:
            with torch.no_grad():  # hard negatives: drawn in proportion to the ITC similarity
                weights = torch.softmax(sim.float(), 1).masked_fill(same, 0).cpu()
                weights_t = torch.softmax(sim.t().float(), 1).masked_fill(same, 0).cpu()
                neg_text = _draw_negatives(weights, generator).to(device)
                neg_image = _draw_negatives(weights_t, generator).to(device)
            all_ids = torch.cat([ids, ids[neg_text], ids])
            all_mask = torch.cat([mask, mask[neg_text], mask])
            all_images = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]])
            logits = self.itm_logits(all_ids, all_mask, all_images)
            labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long().to(device)
            losses["itm"] = F.cross_entropy(logits.float(), labels)
        if cfg.itg_weight:
            losses["itg"] = self.itg_loss(ids, mask, image_embeds, cfg.label_smoothing)
        losses["loss"] = (cfg.itc_weight * losses["itc"] + cfg.itm_weight * losses.get("itm", 0.0)
                          + cfg.itg_weight * losses.get("itg", 0.0))
        return losses


def _draw_negatives(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row, in proportion to `weights`; rows with no negative in the batch
    (every other row shares their text) fall back to a uniform draw over the others."""
    empty = weights.sum(1) <= 0
    if empty.any():
        fallback = 1.0 - torch.eye(len(weights))
        weights = torch.where(empty[:, None], fallback, weights)
    return torch.multinomial(weights, 1, generator=generator).flatten()


# ------------------------------------------------------------------- learning check
@torch.no_grad()
def retrieval(stage1: Stage1, images: CaptionData,
              candidates: tuple[list[str], torch.Tensor, torch.Tensor]) -> dict:
    """Image-to-text R@1 by ITC: each held-out image ranks the `candidates` (see
    `candidate_captions`); the top one must be its own. Chance: one over their number."""
    was_training = stage1.training
    stage1.eval()
    device = stage1.temp.device
    captions, ids, mask = candidates
    text_feats = torch.cat([stage1.text_features(i.to(device), m.to(device))
                            for i, m in zip(ids.split(64), mask.split(64))])
    image_feats = torch.cat([stage1.image_features(stage1.image_embeds(p)) for p in images.pixels.split(64)])
    best = stage1.similarity(image_feats, text_feats).argmax(1).cpu()
    truth = torch.tensor([captions.index(images.texts[texts[0]]) for texts in images.row_texts])
    stage1.train(was_training)
    r1 = (best == truth).float().mean().item()
    chance = 1.0 / len(captions)
    return {"itc_r1": r1, "itc_r1_chance": chance, "itc_r1_over_chance": r1 / chance,
            "itc_images": len(images), "itc_captions": len(captions)}


@torch.no_grad()
def fixed_batch_losses(stage1: Stage1, data: CaptionData, cfg: PretrainQFormerConfig) -> dict[str, float]:
    was_training = stage1.training
    stage1.eval()
    pixels, texts, g = draw(cfg, data, -1, 0, 0)
    losses = {k: v.item() for k, v in stage1(pixels, texts, data, cfg, g).items()}
    stage1.train(was_training)
    return losses


# ---------------------------------------------------------------------------- stage
@training.explain_out_of_memory(
    "pretrain_qformer", "lower pretrain_qformer.batch_size (gradient_accumulation_steps keeps the effective "
    "batch, though ITC and ITM then see fewer in-batch negatives)")
def run(params: Params, root: Path, resume: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    from diffusers.optimization import get_cosine_schedule_with_warmup

    cfg = params.pretrain_qformer
    frame = read_manifest(root / SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    train_frame, held_frame = frame[frame["split"] == "train"], frame[frame["split"] == "test"]
    if train_frame.empty:
        raise BlipDiffError(f"{SUBJECTS_MANIFEST}: no images in the train split (run `dvc repro ingest`)")

    accelerator = training.make_accelerator(cfg.gradient_accumulation_steps, cfg.mixed_precision, "pretrain_qformer")
    torch.manual_seed(cfg.seed)
    model = from_preset(params.preset, seed=cfg.seed)
    qformer, tokenizer = model.qformer, model.qformer_tokenizer
    max_length = min(cfg.max_text_length, qformer.config.qformer_config.max_position_embeddings)
    train = CaptionData(train_frame, root, model.image_processor, tokenizer, max_length)
    if len(train.texts) < 2:
        raise BlipDiffError(f"{SUBJECTS_MANIFEST}: every training image has the same caption "
                            f"({train.texts[0]!r}); ITC and ITM need at least two different ones")
    candidates = candidate_captions(frame, tokenizer, max_length)
    held_out = CaptionData(held_frame, root, model.image_processor, tokenizer, max_length) if len(held_frame) else None
    log.info("%d training images with %d distinct captions, %d held out; %d process(es) on %s",
             len(train), len(train.texts), len(held_frame), accelerator.num_processes, accelerator.device)

    qformer.requires_grad_(True)
    qformer.visual_encoder.requires_grad_(False)
    qformer.proj_layer.requires_grad_(False)  # stage 2's; pre-training does not reach it
    stage1 = Stage1(qformer, cfg.embed_dim, tokenizer.bos_token_id).to(accelerator.device)
    stage1.train()
    qformer.visual_encoder.eval()
    trainable = [p for p in stage1.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    stage1, optimizer, lr_schedule = accelerator.prepare(stage1, optimizer, lr_schedule)
    plain = accelerator.unwrap_model(stage1)

    ckpt_root = root / CHECKPOINT_DIR
    config_hash = training.config_hash(params, "pretrain_qformer")
    start, curve = 0, []
    if resume:
        start, curve = training.load_checkpoint(accelerator, ckpt_root, resume, config_hash, "pretrain_qformer")

    fixed_start = fixed_batch_losses(plain, train, cfg)
    r1_start = retrieval(plain, held_out, candidates)["itc_r1"] if held_out and not start else None

    def loss_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
        pixels, texts, g = draw(cfg, train, step, micro, accelerator.process_index)
        return stage1(pixels, texts, train, cfg, g)

    _, seconds = training.train_loop(
        accelerator, stage1, optimizer, lr_schedule, trainable, cfg, stage="pretrain_qformer", start=start,
        ckpt_root=ckpt_root, config_hash=config_hash, loss_fn=loss_fn,
        log_extra=lambda: {"temp": plain.temp.item()}, curve=curve)
    stage1 = None  # the DDP wrapper goes before the process group (training.finish)

    metrics: dict = {}
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        plain.eval()
        fixed_end = fixed_batch_losses(plain, train, cfg)
        training.write_curve(curve, root / curve_file("pretrain_qformer"))
        with atomic_path(root / QFORMER_DIR) as tmp:
            qformer.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / HEADS_FILE).parent.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in plain.heads_state_dict().items()}, tmp / HEADS_FILE)
        steps_run = cfg.steps - start
        metrics = {
            "fixed_batch_loss_start": fixed_start["loss"],
            "fixed_batch_loss_end": fixed_end["loss"],
            **{f"fixed_batch_{k}_end": v for k, v in fixed_end.items() if k != "loss"},
            "temperature": plain.temp.item(),
            "seconds_training": round(seconds, 3),
            "samples_per_s": round(steps_run * cfg.batch_size * cfg.gradient_accumulation_steps
                                   * accelerator.num_processes / max(seconds, 1e-9), 3),
            "peak_memory_mb": round(training.peak_memory_mb(), 1),
            "processes": accelerator.num_processes,
            "train_images": len(train),
        }
        if held_out is not None:
            metrics.update(retrieval(plain, held_out, candidates))
            if r1_start is not None:
                metrics["itc_r1_start"] = r1_start
        log.info("wrote %s; %s", QFORMER_DIR, {k: v for k, v in metrics.items() if k.startswith(("itc", "fixed"))})
    training.finish(accelerator)
    return metrics, {}
