"""TensorRT engines: profiles, names, rebuild decisions and the build's control flow against a
stand-in `tensorrt` module (no GPU needed); two real builds run only where TensorRT and a CUDA
GPU are."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path

import pytest
import torch

from components.core.errors import BlipDiffError
from components.export import tensorrt as trtx
from tests.helpers.fake_tensorrt import GRAPH_INPUTS, Flag, Flag11, make_fake_trt

REPO = Path(__file__).resolve().parents[1]
D = 768



# ---------------------------------------------------------------- profiles
def test_profiles_are_tuned_to_the_serving_batch_of_both_clis():
    """opt (and max) at the rows `blipdiff batch` and `blipdiff generate` send by default: two
    per image with guidance for the text encoder and the UNet, one for the VAE decoder."""
    import argparse

    from components.cli import batch, generate
    from components.export.graphs import SERVING_BATCH

    defaults = set()
    for cli in (batch, generate):
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        defaults.add(next(a.default for a in parser._actions if a.dest == "batch_size"))
    assert defaults == {SERVING_BATCH}
    images = SERVING_BATCH
    for name in trtx.PROFILES:
        for graph, rows in (("unet", 2 * images), ("text_encoder", 2 * images), ("vae_decoder", images)):
            first = next(iter(trtx.profile_shapes(graph, name, hidden=32).values()))
            assert (first[0][0], first[1][0], first[2][0]) == (1, rows, rows), (name, graph)


def test_unet_profile_static512():
    shapes = trtx.profile_shapes("unet", "static512")
    assert shapes == {
        "sample": ((1, 4, 64, 64), (16, 4, 64, 64), (16, 4, 64, 64)),
        "timestep": ((1,), (16,), (16,)),
        "encoder_hidden_states": ((1, 77, D), (16, 77, D), (16, 77, D)),
    }


def test_unet_and_vae_profile_dynamic():
    unet = trtx.profile_shapes("unet", "dynamic")
    assert unet["sample"] == ((1, 4, 32, 32), (16, 4, 64, 64), (16, 4, 128, 128))
    vae = trtx.profile_shapes("vae_decoder", "dynamic")
    assert vae == {"latents": ((1, 4, 32, 32), (8, 4, 64, 64), (8, 4, 128, 128))}
    assert trtx.profile_shapes("vae_decoder", "static512") == {
        "latents": ((1, 4, 64, 64), (8, 4, 64, 64), (8, 4, 64, 64))}


def test_text_and_subject_encoder_profiles_take_the_model_dims():
    text = trtx.profile_shapes("text_encoder", "static512", num_query=16, hidden=32)
    assert text == {
        "input_ids": ((1, 77), (16, 77), (16, 77)),
        "subject_embeds": ((1, 16, 32), (16, 16, 32), (16, 16, 32)),
        "has_subject": ((1,), (16,), (16,)),
    }
    subject = trtx.profile_shapes("subject_encoder", "dynamic", subject_image_size=32)
    assert subject == {
        "pixel_values": ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32)),
        "input_ids": ((1, 1), (4, 8), (8, 32)),
        "attention_mask": ((1, 1), (4, 8), (8, 32)),
    }
    # the tiny preset's latent factor 2: 512 px -> 256 latents
    assert trtx.profile_shapes("unet", "static512", latent_factor=2)["sample"][2] == (16, 4, 256, 256)


def test_profile_errors_name_the_problem():
    with pytest.raises(BlipDiffError, match="latent factor 7"):
        trtx.profile_shapes("unet", "static512", latent_factor=7)
    with pytest.raises(BlipDiffError, match="unknown graph 'vae_encoder'"):
        trtx.profile_shapes("vae_encoder", "static512")
    with pytest.raises(BlipDiffError, match="unknown TensorRT profile 'huge'"):
        trtx.profile_shapes("unet", "huge")


def test_model_dims_from_export_json():
    dims = trtx.ModelDims.from_export({"latent_factor": 2, "num_query_tokens": 8, "hidden_size": 32,
                                       "subject_image_size": 32, "unrelated": 1}, text_len=None)
    assert (dims.latent_factor, dims.num_query, dims.hidden, dims.subject_image_size, dims.text_len) == \
        (2, 8, 32, 32, 77)
    assert trtx.ModelDims.from_export(None, hidden=64).hidden == 64
    # the exporter's own names, nested under "dims"
    nested = trtx.ModelDims.from_export({"dims": {"vae_scale_factor": 2, "num_query": 4, "hidden": 32,
                                                  "image_size": 32, "text_length": 77, "latent_multiple": 2}})
    assert nested == trtx.ModelDims(latent_factor=2, num_query=4, hidden=32, subject_image_size=32, latent_multiple=2)
    with pytest.raises(BlipDiffError, match="not multiples of the UNet's 64"):
        trtx.profile_shapes("unet", "dynamic", latent_multiple=64)  # 256 px -> 32 latents
    assert trtx.profile_shapes("unet", "dynamic", latent_multiple=8)["sample"][0] == (1, 4, 32, 32)


def test_static_dims_must_match_the_profile():
    shapes = trtx.profile_shapes("unet", "dynamic")
    trtx.check_static_dims("unet", "sample", (-1, 4, -1, -1), shapes["sample"])
    with pytest.raises(BlipDiffError, match="axis 2 is fixed to 32"):
        trtx.check_static_dims("unet", "encoder_hidden_states", (-1, 77, 32), shapes["encoder_hidden_states"])
    with pytest.raises(BlipDiffError, match="rank 3"):
        trtx.check_static_dims("unet", "sample", (-1, 4, -1), shapes["sample"])


# ---------------------------------------------------------------- names and rebuild decisions
def test_engine_name_has_version_and_compute_capability():
    assert trtx.engine_name("unet", "10.13.0.35", (9, 0), "static512") == "unet.trt10.13.0.sm90.static512.plan"
    assert trtx.engine_name("vae_decoder", "11.0.0", (12, 0), "dynamic") == "vae_decoder.trt11.0.0.sm120.dynamic.plan"
    names = {trtx.engine_name("unet", v, cc, p) for v in ("10.12.0", "10.13.0") for cc in ((8, 0), (9, 0))
             for p in ("static512", "dynamic")}
    assert len(names) == 8


def _onnx(tmp_path: Path, data: bytes = b"graph") -> list[Path]:
    onnx, ext = tmp_path / "unet.fp16.onnx", tmp_path / "unet.fp16.onnx.data"
    onnx.write_bytes(data)
    ext.write_bytes(b"weights")
    assert trtx.onnx_files(tmp_path, "unet") == [onnx, ext]
    return [onnx, ext]


def _record(engine: Path, onnx: list[Path], shapes, version="10.13.0", cc="sm90"):
    engine.write_bytes(b"PLAN")
    trtx.write_json({"onnx_sha256": trtx.onnx_hashes(onnx), "shapes": trtx._jsonable_shapes(shapes),
                     "tensorrt_version": version, "compute_capability": cc, "engine_size": 4},
                    trtx.sidecar_path(engine))


def test_needs_build_decisions(tmp_path):
    onnx = _onnx(tmp_path)
    shapes = trtx.profile_shapes("unet", "static512")
    engine = tmp_path / trtx.engine_name("unet", "10.13.0", (9, 0), "static512")

    build, why = trtx.needs_build(engine, onnx, shapes, "10.13.0", (9, 0))
    assert build and "no engine" in why
    engine.write_bytes(b"PLAN")
    assert trtx.needs_build(engine, onnx, shapes, "10.13.0", (9, 0)) == \
        (True, f"no readable sidecar {engine.name}.json")

    _record(engine, onnx, shapes)
    assert trtx.needs_build(engine, onnx, shapes, "10.13.0", (9, 0)) == (False, "up to date")
    assert trtx.needs_build(engine, onnx, shapes, "10.13.0", "sm90") == (False, "up to date")

    onnx[1].write_bytes(b"other weights")  # the external data changed
    build, why = trtx.needs_build(engine, onnx, shapes, "10.13.0", (9, 0))
    assert build and "ONNX changed" in why
    assert "unet.fp16.onnx.data sha256" in why and "unet.fp16.onnx sha256" not in why

    _record(engine, onnx, shapes)
    build, why = trtx.needs_build(engine, onnx, trtx.profile_shapes("unet", "dynamic"), "10.13.0", (9, 0))
    assert build and why.startswith("profile changed")

    build, why = trtx.needs_build(engine, onnx, shapes, "10.14.1", (9, 0))
    assert build and why == "TensorRT version changed: 10.13.0 -> 10.14.1"
    build, why = trtx.needs_build(engine, onnx, shapes, "10.13.0", (8, 9))
    assert build and why == "compute capability changed: sm90 -> sm89"

    engine.write_bytes(b"PLA")  # truncated
    build, why = trtx.needs_build(engine, onnx, shapes, "10.13.0", (9, 0))
    assert build and "engine size 3" in why


def test_onnx_files_missing_is_a_clear_error(tmp_path):
    with pytest.raises(BlipDiffError, match="run the export stage"):
        trtx.onnx_files(tmp_path, "unet")


# ---------------------------------------------------------------- a stand-in tensorrt
@pytest.fixture
def fake_trt(monkeypatch):
    fake = make_fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trtx, "device_info", lambda: {"compute_capability": (9, 0), "gpu_name": "Fake H100",
                                                      "cuda_version": "12.8"})
    return fake


@pytest.fixture
def export_dir(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    for graph in trtx.GRAPHS:
        (folder / f"{graph}.fp16.onnx").write_bytes(f"fp16 {graph}".encode())
        (folder / f"{graph}.onnx").write_bytes(f"fp32 {graph}".encode())
    (folder / "unet.fp16.onnx.data").write_bytes(b"unet weights")
    (folder / "export.json").write_text(json.dumps({"latent_factor": 8, "num_query_tokens": 16, "hidden_size": D}))
    return folder


def _calls(fake, name):
    return [c for c in fake.calls if c[0] == name]


def test_tensorrt_status_reasons(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trtx.tensorrt_status() == (False, "torch sees no CUDA GPU")  # the first reason on a CPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trtx.tensorrt_status() == (False, trtx.INSTALL_HINT)
    with pytest.raises(BlipDiffError, match=r"pip install -e '\.\[gpu\]'"):
        trtx.build_engines(Path("nowhere"), Path("nowhere"))
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trtx.tensorrt_status() == (False, "torch sees no CUDA GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trtx, "device_info", lambda: {"compute_capability": (8, 9), "gpu_name": "L4"})
    assert trtx.tensorrt_status() == (True, "TensorRT 10.13.0.35 on L4 (sm89)")


def test_build_engines_control_flow(fake_trt, export_dir, tmp_path):
    out = tmp_path / "engines"
    results = trtx.build_engines(export_dir, out, workspace_gb=2)

    assert [r["graph"] for r in results] == list(trtx.GRAPHS) and all(r["built"] for r in results)
    # strongly typed only: no EXPLICIT_BATCH bit, and no precision flag
    assert _calls(fake_trt, "create_network") == [("create_network", 1 << int(Flag.STRONGLY_TYPED))] * 4
    assert _calls(fake_trt, "set_flag") == []
    assert [c[1] for c in _calls(fake_trt, "parse_from_file")] == [str(export_dir / f"{g}.fp16.onnx")
                                                                   for g in trtx.GRAPHS]
    assert _calls(fake_trt, "set_memory_pool_limit") == [("set_memory_pool_limit", "WORKSPACE", 2 << 30)] * 4
    expected = [("set_shape", name, *triple) for g in trtx.GRAPHS
                for name, triple in trtx.profile_shapes(g, "static512").items()]
    assert _calls(fake_trt, "set_shape") == expected
    # one timing cache, carried from build to build and saved in out_dir
    assert [c[1] for c in _calls(fake_trt, "create_timing_cache")] == [b"", b"+", b"++", b"+++"]
    assert (out / "timing.cache").read_bytes() == b"++++"
    assert _calls(fake_trt, "set_timing_cache") == [("set_timing_cache", False)] * 4

    unet = out / "unet.trt10.13.0.sm90.static512.plan"
    plan = json.loads(unet.read_bytes().removeprefix(b"PLAN|"))
    assert results[2]["path"] == str(unet) and plan["graph"] == "unet"
    assert plan["profile"]["sample"] == [list(s) for s in trtx.profile_shapes("unet", "static512")["sample"]]
    assert results[2]["size"] == unet.stat().st_size and results[2]["reason"].startswith("no engine")
    meta = json.loads((out / (unet.name + ".json")).read_text())
    assert meta["onnx_sha256"] == {"unet.fp16.onnx": trtx.file_sha256(export_dir / "unet.fp16.onnx"),
                                   "unet.fp16.onnx.data": trtx.file_sha256(export_dir / "unet.fp16.onnx.data")}
    assert (meta["tensorrt_version"], meta["compute_capability"], meta["gpu_name"], meta["cuda_version"]) == \
        ("10.13.0.35", "sm90", "Fake H100", "12.8")
    assert meta["profile"] == "static512" and meta["shapes"]["sample"] == [[1, 4, 64, 64], [16, 4, 64, 64],
                                                                          [16, 4, 64, 64]]
    assert meta["workspace_bytes"] == 2 << 30 and "built_at" in meta and "build_seconds" in meta

    # a second call reuses every engine after deserialising it, and builds nothing
    fake_trt.calls.clear()
    again = trtx.build_engines(export_dir, out, workspace_gb=2)
    assert not any(r["built"] for r in again) and {r["reason"] for r in again} == {"up to date"}
    assert _calls(fake_trt, "build") == [] and len(_calls(fake_trt, "deserialize")) == 4


def test_changed_onnx_rebuilds_only_that_engine(fake_trt, export_dir, tmp_path):
    out = tmp_path / "engines"
    trtx.build_engines(export_dir, out)
    (export_dir / "vae_decoder.fp16.onnx").write_bytes(b"re-exported")
    fake_trt.calls.clear()
    results = trtx.build_engines(export_dir, out)
    assert [r["graph"] for r in results if r["built"]] == ["vae_decoder"]
    assert "vae_decoder.fp16.onnx sha256" in results[3]["reason"]
    assert _calls(fake_trt, "build") == [("build", "vae_decoder")]


def test_corrupted_engine_is_rebuilt_not_a_crash(fake_trt, export_dir, tmp_path, caplog):
    out = tmp_path / "engines"
    trtx.build_engines(export_dir, out, graphs=("unet",))
    unet = out / "unet.trt10.13.0.sm90.static512.plan"
    unet.write_bytes(b"X" * unet.stat().st_size)  # same size: only deserialising finds it
    fake_trt.calls.clear()
    with caplog.at_level("WARNING", logger=trtx.__name__):
        results = trtx.build_engines(export_dir, out, graphs=("unet",))
    assert results[0]["built"] and results[0]["reason"] == "the engine on disk failed to deserialise"
    assert "failed to deserialise" in caplog.text
    assert _calls(fake_trt, "build") == [("build", "unet")] and unet.read_bytes().startswith(b"PLAN|{")


def test_load_engine_survives_an_exception(fake_trt, tmp_path, monkeypatch):
    def boom(self, data):
        raise RuntimeError("serialization version mismatch")

    monkeypatch.setattr(fake_trt.Runtime, "deserialize_cuda_engine", boom)
    (tmp_path / "e.plan").write_bytes(b"PLAN|unet")
    assert trtx.load_engine(tmp_path / "e.plan") is None
    assert trtx.load_engine(tmp_path / "missing.plan") is None


def test_parser_errors_are_listed(fake_trt, export_dir, tmp_path):
    fake_trt.parser_errors = ["In node 3 (Conv): unsupported", "In node 9: bad weights"]
    with pytest.raises(BlipDiffError) as info:
        trtx.build_engines(export_dir, tmp_path / "engines", graphs=("unet",))
    message = str(info.value)
    assert "unet.fp16.onnx" in message and "In node 3 (Conv): unsupported" in message and "node 9" in message
    assert _calls(fake_trt, "build") == []


def test_failed_build_is_a_clear_error_and_leaves_no_record(fake_trt, export_dir, tmp_path):
    fake_trt.fail_build = True
    with pytest.raises(BlipDiffError, match="failed to build the unet engine"):
        trtx.build_engines(export_dir, tmp_path / "engines", graphs=("unet",))
    assert list((tmp_path / "engines").glob("*.plan*")) == []
    # a forced rebuild that fails leaves no sidecar vouching for the engine it was replacing
    fake_trt.fail_build = False
    [done] = trtx.build_engines(export_dir, tmp_path / "engines", graphs=("unet",))
    fake_trt.fail_build = True
    with pytest.raises(BlipDiffError):
        trtx.build_engines(export_dir, tmp_path / "engines", graphs=("unet",), force=True)
    assert not trtx.sidecar_path(Path(done["path"])).exists()


def test_wrong_model_dims_are_named(fake_trt, export_dir, tmp_path):
    (export_dir / "export.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(BlipDiffError, match="'encoder_hidden_states' axis 2 is fixed to 768"):
        trtx.build_engines(export_dir, tmp_path / "engines", graphs=("unet",))


def test_graph_input_without_profile_shapes_is_named(monkeypatch, export_dir, tmp_path):
    inputs = {**GRAPH_INPUTS, "vae_decoder": {"latents": (-1, 4, -1, -1), "scale": (1,)}}
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(graph_inputs=inputs))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trtx, "device_info", lambda: {"compute_capability": (9, 0), "gpu_name": "Fake"})
    with pytest.raises(BlipDiffError, match=r"has inputs \['scale'\] that the profile does not shape"):
        trtx.build_engines(export_dir, tmp_path / "engines", graphs=("vae_decoder",))


def test_timing_cache_of_another_version_is_not_loaded(fake_trt, export_dir, tmp_path, monkeypatch):
    out = tmp_path / "engines"
    trtx.build_engines(export_dir, out, graphs=("unet",))
    monkeypatch.setattr(fake_trt, "__version__", "10.14.1.48")
    fake_trt.calls.clear()
    results = trtx.build_engines(export_dir, out, graphs=("unet",))
    assert results[0]["built"] and results[0]["reason"] == "no engine at " + str(
        out / "unet.trt10.14.1.sm90.static512.plan")
    assert [c[1] for c in _calls(fake_trt, "create_timing_cache")] == [b""]


def test_network_flags_of_tensorrt_11_and_later(monkeypatch, export_dir, tmp_path, fake_trt):
    # TensorRT 11: every network strongly typed; STRONGLY_TYPED kept (value 0) and ignored
    fake_trt.NetworkDefinitionCreationFlag = Flag11
    trtx.build_engines(export_dir, tmp_path / "engines", graphs=("vae_decoder",))
    assert _calls(fake_trt, "create_network") == [("create_network", 1 << int(Flag11.STRONGLY_TYPED))]

    class Later(enum.IntEnum):  # a TensorRT where the flag is removed
        PREFER_JIT_PYTHON_PLUGINS = 2

    fake_trt.NetworkDefinitionCreationFlag = Later
    fake_trt.calls.clear()
    trtx.build_engines(export_dir, tmp_path / "engines", graphs=("vae_decoder",), force=True)
    assert _calls(fake_trt, "create_network") == [("create_network", 0)]


def test_inconsistent_profiles_are_refused_before_tensorrt_sees_them(fake_trt):
    with pytest.raises(BlipDiffError, match=r"'bad': batch of unet \(min, opt, max\) = \(4, 2, 8\)"):
        trtx.Profile("bad", image=(512, 512, 512), batch={"unet": (4, 2, 8)})
    with pytest.raises(BlipDiffError, match="image"):
        trtx.Profile("bad", image=(512, 256, 1024), batch={})
    # the stand-in's set_shape raises as TensorRT's does
    profile = fake_trt.Builder(None).create_optimization_profile()
    with pytest.raises(ValueError, match="does not hold"):
        profile.set_shape("sample", (4, 4, 64, 64), (2, 4, 64, 64), (8, 4, 64, 64))


# ---------------------------------------------------------------- real TensorRT on a GPU
def _toy_unet_onnx(path: Path, hidden: int) -> None:
    """A graph with the UNet's inputs and output that computes in fp16 (as the fp16 export):
    noise_pred = 0.5 * sample + timestep + mean(encoder_hidden_states)."""
    import onnx
    from onnx import TensorProto, helper

    fp16, fp32 = TensorProto.FLOAT16, TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["sample"], ["s16"], to=fp16),
        helper.make_node("Cast", ["timestep"], ["t16"], to=fp16),
        helper.make_node("Cast", ["encoder_hidden_states"], ["e16"], to=fp16),
        helper.make_node("ReduceMean", ["e16"], ["m16"], axes=[1, 2], keepdims=0),
        helper.make_node("Add", ["t16", "m16"], ["tm"]),
        helper.make_node("Reshape", ["tm", "shape"], ["tm4"]),
        helper.make_node("Mul", ["s16", "half"], ["hs"]),
        helper.make_node("Add", ["hs", "tm4"], ["y16"]),
        helper.make_node("Cast", ["y16"], ["noise_pred"], to=fp32),
    ]
    graph = helper.make_graph(
        nodes, "toy_unet",
        [helper.make_tensor_value_info("sample", fp32, ["B", 4, "H", "W"]),
         helper.make_tensor_value_info("timestep", fp32, ["B"]),
         helper.make_tensor_value_info("encoder_hidden_states", fp32, ["B", 77, hidden])],
        [helper.make_tensor_value_info("noise_pred", fp32, ["B", 4, "H", "W"])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 1, 1]),
                     helper.make_tensor("half", fp16, [], [0.5])],
    )
    # IR version 8 (opset 17's): the onnx package writes a newer one that parsers may not read yet
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.gpu(tensorrt=True)
def test_gpu_builds_runs_and_reuses_a_unet_engine(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    _toy_unet_onnx(export / "unet.fp16.onnx", hidden=32)
    (export / "export.json").write_text(json.dumps({"latent_factor": 8, "hidden_size": 32}))
    small = trtx.Profile("gputest", image=(64, 64, 128), batch={"unet": (2, 2, 4)})
    [built] = trtx.build_engines(export, tmp_path / "engines", profile=small, workspace_gb=1, graphs=("unet",))
    assert built["built"] and built["size"] > 0 and (tmp_path / "engines" / "timing.cache").stat().st_size > 0
    [again] = trtx.build_engines(export, tmp_path / "engines", profile=small, workspace_gb=1, graphs=("unet",))
    assert not again["built"]

    engine = trtx.load_engine(Path(built["path"]))
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert names == {"sample", "timestep", "encoder_hidden_states", "noise_pred"}
    context = engine.create_execution_context()
    inputs = {"sample": torch.randn(3, 4, 16, 12, device="cuda"), "timestep": torch.full((3,), 2.0, device="cuda"),
              "encoder_hidden_states": torch.ones(3, 77, 32, device="cuda")}
    out = torch.empty(3, 4, 16, 12, device="cuda")
    for name, tensor in inputs.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    context.set_tensor_address("noise_pred", out.data_ptr())
    stream = torch.cuda.Stream()  # TensorRT's own stream, never the legacy default one
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were made there
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    torch.testing.assert_close(out, 0.5 * inputs["sample"] + 3.0, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu(tensorrt=True)
def test_gpu_builds_the_exported_unet(tmp_path):
    """The export stage's own UNet (tiny or real) at small latents, when it has run here."""
    from components.core.paths import EXPORT_DIR

    export = REPO / EXPORT_DIR  # where the export stage writes (models/onnx)
    if not (export / "unet.fp16.onnx").is_file():
        pytest.skip(f"no exported UNet at {export} (run the export stage)")
    meta = json.loads((export / "export.json").read_text()) if (export / "export.json").is_file() else {}
    factor = trtx.ModelDims.from_export(meta).latent_factor
    small = trtx.Profile("gputest", image=(16 * factor,) * 3, batch={"unet": (2, 2, 2)})
    [built] = trtx.build_engines(export, tmp_path / "engines", profile=small, workspace_gb=4, graphs=("unet",))
    assert built["built"] and trtx.load_engine(Path(built["path"])) is not None
