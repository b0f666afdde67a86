"""ControlNet on the exported backends: the `controlnet` and `unet_control` graphs, their
parity gate, ONNX Runtime generation against PyTorch, and TensorRT's profiles for them."""

import json
import shutil
import types

import numpy as np
import onnx
import pytest
import torch

from components.core.io import write_json
from components.export import graphs as export_graphs
from components.export import onnx_export, parity
from components.export import tensorrt as trtx
from components.model.controlnet import Control, control_pixels
from components.model.tiny.blip_diffusion import build_tiny
from components.model.tiny.controlnet import build_tiny_controlnet
from components.stages import export as stage
from serving.generator import Generator

SIZE = 64  # the tiny preset's native size: latents 32 x 32, residuals at 32 and 16


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = build_tiny(0)
    m.controlnets.append(build_tiny_controlnet(m, seed=1))
    return m


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory):
    """The tiny model with its ControlNet, exported as the export stage writes it (fp32 and fp16)."""
    folder = tmp_path_factory.mktemp("export") / "onnx"
    folder.mkdir()
    graphs = onnx_export.export_all(model, folder, opset=18, batch=2, fp16=True)
    report = parity.check_parity(model, folder, graphs, batch=3)
    parity.gate(report)
    files = stage.write_serving_files(model, folder)
    write_json(stage.manifest(model, types.SimpleNamespace(opset=18), "preset tiny", "preset:tiny:seed0", graphs,
                              files, {"source": "tiny controlnet", "hash": None}), folder / "export.json")
    (folder / "parity.json").write_text(json.dumps(report, default=float))
    return folder


def test_controlnet_graphs_take_and_give_the_residuals(model, export_dir):
    meta = json.loads((export_dir / "export.json").read_text())
    assert sorted(meta["graphs"]) == sorted([*export_graphs.GRAPHS, "controlnet", "unet_control"])
    layout = export_graphs.residual_layout(model.unet.config)
    assert meta["residuals"] == [list(r) for r in layout]
    assert len(layout) == 5  # conv_in, 2 layers, 1 downsampler, mid (SD 1.5: 12 + 1)
    cn = onnx.load(str(export_dir / "controlnet.onnx"), load_external_data=False)
    assert [i.name for i in cn.graph.input] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    assert [o.name for o in cn.graph.output] == ["down_0", "down_1", "down_2", "down_3", "mid"]
    unet = onnx.load(str(export_dir / "unet_control.onnx"), load_external_data=False)
    assert [i.name for i in unet.graph.input][3:] == ["down_0", "down_1", "down_2", "down_3", "mid"]
    dims = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in cn.graph.output]
    assert dims[0] == ["batch", 32, "latent_height", "latent_width"]
    assert dims[-1] == ["batch", 64, "latent_height_2", "latent_width_2"]
    report = json.loads((export_dir / "parity.json").read_text())
    for name in ("controlnet", "unet_control"):
        assert report[name]["fp32"]["passed"] and report[name]["fp32"]["max_abs_diff"] < 1e-4
        assert report[name]["fp16"]["runnable"]


def test_full_size_residual_layout_is_twelve_plus_one():
    from components.model.full_size import full_size_configs

    unet = types.SimpleNamespace(**full_size_configs()["unet"])
    layout = export_graphs.residual_layout(unet)
    assert len(layout) == 13 and layout[0] == (320, 1) and layout[-1] == (1280, 8)
    assert [c for c, _ in layout[:-1]] == [320] * 4 + [640] * 3 + [1280] * 5


def test_onnxruntime_controlnet_generation_within_2_of_255_of_torch(model, export_dir):
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(1, model.qformer.config.num_query_tokens, 32, generator=g)
    rng = np.random.default_rng(0)
    conds = [(rng.random((SIZE, SIZE, 3)) > 0.8).astype(np.uint8) * 255 for _ in range(2)]
    control = Control([control_pixels(conds, SIZE, SIZE)], [[1.0, 0.6]])
    kw = dict(num_inference_steps=4, height=SIZE, width=SIZE, guidance_scale=5.0)
    ort = Generator.load(export_dir, backend="onnxruntime", dtype="fp32")
    assert ort.networks.num_controlnets == 1
    ours = ort.generate(embeds, ["on a beach", "in the snow"], "dog", [0, 1], control=control, **kw)
    ref = model.generate(embeds, ["on a beach", "in the snow"], "dog", [0, 1], control=control, **kw)
    plain = model.generate(embeds, ["on a beach", "in the snow"], "dog", [0, 1], **kw)
    assert np.abs(ours - ref).max() <= 2 / 255
    assert np.abs(ref - plain).max() > 0.05  # the ControlNet acts on both backends
    # without control the ONNX Runtime backend runs the plain unet graph
    assert np.abs(ort.generate(embeds, ["on a beach", "in the snow"], "dog", [0, 1], **kw) - plain).max() <= 2 / 255


