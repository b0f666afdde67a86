"""DreamBench scores (metrics.py) and the evaluation networks (evaluators.py): the pairing
rules, raw cosines, DINO's transform against torchvision's output on real photos, the tiny
evaluators, and that even tiny random features tell DreamBench subjects apart."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.core.errors import BlipDiffError
from components.evaluation import evaluators as ev
from components.evaluation.metrics import (
    cosine_matrix,
    oracle_pairs,
    subject_fidelity,
    summarize,
    text_alignment,
)

GOLDEN = Path(__file__).parent / "fixtures" / "dino_transform"
SQRT_HALF = math.sqrt(0.5)


# ---------------------------------------------------------------- metrics

def test_fidelity_is_one_for_the_image_itself():
    real = torch.tensor([[0.3, -1.2, 2.0]])
    assert subject_fidelity(real, real).tolist() == pytest.approx([1.0])


def test_fidelity_is_the_mean_over_every_real_image():
    """Not the nearest real image, not the conditioning one: all of the subject's."""
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    score = subject_fidelity(real[:1], real).item()
    assert score == pytest.approx((1.0 + 0.0 + SQRT_HALF) / 3)
    assert score < 1.0


def test_scores_are_raw_cosines():
    """Negative stays negative, scale does not matter, no x100, nothing clamped."""
    gen = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    real = torch.tensor([[-3.0, 0.0], [-1.0, 1.0]])
    assert cosine_matrix(gen, real).tolist() == [pytest.approx([-1.0, -SQRT_HALF]),
                                                 pytest.approx([0.0, SQRT_HALF])]
    assert subject_fidelity(gen, real).tolist() == pytest.approx([(-1 - SQRT_HALF) / 2, SQRT_HALF / 2])
    feats = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    sims = cosine_matrix(feats, feats)
    assert sims.min() < -0.5 and sims.max() <= 1 + 1e-12 and sims.min() >= -1 - 1e-12


def test_text_alignment_pairs_rows():
    images = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    texts = np.array([[2.0, 0.0], [0.0, -1.0], [4.0, 3.0]])
    assert text_alignment(images, texts).tolist() == pytest.approx([1.0, -1.0, 24 / 25])
    with pytest.raises(ValueError):
        text_alignment(images, texts[:2])


def test_oracle_uses_distinct_pairs_only():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Ordered pairs i != j: (0,1) (1,0) = 0, (0,2) (2,0) (1,2) (2,1) = sqrt(1/2).
    distinct = 4 * SQRT_HALF / 6
    with_self = (4 * SQRT_HALF + 3) / 9
    assert oracle_pairs(real) == pytest.approx(distinct)
    assert oracle_pairs(real) != pytest.approx(with_self)
    assert oracle_pairs(real[:1]) is None
    assert oracle_pairs(real[:0]) is None


def test_summarize_groups():
    per_image = pd.DataFrame({
        "subject": ["dog", "dog", "cat", "can", "can"],
        "category": ["live", "live", "live", "object", "object"],
        "prompt": ["a dog in the snow", "a red dog", "a cat in the snow", "a can in the snow", "a red can"],
        "template": ["snow", "red", "snow", "snow", "red"],
        "dino": [0.1, 0.3, 0.5, 0.7, 0.9],
        "clip_i": [0.2, 0.4, 0.6, 0.8, 1.0],
        "clip_t": [0.30, 0.32, 0.34, 0.36, 0.38],
        "seed": [1, 2, 3, 4, 5],
    })
    out = summarize(per_image)
    assert out["overall"] == pytest.approx({"dino": 0.5, "clip_i": 0.6, "clip_t": 0.34, "images": 5})
    assert out["by_category"]["live"] == pytest.approx({"dino": 0.3, "clip_i": 0.4, "clip_t": 0.32, "images": 3})
    assert out["by_category"]["object"] == pytest.approx({"dino": 0.8, "clip_i": 0.9, "clip_t": 0.37,
                                                          "images": 2})
    assert out["per_subject"]["dog"] == pytest.approx({"dino": 0.2, "clip_i": 0.3, "clip_t": 0.31, "images": 2})
    assert out["per_subject"]["cat"]["images"] == 1
    assert out["per_prompt"]["a red can"] == pytest.approx({"dino": 0.9, "clip_i": 1.0, "clip_t": 0.38,
                                                             "images": 1})
    assert set(out["per_prompt"]) == set(per_image["prompt"])
    assert isinstance(out["overall"]["dino"], float) and type(out["overall"]["images"]) is int
    json.dumps(out)  # plain Python types
    only_objects = summarize(per_image[per_image["category"] == "object"])
    assert list(only_objects["by_category"]) == ["object"]


