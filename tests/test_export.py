"""Stage `export`: the four ONNX graphs of a tiny model, their parity with PyTorch under ONNX
Runtime (CPU provider) at other batch sizes and latent sizes than the export's, both guidance
branches of the text encoder graph, the parity gate, the TensorRT switch, and the stage end to
end (offline, tiny preset)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml

from components.core.config import Params, parse_params
from components.core.errors import BlipDiffError, ConfigError
from components.export import files as export_files
from components.export import onnx_export, parity
from components.export import tensorrt as export_trt
from components.export.graphs import GRAPHS, SPECS, Dims, sample_inputs, text_encoder_inputs
from components.model import layout
from components.model.tiny.blip_diffusion import build_tiny
from components.stages import export, runner
from tests.helpers.text_reference import encode_negative, encode_prompts

REPO = Path(__file__).resolve().parents[1]
INPUTS = {"subject_encoder": ["pixel_values", "input_ids", "attention_mask"],
          "text_encoder": ["input_ids", "subject_embeds", "has_subject"],
          "unet": ["sample", "timestep", "encoder_hidden_states"], "vae_decoder": ["latents"]}
OUTPUTS = {"subject_encoder": "subject_embeds", "text_encoder": "text_embeds", "unet": "noise_pred",
           "vae_decoder": "images"}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(0)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    graphs = onnx_export.export_all(tiny, folder, opset=18, batch=2, fp16=True)
    return tiny, folder, graphs


@pytest.fixture(scope="module")
def model_folder(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "blip_diffusion"
    layout.save(tiny, folder)
    return folder


def _root(tmp_path: Path, model_folder: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(model_folder, root / "models/blip_diffusion")
    return root


def _dims(proto, name: str) -> list:
    value = next(v for v in [*proto.graph.input, *proto.graph.output] if v.name == name)
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _max_diff(model, folder: Path, name: str, batch: int, hw=None, fp16: bool = False) -> float:
    inputs = sample_inputs(name, model, Dims.of(model), batch, torch.Generator().manual_seed(batch), hw)
    sess = parity.session(folder / f"{name}{'.fp16' if fp16 else ''}.onnx")
    assert sess.get_providers() == ["CPUExecutionProvider"]
    return parity.compare(name, sess, inputs, parity.reference(name, model, inputs))["max_abs_diff"]


def _tolerance(monkeypatch, name: str, value: float) -> None:
    """The parity gate's tolerance of one graph, for this test."""
    monkeypatch.setitem(SPECS, name, dataclasses.replace(SPECS[name], tolerance=value))


