"""Serving: the model's one sampling loop on swappable networks (torch, ONNX Runtime,
TensorRT), `Generator.load` from a model folder, an export folder or the MLflow registry, and
`blipdiff batch` (manifests, grouping, records, bad rows, resume after SIGKILL). Tiny preset,
offline; the TensorRT GPU path only where CUDA and TensorRT are."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.core.errors import BlipDiffError, NonFiniteError
from components.data import synthetic
from components.data.images import save_png
from components.export import onnx_export
from components.export import tensorrt as trtx
from components.export.graphs import Dims, text_encoder_inputs
from components.model import layout
from components.model.blip_diffusion import TorchNetworks
from components.model.embeddings import save_embeddings
from components.model.tiny.blip_diffusion import build_tiny
from serving import backends
from serving.generator import Generator

REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--height", "16", "--width", "16"]  # the batch command's smallest useful run
GEN = dict(num_inference_steps=2, height=16, width=16)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(0)


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "blip_diffusion"
    layout.save(tiny, folder)
    return folder


@pytest.fixture(scope="module")
def export_dir(tiny, tmp_path_factory) -> Path:
    """The tiny model's fp32 graphs and serving files, as the export stage writes them."""
    from components.core.io import write_json
    from components.stages import export as stage

    folder = tmp_path_factory.mktemp("export") / "onnx"
    folder.mkdir()
    graphs = onnx_export.export_all(tiny, folder, opset=18, batch=2, fp16=False)
    files = stage.write_serving_files(tiny, folder)
    write_json(stage.manifest(tiny, types.SimpleNamespace(opset=18), "preset tiny", "preset:tiny:seed0", graphs, files),
               folder / "export.json")
    return folder


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("subjects")
    for i, view in enumerate(synthetic.generate(2, 2, 2, 64, seed=0)):
        save_png(view.image, folder / f"s{i}.png")
    (folder / "bad.png").write_bytes(b"not an image")
    return folder


def _embeds(tiny, subjects: Path, names=("s0.png", "s1.png"), subject="dog") -> torch.Tensor:
    from components.data.images import read_subject_images

    return tiny.subject_embeddings(read_subject_images([subjects / n for n in names]), subject)


# ------------------------------------------------------------------ one sampling loop
class Spy:
    """Networks that record every call and pass it on."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        for name in ("device", "dtype", "text_length", "latent_channels", "vae_scale_factor", "scaling_factor"):
            setattr(self, name, getattr(inner, name))

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(*args):
            self.calls.append((name, args))
            return fn(*args)

        return call


def test_generate_with_explicit_torch_networks_is_bit_identical_and_calls_only_them(tiny, subjects):
    embeds = _embeds(tiny, subjects)
    for kw in (dict(GEN), dict(GEN, guidance_scale=1.0, scheduler="ddim", negative_prompt="blurry")):
        default = tiny.generate(embeds, ["in the snow", "on a beach"], "dog", [0, 1], **kw)
        spy = Spy(TorchNetworks(tiny))
        explicit = tiny.generate(embeds, ["in the snow", "on a beach"], "dog", [0, 1], networks=spy, **kw)
        assert np.array_equal(default, explicit)
        names = [name for name, _ in spy.calls]
        guided = kw.get("guidance_scale", 7.5) > 1
        sched = tiny.make_scheduler(kw.get("scheduler", "pndm"))
        sched.set_timesteps(2)
        assert names == ["text"] * (2 if guided else 1) + ["unet"] * len(sched.timesteps) + ["vae_decode"]
    assert torch.equal(tiny.subject_embeddings([np.zeros((8, 8, 3), np.uint8)], "dog"),
                       tiny.subject_embeddings([np.zeros((8, 8, 3), np.uint8)], "dog", networks=TorchNetworks(tiny)))


def test_the_loops_text_inputs_are_what_the_exported_text_encoder_graph_expects(tiny, subjects):
    """Both guidance branches' ids and flags match `graphs.text_encoder_inputs`."""
    spy = Spy(TorchNetworks(tiny))
    tiny.generate(_embeds(tiny, subjects), ["in the snow", "on a beach"], ["dog", "cat"], [0, 1], networks=spy,
                  negative_prompt="blurry", **GEN)
    (_, (cond_ids, cond_embeds, cond_has)), (_, (neg_ids, _, neg_has)) = spy.calls[:2]
    built = [tiny.build_prompt("in the snow", "dog", 1.0, 20), tiny.build_prompt("on a beach", "cat", 1.0, 20)]
    dims = Dims.of(tiny)
    expected = text_encoder_inputs(tiny.tokenizer, [*built, "blurry"], [True, True, False], dims.text_length,
                                   dims.num_query)
    got = torch.cat([cond_ids, neg_ids])
    keep = dims.text_length - dims.num_query  # the pads after a subject row's own ids are never read
    assert np.array_equal(got[:2, :keep].numpy(), expected["input_ids"][:2, :keep])
    assert np.array_equal(got[2:].numpy(), expected["input_ids"][2:])
    assert torch.cat([cond_has, neg_has]).tolist() == expected["has_subject"].tolist()
    assert cond_embeds.shape == (2, dims.num_query, dims.hidden)


