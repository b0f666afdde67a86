"""Benchmark of the exported ONNX graphs against PyTorch (CPU; TensorRT on a GPU).

Prints:
1. tiny preset (`build_tiny(0)`, saved with `layout.save`, exported as the export stage does:
   `export_all`, `check_parity` + `gate`, serving files, export.json, into temporary folders):
   one UNet step (batch 2 = one image with guidance, native latent size, same inputs) in ONNX
   Runtime (CPU provider, fp32 graph) and in PyTorch eager fp32, median of `--runs` after a
   warm-up, and their ratio; then images/s of a batch of 8 prompts (`--steps` PNDM steps,
   guidance 7.5) through `serving.generator.Generator.load(...).generate` per backend (torch,
   onnxruntime) and the largest pixel difference between the two backends' images;
2. `--full-size` (~16 GB RAM, several minutes): the released UNet architecture (random
   weights) exported alone with the stage's exporter settings (external data: it passes
   2 GB): export seconds, file sizes (fp32, and fp16 where the stage's conversion fits in
   memory), and one UNet step at 512 px, batch 2, ONNX Runtime CPU against PyTorch CPU
   (median of 2 after a warm-up);
3. on a CUDA machine only: the full-size UNet at 512 px, batch 2, in PyTorch fp16 eager and
   in a TensorRT fp16 engine (`components.export.tensorrt.build_engines` on the exported
   fp16 UNet), ms/step and a 50-step loop + VAE decode, with public anchors and the compute
   bound for comparison.

    python benchmarks/export_bench.py [--steps 20] [--runs 20] [--threads N] [--full-size]

`--threads` sets PyTorch's threads and ONNX Runtime's intra-op threads alike (the
generator's ONNX Runtime sessions are re-created with it). Another busy process slows
multi-threaded timings badly: the header prints the load average; `--threads 1` is steadier.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from components.core.config import NEGATIVE_PROMPT, ExportConfig
from components.core.io import write_json
from components.export import files as export_files
from components.export import onnx_export, parity
from components.export.fp16 import convert_fp16
from components.export.graphs import Dims, sample_inputs
from components.model import layout
from components.model.full_size import build_full_size, full_size_configs
from components.model.tiny.blip_diffusion import build_tiny
from components.stages import export as stage

PROMPTS = ["in the jungle", "in the snow", "on the beach", "on a cobblestone street",
           "on top of pink fabric", "on top of a wooden floor", "with a city in the background",
           "with a mountain in the background"]
GUIDANCE = 7.5
E2E_STEPS = 50
# Public anchors (quoted, not measured here): SD 1.5 UNet at 512 px with guidance on an H100.
ANCHORS = ("TensorRT demo (SD 1.5, fp16): ~12 ms/UNet step, ~0.6 s per 50-step image on an H100",
           "stable-fast (SD 1.5, fp16): 9.6 ms/UNet step")
STEP_FLOP = 1.607e12  # one guided UNet step (batch 2, 64x64 latents), benchmarks/eval_bench.py's count
H100_PEAK = 989e12  # dense fp16/bf16 tensor-core FLOP/s, H100 SXM


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(runs))


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def ort_session(path: Path, threads: int | None):
    """A CPU session of one graph; `threads` intra-op threads (None: ONNX Runtime's default,
    one per physical core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def step_ratio(label: str, sess, unet, inputs: dict[str, torch.Tensor], runs: int, warmup: int) -> None:
    """One UNet step in ONNX Runtime and in PyTorch on the same inputs; the outputs' difference."""
    feeds = {k: v.numpy() for k, v in inputs.items()}
    with torch.inference_mode():
        def run_torch():
            return unet(inputs["sample"], inputs["timestep"],
                        encoder_hidden_states=inputs["encoder_hidden_states"]).sample

        expected = run_torch().numpy()
        got = sess.run(None, feeds)[0]
        t_ort = median_time(lambda: sess.run(None, feeds), runs, warmup)
        t_torch = median_time(run_torch, runs, warmup)
    print(f"{label}: ORT provider that ran: {sess.get_providers()}")
    print(f"{label}: UNet step, ONNX Runtime CPU fp32: {t_ort * 1e3:.2f} ms (median of {runs})")
    print(f"{label}: UNet step, PyTorch eager CPU fp32: {t_torch * 1e3:.2f} ms (median of {runs})")
    print(f"{label}: ratio ORT/torch: {t_ort / t_torch:.2f}")
    print(f"{label}: max abs diff ORT vs torch output: {np.abs(got.astype(np.float64) - expected).max():.2e}")


# ---------------------------------------------------------------------- 1. tiny
def export_tiny(model, model_dir: Path, export_dir: Path) -> None:
    """The export stage's steps (stage.run without its params, DVC paths and MLflow)."""
    cfg = ExportConfig(model=str(model_dir))
    source, model_hash, _ = stage.model_source(cfg, "tiny", model_dir.parent)
    start = time.perf_counter()
    graphs = onnx_export.export_all(model, export_dir, cfg.opset, cfg.batch, cfg.fp16, "cpu", cfg.parity_seed)
    t_export = time.perf_counter() - start
    report = parity.check_parity(model, export_dir, graphs, batch=cfg.batch + 1, seed=cfg.parity_seed)
    parity.gate(report)
    files = stage.write_serving_files(model, export_dir)
    write_json(stage.manifest(model, cfg, source, model_hash, graphs, files), export_dir / stage.MANIFEST.name)
    print(f"tiny export (4 graphs, opset {cfg.opset}, batch {cfg.batch}, fp16 twins {cfg.fp16}): {t_export:.1f} s; "
          f"parity gate passed (unet fp32 max abs diff {report['unet']['fp32']['max_abs_diff']:.2e})")


def bench_tiny(args) -> None:
    from serving.generator import Generator

    model = build_tiny(0)
    dims = Dims.of(model)
    print(f"\n== tiny preset, {model.native_size} px (latents {dims.latent_size}x{dims.latent_size}) ==")
    with tempfile.TemporaryDirectory(prefix="blipdiff-export-bench-") as tmp:
        model_dir, export_dir = Path(tmp) / "model", Path(tmp) / "onnx"
        layout.save(model, model_dir)
        export_tiny(model, model_dir, export_dir)

        inputs = sample_inputs("unet", model, dims, 2, torch.Generator().manual_seed(0))
        step_ratio("tiny", ort_session(export_dir / "unet.onnx", args.threads), model.unet.eval(), inputs,
                   args.runs, warmup=5)

        pt = Generator.load(model_dir, backend="torch", device="cpu", dtype="fp32")
        ox = Generator.load(export_dir, backend="onnxruntime", providers=["CPUExecutionProvider"], dtype="fp32")
        if args.threads:  # the generator's sessions take ONNX Runtime's default threads: same as torch's
            for graph in ox.networks.sessions:
                ox.networks.sessions[graph] = ort_session(export_dir / f"{graph}.onnx", args.threads)
        print(f"generator backends: torch -> {pt.provider}; onnxruntime -> {ox.provider} "
              f"(sessions' providers {ox.networks.sessions['unet'].get_providers()})")
        rng = np.random.default_rng(0)
        refs = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(2)]
        embeds = pt.subject_embeddings(refs, "dog")  # the same subject embeddings for both backends
        kwargs = {"negative_prompt": NEGATIVE_PROMPT, "guidance_scale": GUIDANCE, "height": model.native_size,
                  "width": model.native_size}
        seeds = list(range(len(PROMPTS)))
        images = {}
        for gen in (pt, ox):
            gen.generate(embeds, PROMPTS[:2], "dog", [0, 1], num_inference_steps=2, **kwargs)  # warm up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                images[gen.backend] = gen.generate(embeds, PROMPTS, "dog", seeds, num_inference_steps=args.steps,
                                                   **kwargs)
                times.append(time.perf_counter() - start)
            t = statistics.median(times)
            print(f"generation, {gen.backend}: {len(PROMPTS) / t:.2f} images/s ({len(PROMPTS)} prompts, "
                  f"{args.steps} PNDM steps, guidance {GUIDANCE}, {t:.2f} s per batch, median of 3)")
        a, b = images["torch"], images["onnxruntime"]
        levels = np.abs(np.round(a * 255) - np.round(b * 255)).max()
        print(f"max pixel difference torch vs onnxruntime: {levels:.0f}/255 (float {np.abs(a - b).max():.2e})")


