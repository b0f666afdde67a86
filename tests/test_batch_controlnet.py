"""`blipdiff batch` with the model's ControlNet: the control columns, grouping apart from rows
without control, per-image condition images and scales in one UNet batch, records, resume
(a changed control image is made again), and bad control rows (tiny preset, 2 steps, 32x32)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.cli import main
from components.data import synthetic
from components.data.images import save_png
from components.model import layout
from components.model.tiny.blip_diffusion import build_tiny
from components.model.tiny.controlnet import build_tiny_controlnet
from serving.generator import Generator

FAST = ["--steps", "2", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def cn_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a tiny (perturbed, so it moves the image) ControlNet, in the
    blipdiffusion-controlnet layout."""
    torch.set_num_threads(1)
    model = build_tiny(0)
    model.controlnets.append(build_tiny_controlnet(model, seed=1))
    folder = tmp_path_factory.mktemp("cn_model") / "blip_diffusion_controlnet"
    layout.save(model, folder)
    assert (folder / "controlnet").is_dir()
    return folder


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plain_model") / "blip_diffusion"
    layout.save(build_tiny(0), folder)
    return folder


def _edges(seed: int, size: int = 64) -> np.ndarray:
    """A condition-like picture: random white rectangles on black."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    for _ in range(5):
        y, x = rng.integers(0, size - 16, 2)
        img[y:y + rng.integers(6, 16), x:x + rng.integers(6, 16)] = 255
    return img


@pytest.fixture
def folder(tmp_path) -> Path:
    """A manifest's folder: a subject image and control images (relative paths in the manifest)."""
    save_png(synthetic.generate(1, 1, 1, 64, seed=0)[0].image, tmp_path / "dog.png")
    for name, seed in (("edges_a", 1), ("edges_b", 2), ("edges_c", 3)):
        Image.fromarray(_edges(seed)).save(tmp_path / f"{name}.png")
    Image.fromarray(_edges(4, size=80)).save(tmp_path / "big.png")  # 6,400 pixels: over --max-image-pixels 5000
    return tmp_path


def _batch(out: Path, manifest: Path, model: Path, *extra: str) -> int:
    return main(["batch", "--manifest", str(manifest), "--model", str(model), "--out", str(out), *FAST, *extra])


def _png_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def _pixels(out: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / "images" / name), dtype=int)


