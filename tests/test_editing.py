"""Prompt-to-prompt subject editing (components.model.editing, `blipdiff edit`): the token
mapper, the invariants an edit must keep, DDIM inversion, batching, half precision, the
attention processors put back, and bad input. Parity with LAVIS: test_editing_parity.py."""

from __future__ import annotations

import json
import re
import types

import numpy as np
import pytest
import torch
from PIL import Image

from components.core.errors import BlipDiffError
from components.model import editing
from components.model.editing import Edit, EditSettings

SIZE = 32


@pytest.fixture(scope="module")
def model():
    from components.model.tiny.blip_diffusion import build_tiny

    return build_tiny(0, image_size=SIZE).to("cpu", torch.float32)


@pytest.fixture(scope="module")
def embeds(model):
    torch.manual_seed(7)
    q, d = model.qformer.config.num_query_tokens, model.text_encoder.config.hidden_size
    return torch.randn(1, q, d)


def settings(**kw) -> EditSettings:
    return EditSettings(**{"steps": 8, "height": SIZE, "width": SIZE, **kw})


def photo(seed: int = 0, h: int = 45, w: int = 60) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 8 + yy // 8) % 2) * 200], -1)
    return np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ tokens
def test_alignment_maps_shared_tokens_and_leaves_new_ones_unmapped():
    # source: BOS a cat on sand EOS; target: BOS a <16 subject positions> dog on sand EOS
    src = [0, 5, 7, 8, 9, 1]
    tgt = [0, 5] + [-1] * 16 + [6, 8, 9, 1]
    mapper, alphas = editing.align_tokens(src, tgt, 77)
    assert mapper[:2].tolist() == [0, 1] and alphas[:2].tolist() == [1, 1]
    assert (mapper[2:19] == -1).all() and (alphas[2:19] == 0).all()  # subject and "dog": their own
    assert mapper[19:22].tolist() == [3, 4, 5] and (alphas[19:22] == 1).all()  # on sand EOS <- source's
    assert mapper[22:].tolist() == list(range(22, 77)) and (alphas[22:] == 1).all()  # padding: same place
    same, ones = editing.align_tokens(src, src, 10)
    assert same.tolist() == list(range(10)) and ones.tolist() == [1.0] * 10


def test_blend_words_are_found_on_the_tokens(model):
    tok = model.tokenizer
    text = "a cat on sand"
    positions = editing.word_positions(tok, text, "cat", 77)
    ids = tok(text).input_ids
    pieces = tok("cat", add_special_tokens=False).input_ids
    assert [ids[p] for p in positions] == pieces and positions[0] == 1 + len(tok("a", add_special_tokens=False).input_ids)
    assert editing.word_positions(tok, text, "dog", 77) == []
    two = Edit("on sand", "teddy bear", "dog")  # a class of two words blends on both
    assert two.words == ("teddy", "bear")
    editing.check_edits(model, [two], settings())
    assert Edit("x", "cat", "dog", blend_words=("sofa cushion", "cat")).words == ("sofa", "cushion", "cat")
    with pytest.raises(BlipDiffError, match="blend word 'dog' is not a word of the source prompt 'a cat on sand'"):
        editing.check_edits(model, [Edit("on sand", "cat", "dog", blend_words=("dog",))], settings())


# ------------------------------------------------------------------------------ invariants
def test_no_replacement_and_no_blend_is_the_target_prompts_own_generation(model, embeds):
    got = editing.edit(model, embeds, [Edit("on sand", "cat", "dog", seed=3)],
                       settings(cross_replace_steps=0.0, self_replace_steps=0.0, blend=False))
    plain = model.generate(embeds, ["on sand"], "dog", [3], num_inference_steps=8, height=SIZE, width=SIZE,
                           prompt_reps=1)
    np.testing.assert_allclose(got.edited, plain, atol=1e-5)
    source = model.generate(None, ["a cat on sand"], "", [3], num_inference_steps=8, height=SIZE, width=SIZE)
    np.testing.assert_allclose(got.sources, source, atol=1e-5)
    assert np.abs(got.edited - got.sources).max() > 0.05  # and the edit does change something