# ---------------------------------------------------------------------- 2. full size
def full_size_dims(unet) -> Dims:
    """`Dims.of` without a bundle: the released architecture's sizes (full_size_configs)."""
    cfg = full_size_configs()
    return Dims(
        image_size=cfg["qformer"]["vision_config"]["image_size"], num_query=cfg["qformer"]["num_query_tokens"],
        hidden=cfg["text_encoder"]["hidden_size"], text_length=cfg["text_encoder"]["max_position_embeddings"],
        latent_channels=int(unet.config.in_channels), latent_size=int(unet.config.sample_size),
        latent_multiple=2 ** sum(1 for b in unet.down_blocks if b.downsamplers is not None),
        vae_scale_factor=2 ** (len(cfg["vae"]["block_out_channels"]) - 1), ctx_begin_pos=2)


def unet_bundle(unet) -> types.SimpleNamespace:
    """What `export_graph("unet", ...)` reads of a bundle: the UNet (the unet spec's wrapper,
    sample inputs and output shape read nothing else)."""
    return types.SimpleNamespace(unet=unet)


def available_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def export_full_unet(unet, folder: Path, fp16: bool) -> Dims:
    """The full-size UNet alone, as the stage exports it (`export_graph`: its wrapper, plain
    attention, opset and batch of ExportConfig, external data past 2 GB); then its fp16 twin
    (`convert_fp16`) when memory allows."""
    cfg = ExportConfig()
    dims = full_size_dims(unet)
    holder = unet_bundle(unet)
    t = timed(lambda: onnx_export.export_graph("unet", holder, dims, folder, cfg.opset, cfg.batch,
                                               torch.device("cpu"), cfg.parity_seed))
    print(f"full-size UNet export (opset {cfg.opset}, batch {cfg.batch}, {onnx_export.EXPORTER}): {t:.1f} s")
    for p in export_files.graph_files(folder, "unet"):
        print(f"  {p.name}: {p.stat().st_size / 1e6:.1f} MB")
    print(f"  fp32 total: {export_files.graph_bytes(folder, 'unet') / 1e9:.3f} GB")
    if not fp16:
        return dims
    # the proto with its weights, the fp16 copy, the serialised bytes
    need = 3 * export_files.graph_bytes(folder, "unet")
    if available_bytes() < need:
        print(f"fp16 conversion skipped: {available_bytes() / 1e9:.1f} GB available, ~{need / 1e9:.1f} GB needed")
        return dims
    try:
        t = timed(lambda: convert_fp16("unet", folder))
    except MemoryError:
        print("fp16 conversion: out of memory")
        return dims
    print(f"full-size UNet fp16 conversion (stage's convert_fp16): {t:.1f} s")
    for p in export_files.graph_files(folder, "unet", fp16=True):
        print(f"  {p.name}: {p.stat().st_size / 1e6:.1f} MB")
    print(f"  fp16 total: {export_files.graph_bytes(folder, 'unet', fp16=True) / 1e9:.3f} GB")
    return dims


