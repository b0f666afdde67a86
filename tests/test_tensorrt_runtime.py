"""The TensorRT backend's runtime side (`serving.backends.TrtNetworks`) against the stand-in
TensorRT of tests/helpers/fake_tensorrt.py, on CPU tensors: engines built by the real
`build_engines`, then chunking, padding, fresh aligned bindings, refused addresses, one
shared activation memory, the dedicated stream and non-finite outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from components.core.errors import BlipDiffError, NonFiniteError
from components.export import tensorrt as trtx
from serving import backends
from tests.helpers import fake_tensorrt as ft

HIDDEN, QUERY, TEXT, IMAGE = 32, 16, 77, 32
DIMS = {"num_query": QUERY, "hidden": HIDDEN, "vae_scale_factor": 8, "residuals": ()}
PROFILE = trtx.Profile("ci", image=(64, 64, 64), subject_text=(1, 4, 8),
                       batch={"subject_encoder": (1, 2, 4), "text_encoder": (2, 4, 4), "unet": (2, 4, 4),
                              "vae_decoder": (1, 2, 2)})


@pytest.fixture
def fake(monkeypatch):
    trt = ft.make_fake_trt("11.1.0.8", graph_inputs=ft.graph_inputs_of(HIDDEN, QUERY, TEXT, IMAGE), flags=ft.Flag11,
                           dims=DIMS)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    trt.default_stream = ft.patch_cuda(monkeypatch)
    monkeypatch.setattr(trtx, "device_info", lambda: {"compute_capability": (9, 0), "gpu_name": "Fake H100",
                                                      "cuda_version": "13.0"})
    return trt


@pytest.fixture
def networks(fake, tmp_path) -> backends.TrtNetworks:
    export = tmp_path / "onnx"
    export.mkdir()
    for graph in trtx.GRAPHS:
        (export / f"{graph}.fp16.onnx").write_bytes(graph.encode())
    (export / "export.json").write_text(json.dumps({
        "text_length": TEXT, "latent_channels": 4, "vae_scale_factor": 8, "scaling_factor": 0.18215,
        "num_query_tokens": QUERY, "hidden_size": HIDDEN, "subject_image_size": IMAGE}))
    trtx.build_engines(export, tmp_path / "tensorrt", profile=PROFILE, workspace_gb=1)
    return backends.TrtNetworks(export, tmp_path / "tensorrt", "ci", device="cpu")


def _feeds(graph: str, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if graph == "subject_encoder":
        return {"pixel_values": torch.randn(rows, 3, IMAGE, IMAGE, generator=g),
                "input_ids": torch.randint(0, 1000, (rows, 5), generator=g),
                "attention_mask": torch.ones(rows, 5, dtype=torch.int64)}
    if graph == "text_encoder":
        return {"input_ids": torch.randint(0, 1000, (rows, TEXT), generator=g),
                "subject_embeds": torch.randn(rows, QUERY, HIDDEN, generator=g),
                "has_subject": torch.arange(rows) % 2 == 0}
    if graph == "unet":
        return {"sample": torch.randn(rows, 4, 8, 8, generator=g), "timestep": torch.rand(rows, generator=g) * 999,
                "encoder_hidden_states": torch.randn(rows, TEXT, HIDDEN, generator=g)}
    return {"latents": torch.randn(rows, 4, 8, 8, generator=g)}


@pytest.mark.parametrize("graph,rows", [
    ("subject_encoder", 6),  # chunks of 4 and 2: the second chunk's int64 input_ids start 160 bytes in
    ("subject_encoder", 1),
    ("text_encoder", 5),  # 4 + 1 padded to the minimum of 2
    ("unet", 9),  # 4 + 4 + 1 padded
    ("unet", 3),
    ("vae_decoder", 3),
])
def test_calls_of_any_size_give_the_engine_rows_in_order(networks, fake, graph, rows):
    feeds = _feeds(graph, rows)
    out = networks._run(graph, feeds)
    [expected] = ft.reference(graph, feeds, fake.dims)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    _, high = networks.io[graph]["batch"]
    enqueues = [c for c in fake.calls if c[0] == "execute" and c[1] == graph]
    assert len(enqueues) == -(-rows // high)


def test_a_chunk_is_bound_as_a_fresh_aligned_copy_not_a_view(networks, fake):
    feeds = _feeds("subject_encoder", 6)
    networks._run("subject_encoder", feeds)
    context = networks.contexts["subject_encoder"]
    ids = feeds["input_ids"]
    views = {ids.data_ptr() + i * ids.stride(0) * ids.element_size() for i in range(len(ids))}
    assert context.addresses["input_ids"] % ft.ALIGNMENT == 0 and context.addresses["input_ids"] not in views


def test_a_refused_address_is_an_error_not_stale_rows(networks, fake, monkeypatch):
    context = networks.contexts["unet"]
    networks._run("unet", _feeds("unet", 4))  # every address bound once
    monkeypatch.setattr(type(context), "set_tensor_address", lambda self, name, ptr: name != "sample")
    with pytest.raises(BlipDiffError, match=r"unet: TensorRT refused the address 0x[0-9a-f]+ of sample"):
        networks._run("unet", _feeds("unet", 4, seed=1))


def test_an_unaligned_buffer_is_never_bound(networks, fake):
    raw = torch.empty(4 * 64 + 8, dtype=torch.uint8)
    offset = (8 - raw.data_ptr()) % ft.ALIGNMENT or ft.ALIGNMENT  # 8 bytes past an aligned address
    unaligned = raw[offset: offset + 4 * 8].view(torch.int64)
    assert unaligned.data_ptr() % ft.ALIGNMENT
    with pytest.raises(BlipDiffError, match="needs 256-byte alignment"):
        networks._bind("text_encoder", networks.contexts["text_encoder"], "input_ids", unaligned)
    aligned = backends.aligned_empty((3, 77), torch.int64, torch.device("cpu"))
    assert aligned.data_ptr() % ft.ALIGNMENT == 0 and aligned.is_contiguous() and aligned.shape == (3, 77)


def test_contexts_share_one_activation_memory_of_the_largest_engine(networks, fake):
    created = [c for c in fake.calls if c[0] == "create_execution_context"]
    assert sorted(c[1] for c in created) == sorted(trtx.GRAPHS)
    assert {c[2] for c in created} == {"USER_MANAGED"}
    need = {g: fake.device_memory[g] for g in trtx.GRAPHS}
    assert networks.device_memory.numel() == max(need.values())  # one block, not their sum
    ptrs = {ctx.memory[0] for ctx in networks.contexts.values()}
    assert ptrs == {networks.device_memory.data_ptr()}
    assert all(ctx.memory[1] == need[g] for g, ctx in networks.contexts.items())
    # and they run with it: a context without memory would fail its enqueue
    networks._run("vae_decoder", _feeds("vae_decoder", 2))


def test_enqueues_run_on_the_backend_stream_after_the_callers(networks, fake):
    networks._run("unet", _feeds("unet", 5))
    streams = {c[2] for c in fake.calls if c[0] == "execute"}
    assert streams == {networks.stream.cuda_stream} and 0 not in streams  # never the legacy default stream
    assert networks.stream.waited[-1] == fake.default_stream.cuda_stream


def test_non_finite_output_is_an_error_naming_the_graph(networks, fake):
    feeds = _feeds("unet", 3)
    feeds["sample"][1, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"TensorRT unet \(noise_pred\) gave NaN or infinity in 1 of 3 rows \(1\)"):
        networks._run("unet", feeds)


def test_an_input_outside_the_profile_is_named(networks, fake):
    feeds = _feeds("unet", 2)
    feeds = {**feeds, "sample": torch.randn(2, 4, 16, 16)}  # latents for 128 px, engines for 64
    with pytest.raises(BlipDiffError, match=r"input sample of shape \(2, 4, 16, 16\) is outside the engine's profile ci"):
        networks._run("unet", feeds)


def test_engines_from_another_build_are_not_run(fake, tmp_path, networks):
    # the engines are named for TensorRT 11.1.0 on sm90: another GPU finds none of its own
    with pytest.raises(BlipDiffError, match="built for TensorRT 11.1.0 on sm90, not for TensorRT 11.1.0 on sm89"):
        backends.select_engines(tmp_path / "tensorrt", "11.1.0.8", (8, 9))
    assert Path(networks.engine_dir) == tmp_path / "tensorrt"