# ------------------------------------------------------------------------- graphs
def test_export_writes_four_graphs_with_named_inputs_outputs_and_dynamic_axes(exported):
    model, folder, graphs = exported
    assert list(graphs) == list(GRAPHS)
    dims = Dims.of(model)
    q, d, s = dims.num_query, dims.hidden, dims.image_size
    expected = {
        "pixel_values": ["batch", 3, s, s], "input_ids@subject_encoder": ["batch", "text_length"],
        "attention_mask": ["batch", "text_length"], "subject_embeds@subject_encoder": ["batch", q, d],
        "input_ids@text_encoder": ["batch", 77], "subject_embeds@text_encoder": ["batch", q, d],
        "has_subject": ["batch"], "text_embeds": ["batch", 77, d],
        "sample": ["batch", 4, "latent_height", "latent_width"], "timestep": ["batch"],
        "encoder_hidden_states": ["batch", 77, d], "noise_pred": ["batch", 4, "latent_height", "latent_width"],
        "latents": ["batch", 4, "latent_height", "latent_width"], "images": ["batch", 3, "image_height", "image_width"],
    }
    for name in GRAPHS:
        for fp16 in (False, True):
            path = folder / f"{name}{'.fp16' if fp16 else ''}.onnx"
            onnx.checker.check_model(str(path))
            proto = onnx.load(str(path))
            assert [i.name for i in proto.graph.input] == INPUTS[name]
            assert [o.name for o in proto.graph.output] == [OUTPUTS[name]]
            assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
            assert not (folder / f"{path.name}.data").exists()  # small graphs: one file
            for io in [*INPUTS[name], OUTPUTS[name]]:
                key = f"{io}@{name}" if f"{io}@{name}" in expected else io
                assert _dims(proto, io) == expected[key], (name, io)
            # fp16 graphs keep fp32 (and int64/bool) inputs and outputs
            types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
            assert onnx.TensorProto.FLOAT16 not in types.values()
        description = graphs[name]
        assert description["opset"] == 18 and description["file"] == f"{name}.onnx"
        assert [i["name"] for i in description["inputs"]] == INPUTS[name]
        assert description["fp16"]["file"] == f"{name}.fp16.onnx"
    # plain attention went on the export copies only: the bundle keeps SDPA
    assert model.text_encoder.config._attn_implementation == "sdpa"
    assert {type(p).__name__ for p in model.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    # the fp16 UNet keeps its timestep embedding in fp32 (an fp16 island of Sin/Cos would be off by ~0.5 rad)
    unet16 = onnx.load(str(folder / "unet.fp16.onnx"))
    assert graphs["unet"]["fp16"]["kept_fp32_nodes"] > 0
    sin = next(n for n in unet16.graph.node if n.op_type == "Sin")
    assert not sin.input[0].endswith("_cast_to_fp32")  # fed by the fp32 product, not an fp16 round trip


def test_opset_19_and_external_data(tiny, tmp_path, monkeypatch):
    """Opset 19 is recorded; a graph past the 2 GB limit (here: the limit set to 0) keeps its
    weights in one `<name>.onnx.data` file beside it, which ONNX Runtime reads."""
    monkeypatch.setattr(export_files, "EXTERNAL_DATA_BYTES", 0)
    graphs = onnx_export.export_all(tiny, tmp_path, opset=19, batch=2, fp16=True, graphs=("text_encoder",))
    assert graphs["text_encoder"]["opset"] == 19
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "text_encoder.fp16.onnx", "text_encoder.fp16.onnx.data", "text_encoder.onnx", "text_encoder.onnx.data"]
    assert graphs["text_encoder"]["external_data"] == "text_encoder.onnx.data"
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert sizes["text_encoder.onnx"] < 100_000 < sizes["text_encoder.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "text_encoder.onnx"))
    assert _max_diff(tiny, tmp_path, "text_encoder", 3) <= SPECS["text_encoder"].tolerance
    assert _max_diff(tiny, tmp_path, "text_encoder", 3, fp16=True) < 2e-2
    with pytest.raises(BlipDiffError, match="opset 17"):
        onnx_export.export_all(tiny, tmp_path, opset=17, graphs=("text_encoder",))
    with pytest.raises(BlipDiffError, match="must be >= 2"):
        onnx_export.export_all(tiny, tmp_path, batch=1, graphs=("text_encoder",))


@pytest.mark.parametrize("batch", [1, 3])
def test_graphs_match_pytorch_at_batch_sizes_other_than_the_exports(exported, batch):
    model, folder, _ = exported
    for name in GRAPHS:
        diff = _max_diff(model, folder, name, batch)
        assert diff <= SPECS[name].tolerance, f"{name} at batch {batch}: {diff:.3g}"


def test_unet_and_vae_at_other_latent_sizes_and_subject_encoder_at_another_text_length(exported):
    model, folder, _ = exported
    native = Dims.of(model).latent_size  # exported at 32 x 32 latents
    for hw in [(16, 24), (native + 8, native)]:
        assert _max_diff(model, folder, "unet", 2, hw) <= SPECS["unet"].tolerance, hw
    assert _max_diff(model, folder, "vae_decoder", 1, (16, 24)) <= SPECS["vae_decoder"].tolerance
    # one long class text: another text length than the export's
    text = model.qformer_tokenizer(["a very fluffy stuffed animal toy with long ears"], return_tensors="pt")
    assert text.input_ids.shape[1] > 6
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = {"pixel_values": pixels, "input_ids": text.input_ids, "attention_mask": text.attention_mask}
    result = parity.compare("subject_encoder", parity.session(folder / "subject_encoder.onnx"), inputs,
                            parity.reference("subject_encoder", model, inputs))
    assert result["max_abs_diff"] <= 1e-4


@torch.no_grad()
def test_text_encoder_graph_holds_both_guidance_branches(exported):
    """Rows with a subject equal the reference pipeline's conditioning, rows without its negative branch: the
    two branches of classifier-free guidance in one graph, one batch."""
    model, folder, _ = exported
    dims = Dims.of(model)
    prompts = [model.build_prompt("in the jungle", "dog", prompt_reps=20),  # truncated to 77 - Q tokens
               model.build_prompt("on a beach", "red backpack")]
    negative = "low quality, blurry, duplicate"
    rows, has = [prompts[0], negative, prompts[1]], [True, False, True]
    arrays = text_encoder_inputs(model.tokenizer, rows, has, dims.text_length, dims.num_query)
    assert np.array_equal(arrays["input_ids"][[0, 2], :77 - dims.num_query],
                          model.tokenizer(prompts, padding="max_length", truncation=True, max_length=77 - dims.num_query,
                                          return_tensors="np").input_ids)
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, dims.num_query, dims.hidden, generator=generator)
    garbage = 100 * torch.randn(1, dims.num_query, dims.hidden, generator=generator)  # ignored without a subject
    feeds = {**arrays, "subject_embeds": torch.cat([embeds, garbage, embeds]).numpy()}
    out = parity.session(folder / "text_encoder.onnx").run(None, feeds)[0]
    cond = encode_prompts(model, prompts, embeds).numpy()
    uncond = encode_negative(model, negative, 1).numpy()
    np.testing.assert_allclose(out[[0, 2]], cond, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[[1]], uncond, atol=1e-4, rtol=0)
    assert np.abs(cond[0] - uncond[0]).max() > 1e-2  # the branches do differ