def test_tensorrt_profiles_for_the_controlnet_graphs(export_dir):
    meta = json.loads((export_dir / "export.json").read_text())
    dims = trtx.ModelDims.from_export(meta)
    cn = trtx.profile_shapes("controlnet", "dynamic", **dims.as_kwargs())
    assert cn["controlnet_cond"] == ((1, 3, 256, 256), (16, 3, 512, 512), (16, 3, 1024, 1024))
    unet = trtx.profile_shapes("unet_control", "static512", **dims.as_kwargs())
    assert unet["down_0"][1] == (16, 32, 256, 256) and unet["mid"][1] == (16, 64, 128, 128)


def test_tensorrt_engines_and_output_shapes_of_an_export_with_a_controlnet(tmp_path, export_dir):
    from serving import backends

    meta = json.loads((export_dir / "export.json").read_text())
    graphs = backends.export_graphs(meta)
    assert graphs[-2:] == ("controlnet", "unet_control")
    for g in backends.GRAPHS:
        (tmp_path / trtx.engine_name(g, "10.16.1.11", (9, 0), "static512")).write_bytes(b"plan")
    with pytest.raises(Exception, match="no TensorRT engine controlnet.trt10.16.1.sm90.static512.plan"):
        backends.select_engines(tmp_path, "10.16.1.11", (9, 0), graphs=graphs)
    for g in ("controlnet", "unet_control"):
        (tmp_path / trtx.engine_name(g, "10.16.1.11", (9, 0), "static512")).write_bytes(b"plan")
    _, paths = backends.select_engines(tmp_path, "10.16.1.11", (9, 0), graphs=graphs)
    assert paths["unet_control"].name == "unet_control.trt10.16.1.sm90.static512.plan"
    residuals = tuple(tuple(r) for r in meta["residuals"])
    shapes = backends.output_shape("controlnet", {"sample": (4, 4, 64, 48)}, 16, 32, 77, 2, residuals=residuals)
    assert shapes == [(4, 32, 64, 48), (4, 32, 64, 48), (4, 32, 32, 24), (4, 64, 32, 24), (4, 64, 32, 24)]
    assert backends.output_shape("unet_control", {"sample": (4, 4, 64, 48)}, 16, 32, 77, 2) == (4, 4, 64, 48)


def test_export_stage_with_export_controlnet_and_the_torch_backend_of_it(tmp_path, model):
    """`export.controlnet` adds a ControlNet folder to the exported model: the export has the
    pair of graphs, export.json names and hashes it, and the torch backend of the export
    attaches it again."""
    from components.core.config import Params
    from components.model import layout
    from components.model.tiny.blip_diffusion import build_tiny as plain_tiny

    root = tmp_path / "repo"
    layout.save(plain_tiny(0), root / "models/blip_diffusion")
    model.controlnets[0].save_pretrained(root / "models/controlnet")
    params = Params.model_validate({"export": {"controlnet": "models/controlnet", "fp16": False}})
    stage.run(params, root)
    meta = json.loads((root / "models/onnx/export.json").read_text())
    assert {"controlnet", "unet_control"} <= set(meta["graphs"])
    assert meta["controlnet"]["source"] == "models/controlnet" and len(meta["controlnet"]["hash"]) == 16
    parity_report = json.loads((root / "reports/export/parity.json").read_text())
    assert parity_report["graphs"]["controlnet"]["fp32"]["passed"]
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        gen = Generator.load("models/onnx", backend="torch", device="cpu", dtype="fp32")
    finally:
        os.chdir(cwd)
    assert len(gen.model.controlnets) == 1
    twice = Params.model_validate({"export": {"controlnet": "models/controlnet", "model": "models/with_cn"}})
    layout.save(model, root / "models/with_cn")
    with pytest.raises(Exception, match="already has a ControlNet"):
        stage.run(twice, root)
    # the default (the controlnet stage's folder) not there: one line, nothing exported
    shutil.rmtree(root / "models/controlnet")
    shutil.rmtree(root / "models/onnx")
    with pytest.raises(Exception, match=r"export.controlnet: .*models/controlnet not found \(run `dvc repro controlnet`"):
        stage.run(Params(), root)
    assert not (root / "models/onnx").exists()


def test_controlnet_graphs_export_attention_tensorrt_fuses(export_dir):
    import onnx

    from components.export import onnx_export

    for name in ("controlnet", "unet_control"):
        for suffix in (".onnx", ".fp16.onnx"):
            pattern = onnx_export.attention_pattern(onnx.load(str(export_dir / f"{name}{suffix}")))
            assert pattern["softmax"] > 0 and pattern["fusable"] == pattern["softmax"], (name, suffix, pattern)
            assert pattern["softmax_with_casts"] == 0, (name, suffix, pattern)
