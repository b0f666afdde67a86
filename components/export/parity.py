"""The exported graphs' parity with PyTorch under ONNX Runtime, and the gate on it.

Each graph runs on seeded random inputs (its spec's `sample_inputs`, at the spec's
`parity_cases`) against its spec's `reference`: PyTorch fp32 on the CPU with the bundle's own
modules, as the Python pipeline runs them. The fp32 graphs are gated on the spec's
`tolerance`, the fp16 ones on its `fp16_tolerance` where ONNX Runtime can run them (an fp16
graph it has no kernels for is recorded as not runnable).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from components.core.errors import BlipDiffError
from components.export.files import graph_bytes
from components.export.graphs import Dims, get_spec, sample_inputs
from components.export.onnx_export import EXPORTER
from components.model.blip_diffusion import BlipDiffusion

log = logging.getLogger(__name__)

PROVIDER = "CPUExecutionProvider"


def session(path: Path, provider: str = PROVIDER):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime-gpu without CUDA libraries: no warning per session
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # a check, not a benchmark
    return ort.InferenceSession(str(path), options, providers=[provider])


@torch.no_grad()
def reference(name: str, model: BlipDiffusion, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """PyTorch fp32 on the CPU, the bundle's own modules (as the Python pipeline runs them):
    every output of the graph."""
    out = get_spec(name, Dims.of(model).residuals).reference(model, inputs)
    return [t.float().numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]


def compare(name: str, sess, inputs: dict[str, torch.Tensor], expected: list[np.ndarray]) -> dict:
    """ONNX Runtime's outputs against PyTorch's: the largest difference over all outputs."""
    feeds = {k: v.numpy() for k, v in inputs.items()}
    outputs = sess.run(None, feeds)
    if len(outputs) != len(expected):
        raise BlipDiffError(f"{name}: ONNX Runtime gave {len(outputs)} outputs, PyTorch {len(expected)}")
    diffs = []
    for got, want in zip(outputs, expected):
        if got.shape != want.shape:
            raise BlipDiffError(f"{name}: ONNX Runtime gave shape {got.shape}, PyTorch {want.shape}")
        diffs.append(np.abs(got.astype(np.float64) - want.astype(np.float64)).ravel())
    diff = np.concatenate(diffs)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "shapes": {k: list(v.shape) for k, v in inputs.items()}}


def _row(name: str, folder: Path, description: dict, fp16: bool, provider: str, inputs: list, expected: list,
         tolerance: float) -> dict:
    """One graph file's parity row; an fp16 graph ONNX Runtime cannot run is recorded as such."""
    import onnxruntime as ort

    path = folder / f"{name}{'.fp16' if fp16 else ''}.onnx"
    row = {"file": path.name, "size_bytes": graph_bytes(folder, name, fp16), "opset": description["opset"],
           "exporter": EXPORTER, "onnxruntime": ort.__version__, "tolerance": tolerance}
    try:
        sess = session(path, provider)
        row["provider"] = sess.get_providers()[0]
        runs = [compare(name, sess, x, y) for x, y in zip(inputs, expected)]
    except Exception as exc:  # an op without a kernel for this provider
        if not fp16:
            raise BlipDiffError(f"{name}: ONNX Runtime could not run {path.name}: {exc}") from None
        row.update(provider=None, runnable=False, max_abs_diff=None, mean_abs_diff=None, passed=None,
                   error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return row
    row["max_abs_diff"] = float(np.max([r["max_abs_diff"] for r in runs]))  # NaN stays NaN
    row["mean_abs_diff"] = float(np.mean([r["mean_abs_diff"] for r in runs]))
    row["passed"] = None if tolerance is None else bool(row["max_abs_diff"] <= tolerance)  # NaN fails
    row["runnable"] = True
    row["cases"] = runs
    log.info("parity %s %s on %s: max abs diff %.3g (mean %.3g)%s", name, "fp16" if fp16 else "fp32",
             row["provider"], row["max_abs_diff"], row["mean_abs_diff"],
             "" if tolerance is None else f", tolerance {tolerance:g}")
    return row


def check_parity(model: BlipDiffusion, folder: Path, graphs: dict, batch: int = 3, seed: int = 0,
                 provider: str = PROVIDER) -> dict:
    """ONNX Runtime against PyTorch fp32 on the same seeded random inputs, per graph (fp16
    graphs too, reported without a gate). Returns the parity report; `gate` judges it."""
    dims = Dims.of(model)
    report = {}
    for i, name in enumerate(graphs):
        spec = get_spec(name, dims.residuals)
        cases = spec.parity_cases(dims, batch)
        generator = torch.Generator().manual_seed(seed + i)
        inputs = [sample_inputs(name, model, dims, b, generator, hw) for b, hw in cases]
        expected = [reference(name, model, x) for x in inputs]
        report[name] = {kind: _row(name, folder, graphs[name], kind == "fp16", provider, inputs, expected,
                                   spec.fp16_tolerance if kind == "fp16" else spec.tolerance)
                        for kind in ("fp32", "fp16") if kind == "fp32" or "fp16" in graphs[name]}
    return report


def gate(report: dict) -> None:
    """Raise naming every graph (fp32, and fp16 where ONNX Runtime runs it) whose difference
    from PyTorch passes its tolerance."""
    bad = [f"{name}{'' if kind == 'fp32' else ' (fp16)'}: max abs diff {row['max_abs_diff']:.3g} > "
           f"{row['tolerance']:g}"
           for name, e in report.items() for kind, row in e.items() if row.get("passed") is False]
    if bad:
        raise BlipDiffError("ONNX graphs differ from PyTorch (ONNX Runtime, CPU): " + "; ".join(bad))