# --------------------------------------------------------------------------- gate
def test_parity_gate_names_the_graph_that_differs(exported, monkeypatch):
    model, folder, graphs = exported
    fp32 = {name: {k: v for k, v in graphs[name].items() if k != "fp16"} for name in GRAPHS}
    # a weight changed after the export: that graph no longer is the model
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.vae.decoder.conv_out.bias += 0.01
    subset = {name: fp32[name] for name in ("text_encoder", "vae_decoder")}
    report = parity.check_parity(changed, folder, subset, batch=3)
    assert report["text_encoder"]["fp32"]["passed"] and not report["vae_decoder"]["fp32"]["passed"]
    row = report["vae_decoder"]["fp32"]
    assert row["provider"] == "CPUExecutionProvider" and row["tolerance"] == 3e-4 and row["opset"] == 18
    with pytest.raises(BlipDiffError, match=r"vae_decoder: max abs diff 0\.01\d* > 0\.0003") as err:
        parity.gate(report)
    assert "text_encoder" not in str(err.value)

    parity.gate(parity.check_parity(model, folder, {"text_encoder": fp32["text_encoder"]}))  # passes as exported
    _tolerance(monkeypatch, "text_encoder", 0.0)
    with pytest.raises(BlipDiffError, match=r"text_encoder: max abs diff .* > 0$"):
        parity.gate(parity.check_parity(model, folder, {"text_encoder": fp32["text_encoder"]}))


def test_attention_is_exported_in_the_pattern_tensorrt_fuses(exported):
    """UNet and VAE: every Softmax is fed by a MatMul of Q and Kᵀ each multiplied by a constant
    (pre-scaled, as torch's SDPA export writes it), and the fp16 graphs keep that Softmax in
    fp16 (no Cast next to it, which the fusion would not cross). The unscaled Q·Kᵀ followed by
    a Mul by the scale (diffusers' AttnProcessor), or an fp32 Softmax between Casts, fails."""
    model, folder, graphs = exported
    for name in ("unet", "vae_decoder"):
        for suffix in (".onnx", ".fp16.onnx"):
            pattern = onnx_export.attention_pattern(onnx.load(str(folder / f"{name}{suffix}")))
            assert pattern["softmax"] > 0 and pattern["fusable"] == pattern["softmax"], (name, suffix, pattern)
            assert pattern["softmax_with_casts"] == 0, (name, suffix, pattern)
        assert "Softmax" not in graphs[name]["fp16"]["kept_fp32_ops"]
    # the small encoders keep eager attention and an fp32 Softmax
    assert "Softmax" in graphs["text_encoder"]["fp16"]["kept_fp32_ops"]
    # the pattern check itself: diffusers' plain AttnProcessor (unscaled MatMul, then Mul) is not fusable
    from diffusers.models.attention_processor import AttnProcessor

    vae = copy.deepcopy(model.vae)
    vae.set_attn_processor(AttnProcessor())
    graph = SPECS["vae_decoder"].wrapper(vae, Dims.of(model)).eval()
    path = folder.parent / "plain_vae.onnx"
    with torch.no_grad():
        torch.onnx.export(graph, (torch.randn(2, 4, 8, 8),), str(path), dynamo=False, opset_version=18,
                          input_names=["latents"], output_names=["images"])
    plain = onnx_export.attention_pattern(onnx.load(str(path)))
    assert plain["softmax"] == 1 and plain["fusable"] == 0


