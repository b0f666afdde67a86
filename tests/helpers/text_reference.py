"""Reference text conditioning for tests, written out as the reference pipeline does it
(diffusers' BlipDiffusionPipeline), independent of `components.model.conditioning`: a
prompt with a subject is tokenized to 77 - Q ids and the subject embeddings are handed to
the context text encoder; the negative prompt is tokenized to 77 ids and encoded alone."""

from __future__ import annotations

import torch


def encode_prompts(model, prompts: list[str], subject_embeds: torch.Tensor) -> torch.Tensor:
    """Context text embeddings of built prompts (`BlipDiffusion.build_prompt`), one subject
    embedding per prompt or one shared."""
    length = model.text_encoder.config.max_position_embeddings - subject_embeds.shape[1]
    ids = model.tokenizer(prompts, padding="max_length", truncation=True, max_length=length,
                          return_tensors="pt").input_ids
    embeds = subject_embeds.expand(len(ids), -1, -1) if len(subject_embeds) == 1 else subject_embeds
    return model.text_encoder(ids.to(model.device), ctx_embeddings=embeds,
                              ctx_begin_pos=model.ctx_begin_pos).last_hidden_state


def encode_negative(model, negative_prompt: str, count: int) -> torch.Tensor:
    """The unconditional branch: the negative prompt alone, without subject embeddings."""
    ids = model.tokenizer([negative_prompt], padding="max_length", truncation=True,
                          max_length=model.text_encoder.config.max_position_embeddings,
                          return_tensors="pt").input_ids
    return model.text_encoder(ids.to(model.device)).last_hidden_state.expand(count, -1, -1)
