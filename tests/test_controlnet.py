"""ControlNet-guided generation: loading, fit, the condition image, the sampling loop's
invariants, and `blipdiff generate --control-image` end to end (tiny preset)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from components.cli import main
from components.core.errors import BlipDiffError
from components.model import controlnet, layout
from components.model.controlnet import Control, control_pixels
from components.model.tiny.blip_diffusion import build_tiny
from components.model.tiny.controlnet import build_tiny_controlnet, zero_initialised

SIZE = 32
STEPS = 4


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = build_tiny(seed=0)
    m.controlnets.append(build_tiny_controlnet(m, seed=1))
    return m


@pytest.fixture(scope="module")
def embeds(model):
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, model.qformer.config.num_query_tokens, model.text_encoder.config.hidden_size, generator=g)


def _image(seed: int, size=(40, 48)) -> np.ndarray:
    """A condition-like picture: random rectangles, white on black."""
    rng = np.random.default_rng(seed)
    img = np.zeros((*size, 3), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, size[0] - 8), rng.integers(0, size[1] - 8)
        img[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12)] = 255
    return img


def _gen(model, embeds, control=None, prompts=("on a beach", "in the snow"), seeds=(0, 1), **kw):
    kw = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, **kw}
    return model.generate(embeds, list(prompts), "dog", list(seeds), control=control, **kw)


def _control(*images, scales=(1.0,), **kw):
    return Control([control_pixels([im], SIZE, SIZE) for im in images], list(scales), **kw)


# ------------------------------------------------------------------ the sampling loop
def test_controlnet_moves_the_image_and_scale_zero_is_plain_generate_bit_for_bit(model, embeds):
    plain = _gen(model, embeds)
    with_a = _gen(model, embeds, _control(_image(0)))
    with_b = _gen(model, embeds, _control(_image(1)))
    at_zero = _gen(model, embeds, _control(_image(0), scales=(0.0,)))
    assert np.array_equal(at_zero, plain)
    assert np.abs(with_a - plain).max() > 0.05  # the perturbed ControlNet acts
    assert np.abs(with_a - with_b).max() > 0.02  # and follows its condition image


def test_zero_initialised_controlnet_adds_nothing(embeds):
    m = build_tiny(seed=0)
    m.controlnets.append(build_tiny_controlnet(m, std=None))
    assert all(not p.any() for mod in zero_initialised(m.controlnets[0]) for p in mod.parameters())
    torch.testing.assert_close(torch.from_numpy(_gen(m, embeds, _control(_image(0)))),
                               torch.from_numpy(_gen(m, embeds)), atol=1e-6, rtol=0)


def test_controlnet_sees_the_unets_text_embeddings_in_both_branches(model, embeds):
    seen = {"unet": [], "controlnet": []}
    hooks = [model.unet.register_forward_hook(
        lambda mod, args, kw, out: seen["unet"].append(kw["encoder_hidden_states"].clone()), with_kwargs=True),
        model.controlnets[0].register_forward_hook(
        lambda mod, args, kw, out: seen["controlnet"].append(kw["encoder_hidden_states"].clone()), with_kwargs=True)]
    try:
        _gen(model, embeds, _control(_image(0)), guidance_scale=5.0)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen["unet"]) == len(seen["controlnet"]) > 0
    for u, c in zip(seen["unet"], seen["controlnet"]):
        assert u.shape[0] == 4 and torch.equal(u, c)  # negative and subject-conditioned rows, two images
    assert not torch.equal(seen["unet"][0][0], seen["unet"][0][2])  # the branches differ


def test_batched_control_images_equal_one_call_per_image(model, embeds):
    a, b = _image(0), _image(1)
    control = Control([control_pixels([a, b], SIZE, SIZE)], [[1.0, 0.5]])
    batched = _gen(model, embeds, control)
    one = _gen(model, embeds, _control(a), prompts=("on a beach",), seeds=(0,))
    two = _gen(model, embeds, _control(b, scales=(0.5,)), prompts=("in the snow",), seeds=(1,))
    torch.testing.assert_close(torch.from_numpy(batched), torch.from_numpy(np.concatenate([one, two])),
                               atol=2e-6, rtol=0)


def test_multi_controlnet_sums_residuals_as_diffusers_multicontrolnet(model, embeds):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    two = build_tiny(seed=0)
    two.controlnets += [model.controlnets[0], build_tiny_controlnet(two, seed=2)]
    a, b = _image(0), _image(1)
    # one net is single: the second at scale 0 adds nothing
    single = _gen(model, embeds, _control(a))
    assert np.array_equal(_gen(two, embeds, _control(a, b, scales=(1.0, 0.0))), single)
    # two nets: our residuals are MultiControlNetModel's
    from components.model.blip_diffusion import TorchNetworks
    from components.model.controlnet import residuals

    g = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    conds = [control_pixels([a, a], SIZE, SIZE), control_pixels([b, b], SIZE, SIZE)]
    with torch.no_grad():
        down, mid = residuals(TorchNetworks(two), conds, torch.tensor([[0.7, 0.7], [1.3, 1.3]]), sample,
                              torch.tensor(500), hidden)
        ref_down, ref_mid = MultiControlNetModel(two.controlnets)(
            sample, torch.tensor(500), hidden, conds, [0.7, 1.3], return_dict=False)
    for x, y in zip([*down, mid], [*ref_down, ref_mid]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_guidance_window_runs_the_controlnet_only_inside_it(model, embeds):
    calls = []
    hook = model.controlnets[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        _gen(model, embeds, _control(_image(0), start=0.5, end=1.0), num_inference_steps=10)
    finally:
        hook.remove()
    steps = model.make_scheduler("pndm")
    steps.set_timesteps(10)
    n = len(steps.timesteps)
    assert len(calls) == sum(1 for i in range(n) if i / n >= 0.5)
    assert [Control([], start=0.2, end=0.6).active(i, 10) for i in range(10)] == \
        [False, False, True, True, True, True, False, False, False, False]


def test_control_without_controlnet_and_wrong_sizes_are_clear_errors(embeds):
    plain = build_tiny(seed=0)
    with pytest.raises(BlipDiffError, match="has no ControlNet"):
        _gen(plain, embeds, _control(_image(0)))
    m = build_tiny(seed=0)
    m.controlnets.append(build_tiny_controlnet(m))
    with pytest.raises(BlipDiffError, match="control image of 48x48 for an output of 32x32"):
        _gen(m, embeds, Control([control_pixels([_image(0)], 48, 48)]))
    with pytest.raises(BlipDiffError, match="2 control images for 1 ControlNets"):
        _gen(m, embeds, _control(_image(0), _image(1), scales=(1.0, 1.0)))


# ------------------------------------------------------------------ condition images
def test_control_pixels_match_the_reference_blip_image_processor():
    from transformers import BlipImageProcessor

    image = _image(5, size=(37, 53))
    image[..., 1] = np.arange(53, dtype=np.uint8)[None] * 4  # not only black and white
    ref = BlipImageProcessor().preprocess(image, size={"height": 24, "width": 40}, do_rescale=True,
                                          do_center_crop=False, do_normalize=False,
                                          return_tensors="pt")["pixel_values"]
    ours = control_pixels([image], 24, 40)
    assert ours.shape == (1, 3, 24, 40) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.float(), atol=0, rtol=0)


def test_canny_is_lavis_recipe_binary_edges_at_multiples_of_64():
    image = np.zeros((300, 200, 3), np.uint8)
    image[100:200, 50:150] = 200
    edges = controlnet.canny(image)
    assert edges.shape == (768, 512, 3)  # short side 512, long side 768 (multiples of 64)
    assert set(np.unique(edges)) == {0, 255} and (edges[..., 0] == edges[..., 2]).all()
    assert controlnet.canny_side(512, 512) == 512 and controlnet.canny_side(32, 32) == 64
    assert controlnet.canny_side(768, 512) == 512 and controlnet.canny(image, short_side=64).shape == (128, 64, 3)
    dense = controlnet.canny(image, 30, 70)
    assert (dense > 0).sum() >= (edges > 0).sum()
    with pytest.raises(BlipDiffError, match="needs a depth estimator"):
        controlnet.condition_map(image, "depth")
    with pytest.raises(BlipDiffError, match="0 <= low <= high"):
        controlnet.canny(image, 200, 100)


# ------------------------------------------------------------------ loading
def test_layout_round_trip_with_a_controlnet(tmp_path, model):
    layout.save(model, tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model_index.json").read_text())
    assert index["_class_name"] == "BlipDiffusionControlNetPipeline"
    assert index["controlnet"] == ["diffusers", "ControlNetModel"]
    loaded = layout.load(tmp_path / "ckpt")
    assert len(loaded.controlnets) == 1
    for k, v in model.controlnets[0].state_dict().items():
        assert torch.equal(loaded.controlnets[0].state_dict()[k], v), k
    # the folder's controlnet/ is also a --controlnet for another checkpoint
    assert controlnet.controlnet_folder(tmp_path / "ckpt") == tmp_path / "ckpt" / "controlnet"


def test_a_controlnet_of_another_unet_is_refused_naming_both(tmp_path):
    from diffusers import UNet2DConditionModel

    m = build_tiny(seed=0)
    other = UNet2DConditionModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24)
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(other, conditioning_embedding_out_channels=(8, 16)).save_pretrained(tmp_path / "cn")
    with pytest.raises(BlipDiffError) as err:
        controlnet.attach(m, [tmp_path / "cn"], "tiny")
    message = str(err.value)
    assert "\n" not in message and "block channels [16, 32]" in message and "block channels [32, 64]" in message
    assert "cross-attention 24" in message and "cross-attention 32" in message
    with pytest.raises(BlipDiffError, match="no ControlNet here"):
        controlnet.load_controlnet(tmp_path)


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def cn_folder(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("cn") / "controlnet"
    model.controlnets[0].save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_cn(tmp_path_factory):
    """A ControlNet made for another UNet (block channels 16/32, cross-attention 24)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    other = UNet2DConditionModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24)
    folder = tmp_path_factory.mktemp("other") / "controlnet"
    ControlNetModel.from_unet(other, conditioning_embedding_out_channels=(8, 16)).save_pretrained(folder)
    return folder


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, seed in (("ref", 0), ("edges_a", 1), ("edges_b", 2)):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(_image(seed, size=(64, 64))).save(paths[name])
    return paths