# ------------------------------------------------------------------ backends
def test_onnxruntime_matches_torch_within_2_of_255(model_dir, export_dir, subjects):
    from components.data.images import read_subject_images

    ort = Generator.load(export_dir, backend="onnxruntime")
    pt = Generator.load(model_dir, backend="torch", device="cpu")
    assert ort.provider == "CPUExecutionProvider" and ort.backend == "onnxruntime"
    assert ort.model.unet is None and ort.model.qformer is None  # no PyTorch weights for ONNX Runtime
    assert ort.native_size == pt.native_size == 64 and ort.model_hash == "preset:tiny:seed0"
    refs = read_subject_images([subjects / "s0.png", subjects / "s1.png"])
    e_ort, e_pt = ort.subject_embeddings(refs, "dog"), pt.subject_embeddings(refs, "dog")
    assert (e_ort - e_pt).abs().max() < 1e-4
    args = (e_pt, ["in the snow", "on a beach", "x"], ["dog", "cat", "dog"], [0, 1, 2])
    kw = dict(num_inference_steps=4, height=32, width=24, negative_prompt="blurry")
    a, b = pt.generate(*args, **kw), ort.generate(*args, **kw)
    diff = np.abs(np.round(a * 255) - np.round(b * 255)).max()
    print(f"torch vs ONNX Runtime (CPU): max pixel diff {diff:.0f}/255, max float diff {np.abs(a - b).max():.2e}")
    assert a.shape == b.shape == (3, 32, 24, 3) and diff <= 2


def test_backend_source_errors(model_dir, tmp_path):
    with pytest.raises(BlipDiffError, match="runs an export folder"):
        Generator.load(model_dir, backend="onnxruntime")
    with pytest.raises(BlipDiffError, match="model: .*nothing not found"):
        Generator.load(tmp_path / "nothing", backend="torch")
    with pytest.raises(BlipDiffError, match="unknown backend"):
        Generator.load(model_dir, backend="openvino")


