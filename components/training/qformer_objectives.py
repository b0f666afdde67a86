"""BLIP-2 stage 1's objectives: the Q-Former with its pre-training heads and three losses.

The code of that stage is public in LAVIS (`lavis/models/blip2_models/blip2_qformer.py`,
`Blip2Qformer.forward`), and the three losses here follow it (checked against it on a tiny
model: tests/test_pretrain_qformer.py, fixtures by scripts/golden/make_stage1_golden.py).
The image encoder is frozen except its final LayerNorm, which is BLIP-2's `ln_vision`
(fresh and trained there; the released BLIP-Diffusion checkpoint carries it as
`visual_encoder.post_layernorm`). The Q-Former (its query tokens, layers and text
embeddings) learns three objectives on image-caption pairs, each with its own attention
mask over [queries | text]:

- ITC, image-text contrastive: query outputs and the text's [CLS] output are projected
  and L2-normalised; an image-text similarity is the best of its query similarities;
  softmax over the global batch (every process's images and texts, gathered; as in
  BLIP-2 the gathered side carries no gradient unless `itc_full_gradient`) with a
  learnable temperature, cross-entropy with label smoothing (`itc_label_smoothing`,
  BLIP-2: 0.1). Queries and text do not see each other.
- ITM, image-text matching: queries and text attend to each other; a binary head on the
  query outputs, averaged, tells matched from unmatched. Negatives are hard ones, drawn
  from the global batch in proportion to the ITC similarities (one text per image and one
  image per text).
- ITG, image-grounded text generation: the text, [DEC] first, is predicted token by
  token (causal mask) while it attends to all queries; the queries see only each other,
  so everything the text learns about the image must pass through them. Cross-entropy
  with label smoothing (`label_smoothing`, BLIP-2: 0.1).

Rows that share a caption are positives of each other in ITC (soft targets, spread evenly
over them, then smoothed: LAVIS's own rule when it knows which rows are the same, its
`image_id` branch) and never drawn as ITM negatives. Where every caption differs this is
exactly BLIP-2's `cross_entropy(sim, arange, label_smoothing=0.1)`.

Each step's rows, texts, augmentation and ITM negatives come from the step's seeded
generator (`draw`), so a resumed run trains on the same batches. Learning checks:
image-to-text retrieval R@1 by ITC (`retrieval`) and the losses on a fixed batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.core.config import PretrainQFormerConfig
from components.core.errors import BlipDiffError
from components.training import data as streaming
from components.training.data import CaptionData


# ------------------------------------------------------------------ per-step draw
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


def draw(cfg: PretrainQFormerConfig, data: CaptionData, step: int, micro: int, rank: int,
         batch: dict | None = None):
    """Rows' pixels, their texts and the generator for ITM negatives: a function of the
    position in the run. `batch`: those rows as the loader read them (else read here)."""
    g = streaming.step_generator(cfg.seed, step, micro, rank)
    rows = streaming.draw_rows(g, len(data), cfg.batch_size)
    texts = torch.tensor([data.row_texts[r][int(torch.randint(0, len(data.row_texts[r]), (1,), generator=g))]
                          for r in rows.tolist()])
    if batch is None:
        batch = data.batch(rows)
    elif not torch.equal(batch["index"], rows):
        raise BlipDiffError(f"pretrain_qformer: loader out of step at step {step}.{micro}")
    pixels = batch["pixels"]
    if cfg.augment:
        pixels = augment(pixels, g)
    return pixels, texts, g


# ------------------------------------------------------------------------ objectives
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

    @property
    def ln_vision(self) -> nn.LayerNorm:
        """BLIP-2's `ln_vision`: the image encoder's final LayerNorm, trained in this stage."""
        return self.qformer.visual_encoder.post_layernorm

    def image_body(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen image encoder up to its final LayerNorm, without gradients."""
        encoder = self.qformer.visual_encoder
        with torch.no_grad():
            hidden = encoder.pre_layernorm(encoder.embeddings(pixels.to(self.temp.device)))
            return encoder.encoder(inputs_embeds=hidden).last_hidden_state

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """What the Q-Former reads: `visual_encoder(pixels)`, the gradient reaching `ln_vision` only."""
        return self.ln_vision(self.image_body(pixels))

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

    def hard_negatives(self, weights_i2t: torch.Tensor, weights_t2i: torch.Tensor,
                       generator: torch.Generator | None, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM negatives, indices into the global batch: a text for each of this process's
        images, then an image for each of its texts, in proportion to the (local, global)
        weights. `offset`: this process's first row in the global batch. A method, so
        that a test can give both sides of a comparison the same draws."""
        return (_draw_negatives(weights_i2t, generator, offset),
                _draw_negatives(weights_t2i, generator, offset))

    def forward(self, pixels, text_idx, data: CaptionData, cfg: PretrainQFormerConfig,
                generator: torch.Generator, gather: bool = True) -> dict[str, torch.Tensor]:
        device = self.temp.device
        ids, mask = data.ids[text_idx].to(device), data.mask[text_idx].to(device)
        return self.losses(self.image_embeds(pixels), text_idx, ids, mask, cfg, generator, gather)

    def losses(self, image_embeds: torch.Tensor, text_idx: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
               cfg: PretrainQFormerConfig, generator: torch.Generator | None,
               gather: bool = True) -> dict[str, torch.Tensor]:
        """The three losses of this process's batch. With `gather` and several processes,
        ITC's softmax runs over the global batch and ITM draws negatives from it, as
        BLIP-2 does; `text_idx` (which caption each row has) says which rows are positives."""
        device = self.temp.device
        world, rank = _world() if gather else (1, 0)
        offset = rank * len(ids)
        text_idx = text_idx.to(device)
        losses: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_feats = self.image_features(image_embeds)
        text_feats = self.text_features(ids, mask)
        # (local rows, global columns). BLIP-2 gathers the other side's features without
        # gradient (concat_all_gather; it does so in one process too): image-to-text rows
        # train the image side only, text-to-image rows the text side. itc_full_gradient
        # lets gradients through the gathered features as well. Either way the losses and
        # gradients averaged over processes (as DDP does) are those of one process on the
        # whole batch.
        if cfg.itc_full_gradient:
            texts_all, images_all = _all_gather(text_feats, world, grad=True), _all_gather(image_feats, world, grad=True)
        else:
            texts_all, images_all = _all_gather(text_feats.detach(), world), _all_gather(image_feats.detach(), world)
        sim_i2t = self.similarity(image_feats, texts_all) / self.temp
        sim_t2i = self.similarity(images_all, text_feats).t() / self.temp
        same = text_idx[:, None] == _all_gather(text_idx, world)[None, :]
        # BLIP-2: cross_entropy(sim, arange, label_smoothing=0.1). Rows sharing a caption
        # share the target; smoothing mixes it with the uniform one, target * (1 - e) + e / N.
        targets = same.float() / same.sum(1, keepdim=True)
        smoothing = cfg.itc_label_smoothing
        losses["itc"] = 0.5 * (F.cross_entropy(sim_i2t.float(), targets, label_smoothing=smoothing)
                               + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=smoothing))
        if cfg.itm_weight:
            with torch.no_grad():  # hard negatives: drawn in proportion to the ITC similarity
                weights_i2t = torch.softmax(sim_i2t.float(), 1).masked_fill(same, 0).cpu()
                weights_t2i = torch.softmax(sim_t2i.float(), 1).masked_fill(same, 0).cpu()
                neg_text, neg_image = (n.to(device) for n in self.hard_negatives(weights_i2t, weights_t2i,
                                                                                 generator, offset))
            ids_world, mask_world = _all_gather(ids, world), _all_gather(mask, world)
            image_embeds_world = _all_gather(image_embeds, world, grad=True)  # ln_vision's gradient
            all_ids = torch.cat([ids, ids_world[neg_text], ids])
            all_mask = torch.cat([mask, mask_world[neg_text], mask])
            all_images = torch.cat([image_embeds, image_embeds, image_embeds_world[neg_image]])
            logits = self.itm_logits(all_ids, all_mask, all_images)
            labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long().to(device)
            losses["itm"] = F.cross_entropy(logits.float(), labels)
        if cfg.itg_weight:
            losses["itg"] = self.itg_loss(ids, mask, image_embeds, cfg.label_smoothing)
        losses["loss"] = (cfg.itc_weight * losses["itc"] + cfg.itm_weight * losses.get("itm", 0.0)
                          + cfg.itg_weight * losses.get("itg", 0.0))
        return losses


def _draw_negatives(weights: torch.Tensor, generator: torch.Generator | None, offset: int = 0) -> torch.Tensor:
    """One index per row, in proportion to `weights` (local rows, global columns; row i is
    column offset + i); rows with no negative in the batch (every other row shares their
    text) fall back to a uniform draw over the others."""
    empty = weights.sum(1) <= 0
    if empty.any():
        fallback = torch.ones_like(weights)
        rows = torch.arange(len(weights))
        fallback[rows, rows + offset] = 0.0
        weights = torch.where(empty[:, None], fallback, weights)
    return torch.multinomial(weights, 1, generator=generator).flatten()


def _world() -> tuple[int, int]:
    """(processes, this one's rank) in torch.distributed's default group; (1, 0) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """Every process's rows, in rank order. Backward: the gradient of every process's loss
    with respect to this process's rows, summed (all-reduce; gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rows = (rank * len(x), (rank + 1) * len(x))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rows[0] : ctx.rows[1]]


def _all_gather(x: torch.Tensor, world: int, grad: bool = False) -> torch.Tensor:
    """`x` of every process, concatenated in rank order (each has the same number of rows);
    `x` itself in a single process. With `grad`, gradients flow back to every process."""
    if world == 1:
        return x
    if grad and x.requires_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


# ------------------------------------------------------------------- learning checks
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
    image_feats = torch.cat([stage1.image_features(stage1.image_embeds(b["pixels"]))
                             for b in streaming.make_loader(images, batch_size=64)])
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
    # local: the end's call runs on the main process alone
    losses = {k: v.item() for k, v in stage1(pixels, texts, data, cfg, g, gather=False).items()}
    stage1.train(was_training)
    return losses