def _cli(out, files, *extra):
    return ["generate", "--preset", "tiny", "--steps", "3", "--height", "32", "--width", "32", "--out", str(out),
            "--subject-image", str(files["ref"]), "--source-subject", "dog", *extra]


def test_generate_with_control_images_end_to_end(tmp_path, files, cn_folder):
    out = tmp_path / "out"
    assert main(_cli(out, files, "--prompt", "on a beach", "--prompt", "in the snow", "--images-per-prompt", "2",
                     "--controlnet", str(cn_folder), "--control-image", str(files["edges_a"]),
                     "--control-image", str(files["edges_b"]), "--control-type", "none",
                     "--controlnet-scale", "0.8")) == 0
    records = json.loads((out / "records.json").read_text())
    assert [r["control_images"] for r in records] == [[str(files["edges_a"])]] * 2 + [[str(files["edges_b"])]] * 2
    assert records[0]["controlnets"] == [str(cn_folder)] and records[0]["controlnet_scale"] == [0.8]
    assert sorted(p.name for p in (out / "control").iterdir()) == ["00.png", "01.png"]
    plain = tmp_path / "plain"
    assert main(_cli(plain, files, "--prompt", "on a beach", "--prompt", "in the snow", "--images-per-prompt",
                     "2")) == 0
    a, b = (np.asarray(Image.open(f / "images/0000.png"), dtype=int) for f in (out, plain))
    assert np.abs(a - b).max() > 5
    # canny on a photo: the edge map is written, white edges on black
    canny = tmp_path / "canny"
    assert main(_cli(canny, files, "--prompt", "x", "--controlnet", str(cn_folder), "--control-image",
                     str(files["ref"]), "--canny-low", "30", "--canny-high", "70")) == 0
    edges = np.asarray(Image.open(canny / "control/00.png"))
    # made at the output's side rounded to 64 (LAVIS: 512 for 512 px images), white on black
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) <= {0, 255} and edges.max() == 255