def test_fp16_graphs_are_gated_and_the_vae_sees_latents_at_its_scale(exported, monkeypatch):
    model, folder, graphs = exported
    latents = sample_inputs("vae_decoder", model, Dims.of(model), 8, torch.Generator().manual_seed(0))["latents"]
    assert latents.std() == pytest.approx(1 / model.vae.config.scaling_factor, rel=0.1)
    report = parity.check_parity(model, folder, {"vae_decoder": graphs["vae_decoder"]}, batch=3)
    row = report["vae_decoder"]["fp16"]
    assert row["tolerance"] == SPECS["vae_decoder"].fp16_tolerance and row["passed"] is True
    assert 0 < row["max_abs_diff"] <= row["tolerance"]
    parity.gate(report)
    monkeypatch.setitem(SPECS, "vae_decoder", dataclasses.replace(SPECS["vae_decoder"], fp16_tolerance=1e-6))
    with pytest.raises(BlipDiffError, match=r"vae_decoder \(fp16\): max abs diff .* > 1e-06"):
        parity.gate(parity.check_parity(model, folder, {"vae_decoder": graphs["vae_decoder"]}, batch=3))


def test_stage_fails_naming_the_graph_and_writes_nothing(tmp_path, model_folder, monkeypatch):
    root = _root(tmp_path, model_folder)
    _tolerance(monkeypatch, "text_encoder", 0.0)
    params = Params.model_validate({"export": {"fp16": False, "controlnet": None}})
    with pytest.raises(BlipDiffError, match="text_encoder: max abs diff"):
        export.run(params, root)
    assert not (root / "models/onnx").exists() and not (root / "reports/export/parity.json").exists()
    assert [p.name for p in (root / "models").iterdir()] == ["blip_diffusion"]  # no temporary folder left


# ----------------------------------------------------------------------- TensorRT
def test_tensorrt_switch(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on = Params.model_validate({"export": {"tensorrt": "on"}})
    # fails at once, before any model is read (this root has none)
    with pytest.raises(BlipDiffError, match=r"export\.tensorrt: on, but TensorRT engines cannot be built.*no CUDA"):
        export.run(on, tmp_path)
    caplog.set_level(logging.INFO, logger="components.stages.export")
    auto = Params().export
    reason = export.tensorrt_check(auto)
    assert export.tensorrt_engines(auto, tmp_path, tmp_path / "engines", reason) == {
        "built": 0, "reused": 0, "skipped": reason}
    assert "TensorRT engines skipped: torch sees no CUDA GPU" in caplog.text
    caplog.clear()
    off = Params.model_validate({"export": {"tensorrt": "off"}}).export
    assert export.tensorrt_engines(off, tmp_path, tmp_path / "engines", export.tensorrt_check(off))["built"] == 0
    assert "TensorRT" not in caplog.text and not (tmp_path / "engines").exists()
    # a GPU, but no tensorrt package
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BlipDiffError, match=r"tensorrt is not installed \(pip install -e '\.\[gpu\]'\)"):
        export.tensorrt_check(on.export)
    # a GPU and TensorRT: the stage builds the engines from the fp16 graphs into models/tensorrt
    calls = []
    monkeypatch.setattr(export_trt, "tensorrt_status", lambda: (True, "TensorRT 10 on a GPU"))
    monkeypatch.setattr(export_trt, "build_engines", lambda *a, **k: calls.append((a, k)) or [
        {"graph": "unet", "path": tmp_path / "e.plan", "built": True}])
    assert export.tensorrt_check(on.export) is None
    assert export.tensorrt_engines(on.export, tmp_path / "onnx", tmp_path / "engines", None)["built"] == 1
    assert calls == [((tmp_path / "onnx", tmp_path / "engines"), {"profile": "static512", "workspace_gb": 8})]


def test_export_params_are_checked():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert parse_params(raw).export == Params().export
    raw["export"]["tensorrt"] = True  # YAML's bare `on`
    assert parse_params(raw).export.tensorrt == "on"
    for key, value, message in [("opset", 17, "export.opset"), ("batch", 1, "export.batch"),
                                ("tensorrt", "maybe", "export.tensorrt"), ("tensorrt_profile", "x", "tensorrt_profile"),
                                ("modle", "x", "export.modle: unknown key")]:
        bad = yaml.safe_load((REPO / "params.yaml").read_text())
        bad["export"][key] = value
        with pytest.raises(ConfigError, match=message):
            parse_params(bad)


def test_export_model_source(tmp_path, model_folder):
    root = _root(tmp_path, model_folder)
    cfg = Params().export
    source, model_hash, folder = export.model_source(cfg, "tiny", root)
    assert (source, folder) == ("models/blip_diffusion", root / "models/blip_diffusion") and len(model_hash) == 16
    null = Params.model_validate({"export": {"model": None}}).export
    assert export.model_source(null, "tiny", root) == ("preset tiny", "preset:tiny:seed0", None)
    hub = Params.model_validate({"export": {"model": "Salesforce/blipdiffusion"}}).export
    assert export.model_source(hub, "tiny", root)[:2] == ("Salesforce/blipdiffusion", "Salesforce/blipdiffusion")
    missing = Params.model_validate({"export": {"model": "models/nope"}}).export
    with pytest.raises(BlipDiffError, match=r"export\.model: .*models/nope not found"):
        export.model_source(missing, "tiny", root)


