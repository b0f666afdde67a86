"""BLIP-Diffusion model bundle: released folder layout, text encoder splicing, batched sampling."""

import json

import numpy as np
import pytest
import torch

from components.core.errors import BlipDiffError
from components.model import blip_diffusion, layout, presets
from components.model.layout import load
from components.model.qformer import convert_reference_state_dict
from components.model.tiny.blip_diffusion import build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(seed=0)


@pytest.fixture(scope="module")
def subject_image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)


def test_save_writes_released_layout_and_loads_back(tiny, subject_image, tmp_path):
    layout.save(tiny, tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(["model_index.json", *layout.FOLDERS])
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["_class_name"] == "BlipDiffusionPipeline" and index["ctx_begin_pos"] == 2
    assert index["qformer"] == ["blip_diffusion", "Blip2QFormerModel"]
    for sub in ("qformer", "text_encoder", "unet", "vae"):
        assert list((ckpt / sub).glob("*.safetensors")), sub
    loaded = load(ckpt)
    a = tiny.subject_embeddings([subject_image], "dog")
    b = loaded.subject_embeddings([subject_image], "dog")
    assert torch.equal(a, b)
    kw = dict(num_inference_steps=2, height=32, width=32)
    assert np.array_equal(tiny.generate(a, ["on a beach"], "dog", [3], **kw),
                          loaded.generate(b, ["on a beach"], "dog", [3], **kw))


def test_incomplete_or_missing_checkpoint(tiny, tmp_path):
    with pytest.raises(BlipDiffError, match="checkpoint folder not found"):
        load(tmp_path / "nope")
    layout.save(tiny, tmp_path / "ckpt")
    for f in (tmp_path / "ckpt" / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(BlipDiffError, match=r"unet: no weights file"):
        load(tmp_path / "ckpt")
    import shutil

    shutil.rmtree(tmp_path / "ckpt" / "vae")
    with pytest.raises(BlipDiffError, match="incomplete checkpoint, missing vae"):
        load(tmp_path / "ckpt")


def test_subject_embeddings_average_the_reference_images(tiny, subject_image):
    other = np.ascontiguousarray(subject_image[::-1])
    a = tiny.subject_embeddings([subject_image], "dog")
    b = tiny.subject_embeddings([other], "dog")
    both = tiny.subject_embeddings([subject_image, other], "dog")
    assert a.shape == (1, 16, 32)
    assert torch.allclose(both, (a + b) / 2, atol=1e-5)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, tiny.subject_embeddings([subject_image], "cat"))  # the text matters


def test_text_encoder_splices_subject_embeddings(tiny):
    te = tiny.text_encoder
    ids = tiny.tokenizer(["a dog on a beach"], padding="max_length", max_length=61,
                         return_tensors="pt").input_ids
    plain = te(ids).last_hidden_state
    ctx = torch.randn(1, 16, te.config.hidden_size)
    with_ctx = te(ids, ctx_embeddings=ctx, ctx_begin_pos=2).last_hidden_state
    assert plain.shape == (1, 61, 32) and with_ctx.shape == (1, 77, 32)
    # causal: tokens before the splice point do not see the subject embeddings
    assert torch.allclose(with_ctx[:, :2], plain[:, :2], atol=1e-6)
    assert not torch.allclose(with_ctx[:, 18:], plain[:, 2:], atol=1e-3)
    # without subject embeddings it is exactly transformers' CLIP text model
    assert torch.allclose(plain, te.text_model(input_ids=ids).last_hidden_state, atol=1e-6)
    with pytest.raises(ValueError, match="longer than"):
        te(torch.zeros(1, 70, dtype=torch.long), ctx_embeddings=ctx)


def test_build_prompt_matches_reference_rule():
    built = blip_diffusion.BlipDiffusion.build_prompt(" swimming ", "dog", 1.0, 3)
    assert built == "a dog swimming, a dog swimming, a dog swimming"
    assert blip_diffusion.BlipDiffusion.build_prompt("x", "cat", 0.5, 20).count("a cat x") == 10


@pytest.mark.parametrize("scheduler", blip_diffusion.SCHEDULERS)
def test_batched_generation_equals_one_by_one(tiny, subject_image, scheduler):
    embeds = tiny.subject_embeddings([subject_image], "dog")
    kw = dict(num_inference_steps=3, height=32, width=32, scheduler=scheduler)
    batch = tiny.generate(embeds, ["in the snow", "on a beach", "in the snow"], "dog", [0, 1, 2], **kw)
    assert batch.shape == (3, 32, 32, 3) and batch.min() >= 0 and batch.max() <= 1
    for i, (prompt, seed) in enumerate([("in the snow", 0), ("on a beach", 1), ("in the snow", 2)]):
        single = tiny.generate(embeds, [prompt], "dog", [seed], **kw)
        assert np.abs(single[0] - batch[i]).max() < 1e-4
    assert np.abs(batch[0] - batch[2]).max() > 1e-2  # another seed, another image


def test_ddim_from_the_pndm_config_does_not_clip_latents(tiny):
    """The released scheduler config is PNDM's and has no clip_sample; DDIM's own default
    (True) would clip every step's predicted x0 to [-1, 1]. The references' DDIM does not."""
    assert "clip_sample" not in tiny.scheduler.config
    ddim = tiny.make_scheduler("ddim")
    assert ddim.config.clip_sample is False
    ddim.set_timesteps(10)
    t = ddim.timesteps[0]
    sample, noise = torch.full((1, 4, 4, 4), 3.0), torch.zeros(1, 4, 4, 4)  # x0 = 3 / sqrt(alpha_bar) > 1
    from diffusers import DDIMScheduler

    clipping = DDIMScheduler.from_config(tiny.scheduler.config)
    clipping.set_timesteps(10)
    assert clipping.config.clip_sample is True
    kept = ddim.step(noise, t, sample).pred_original_sample
    assert kept.min() > 1.0 and clipping.step(noise, t, sample).pred_original_sample.max() <= 1.0


def test_generate_rejects_bad_input(tiny):
    embeds = torch.zeros(1, 16, 32)
    with pytest.raises(BlipDiffError, match="multiples of 8"):
        tiny.generate(embeds, ["x"], "dog", [0], height=30, width=32)
    with pytest.raises(BlipDiffError, match="2 prompts but 1 seeds"):
        tiny.generate(embeds, ["x", "y"], "dog", [0])
    with pytest.raises(BlipDiffError, match="unknown scheduler 'euler'"):
        tiny.generate(embeds, ["x"], "dog", [0], scheduler="euler", height=32, width=32)


def test_convert_reference_state_dict():
    q, v, w = torch.ones(4), torch.full((4,), 2.0), torch.zeros(12, 4)
    state = {
        "visual_encoder.encoder.layers.0.self_attn.q_bias": q,
        "visual_encoder.encoder.layers.0.self_attn.v_bias": v,
        "visual_encoder.encoder.layers.0.self_attn.qkv.weight": w,
        "embeddings.position_ids": torch.arange(8)[None],
        "query_tokens": torch.zeros(1, 16, 4),
    }
    out = convert_reference_state_dict(state)
    assert set(out) == {"visual_encoder.encoder.layers.0.self_attn.qkv.bias",
                        "visual_encoder.encoder.layers.0.self_attn.qkv.weight", "query_tokens"}
    assert out["visual_encoder.encoder.layers.0.self_attn.qkv.bias"].tolist() == [1] * 4 + [0] * 4 + [2] * 4
    del state["visual_encoder.encoder.layers.0.self_attn.v_bias"]
    with pytest.raises(KeyError, match="expected both q_bias and v_bias"):
        convert_reference_state_dict(state)


def test_hub_preset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BlipDiffError, match="Salesforce/blipdiffusion: not a local folder and not downloadable"):
        presets.from_preset("blipdiffusion")
