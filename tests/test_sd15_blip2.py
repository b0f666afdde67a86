"""The sd15-blip2 composition from local stand-ins of its sources (tiny CLIP vision, BERT, SD)."""

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from components.core.errors import BlipDiffError
from components.model import sd15_blip2
from components.model.tiny.tokenizers import clip_tokenizer, tiny_bert_tokenizer

H = 32


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, image_size=32, patch_size=8))
    vision.save_pretrained(root / "clip")
    tok = tiny_bert_tokenizer(root / "bert")
    tok.save_pretrained(root / "bert")
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64), add_pooling_layer=False).save_pretrained(root / "bert")
    sd = root / "sd15"
    clip_tok = clip_tokenizer()
    clip_tok.save_pretrained(sd / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=clip_tok.vocab_size, hidden_size=H, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4)).save_pretrained(sd / "text_encoder")
    UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=H,
                         norm_num_groups=8, attention_head_dim=8).save_pretrained(sd / "unet")
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8).save_pretrained(sd / "vae")
    PNDMScheduler(skip_prk_steps=True).save_pretrained(sd / "scheduler")
    return root, vision


def test_composition_takes_every_pretrained_part(sources):
    root, vision = sources
    model = sd15_blip2.build(str(root / "sd15"), str(root / "clip"), str(root / "bert"))
    q = model.qformer
    assert q.config.vision_config.num_hidden_layers == 2  # the last CLIP layer is dropped
    assert q.query_tokens.shape == (1, 16, H)
    # The image encoder computes what CLIP computes after 2 of its 3 layers (q/k/v fused,
    # key bias dropped), followed by the post LayerNorm on every token.
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = q.visual_encoder(pixels)
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[2]
        expected = vision.post_layernorm(hidden)
    assert torch.allclose(ours, expected, atol=1e-5)
    bert = BertModel.from_pretrained(root / "bert")
    layer = q.encoder.layer[1]
    assert torch.equal(layer.attention.attention.query.weight, bert.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(layer.intermediate_query.dense.weight, bert.encoder.layer[1].intermediate.dense.weight)
    assert torch.equal(layer.output.LayerNorm.bias, bert.encoder.layer[1].output.LayerNorm.bias)
    # the subject embeddings fit the SD text encoder, and the whole bundle generates
    embeds = model.subject_embeddings([torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8).numpy()], "dog")
    images = model.generate(embeds, ["on a beach"], "dog", [0], num_inference_steps=2, height=32, width=32)
    assert images.shape == (1, 32, 32, 3)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(BlipDiffError, match="sd15-blip2: a source could not be loaded"):
        sd15_blip2.build(str(tmp_path / "sd"), str(tmp_path / "clip"), str(tmp_path / "bert"))