# --------------------------------------------------------------------- end to end
def test_export_stage_end_to_end(tmp_path, model_folder):
    """`blipdiff export` as dvc.yaml runs it: graphs, export.json, serving files, parity.json,
    metrics/export.json, and the MLflow run with the parity report and the export folder."""
    import mlflow

    from components.model.layout import load_qformer_tokenizer

    root = _root(tmp_path, model_folder)
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    # the model alone (with the ControlNet: tests/test_controlnet_export.py)
    metrics = runner.run_stage("export", root / "params.yaml", ["export.controlnet=null"], root)

    out = root / "models/onnx"
    files = {p.name for p in out.iterdir()}
    assert files == {*(f"{g}{s}.onnx" for g in GRAPHS for s in ("", ".fp16")), "export.json", "tokenizer",
                     "qformer_tokenizer", "scheduler", "image_processor"}
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["model"] == {"source": "models/blip_diffusion", "hash": layout_hash(root)}
    assert manifest["opset"] == 18 and manifest["ctx_begin_pos"] == 2 and manifest["num_query_tokens"] == 16
    assert manifest["text_length"] == 77 and manifest["hidden_size"] == 32 and manifest["native_size"] == 64
    assert manifest["scaling_factor"] == json.loads((root / "models/blip_diffusion/vae/config.json").read_text())[
        "scaling_factor"]
    assert manifest["scheduler"]["_class_name"] == "PNDMScheduler"
    assert manifest["graphs"]["unet"]["dynamic_axes"]["sample"] == {"0": "batch", "2": "latent_height",
                                                                     "3": "latent_width"}
    assert "tensorrt" not in manifest  # engines are per machine: models/tensorrt, not this DVC output
    # an export folder serves on its own: its tokenizers and scheduler load from it
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer

    model = layout.load(root / "models/blip_diffusion")
    assert CLIPTokenizer.from_pretrained(out / "tokenizer")("a dog").input_ids == model.tokenizer("a dog").input_ids
    bert = load_qformer_tokenizer(out / "qformer_tokenizer", len(model.qformer_tokenizer))
    assert bert("red backpack").input_ids == model.qformer_tokenizer("red backpack").input_ids
    assert PNDMScheduler.from_pretrained(out / "scheduler").config == model.scheduler.config

    parity = json.loads((root / "reports/export/parity.json").read_text())
    assert parity["parity_batch"] == 3 and len(parity["graphs"]["unet"]["fp32"]["cases"]) == 2
    for name in GRAPHS:
        row = parity["graphs"][name]["fp32"]
        assert row["passed"] and row["max_abs_diff"] <= SPECS[name].tolerance
        assert row["provider"] == "CPUExecutionProvider" and row["onnxruntime"] == onnxruntime.__version__
        assert row["size_bytes"] == (out / f"{name}.onnx").stat().st_size
        fp16 = parity["graphs"][name]["fp16"]
        assert fp16["runnable"] is True and fp16["passed"] is True  # gated too
        assert fp16["tolerance"] == SPECS[name].fp16_tolerance and fp16["max_abs_diff"] <= fp16["tolerance"]
        assert metrics[f"diff_{name}_max_abs"] == pytest.approx(row["max_abs_diff"], rel=1e-2)
        assert metrics[f"diff_{name}_fp16_max_abs"] < 2e-2
    written = json.loads((root / "metrics/export.json").read_text())
    # CPU-kernel differences and timings go to MLflow only: the DVC metrics file is machine-independent
    assert "diff_unet_max_abs" not in written and "seconds_export" not in written
    assert written["unet_size_mb"] == pytest.approx((out / "unet.onnx").stat().st_size / 1e6, abs=1e-3)

    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("blip-diffusion").experiment_id],
                             "tags.dvc_stage = 'export'")[0]
    assert run.info.status == "FINISHED" and run.data.params["export.opset"] == "18"
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert "export/parity.json" in listed and "export/graphs" in listed
    graphs = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, "export/graphs")}
    assert {"unet.onnx", "export.json"} <= graphs


def layout_hash(root: Path) -> str:
    from components.core.io import folder_hash

    return folder_hash(root / "models/blip_diffusion")