# ---------------------------------------------------------------- DINO's transform

@pytest.mark.parametrize("case", json.loads((GOLDEN / "meta.json").read_text())["cases"],
                         ids=lambda case: case["name"])
def test_dino_transform_matches_torchvision(dreambench_dir, case):
    """Our PIL re-implementation against torchvision's own output (scripts/golden/
    make_dino_transform_golden.py) on real DreamBench photos: pixel for pixel."""
    path = dreambench_dir / case["source"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == case["sha256"]
    image = Image.open(path).convert("RGB")
    if case["crop_box"]:
        image = image.crop(tuple(case["crop_box"]))
    expected = np.asarray(Image.open(GOLDEN / case["png"]).convert("RGB"))
    ours = np.asarray(ev.dino_resize_crop(image))
    assert ours.shape == expected.shape == (224, 224, 3)
    assert np.array_equal(ours, expected), np.abs(ours.astype(int) - expected).max()

    tensor = ev.dino_transform(np.asarray(image))  # an array input takes the same path
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 224, 224)
    assert tensor.mean(dim=(1, 2)).tolist() == pytest.approx(case["normalized_mean"], abs=2e-6)
    mean, std = torch.tensor(ev.DINO_MEAN).view(3, 1, 1), torch.tensor(ev.DINO_STD).view(3, 1, 1)
    unnormalised = (tensor * std + mean).permute(1, 2, 0).numpy()
    assert np.abs(unnormalised - expected / 255.0).max() <= 1e-6


def test_dino_crop_offsets_round_like_torchvision():
    """A 256 x 329 image is not resized; the crop's top is int(round(52.5)) = 52 (Python
    rounds half to even; half up would give 53, and the golden portrait rules out floor),
    its left (256 - 224) / 2 = 16."""
    rows, cols = np.meshgrid(np.arange(329), np.arange(256), indexing="ij")
    image = np.stack([rows % 256, cols, rows // 256], axis=-1).astype(np.uint8)
    out = np.asarray(ev.dino_resize_crop(image))
    assert np.array_equal(out, image[52:276, 16:240])


def test_vit_image_processor_is_a_different_transform():
    """transformers' ViTImageProcessor squashes to 224 x 224 (bilinear, mean/std 0.5): not DINO's."""
    from transformers.models.vit import ViTImageProcessorPil

    image = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    vit = ViTImageProcessorPil()(images=[image], return_tensors="pt").pixel_values[0]
    assert vit.shape == (3, 224, 224)
    assert (vit - ev.dino_transform(image)).abs().max() > 0.1


# ---------------------------------------------------------------- tiny evaluators

@pytest.fixture(scope="module")
def tiny() -> ev.Evaluators:
    return ev.Evaluators.build(None, None, tiny=True, seed=0)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (200 + 10 * i, 260, 3), dtype=np.uint8) for i in range(n)]


def test_tiny_evaluators_shapes_and_determinism(tiny):
    images = _images(5)
    dino, clip_i = tiny.dino_features(images), tiny.clip_image_features(images)
    clip_t = tiny.clip_text_features(["a dog in the snow", "a red can"])
    assert dino.shape == (5, 48) and clip_i.shape == (5, 32) and clip_t.shape == (2, 32)
    assert {t.dtype for t in (dino, clip_i, clip_t)} == {torch.float32}
    # PIL input, another batching, and a fresh build with the same seed: the same features.
    again = ev.Evaluators.build("ignored", "ignored", tiny=True, seed=0, batch_size=2)
    pil = [Image.fromarray(image) for image in images]
    assert torch.allclose(again.dino_features(pil), dino, atol=1e-6)
    assert torch.allclose(again.clip_image_features(pil), clip_i, atol=1e-6)
    other = ev.Evaluators.build(None, None, tiny=True, seed=1)
    assert not torch.allclose(other.dino_features(images), dino, atol=1e-3)
    assert tiny.describe() == {"dino_model": "tiny(seed=0)", "clip_model": "tiny(seed=0)",
                               "dino_transform": "resize256-bicubic/centercrop224/imagenet",
                               "clip_transform": "clip-image-processor", "text_max_length": 77,
                               "dtype": "float32"}
    assert tiny.dino_features([]).shape == (0, 48)