def test_the_same_text_as_target_gives_back_the_source(model):
    got = editing.edit(model, None, [Edit("on sand", "cat", "cat", seed=1)], settings())
    assert np.array_equal(got.edited, got.sources)


def test_the_mask_shrinks_as_the_threshold_rises_and_at_one_the_source_comes_back(model, embeds):
    fractions = []
    for threshold in (0.0, 0.5, 0.8, 0.9, 0.95, 1.0):
        got = editing.edit(model, embeds, [Edit("on sand", "cat", "dog", seed=2)], settings(blend_threshold=threshold))
        fractions.append(got.masks.mean())
        if threshold == 1.0:
            assert np.array_equal(got.edited, got.sources)
    assert fractions == sorted(fractions, reverse=True), fractions
    assert fractions[0] == 1.0 and fractions[-1] == 0.0 and 0.0 < min(fractions[1:-1]) < 1.0, fractions


def test_the_blend_leaves_the_source_outside_the_mask(model, embeds):
    got = editing.edit(model, embeds, [Edit("on sand", "cat", "dog", seed=2)], settings(blend_threshold=0.9))
    outside = got.masks[0] == 0
    assert 0 < outside.mean() < 1
    # the final step's blend keeps the source's latents outside the mask; after decoding, pixels well
    # inside the unmasked region are the source's up to the VAE's reach
    diff = np.abs(got.edited[0] - got.sources[0]).max(-1)
    assert diff[outside].mean() < diff[~outside].mean()


def test_edits_in_one_batch_match_each_alone(model, embeds):
    edits = [Edit("on sand", "cat", "dog", seed=4), Edit("in the snow", "cat", "dog", seed=5),
             Edit("on a sofa", "cat", "toy", seed=4, blend_words=("sofa",))]
    together = editing.edit(model, embeds, edits, settings(blend_threshold=0.8))
    for k, e in enumerate(edits):
        alone = editing.edit(model, embeds, [e], settings(blend_threshold=0.8))
        np.testing.assert_allclose(together.edited[k], alone.edited[0], atol=1e-5)
        np.testing.assert_allclose(together.sources[k], alone.sources[0], atol=1e-5)
        np.testing.assert_array_equal(together.masks[k], alone.masks[0])


# ------------------------------------------------------------------------------ real photos
def test_on_a_photo_the_source_does_not_depend_on_guidance_target_or_subject(model, embeds):
    base = editing.edit(model, embeds, [Edit("on sand", "cat", "dog", seed=0, photo=photo())], settings())
    others = [
        editing.edit(model, embeds, [Edit("on sand", "cat", "dog", seed=0, photo=photo())], settings(guidance_scale=3)),
        editing.edit(model, embeds, [Edit("on sand", "cat", "vase", seed=0, photo=photo())], settings()),
        editing.edit(model, embeds * -1.5, [Edit("on sand", "cat", "dog", seed=0, photo=photo())], settings()),
    ]
    for other in others:
        np.testing.assert_allclose(other.sources, base.sources, atol=1e-6)
        assert np.abs(other.edited - base.edited).max() > 1e-3
    assert base.inversion_texts == ["a cat on sand"]