def _errors(out: Path) -> dict[str, dict]:
    return {e["id"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# p, c1, c2 share prompt, seed and subject: only their control differs (none, edges_a as a map, edges_b's canny
# at 0.5). Plan at --batch-size 4: batch 0 = p_0 p_1 q_0 (no control), batch 1 = c1_0 c1_1 c2_0 m_0,
# batch 2 = o_0 c3_0 (control); t, s, u are bad rows and are not planned.
MANIFEST = """id,subject_images,source_subject,prompt,num_images,seed,control_image,control_type,controlnet_scale
p,dog.png,dog,in the snow,2,0,,,
c1,dog.png,dog,in the snow,2,0,edges_a.png,none,
c2,dog.png,dog,in the snow,1,0,edges_b.png,,0.5
q,dog.png,dog,on a beach,1,5,,,
m,dog.png,dog,in the snow,1,0,missing.png,,
t,dog.png,dog,in the snow,1,0,edges_a.png,sketch,
o,dog.png,dog,in the snow,1,0,big.png,,
s,dog.png,dog,in the snow,1,0,edges_a.png,,inf
u,dog.png,dog,in the snow,1,0,,none,
c3,dog.png,dog,on a beach,1,5,edges_c.png,none,0
"""


def test_batch_with_control_groups_apart_records_and_resumes(cn_model_dir, folder):
    manifest = folder / "jobs.csv"
    manifest.write_text(MANIFEST)
    out = folder / "out"
    assert _batch(out, manifest, cn_model_dir, "--batch-size", "4", "--max-image-pixels", "5000") == 0
    first = _png_bytes(out)
    assert sorted(first) == ["c1_0.png", "c1_1.png", "c2_0.png", "c3_0.png", "p_0.png", "p_1.png", "q_0.png"]

    # the control moves the image; each image of a control batch follows its own condition image and scale
    for k in (0, 1):
        assert np.abs(_pixels(out, f"c1_{k}.png") - _pixels(out, f"p_{k}.png")).max() > 5
    assert np.abs(_pixels(out, "c2_0.png") - _pixels(out, "c1_0.png")).max() > 5
    assert np.abs(_pixels(out, "c2_0.png") - _pixels(out, "p_0.png")).max() > 5
    # c3 is q with a control image at scale 0: as without ControlNet (another batch: up to the last float bits)
    assert np.abs(_pixels(out, "c3_0.png") - _pixels(out, "q_0.png")).max() <= 1

    # the plan: rows without control and rows with control in batches apart, holes for bad rows
    records = pd.read_parquet(out / "records.parquet")
    batches = records.groupby("batch")["control_image"].agg(lambda c: sorted(set(c.notna())))
    assert batches.to_dict() == {0: [False], 1: [True], 2: [True]}
    assert records.groupby("batch")["image"].agg(sorted).to_dict() == {
        0: ["images/p_0.png", "images/p_1.png", "images/q_0.png"],
        1: ["images/c1_0.png", "images/c1_1.png", "images/c2_0.png"], 2: ["images/c3_0.png"]}
    assert set(records[records["batch"] == 1]["batch_images"]) == {3}  # m_0 left a hole
    journal = [json.loads(line) for line in (out / "batches.jsonl").read_text().splitlines()]
    assert [e["batch"] for e in journal] == [0, 1, 2] and len({e["key"] for e in journal}) == 3
    assert [e["id"] for e in journal[1]["errors"]] == ["m"] and [e["id"] for e in journal[2]["errors"]] == ["o"]

    # records: every image's control inputs
    by = records.set_index("image")
    c1, c2, p, c3 = (by.loc[f"images/{i}_0.png"] for i in ("c1", "c2", "p", "c3"))
    assert c1["control_image"] == str(folder / "edges_a.png") and c1["control_sha256"] == _sha(folder / "edges_a.png")
    assert c1["control_type"] == "none" and pd.isna(c1["canny_low"]) and c1["controlnet_scale"] == 1.0
    assert c2["control_image"] == str(folder / "edges_b.png") and c2["control_type"] == "canny"
    assert (c2["canny_low"], c2["canny_high"], c2["controlnet_scale"]) == (100, 200, 0.5)
    assert c3["controlnet_scale"] == 0.0
    assert all(pd.isna(p[k]) for k in ("control_image", "control_sha256", "control_type", "canny_low",
                                       "canny_high", "controlnet_scale"))

    errors = _errors(out)
    assert sorted(errors) == ["m", "o", "s", "t", "u"]
    assert "control image" in errors["m"]["error"] and "missing.png" in errors["m"]["error"]
    assert "big.png" in errors["o"]["error"] and "more than the limit of 5,000" in errors["o"]["error"]
    assert errors["t"]["error"] == "unknown control_type 'sketch'; choose one of canny, none"
    assert "controlnet_scale must be a finite number" in errors["s"]["error"]
    assert "control_type without control_image" in errors["u"]["error"]

    # resume: one batch's journal entry gone -> that batch made again, whole, with the same bytes
    lines = (out / "batches.jsonl").read_text().splitlines()
    (out / "batches.jsonl").write_text("\n".join(line for line in lines if json.loads(line)["batch"] != 1) + "\n")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    time.sleep(0.01)
    assert _batch(out, manifest, cn_model_dir, "--batch-size", "4", "--max-image-pixels", "5000") == 0
    assert _png_bytes(out) == first
    touched = sorted(p.name for p in (out / "images").glob("*.png") if p.stat().st_mtime_ns != mtimes[p.name])
    assert touched == ["c1_0.png", "c1_1.png", "c2_0.png"]
    assert sorted(_errors(out)) == ["m", "o", "s", "t", "u"] and len(pd.read_parquet(out / "records.parquet")) == 7

    # a changed control image is another input: its batch is made again, the others are kept
    Image.fromarray(_edges(9)).save(folder / "edges_b.png")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    time.sleep(0.01)
    assert _batch(out, manifest, cn_model_dir, "--batch-size", "4", "--max-image-pixels", "5000") == 0
    touched = sorted(p.name for p in (out / "images").glob("*.png") if p.stat().st_mtime_ns != mtimes[p.name])
    assert touched == ["c1_0.png", "c1_1.png", "c2_0.png"]
    assert _png_bytes(out)["c2_0.png"] != first["c2_0.png"]
    records = pd.read_parquet(out / "records.parquet").set_index("id")
    assert records.loc["c2", "control_sha256"] == _sha(folder / "edges_b.png")
    # the missing control image appears: its row is made on the next run
    Image.fromarray(_edges(5)).save(folder / "missing.png")
    assert _batch(out, manifest, cn_model_dir, "--batch-size", "4", "--max-image-pixels", "5000") == 0
    assert "m_0.png" in _png_bytes(out) and sorted(_errors(out)) == ["o", "s", "t", "u"]


def test_control_rows_on_a_model_without_controlnet_are_bad_rows(plain_model_dir, folder):
    rows = [{"id": "plain", "subject_images": ["dog.png"], "source_subject": "dog", "prompt": "in the snow"},
            {"id": "ctl", "subject_images": ["dog.png"], "source_subject": "dog", "prompt": "in the snow",
             "control_image": "edges_a.png", "controlnet_scale": 0.8}]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = folder / "out"
    assert _batch(out, folder / "jobs.jsonl", plain_model_dir) == 0
    assert sorted(_png_bytes(out)) == ["plain_0.png"]
    errors = _errors(out)
    assert sorted(errors) == ["ctl"] and errors["ctl"]["error"].startswith("the model has no ControlNet: ")
    assert "blipdiffusion-controlnet" in errors["ctl"]["error"]
    assert len(pd.read_parquet(out / "records.parquet")) == 1


@pytest.mark.parametrize("extra, message", [
    (["--control-type", "sketch"], "unknown control type 'sketch'"),
    (["--control-type", "depth"], "--control-type depth needs a depth estimator"),
    (["--canny-low", "200", "--canny-high", "100"], "--canny-low/--canny-high must satisfy 0 <= low <= high"),
    (["--controlnet-scale", "nan"], "--controlnet-scale must be a finite number"),
])
def test_bad_control_flags_stop_with_one_line_before_any_model_is_loaded(extra, message, folder, capsys,
                                                                        monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(Generator, "load", no_load)
    (folder / "jobs.csv").write_text("id,subject_images,source_subject,prompt,control_image\na,dog.png,dog,x,"
                                     "edges_a.png\n")
    assert _batch(folder / "out", folder / "jobs.csv", folder / "none", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("blipdiff batch: error: ") and message in err
    assert not (folder / "out").exists()


def test_control_columns_are_checked_with_the_manifest(folder):
    """Bad control settings are the row's error before any model; the flags are the defaults."""
    from serving.batch import ControlDefaults, Sampler, read_manifest

    defaults = Sampler(steps=2, guidance_scale=7.5, scheduler="pndm", negative_prompt="", height=32, width=32,
                       prompt_strength=1.0, prompt_reps=20)
    (folder / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "embeddings": "e.safetensors", "prompt": "x", "source_subject": "dog",
         "control_image": "edges_a.png"},
        {"id": "b", "embeddings": "e.safetensors", "prompt": "x", "source_subject": "dog",
         "control_image": "edges_a.png", "control_type": "hed"},
        {"id": "c", "embeddings": "e.safetensors", "prompt": "x", "source_subject": "dog",
         "control_image": ["edges_a.png", "edges_b.png"]},
        {"id": "d", "embeddings": "e.safetensors", "prompt": "x", "source_subject": "dog",
         "control_image": "edges_b.png", "controlnet_scale": "strong"},
        {"id": "e", "embeddings": "e.safetensors", "prompt": "x", "source_subject": "dog",
         "control_image": "gone.png", "control_type": "canny", "controlnet_scale": 0.25}]))
    jobs, errors = read_manifest(folder / "jobs.jsonl", defaults, 0,
                                 ControlDefaults(control_type="none", canny_low=30, canny_high=70,
                                                 controlnet_scale=0.7))
    by = {j.id: j for j in jobs}
    assert sorted(by) == ["a", "e"]
    a, e = by["a"].control, by["e"].control
    assert (a.type, a.canny_low, a.scale, a.sha256) == ("none", None, 0.7, _sha(folder / "edges_a.png"))
    assert (e.type, e.canny_low, e.canny_high, e.scale, e.sha256) == ("canny", 30, 70, 0.25, None)
    messages = {x["id"]: x["error"] for x in errors}
    assert "control_type hed needs the HED edge detector" in messages["b"]
    assert messages["c"].startswith("control_image must be one path")
    assert messages["d"] == "controlnet_scale must be a number, got 'strong'"
