"""Context text encoder: the CLIP text encoder with subject embeddings spliced into the prompt.

The 16 subject embeddings from the Q-Former go into the prompt's token embeddings right
after `ctx_begin_pos` tokens (2: the start token and the "a" of the reference's prompt
"a {subject} {prompt}"); positions run over the longer sequence, and the causal mask
covers it too. The module tree is `text_model.{embeddings,encoder,final_layer_norm}`, the
key layout of the released `text_encoder/` folder, on transformers' own CLIP blocks.
"""

from __future__ import annotations

import torch
from transformers import CLIPPreTrainedModel, CLIPTextConfig, CLIPTextModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

CTX_BEGIN_POS = 2


class ContextCLIPTextModel(CLIPPreTrainedModel):
    config_class = CLIPTextConfig
    # Older checkpoints saved the position_ids buffer; it is recomputed here.
    _keys_to_ignore_on_load_unexpected = [r"text_model\.embeddings\.position_ids"]

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.text_model = CLIPTextModel(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        ctx_embeddings: torch.Tensor | None = None,
        ctx_begin_pos: list[int] | int = CTX_BEGIN_POS,
    ) -> BaseModelOutputWithPooling:
        """Token ids (B, L) and optional subject embeddings (B, Q, D) -> hidden states (B, L+Q, D)."""
        model = self.text_model
        embeds = model.embeddings.token_embedding(input_ids)
        if ctx_embeddings is not None:
            batch = embeds.shape[0]
            if ctx_embeddings.shape[0] != batch:
                ctx_embeddings = ctx_embeddings.expand(batch, -1, -1)
            begins = [ctx_begin_pos] * batch if isinstance(ctx_begin_pos, int) else ctx_begin_pos
            embeds = torch.stack(
                [
                    torch.cat([embeds[i, :p], ctx_embeddings[i].to(embeds.dtype), embeds[i, p:]])
                    for i, p in enumerate(begins)
                ]
            )
        length = embeds.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt of {length} tokens (subject embeddings included) is longer than the "
                f"text encoder's {self.config.max_position_embeddings} positions"
            )
        positions = torch.arange(length, device=embeds.device)[None]
        hidden = embeds + model.embeddings.position_embedding(positions)
        # Causal over the whole sequence, subject embeddings included (as the reference).
        mask = torch.full((length, length), torch.finfo(hidden.dtype).min, device=hidden.device)
        mask = mask.triu(1)[None, None].to(hidden.dtype)
        hidden = model.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        hidden = model.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(-1)]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