def test_tensorrt_without_cuda_or_tensorrt_is_a_clear_error(export_dir, monkeypatch):
    monkeypatch.setattr(trtx, "_import_trt", lambda: types.SimpleNamespace(__version__="10.16.1.11"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BlipDiffError, match="backend tensorrt needs a CUDA GPU and TensorRT: torch sees no CUDA GPU"):
        Generator.load(export_dir, backend="tensorrt")

    def no_trt():
        raise ImportError("No module named 'tensorrt'")

    monkeypatch.setattr(trtx, "_import_trt", no_trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(BlipDiffError, match="tensorrt is not installed"):
        Generator.load(export_dir, backend="tensorrt")


def test_tensorrt_engine_selection(tmp_path):
    def touch(graphs, version="10.16.1.11", cc=(9, 0), profile="static512"):
        for g in graphs:
            (tmp_path / trtx.engine_name(g, version, cc, profile)).write_bytes(b"plan")

    with pytest.raises(BlipDiffError, match="no TensorRT engine subject_encoder.trt10.16.1.sm90.static512.plan"):
        backends.select_engines(tmp_path, "10.16.1.11", (9, 0))
    touch(backends.GRAPHS, cc=(8, 6))
    with pytest.raises(BlipDiffError, match=r"built for TensorRT 10.16.1 on sm86, not for TensorRT 10.16.1 on sm90"):
        backends.select_engines(tmp_path, "10.16.1.11", (9, 0))
    touch(backends.GRAPHS)
    profile, paths = backends.select_engines(tmp_path, "10.16.1.40", (9, 0))  # build number is not in the name
    assert profile == "static512" and paths["unet"].name == "unet.trt10.16.1.sm90.static512.plan"
    touch(("unet", "vae_decoder"), profile="dynamic")  # incomplete: not a candidate
    assert backends.select_engines(tmp_path, "10.16.1.11", (9, 0))[0] == "static512"
    with pytest.raises(BlipDiffError, match="no TensorRT engine subject_encoder.*text_encoder.*profile dynamic"):
        backends.select_engines(tmp_path, "10.16.1.11", (9, 0), profile="dynamic")
    touch(("subject_encoder", "text_encoder"), profile="dynamic")
    with pytest.raises(BlipDiffError, match=r"several profiles \(dynamic, static512\)"):
        backends.select_engines(tmp_path, "10.16.1.11", (9, 0))
    assert backends.select_engines(tmp_path, "10.16.1.11", "sm90", profile="dynamic")[1]["text_encoder"].name == \
        "text_encoder.trt10.16.1.sm90.dynamic.plan"
    # the engines of the export stage are beside the export folder
    (tmp_path / "onnx").mkdir()
    assert backends.default_engine_dir(tmp_path / "onnx") == tmp_path / "onnx"
    (tmp_path / "tensorrt").mkdir()
    assert backends.default_engine_dir(tmp_path / "onnx") == tmp_path / "tensorrt"


def test_tensorrt_batches_fit_the_profile_and_output_shapes():
    assert backends.chunks(3, 1, 4) == [(0, 3, 3)]
    assert backends.chunks(1, 2, 8) == [(0, 1, 2)]  # padded up to the profile's minimum
    assert backends.chunks(10, 2, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert backends.chunks(9, 2, 4) == [(0, 4, 4), (4, 8, 4), (8, 9, 2)]
    with pytest.raises(BlipDiffError):
        backends.chunks(3, 4, 2)
    sizes = dict(num_query=16, hidden=768, text_length=77, vae_scale_factor=8)
    assert backends.output_shape("subject_encoder", {"pixel_values": (3, 3, 224, 224), "input_ids": (3, 5),
                                                     "attention_mask": (3, 5)}, **sizes) == (3, 16, 768)
    assert backends.output_shape("text_encoder", {"input_ids": (4, 77), "subject_embeds": (4, 16, 768),
                                                  "has_subject": (4,)}, **sizes) == (4, 77, 768)
    assert backends.output_shape("unet", {"sample": (8, 4, 64, 48), "timestep": (8,),
                                          "encoder_hidden_states": (8, 77, 768)}, **sizes) == (8, 4, 64, 48)
    assert backends.output_shape("vae_decoder", {"latents": (2, 4, 64, 48)}, **sizes) == (2, 3, 512, 384)


@pytest.mark.gpu(tensorrt=True)
def test_gpu_tensorrt_backend_generates_like_torch(tiny, model_dir, subjects, tmp_path):
    from components.core.io import write_json
    from components.stages import export as stage

    export = tmp_path / "onnx"
    export.mkdir()
    graphs = onnx_export.export_all(tiny, export, opset=18, batch=2, fp16=True)
    files = stage.write_serving_files(tiny, export)
    write_json(stage.manifest(tiny, types.SimpleNamespace(opset=18), "preset tiny", "preset:tiny:seed0", graphs, files),
               export / "export.json")
    small = trtx.Profile("test", image=(32, 32, 32), batch={"subject_encoder": (1, 1, 4), "text_encoder": (2, 2, 8),
                                                            "unet": (2, 2, 8), "vae_decoder": (1, 1, 4)},
                         subject_text=(1, 4, 16))
    trtx.build_engines(export, tmp_path / "tensorrt", profile=small, workspace_gb=1)
    trt = Generator.load(export, backend="tensorrt", trt_profile="test")
    assert trt.provider.startswith("TensorRT") and trt.networks.io["unet"]["batch"] == (2, 8)
    pt = Generator.load(model_dir, backend="torch", device="cuda", dtype="fp32")
    embeds = pt.subject_embeddings([np.asarray(synthetic.generate(1, 1, 1, 64, seed=0)[0].image)], "dog")
    assert (trt.subject_embeddings([np.asarray(synthetic.generate(1, 1, 1, 64, seed=0)[0].image)], "dog")
            - embeds).abs().max() < 0.05
    kw = dict(num_inference_steps=4, height=32, width=32)
    prompts, seeds = ["in the snow"] * 5, list(range(5))  # 10 UNet rows: two enqueues of the profile's 8
    a, b = pt.generate(embeds, prompts, "dog", seeds, **kw), trt.generate(embeds, prompts, "dog", seeds, **kw)
    assert b.shape == a.shape and np.isfinite(b).all() and np.abs(a - b).mean() < 0.02


# ------------------------------------------------------------------ registry
def test_registered_model_by_alias_generates_as_its_folder(model_dir, subjects):
    from mlflow import MlflowClient

    from components.model import registry

    version = registry.log_and_register(model_dir, base={"preset": "tiny", "seed": 0})
    MlflowClient().set_registered_model_alias(registry.REGISTERED_NAME, "champion", version)
    gen = Generator.load(f"models:/{registry.REGISTERED_NAME}@champion", backend="torch", device="cpu")
    assert gen.source == f"models:/blip-diffusion@champion (blip-diffusion version {version})"
    folder = Generator.load(model_dir, backend="torch", device="cpu")
    embeds = gen.subject_embeddings([np.asarray(synthetic.generate(1, 1, 1, 64, seed=0)[0].image)], "dog")
    assert np.array_equal(gen.generate(embeds, ["on a beach"], "dog", [3], **GEN),
                          folder.generate(embeds, ["on a beach"], "dog", [3], **GEN))
    by_version = Generator.load(f"models:/{registry.REGISTERED_NAME}/{version}", backend="torch", device="cpu")
    assert by_version.model_hash == gen.model_hash
    with pytest.raises(BlipDiffError, match="could not get the registered model"):
        Generator.load(f"models:/{registry.REGISTERED_NAME}@nobody", backend="torch", device="cpu")


# ------------------------------------------------------------------ blipdiff batch
def _batch(out: Path, manifest: Path, model: Path, *extra: str) -> int:
    from components.cli import main

    return main(["batch", "--manifest", str(manifest), "--model", str(model), "--out", str(out), *FAST, *extra])


def _png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


def test_batch_csv_groups_rows_records_every_input_and_goes_on_after_bad_rows(model_dir, subjects, tmp_path, tiny,
                                                                              monkeypatch):
    save_embeddings(tmp_path / "dog.safetensors", _embeds(tiny, subjects), {"source_subject": "dog"})
    (tmp_path / "jobs.csv").write_text(
        "id,subject_images,embeddings,source_subject,target_subject,prompt,num_images,seed,steps\n"
        f"a,{subjects}/s0.png;{subjects}/s1.png,,dog,,in the snow,3,0,\n"
        "b,,dog.safetensors,,cat,on a beach,2,10,\n"
        f"c,{subjects}/bad.png,,dog,,x,1,0,\n"
        f"d,{subjects}/s0.png,,dog,,,1,0,\n"
        f"e,{subjects}/s0.png;{subjects}/s1.png,,dog,,in the rain,2,5,3\n"
        f"f,{subjects}/s0.png,,???,,x,1,0,\n"
        "g,,missing.safetensors,dog,,x,1,0,\n"
        f"h,{subjects}/s0.png,,,,x,1,0,\n"
        f"i,{subjects}/s0.png;{subjects}/s1.png,,dog,robot,in a box,1,7,\n")
    calls = []
    real = Generator.subject_embeddings
    monkeypatch.setattr(Generator, "subject_embeddings", lambda self, images, cls: calls.append(cls) or real(
        self, images, cls))
    out = tmp_path / "out"
    assert _batch(out, tmp_path / "jobs.csv", model_dir, "--batch-size", "4") == 0
    assert sorted(_png_bytes(out)) == ["a_0.png", "a_1.png", "a_2.png", "b_0.png", "b_1.png", "e_0.png", "e_1.png",
                                       "i_0.png"]
    assert calls == ["dog"]  # rows a, e and i share their subject: its embeddings are computed once

    records = pd.read_parquet(out / "records.parquet")
    assert len(records) == 8
    by = records.set_index("image")
    # batches of 4 images across rows, in manifest order, one sampler each (row e has other steps)
    assert list(records.sort_values(["batch", "row", "k"])["image"]) == [
        "images/a_0.png", "images/a_1.png", "images/a_2.png", "images/b_0.png", "images/b_1.png", "images/i_0.png",
        "images/e_0.png", "images/e_1.png"]
    assert by.loc["images/a_0.png", "batch"] == by.loc["images/b_0.png", "batch"] == 0
    assert by.loc["images/b_0.png", "batch_images"] == 4
    # the second batch was b_1, c_0, f_0, g_0: the bad rows' images leave holes, the plan stays
    assert by.loc["images/b_1.png", "batch"] == 1 and by.loc["images/b_1.png", "batch_images"] == 1
    assert by.loc["images/i_0.png", "batch"] == 2 and by.loc["images/e_0.png", "batch"] == 3
    assert by.loc["images/e_0.png", "steps"] == 3 and by.loc["images/a_0.png", "steps"] == 2
    b1 = by.loc["images/b_1.png"]
    assert b1["seed"] == 11 and b1["target_subject"] == "cat" and b1["source_subject"] == "dog"  # from the file
    assert b1["embeddings"] == str(tmp_path / "dog.safetensors") and list(b1["subject_images"]) == []
    assert b1["built_prompt"].startswith("a cat on a beach, a cat on a beach")
    a0 = by.loc["images/a_0.png"]
    assert list(a0["subject_images"]) == [f"{subjects}/s0.png", f"{subjects}/s1.png"] and pd.isna(a0["embeddings"])
    assert by.loc["images/i_0.png", "target_subject"] == "robot"
    for key, value in dict(backend="torch", provider="torch cpu float32", model=str(model_dir), guidance_scale=7.5,
                           scheduler="pndm", negative_prompt="", height=16, width=16, prompt_reps=20).items():
        assert a0[key] == value, key
    assert len(a0["model_hash"]) == 16 and a0["seconds_batch"] > 0 and a0["seconds_per_image"] > 0

    errors = {e["id"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == ["c", "d", "f", "g", "h"]
    assert "bad.png" in errors["c"]["error"] and errors["d"]["error"] == "empty prompt"
    assert "unknown class '???'" in errors["f"]["error"] and "missing.safetensors" in errors["g"]["error"]
    assert "missing class" in errors["h"]["error"] and errors["h"]["row"] == 8


def test_batch_jsonl_and_parquet_manifests(model_dir, subjects, tmp_path):
    import shutil

    shutil.copy(subjects / "s1.png", tmp_path / "s1.png")  # relative paths are relative to the manifest
    rows = [{"id": "x", "subject_images": [str(subjects / "s0.png")], "source_subject": "dog", "prompt": "in the snow",
             "num_images": 2, "seed": 4},
            {"id": "y", "subject_images": ["s1.png"], "source_subject": "dog", "prompt": "on a beach"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "jobs.parquet")
    assert _batch(tmp_path / "j", tmp_path / "jobs.jsonl", model_dir) == 0
    assert _batch(tmp_path / "p", tmp_path / "jobs.parquet", model_dir) == 0
    jsonl, par = _png_bytes(tmp_path / "j"), _png_bytes(tmp_path / "p")
    assert sorted(jsonl) == ["x_0.png", "x_1.png", "y_0.png"] and jsonl == par
    records = pd.read_parquet(tmp_path / "p" / "records.parquet")
    assert list(records["seed"]) == [4, 5, 0] and list(records["subject_images"][2]) == [str(tmp_path / "s1.png")]


@pytest.mark.parametrize("manifest, message", [
    ("id,subject_images,source_subject,prompt\na,s.png,dog,x\nb,s.png,dog,y\na,s.png,dog,z\n",
     "duplicate id 'a' (rows 1 and 3)"),
    ("id,subject_images,source_subject\na,s.png,dog\n", "missing required column(s) prompt"),
    ("id,source_subject,prompt\na,dog,x\n", "missing required column(s) subject_images or embeddings"),
    ("id,subject_images,source_subject,prompt,guidance\na,s.png,dog,x,3\n", "unknown column(s) guidance"),
    ("id,subject_images,source_subject,prompt\na/b,s.png,dog,x\n", "row 1: id 'a/b' must be"),
])
def test_bad_manifest_stops_with_one_line_before_any_model_is_loaded(manifest, message, tmp_path, capsys,
                                                                     monkeypatch):
    from components.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the manifest was checked")

    monkeypatch.setattr(Generator, "load", no_load)
    (tmp_path / "jobs.csv").write_text(manifest)
    assert main(["batch", "--manifest", str(tmp_path / "jobs.csv"), "--model", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("blipdiff batch: error: ") and message in err
    assert not (tmp_path / "out").exists()


def _manifest(tmp_path: Path, subjects: Path) -> Path:
    rows = [{"id": f"r{i}", "subject_images": f"{subjects}/s{i % 3}.png", "source_subject": "dog",
             "prompt": p, "num_images": 2, "seed": 10 * i} for i, p in enumerate(["in the snow", "on a beach",
                                                                                  "in the rain", "on the moon"])]
    pd.DataFrame(rows).to_csv(tmp_path / "jobs.csv", index=False)
    return tmp_path / "jobs.csv"


def test_resume_regenerates_whole_batches_only(model_dir, subjects, tmp_path):
    manifest = _manifest(tmp_path, subjects)
    out = tmp_path / "out"
    assert _batch(out, manifest, model_dir, "--batch-size", "3") == 0
    first = _png_bytes(out)
    assert len(first) == 8
    # a batch cut short: one image gone, its journal line cut, a temporary file left
    (out / "images" / "r2_1.png").unlink()  # of the second batch: r1_1, r2_0, r2_1
    (out / "images" / ".r2_0.png.123.tmp").write_bytes(b"half")
    lines = (out / "batches.jsonl").read_text().splitlines()
    (out / "batches.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:40])
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    time.sleep(0.01)
    assert _batch(out, manifest, model_dir, "--batch-size", "3") == 0
    assert _png_bytes(out) == first and not list((out / "images").glob(".*"))
    touched = sorted(p.name for p in (out / "images").glob("*.png") if p.stat().st_mtime_ns != mtimes.get(p.name))
    assert touched == ["r1_1.png", "r2_0.png", "r2_1.png"]  # the second batch, whole
    assert len(pd.read_parquet(out / "records.parquet")) == 8
    # another batch size is another plan: every batch is made again
    assert _batch(out, manifest, model_dir, "--batch-size", "4") == 0
    assert set(pd.read_parquet(out / "records.parquet")["batch_images"]) == {4}


def test_a_non_finite_batch_is_error_rows_not_black_images(model_dir, subjects, tmp_path, monkeypatch):
    """NaN from the VAE in one batch: that batch's rows are errors, none of its images is
    written (a clamp would have made them black or white PNGs), the other batches go on."""
    manifest = _manifest(tmp_path, subjects)
    real, calls = TorchNetworks.vae_decode, []

    def vae_decode(self, latents):
        calls.append(len(latents))
        images = real(self, latents)
        if len(calls) == 2:  # the second batch: r1_1, r2_0, r2_1
            images[1, 0, 0, 0] = float("nan")
        return images

    monkeypatch.setattr(TorchNetworks, "vae_decode", vae_decode)
    out = tmp_path / "out"
    assert _batch(out, manifest, model_dir, "--batch-size", "3") == 0
    assert calls == [3, 3, 2]
    assert sorted(_png_bytes(out)) == ["r0_0.png", "r0_1.png", "r1_0.png", "r3_0.png", "r3_1.png"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["r1", "r2"]
    assert all("batch 1: the VAE decoder gave NaN or infinity in 1 of 3 rows (1)" == e["error"] for e in errors)
    assert len(pd.read_parquet(out / "records.parquet")) == 5


def test_tensorrt_backend_generates_on_the_stand_in_runtime(tiny, export_dir, subjects, tmp_path, monkeypatch):
    """The whole sampler on TrtNetworks over the stand-in TensorRT (CPU tensors): engines built
    from the export, chunked and padded calls, shared activation memory, the backend's stream;
    the stand-in's engines compute simple row-wise functions, so the test checks the plumbing
    (rows in order, batch-independence, finite images), not the model."""
    import shutil
    import sys as _sys

    from serving.generator import serving_bundle
    from tests.helpers import fake_tensorrt as ft

    meta = json.loads((export_dir / "export.json").read_text())
    export = tmp_path / "onnx"
    shutil.copytree(export_dir, export)
    for graph in trtx.GRAPHS:  # the stand-in parser reads names only
        (export / f"{graph}.fp16.onnx").write_bytes(b"fp16 " + graph.encode())
    dims = trtx.ModelDims.from_export(meta)
    fake = ft.make_fake_trt("11.1.0.8", flags=ft.Flag11, graph_inputs=ft.graph_inputs_of(
        dims.hidden, dims.num_query, dims.text_len, dims.subject_image_size),
        dims={"num_query": dims.num_query, "hidden": dims.hidden, "vae_scale_factor": dims.latent_factor})
    monkeypatch.setitem(_sys.modules, "tensorrt", fake)
    ft.patch_cuda(monkeypatch)
    monkeypatch.setattr(trtx, "device_info", lambda: {"compute_capability": (9, 0), "gpu_name": "Fake",
                                                      "cuda_version": "13.0"})
    small = trtx.Profile("ci", image=(16, 16, 32), subject_text=(1, 4, 16),
                         batch={"subject_encoder": (1, 1, 2), "text_encoder": (2, 4, 4), "unet": (2, 4, 4),
                                "vae_decoder": (1, 2, 2)})
    trtx.build_engines(export, tmp_path / "tensorrt", profile=small, workspace_gb=1)
    networks = backends.TrtNetworks(export, tmp_path / "tensorrt", "ci", device="cpu")
    gen = Generator(serving_bundle(export, meta), networks, "tensorrt", networks.provider, str(export), "", 16)
    images = [np.asarray(synthetic.generate(1, 1, 1, 64, seed=s)[0].image) for s in range(3)]
    embeds = gen.subject_embeddings(images, "dog")  # 3 reference images: chunks of 2 and 1
    prompts, seeds = ["in the snow", "on a beach", "in the rain"], [0, 1, 2]
    together = gen.generate(embeds, prompts, "dog", seeds, **GEN)  # 6 UNet rows: 4 + 2
    alone = np.concatenate([gen.generate(embeds, [p], "dog", [s], **GEN) for p, s in zip(prompts, seeds)])
    assert together.shape == (3, 16, 16, 3) and np.isfinite(together).all()
    np.testing.assert_allclose(together, alone, atol=1e-6)  # rows in order, whatever the chunks
    assert len({together[i].tobytes() for i in range(3)}) == 3
    executes = [c for c in fake.calls if c[0] == "execute"]
    assert {c[1] for c in executes} == set(trtx.GRAPHS) and {c[2] for c in executes} == {networks.stream.cuda_stream}
    assert {ctx.memory[0] for ctx in networks.contexts.values()} == {networks.device_memory.data_ptr()}


def test_resume_after_sigkill_gives_the_bytes_of_an_uninterrupted_run(model_dir, subjects, tmp_path):
    manifest = _manifest(tmp_path, subjects)

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "components.cli", "batch", "--manifest", str(manifest), "--model",
                str(model_dir), "--out", str(out), "--batch-size", "2", "--steps", "3", "--height", "32",
                "--width", "32"]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full = subprocess.run(command(tmp_path / "full"), cwd=REPO, env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "images").glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = _png_bytes(out)
    assert 1 <= len(done) < 8 and not (out / "records.parquet").exists()

    again = subprocess.run(command(out), cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    generated, skipped = map(int, re.search(r"(\d+) images generated, (\d+) already there", again.stdout).groups())
    assert generated + skipped == 8
    reference = _png_bytes(tmp_path / "full")
    assert len(reference) == 8 and _png_bytes(out) == reference
    assert len(pd.read_parquet(out / "records.parquet")) == 8


def test_onnxruntime_cuda_that_falls_back_to_the_cpu_is_an_error(export_dir, monkeypatch):
    """onnxruntime-gpu lists CUDAExecutionProvider even where CUDA cannot load, then builds a
    CPU session and says so only in its log: asked for CUDA, the backend stops with one line
    naming the missing libraries, and never picks the fp16 graphs for a CPU session."""
    import onnxruntime as ort

    real = ort.InferenceSession

    class FallsBack(real):
        def __init__(self, path, options=None, providers=None, **kw):
            super().__init__(path, options, providers=[p for p in providers if p != "CUDAExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FallsBack)
    monkeypatch.setattr(backends, "missing_cuda_libraries", lambda: ["libcudnn.so.9"])
    with pytest.raises(BlipDiffError, match=r"asked for CUDAExecutionProvider but would run on CPUExecutionProvider: "
                                            r"it cannot load libcudnn.so.9"):
        backends.OrtNetworks(export_dir, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    # the CPU asked for: runs, in fp32
    nets = backends.OrtNetworks(export_dir, ["CPUExecutionProvider"])
    assert nets.provider == "CPUExecutionProvider" and nets.precision == "fp32"
    monkeypatch.undo()
    assert set(backends.missing_cuda_libraries(("libc.so.6", "libnot-a-library.so.1"))) == {"libnot-a-library.so.1"}


def test_onnxruntime_io_binding_runs_on_torch_tensors_without_session_run(export_dir, tiny, subjects, monkeypatch):
    """IO binding (what OrtNetworks does on CUDA, here bound to CPU tensors: the same code with
    device type "cpu"): the same images as the array path, and no `session.run` at all, so no
    input goes through numpy; an output with NaN is an error naming the graph."""
    import onnxruntime as ort

    plain = backends.OrtNetworks(export_dir, ["CPUExecutionProvider"])
    bound = backends.OrtNetworks(export_dir, ["CPUExecutionProvider"], io_binding=True)
    assert not plain.io_binding and bound.io_binding and bound.device.type == "cpu"
    embeds = _embeds(tiny, subjects)
    meta = json.loads((export_dir / "export.json").read_text())
    from serving.generator import serving_bundle

    bundle = serving_bundle(export_dir, meta)
    expected = bundle.generate(embeds, ["in the snow", "on a beach"], "dog", [0, 1], networks=plain, **GEN)
    runs, binds = [], []
    real_bind = ort.IOBinding.bind_input
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: runs.append(a) or pytest.fail("run"))
    monkeypatch.setattr(ort.IOBinding, "bind_input", lambda self, name, kind, *a: binds.append((name, kind)) or
                        real_bind(self, name, kind, *a))
    got = bundle.generate(embeds, ["in the snow", "on a beach"], "dog", [0, 1], networks=bound, **GEN)
    assert runs == [] and {kind for _, kind in binds} == {"cpu"}
    assert {name for name, _ in binds} >= {"sample", "timestep", "encoder_hidden_states", "latents"}
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(NonFiniteError, match=r"ONNX Runtime unet \(noise_pred\) gave NaN"):
        bound.unet(torch.full((2, 4, 8, 8), float("nan")), torch.tensor(10.0), torch.zeros(2, 77, bound.hidden))