def test_clip_text_truncates_at_77_tokens(tiny):
    long_text = "a dog sitting " * 20  # 200+ tokens with the character-level tokenizer
    feats = tiny.clip_text_features([long_text, long_text + "on the beach", "a dog", "a red can"])
    assert torch.equal(feats[0], feats[1])  # what follows token 77 is cut off
    assert not torch.allclose(feats[2], feats[3], atol=1e-4)
    assert not torch.allclose(feats[0], feats[2], atol=1e-4)


def test_clip_preprocessing_equals_the_checkpoints(tmp_path):
    """The tiny CLIP's explicit settings against openai/clip-vit-base-patch32's own
    preprocessor_config.json, read the way load_clip reads it."""
    from transformers.models.clip import CLIPImageProcessorPil

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
    }))
    shipped = CLIPImageProcessorPil.from_pretrained(tmp_path)
    image = _images(1)[0]
    ours = ev.tiny_clip()[2](images=[image], return_tensors="pt").pixel_values
    assert ours.shape == (1, 3, 224, 224)
    assert torch.equal(ours, shipped(images=[image], return_tensors="pt").pixel_values)


def test_saved_evaluators_load_from_a_folder(tmp_path):
    model = ev.tiny_dino(seed=3)
    model.save_pretrained(tmp_path / "dino")
    clip, tokenizer, processor = ev.tiny_clip(seed=3)
    for part in (clip, tokenizer, processor):
        part.save_pretrained(tmp_path / "clip")
    loaded = ev.Evaluators.build(str(tmp_path / "dino"), str(tmp_path / "clip"), tiny=False)
    built = ev.Evaluators.build(None, None, tiny=True, seed=3)
    images = _images(2)
    assert torch.allclose(loaded.dino_features(images), built.dino_features(images), atol=1e-6)
    assert torch.allclose(loaded.clip_image_features(images), built.clip_image_features(images), atol=1e-6)
    assert torch.allclose(loaded.clip_text_features(["a dog"]), built.clip_text_features(["a dog"]), atol=1e-6)
    assert loaded.describe()["dino_model"] == str(tmp_path / "dino")


@pytest.mark.parametrize("loader, key", [(ev.load_dino, "evaluate.dino_model"), (ev.load_clip, "evaluate.clip_model")])
@pytest.mark.parametrize("source", ["./no_such_folder/evaluator", "blipdiff-tests/no-such-evaluator"])
def test_unloadable_evaluator_is_one_line_error(loader, key, source, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(BlipDiffError) as err:
        loader(source)
    message = str(err.value)
    assert repr(source) in message and key in message and "\n" not in message


# ---------------------------------------------------------------- real photos, tiny features

def _dreambench_photos(root: Path) -> dict[str, list[Image.Image]]:
    """Every subject's photos, decoded at a reduced JPEG scale (at least 320 px) for speed:
    the transforms' exactness on full-size photos is the golden test's concern."""
    photos = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        photos[folder.name] = []
        for path in sorted(folder.glob("*.jpg")):
            image = Image.open(path)
            image.draft("RGB", (320, 320))
            photos[folder.name].append(image.convert("RGB"))
    return photos


def test_tiny_features_tell_subjects_apart(tiny, dreambench_dir):
    """Each subject's last photo, as a generated image: its fidelity to the subject's other
    photos beats its fidelity to the other subjects' photos, on average over the 30 subjects,
    with DINO's features and with CLIP's, even from random tiny networks."""
    by_subject = _dreambench_photos(dreambench_dir)
    assert len(by_subject) == 30
    photos = [image for images in by_subject.values() for image in images]
    owner = np.array([subject for subject, images in by_subject.items() for _ in images])
    for feats in (tiny.dino_features(photos), tiny.clip_image_features(photos)):
        own, other = [], []
        for subject in by_subject:
            (index,) = np.nonzero(owner == subject)
            held, rest = feats[index[-1:]], feats[index[:-1]]
            own.append(subject_fidelity(held, rest).item())
            other.append(subject_fidelity(held, feats[owner != subject]).item())
        own, other = np.array(own), np.array(other)
        print(f"own {own.mean():.4f} other {other.mean():.4f} wins {(own > other).sum()}/{len(own)}")
        assert own.mean() > other.mean()
        assert (own > other).mean() > 0.5
