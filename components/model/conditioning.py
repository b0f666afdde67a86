"""The text conditioning, once: prompt token ids with room for the subject embeddings, and
the context text encoder with or without them (as diffusers pipelines have one
`encode_prompt`).

A prompt conditioned on a subject is tokenized to `text_length - num_query` ids: the subject
embeddings (Q of them) take the remaining positions, spliced in after the first
`ctx_begin_pos` tokens (2: the start token and "a"). A prompt without a subject (the
negative prompt, or stage 2's dropped subject prompt) is tokenized to `text_length` ids and
encoded by the plain text encoder. Generation, stage 2, fine-tuning, the export's reference
and the text-encoder graph's inputs all go through these two functions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from components.core.errors import BlipDiffError


def prompt_ids(tokenizer, prompts: Sequence[str], text_length: int, num_query: int,
               has_subject: Sequence[bool] | torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """(B, text_length) int64 token ids on the CPU, one row per prompt.

    A row with a subject (all rows when `has_subject` is None) holds `text_length - num_query`
    ids, then `num_query` pad ids that `encode_text` never reads (the subject embeddings take
    those positions); a row without holds `text_length` ids.
    """
    flags = [True] * len(prompts) if has_subject is None else [bool(h) for h in has_subject]
    if len(flags) != len(prompts):
        raise BlipDiffError(f"{len(prompts)} prompts but {len(flags)} has_subject flags")
    ids = torch.full((len(prompts), text_length), tokenizer.pad_token_id, dtype=torch.long)
    for flag in (True, False):
        rows = [i for i, h in enumerate(flags) if h == flag]
        if not rows:
            continue
        length = text_length - num_query if flag else text_length
        tokens = tokenizer([prompts[i] for i in rows], padding="max_length", truncation=True, max_length=length,
                           return_tensors="pt").input_ids
        ids[rows, :length] = tokens
    return ids


def encode_text(text_encoder, ids: torch.Tensor, subject_embeds: torch.Tensor | None, ctx_begin_pos: int,
                has_subject: torch.Tensor | None = None) -> torch.Tensor:
    """Context text embeddings (B, text_length, D) of `prompt_ids` rows, on the encoder's device.

    `subject_embeds` is (1, Q, D), shared by every row with a subject, or (B, Q, D), one per
    row (rows without a subject ignore theirs). `has_subject` (B,) bool: which rows get the
    subject embeddings spliced in at `ctx_begin_pos`; None means every row when
    `subject_embeds` is given, none otherwise.
    """
    device, count = text_encoder.device, len(ids)
    if has_subject is None:
        has = torch.full((count,), subject_embeds is not None, dtype=torch.bool)
    else:
        has = has_subject.to("cpu", torch.bool)
    if has.any() and subject_embeds is None:
        raise BlipDiffError("encode_text: rows marked with a subject but no subject embeddings given")
    if has.any():
        embeds = subject_embeds.expand(count, -1, -1) if len(subject_embeds) == 1 else subject_embeds
        num_query = embeds.shape[1]

    def run(row_ids: torch.Tensor, row_embeds: torch.Tensor | None) -> torch.Tensor:
        if row_embeds is not None:  # the subject embeddings take the last num_query positions of the row
            return text_encoder(row_ids[:, :row_ids.shape[1] - num_query].to(device),
                                ctx_embeddings=row_embeds.to(text_encoder.dtype),
                                ctx_begin_pos=ctx_begin_pos).last_hidden_state
        return text_encoder(row_ids.to(device)).last_hidden_state

    if has.all():
        return run(ids, embeds)
    if not has.any():
        return run(ids, None)
    with_subject, without = run(ids[has], embeds[has.to(embeds.device)]), run(ids[~has], None)
    out = torch.empty(count, *with_subject.shape[1:], device=with_subject.device, dtype=with_subject.dtype)
    out[has.to(out.device)] = with_subject
    out[~has.to(out.device)] = without.to(out.dtype)
    return out
