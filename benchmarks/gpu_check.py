"""The one command to run when a GPU is lent: `make gpu-check` (budget: 8 minutes on an H100).

1. `blipdiff doctor`: driver, torch CUDA, ONNX Runtime providers, TensorRT, compute capability;
2. every GPU test: `pytest -m gpu` (the CUDA and TensorRT tests; they skip without a GPU);
3. the GPU benchmark on the full-size UNet (released SD 1.5 architecture, random weights)
   at 512 px, batch 2 (one image with guidance), fp16:
   - torch fp16 eager (SDPA) and TensorRT (static512 profile, built here) ms/step, inputs
     prepared before timing, TensorRT on its own stream;
   - ONNX Runtime CUDA ms/step (the fp16 graph, IO binding);
   - 50-step PNDM loop + VAE decode seconds per image, torch and TensorRT UNet;
   - the TensorRT loop's image against torch fp16's from the same latents (max and mean
     absolute difference, 0..1 pixels);
   - engine build seconds, the engine's activation memory and torch's peak memory;
   - whether attention is in the fusable pattern in the exported graph, and how many of the
     engine's layers are fused attention kernels (the engine inspector's layer names);
   then one table of all of it.

    python benchmarks/gpu_check.py [--runs 20] [--skip-tests]

Without a GPU it says so and exits 0 after the doctor (nothing else can run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def step(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def run_doctor() -> int:
    step("blipdiff doctor")
    return subprocess.call([sys.executable, "-m", "components.cli", "doctor"], cwd=REPO)


def run_gpu_tests() -> str:
    step("GPU tests: pytest -m gpu")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    print(proc.stdout[-6000:], proc.stderr[-2000:], flush=True)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"{last.strip('= ')} (rc {proc.returncode}, {time.perf_counter() - start:.0f} s)"


def fused_attention_layers(engine_path: Path) -> str:
    """How many of the engine's layers are fused attention (the inspector's layer names)."""
    import tensorrt as trt

    from components.export import tensorrt as trtx

    engine = trtx.load_engine(engine_path)
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers = [str(layer if isinstance(layer, str) else layer.get("Name", "")) for layer in info.get("Layers", [])]
    fused = [name for name in layers if any(k in name.lower() for k in ("mha", "fmha", "attention", "flash"))]
    return f"{len(fused)} of {len(layers)} layers"


def gpu_bench(runs: int, rows: list[tuple[str, str]]) -> None:
    import export_bench as eb
    import onnx

    from components.export import onnx_export
    from components.export import tensorrt as trtx
    from components.model.full_size import build_full_size

    step(f"GPU benchmark: {torch.cuda.get_device_name()}, full-size UNet at 512 px, batch 2, fp16")
    with tempfile.TemporaryDirectory(prefix="blipdiff-gpu-check-") as tmp:
        folder = Path(tmp)
        nets = build_full_size("cpu")
        start = time.perf_counter()
        eb.export_full_unet(nets["unet"].eval(), folder, fp16=True)
        rows.append(("ONNX export + fp16 conversion (CPU)", f"{time.perf_counter() - start:.0f} s"))
        pattern = onnx_export.attention_pattern(onnx.load(str(folder / "unet.fp16.onnx"), load_external_data=False))
        rows.append(("attention in the fusable pattern (fp16 UNet graph)",
                     (f"{pattern['fusable']} of {pattern['softmax']} softmaxes, "
                      f"{pattern['softmax_with_casts']} with casts")))
        unet = nets["unet"].to("cuda", torch.float16).eval()
        vae = nets["vae"].to("cuda", torch.float16).eval()
        g = torch.Generator(device="cuda").manual_seed(0)
        sample = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16, generator=g)
        hidden = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16, generator=g)
        t = torch.tensor(999, device="cuda")

        def torch_unet(s, ts, h):
            return unet(s, ts, encoder_hidden_states=h).sample

        def loop_image(unet_fn) -> tuple[float, np.ndarray]:
            torch.manual_seed(1)
            eb.denoise_and_decode(unet_fn, vae, hidden, 2)  # warm-up
            torch.manual_seed(1)
            start = time.perf_counter()
            image = eb.denoise_and_decode(unet_fn, vae, hidden, eb.E2E_STEPS)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            return seconds, (image.float().clamp(-1, 1) / 2 + 0.5).cpu().numpy()

        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            ms_torch = eb.cuda_median_ms(lambda: torch_unet(sample, t, hidden), runs)
            rows.append(("torch fp16 eager (SDPA) UNet", f"{ms_torch:.2f} ms/step"))
            s_torch, img_torch = loop_image(torch_unet)
            rows.append((f"torch fp16: {eb.E2E_STEPS}-step loop + VAE decode", f"{s_torch:.2f} s/image"))
            rows.append(("torch peak memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"))
            try:
                built = trtx.build_engines(folder, folder / "engines", profile="static512", graphs=("unet",))[0]
                rows.append(("TensorRT UNet engine build (static512)",
                             f"{built['seconds']:.0f} s, {built['size'] / 2**20:.0f} MiB"))
                engine = eb.trt_unet(Path(built["path"]))
                engine.prepare(tuple(sample.shape))
                feeds = (sample.float(), t.float(), hidden.float())
                ms_trt = eb.cuda_median_ms(lambda: engine(*feeds), runs)
                rows.append(("TensorRT fp16 UNet", f"{ms_trt:.2f} ms/step ({ms_torch / ms_trt:.2f}x torch)"))
                rows.append(("TensorRT activation memory (UNet context)", f"{engine.device_memory / 2**30:.2f} GiB"))
                s_trt, img_trt = loop_image(lambda s, ts, h: engine(s.float(), ts.float(), h.float()))
                rows.append((f"TensorRT UNet: {eb.E2E_STEPS}-step loop + torch VAE", f"{s_trt:.2f} s/image"))
                diff = np.abs(img_trt - img_torch)
                rows.append(("TensorRT image vs torch fp16 (same latents)",
                             f"max {diff.max():.4f}, mean {diff.mean():.5f} (0..1 pixels)"))
                rows.append(("fused attention layers in the engine", fused_attention_layers(Path(built["path"]))))
            except Exception as exc:  # noqa: BLE001 - report and go on to ONNX Runtime
                rows.append(("TensorRT", f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
            try:
                ms_ort = ort_cuda_ms(folder, sample, t, hidden, runs)
                rows.append(("ONNX Runtime CUDA fp16 UNet (IO binding)", f"{ms_ort:.2f} ms/step"))
            except Exception as exc:  # noqa: BLE001
                rows.append(("ONNX Runtime CUDA", f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))


def ort_cuda_ms(folder: Path, sample, t, hidden, runs: int) -> float:
    """The fp16 UNet graph on ONNX Runtime's CUDA provider, inputs and output bound on the GPU."""
    import export_bench as eb
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "unet.fp16.onnx"), providers=["CUDAExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"ONNX Runtime runs on {session.get_providers()[0]}")
    feeds = {"sample": sample.float().contiguous(), "timestep": t.float().reshape(1).expand(2).contiguous(),
             "encoder_hidden_states": hidden.float().contiguous()}
    out = torch.empty(sample.shape, dtype=torch.float32, device="cuda")
    binding = session.io_binding()
    for name, x in feeds.items():
        binding.bind_input(name, "cuda", 0, np.float32, tuple(x.shape), x.data_ptr())
    binding.bind_output("noise_pred", "cuda", 0, np.float32, tuple(out.shape), out.data_ptr())
    torch.cuda.synchronize()
    return eb.cuda_median_ms(lambda: session.run_with_iobinding(binding), runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed UNet steps per median")
    parser.add_argument("--skip-tests", action="store_true", help="the benchmark only")
    args = parser.parse_args()
    start = time.perf_counter()
    rows: list[tuple[str, str]] = []
    doctor = run_doctor()
    rows.append(("blipdiff doctor", "ok" if doctor == 0 else f"FAILED (exit {doctor})"))
    if not torch.cuda.is_available():
        print("\nno CUDA GPU here: nothing else of the GPU check can run")
        return 0
    if not args.skip_tests:
        rows.append(("GPU tests (pytest -m gpu)", run_gpu_tests()))
    gpu_bench(args.runs, rows)
    rows.append(("total", f"{time.perf_counter() - start:.0f} s"))
    step(f"GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0 if all("FAILED" not in v for _, v in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