def bench_full_size(args, unet, dims: Dims, folder: Path) -> None:
    inputs = sample_inputs("unet", unet_bundle(unet), dims, 2, torch.Generator().manual_seed(0))
    print(f"full-size UNet step at {dims.latent_size * dims.vae_scale_factor} px, batch 2 (one image with guidance):")
    step_ratio("full size", ort_session(folder / "unet.onnx", args.threads), unet, inputs, runs=2, warmup=1)


# ---------------------------------------------------------------------- 3. GPU
def cuda_median_ms(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def trt_unet(engine_path: Path):
    """A callable running the UNet engine on fp16-castable CUDA tensors, as serving does: its
    own stream (never the legacy default one), fresh 256-byte-aligned input and output buffers
    made once per shape before anything is timed; a timed call copies into them and enqueues."""
    import tensorrt as trt

    from components.export import tensorrt as trtx
    from serving.backends import _torch_dtype, aligned_empty, device_memory_size

    engine = trtx.load_engine(engine_path)
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
    stream = torch.cuda.Stream()
    buffers: dict[tuple, dict[str, torch.Tensor]] = {}

    def prepare(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        if shape not in buffers:
            b = shape[0]
            bufs = {"sample": aligned_empty(shape, dtypes["sample"], torch.device("cuda")),
                    "timestep": aligned_empty((b,), dtypes["timestep"], torch.device("cuda")),
                    "encoder_hidden_states": aligned_empty((b, 77, 768), dtypes["encoder_hidden_states"],
                                                           torch.device("cuda")),
                    "noise_pred": aligned_empty(shape, dtypes["noise_pred"], torch.device("cuda"))}
            for name, x in bufs.items():
                if name != "noise_pred" and not context.set_input_shape(name, tuple(x.shape)):
                    raise RuntimeError(f"{name} {tuple(x.shape)} is outside the engine's profile")
                if not context.set_tensor_address(name, x.data_ptr()):
                    raise RuntimeError(f"TensorRT refused the address of {name}")
            buffers[shape] = bufs
        return buffers[shape]

    def run(sample, timestep, hidden):
        bufs = prepare(tuple(sample.shape))
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            bufs["sample"].copy_(sample)
            bufs["timestep"].copy_(timestep.reshape(-1).expand(len(sample)))
            bufs["encoder_hidden_states"].copy_(hidden)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        torch.cuda.current_stream().wait_stream(stream)
        return bufs["noise_pred"]

    run.prepare, run.device_memory = prepare, device_memory_size(engine)
    return run


def denoise_and_decode(unet_fn, vae, hidden: torch.Tensor, steps: int) -> torch.Tensor:
    """The sampler's loop at 512 px for one image (PNDM, guidance, batch 2), then the VAE decode;
    text encoding left out (random embeddings)."""
    from diffusers import PNDMScheduler

    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                          skip_prk_steps=True, steps_offset=1)
    sched.set_timesteps(steps, device="cuda")
    latents = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16) * sched.init_noise_sigma
    for t in sched.timesteps:
        noise = unet_fn(sched.scale_model_input(torch.cat([latents] * 2), t), t, hidden).to(latents.dtype)
        uncond, cond = noise.chunk(2)
        latents = sched.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
    return vae.decode(latents / vae.config.scaling_factor).sample