class ConstantNoise(torch.nn.Module):
    """A noise predictor that ignores its input."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps
        self.dtype, self.device = eps.dtype, eps.device

    def forward(self, sample, t, encoder_hidden_states=None, **kw):
        return types.SimpleNamespace(sample=self.eps.expand_as(sample))


def _invert_then_sample(model, unet, start, steps):
    sched, inverse, timesteps = editing.editing_grid(model, steps, steps)
    bundle = types.SimpleNamespace(unet=unet, device=start.device, vae_scale_factor=model.vae_scale_factor,
                                   text_length=model.text_length, vae=model.vae, controlnets=[])
    text = torch.zeros(1, model.text_length, model.text_encoder.config.hidden_size)
    noise = editing.invert(bundle, start, text, inverse, timesteps)
    latents = noise
    for t in sched.timesteps:
        latents = sched.step(unet(latents, t, encoder_hidden_states=text).sample, t, latents).prev_sample
    return noise, latents


def test_ddim_inversion_then_sampling_returns_the_start(model):
    start = model.latents_from_moments(model.latent_moments(editing.photo_pixels(photo(), SIZE, SIZE)[None]))
    eps = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    noise, back = _invert_then_sample(model, ConstantNoise(eps), start, 20)
    assert (noise - start).abs().max() > 1.0  # it did noise the latents
    assert (back - start).abs().max() < 1e-5 and (back - start).abs().mean() < 1e-6
    # with the tiny UNet the round trip is approximate, and better with more steps
    text = model.text_conditioning(editing.TorchNetworks(model), None, ["a cat on sand"], None)
    errors = []
    for steps in (20, 50, 200):
        sched, inverse, timesteps = editing.editing_grid(model, steps, steps)
        with torch.inference_mode():
            noise = editing.invert(model, start, text, inverse, timesteps)
            latents = noise
            for t in sched.timesteps:
                latents = sched.step(model.unet(latents, t, encoder_hidden_states=text).sample, t, latents).prev_sample
        errors.append((latents - start).abs().mean().item())
    assert errors[0] > errors[1] > errors[2], errors


def test_inversion_steps_must_align_with_the_editing_grid(model):
    editing.editing_grid(model, 50, 100)  # 100 steps hold every timestep of 50
    with pytest.raises(BlipDiffError, match="--inversion-steps 45 cannot align with --steps 30"):
        editing.editing_grid(model, 30, 45)
    with pytest.raises(BlipDiffError, match="cannot align"):
        editing.check_edits(model, [Edit("on sand", "cat", "dog", photo=photo())], settings(inversion_steps=7))


def test_photo_preparation_covers_and_centre_crops():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the centre half is white
    px = editing.photo_pixels(img, 32, 32)
    assert px.shape == (3, 32, 32) and px.min() >= -1 and px.max() <= 1
    assert (px[:, :, 2:30] > 0.9).all()  # the crop is the white centre
    tall = editing.photo_pixels(np.zeros((90, 30, 3), np.uint8), 16, 24)
    assert tall.shape == (3, 16, 24)


# ------------------------------------------------------------------------------ processors, precision
def test_processors_are_put_back_after_an_edit_and_after_a_failed_one(model, embeds, monkeypatch):
    before = model.generate(embeds, ["on sand"], "dog", [0], num_inference_steps=3, height=SIZE, width=SIZE)
    processors = dict(model.unet.attn_processors)
    editing.edit(model, embeds, [Edit("on sand", "cat", "dog")], settings(steps=3))
    assert {k: type(v) for k, v in model.unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}
    assert all(model.unet.attn_processors[k] is v for k, v in processors.items())
    after = model.generate(embeds, ["on sand"], "dog", [0], num_inference_steps=3, height=SIZE, width=SIZE)
    assert np.array_equal(before, after)

    def boom(self, i, latents):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(editing.Controller, "end", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        editing.edit(model, embeds, [Edit("on sand", "cat", "dog")], settings(steps=3))
    assert all(model.unet.attn_processors[k] is v for k, v in processors.items())
    assert np.array_equal(before, model.generate(embeds, ["on sand"], "dog", [0], num_inference_steps=3,
                                                 height=SIZE, width=SIZE))


def test_bf16_edits_close_to_fp32(embeds):
    """bf16 (the CPU's half precision; fp16 on a GPU runs the same code) runs and stays near
    fp32: a generated edit as near as plain generation is (measured: 0.0028 vs 0.0027 mean
    absolute difference); on a photo the inversion adds to it (measured: 0.009 on the
    reconstructed source, 0.034 on the guided edit)."""
    from components.model.tiny.blip_diffusion import build_tiny

    full = build_tiny(0, image_size=SIZE).to("cpu", torch.float32)
    half = build_tiny(0, image_size=SIZE).to("cpu", torch.bfloat16)
    gen = [m.generate(x, ["on sand"], "dog", [1], num_inference_steps=8, height=SIZE, width=SIZE, prompt_reps=1)
           for m, x in ((full, embeds), (half, embeds.to(torch.bfloat16)))]
    generate_diff = np.abs(gen[0] - gen[1]).mean()
    diffs = []
    for e in (Edit("on sand", "cat", "dog", seed=1), Edit("on sand", "cat", "dog", seed=2, photo=photo())):
        a = editing.edit(full, embeds, [e], settings(blend_threshold=0.8))
        b = editing.edit(half, embeds.to(torch.bfloat16), [e], settings(blend_threshold=0.8))
        assert b.edited.dtype == np.float32 and np.isfinite(b.edited).all() and np.isfinite(b.sources).all()
        diffs.append((np.abs(a.sources - b.sources).mean(), np.abs(a.edited - b.edited).mean()))
    assert diffs[0][1] < 2 * generate_diff, (diffs, generate_diff)
    assert diffs[1][0] < 0.02 and diffs[1][1] < 0.06, diffs


def test_bad_settings_are_one_line_each(model, embeds):
    with pytest.raises(BlipDiffError, match="editing needs guidance > 1"):
        editing.edit(model, embeds, [Edit("on sand", "cat", "dog")], settings(guidance_scale=1.0))
    with pytest.raises(BlipDiffError, match="all on real photos or all on generated"):
        editing.edit(model, embeds, [Edit("on sand", "cat", "dog"), Edit("x", "cat", "dog", photo=photo())],
                     settings())
    with pytest.raises(BlipDiffError, match="cross-replace-steps 1.5"):
        settings(cross_replace_steps=1.5).check()


# ------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    from components.model import layout

    folder = tmp_path_factory.mktemp("edit") / "tiny"
    layout.save(model, folder)
    ref = folder.parent / "ref.png"
    Image.fromarray(photo(3, 64, 64)).save(ref)
    return folder, ref


def _cli(args) -> int:
    from components.cli import main

    return main(["edit", *args])


def test_cli_writes_every_edit_with_its_record(checkpoint, tmp_path):
    folder, ref = checkpoint
    cat = tmp_path / "cat.jpg"
    Image.fromarray(photo(4, 50, 70)).save(cat)
    out = tmp_path / "out"
    rc = _cli(["--checkpoint", str(folder), "--subject-image", str(ref), "--source-subject", "dog",
               "--prompt", "on sand", "--source-class", "cat", "--seed", "0", "1", "--steps", "4",
               "--blend-threshold", "0.8", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000", "0001"]
    for name in ("0000", "0001"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["edited.png", "mask.png", "record.json", "source.png"]
        assert Image.open(out / name / "mask.png").size == (SIZE, SIZE)
    record = json.loads((out / "0001" / "record.json").read_text())
    assert record["seed"] == 1 and record["source_text"] == "a cat on sand" and record["target_text"] == "a dog on sand"
    assert record["blend_words"] == ["cat"] and record["scheduler"] == "pndm" and record["image"] is None
    assert record["cross_replace_steps"] == 0.8 and record["subject_images"] == [str(ref)]
    photo_out = tmp_path / "photo"
    rc = _cli(["--checkpoint", str(folder), "--subject-image", str(ref), "--source-subject", "dog",
               "--image", str(cat), "--prompt", "on sand", "--source-class", "cat", "--steps", "4",
               "--inversion-steps", "8", "--out", str(photo_out)])
    assert rc == 0
    record = json.loads((photo_out / "0000" / "record.json").read_text())
    assert record["image"] == str(cat) and record["scheduler"] == "ddim" and record["inversion_steps"] == 8
    assert record["inversion_text"] == "a cat on sand"


@pytest.mark.parametrize("extra, message", [
    (["--guidance-scale", "1"], "editing needs guidance > 1"),
    (["--blend-words", "sofa"], "blend word 'sofa' is not a word of the source prompt 'a cat on sand'"),
    (["--image", "NOTREAL.jpg"], "photo .*NOTREAL.jpg"),
    (["--image", "BIG"], "photo .*pixels"),
    (["--image", "GOOD", "--steps", "30", "--inversion-steps", "45"], "--inversion-steps 45 cannot align with --steps 30"),
    (["--backend", "tensorrt"], "--backend tensorrt: editing needs the UNet's attention maps"),
    (["--inversion-steps", "8"], "--inversion-steps is for --image"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys, extra, message):
    folder, ref = checkpoint
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(big)
    good = tmp_path / "good.png"
    Image.fromarray(photo()).save(good)
    swap = {"NOTREAL.jpg": str(tmp_path / "NOTREAL.jpg"), "BIG": str(big), "GOOD": str(good)}
    extra = [swap.get(a, a) for a in extra]
    pixels = ["--max-image-pixels", "50000"] if "BIG" in str(extra) or str(big) in extra else []
    out = tmp_path / "out"
    rc = _cli(["--checkpoint", str(folder), "--subject-image", str(ref), "--source-subject", "dog",
               "--prompt", "on sand", "--source-class", "cat", "--steps", "4", *pixels, *extra, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("blipdiff edit: error:") and sum("error" in line for line in err) == 1, err
    assert re.search(message, err[-1]), err[-1]
    assert not out.exists()


@pytest.mark.gpu
def test_fp16_edit_on_cuda_close_to_fp32(embeds):
    """On a GPU: fp16 (LAVIS fails there with a dtype mismatch) near fp32, both modes."""
    from components.model.tiny.blip_diffusion import build_tiny

    full = build_tiny(0, image_size=SIZE).to("cuda", torch.float32)
    half = build_tiny(0, image_size=SIZE).to("cuda", torch.float16)
    for e in (Edit("on sand", "cat", "dog", seed=1), Edit("on sand", "cat", "dog", seed=2, photo=photo())):
        a = editing.edit(full, embeds.cuda(), [e], settings(blend_threshold=0.8))
        b = editing.edit(half, embeds.cuda().half(), [e], settings(blend_threshold=0.8))
        assert np.isfinite(b.edited).all() and np.abs(a.edited - b.edited).mean() < 0.02


def test_cli_edits_a_dreambench_photo_with_dreambench_subject_photos(checkpoint, dreambench_dir, tmp_path):
    """Real photos (JPEGs of 780-1920 px from the DreamBooth dataset) as the photo to edit and
    as the subject's reference images."""
    folder, _ = checkpoint
    out = tmp_path / "out"
    cat = dreambench_dir / "cat" / "00.jpg"
    rc = _cli(["--checkpoint", str(folder), "--subject-image", str(dreambench_dir / "dog" / "00.jpg"),
               str(dreambench_dir / "dog" / "01.jpg"), "--source-subject", "dog", "--image", str(cat),
               "--prompt", "sitting on the grass", "--source-class", "cat", "--steps", "4", "--out", str(out)])
    assert rc == 0
    record = json.loads((out / "0000" / "record.json").read_text())
    assert record["image"] == str(cat) and record["target_text"] == "a dog sitting on the grass"
    source = np.asarray(Image.open(out / "0000" / "source.png"))
    assert source.shape == (SIZE, SIZE, 3) and source.std() > 1
    assert 0.0 <= record["mask_fraction"] <= 1.0


def test_only_cross_attention_materialises_probabilities(model, embeds, monkeypatch):
    """No queries x queries matrix: the only explicit softmax of an edit is over the 77 text
    positions (self-attention, its replacement included, stays scaled_dot_product_attention)."""
    widths = []
    softmax = torch.Tensor.softmax

    def spy(self, *a, **kw):
        widths.append(self.shape[-1])
        return softmax(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    editing.edit(model, embeds, [Edit("on sand", "cat", "dog")], settings(steps=4))
    assert widths and set(widths) == {model.text_length}


def test_cli_warns_when_the_mask_covers_everything(checkpoint, tmp_path, caplog):
    folder, ref = checkpoint
    args = ["--checkpoint", str(folder), "--subject-image", str(ref), "--source-subject", "dog", "--prompt", "on sand",
            "--source-class", "cat", "--steps", "4"]
    with caplog.at_level("WARNING"):
        assert _cli([*args, "--blend-threshold", "0", "--out", str(tmp_path / "all")]) == 0
    assert "the blend mask covers the whole image" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _cli([*args, "--blend-threshold", "0.9", "--out", str(tmp_path / "part")]) == 0
    assert json.loads((tmp_path / "part" / "0000" / "record.json").read_text())["mask_fraction"] < 1
    assert "the blend mask covers the whole image" not in caplog.text