@pytest.mark.parametrize("extra,message", [
    (["--control-image", "{edges_a}"], "--control-image needs a ControlNet"),
    (["--controlnet", "{cn}", "--control-image", "{edges_a}", "--control-type", "depth"],
     "--control-type depth needs a depth estimator"),
    (["--controlnet", "{cn}", "--control-image", "{edges_a}", "--control-type", "sketch"], "unknown control type"),
    (["--controlnet", "{cn}", "--control-image", "{missing}"], "control image"),
    (["--controlnet", "{cn}", "--control-image", "{bad}"], "bad.png: not a recognised image format"),
    (["--controlnet", "{cn}", "--control-image", "{edges_a}", "--max-image-pixels", "1000"],
     "more than the limit of 1,000"),
    (["--controlnet", "{cn}"], "--controlnet without --control-image"),
    (["--controlnet", "{cn}", "--control-image", "{edges_a}", "--control-start", "0.7", "--control-end", "0.2"],
     "need 0 <= start < end <= 1"),
    (["--controlnet", "{cn}", "--controlnet", "{cn}", "--control-image", "{edges_a}"],
     "1 --control-image for 2 ControlNets"),
    (["--controlnet", "{tmp}", "--control-image", "{edges_a}"], "no ControlNet here"),
    (["--controlnet", "{other}", "--control-image", "{edges_a}"],
     "does not fit the UNet of preset tiny (seed 0) (block channels [32, 64], cross-attention 32)"),
])
def test_generate_control_bad_input_is_one_line_error(tmp_path, files, cn_folder, other_cn, capsys, extra, message):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    names = {"edges_a": files["edges_a"], "cn": cn_folder, "missing": tmp_path / "nope.png",
             "bad": tmp_path / "bad.png", "tmp": tmp_path, "other": other_cn}
    args = _cli(tmp_path / "o", files, "--prompt", "x", *[a.format(**names) for a in extra])
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("blipdiff generate: error:"), err
    assert not (tmp_path / "o").exists()