def bench_gpu(args, nets: dict, folder: Path) -> None:
    print(f"\n== GPU: {torch.cuda.get_device_name()}, full-size UNet at 512 px, batch 2, fp16 ==")
    unet = nets["unet"].to("cuda", torch.float16).eval()
    vae = nets["vae"].to("cuda", torch.float16).eval()
    sample = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    hidden = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    t = torch.tensor(999, device="cuda")

    def torch_unet(s, ts, h):
        return unet(s, ts, encoder_hidden_states=h).sample

    with torch.inference_mode():
        ms = cuda_median_ms(lambda: torch_unet(sample, t, hidden), args.runs)
        print(f"torch fp16 eager (SDPA): {ms:.2f} ms/step (median of {args.runs})")
        denoise_and_decode(torch_unet, vae, hidden, 2)  # warm up the loop and the VAE
        e2e = timed(lambda: (denoise_and_decode(torch_unet, vae, hidden, E2E_STEPS), torch.cuda.synchronize()))
        print(f"torch fp16 eager: {E2E_STEPS}-step loop + VAE decode: {e2e:.2f} s/image")
        try:
            from components.export import tensorrt as trtx

            if not (folder / "unet.fp16.onnx").is_file():
                raise RuntimeError(f"no {folder / 'unet.fp16.onnx'} (the fp16 conversion was skipped)")
            built = trtx.build_engines(folder, folder / "engines", profile="static512", graphs=("unet",))[0]
            print(f"TensorRT engine build: {built['seconds']:.1f} s ({built['size'] / 2**20:.0f} MiB)")
            engine = trt_unet(Path(built["path"]))
            engine.prepare(tuple(sample.shape))  # buffers and bindings made before the timing
            feeds = (sample.float(), t.float(), hidden.float())  # the engine's fp32 edges, cast before timing
            ms_trt = cuda_median_ms(lambda: engine(*feeds), args.runs)
            print(f"TensorRT fp16: {ms_trt:.2f} ms/step (median of {args.runs}); torch/TensorRT {ms / ms_trt:.2f}x")
            denoise_and_decode(engine, vae, hidden, 2)  # warm up
            e2e = timed(lambda: (denoise_and_decode(engine, vae, hidden, E2E_STEPS), torch.cuda.synchronize()))
            print(f"TensorRT fp16 UNet (+ torch fp16 VAE): {E2E_STEPS}-step loop + VAE decode: {e2e:.2f} s/image")
        except Exception as exc:  # noqa: BLE001 - no TensorRT, or a build failure: report and go on
            print(f"TensorRT skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    for anchor in ANCHORS:
        print(f"public anchor: {anchor}")
    print(f"physical limit: {STEP_FLOP / 1e12:.3f} TFLOP per guided step / {H100_PEAK / 1e12:.0f} TFLOP/s = "
          f"{STEP_FLOP / H100_PEAK * 1e3:.1f} ms/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="PNDM steps of the tiny generation batch")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per UNet step median (tiny, GPU)")
    parser.add_argument("--full-size", action="store_true", help="export the full-size UNet (~16 GB RAM, minutes)")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads")
    args = parser.parse_args()
    import onnxruntime as ort

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}; torch threads {torch.get_num_threads()}, "
          f"ORT intra-op threads {args.threads or 'default (one per physical core)'}; {os.cpu_count()} cores, "
          f"load average {load_average()} at start")
    start = time.perf_counter()
    bench_tiny(args)

    gpu = torch.cuda.is_available()
    if args.full_size or gpu:
        with tempfile.TemporaryDirectory(prefix="blipdiff-export-bench-full-") as tmp:
            folder = Path(tmp)
            nets = build_full_size("cpu")
            unet = nets["unet"].eval()
            print("\n== full-size UNet (random weights), CPU ==")
            dims = export_full_unet(unet, folder, fp16=True)
            if args.full_size:
                bench_full_size(args, unet, dims, folder)
            if gpu:
                bench_gpu(args, nets, folder)
    else:
        print("\nfull-size UNet: skipped (--full-size); GPU: no CUDA device")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average {load_average()} at the end")


if __name__ == "__main__":
    main()
