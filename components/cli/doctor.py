"""`blipdiff doctor`: can every layer of this install use the machine's NVIDIA GPU?

    blipdiff doctor          # one table: NVIDIA driver, GPUs, torch, cuDNN, ONNX Runtime, TensorRT
    blipdiff doctor --json   # the same checks as JSON

Each check is ok, warn, FAIL or n/a, with a one-line detail. Without an NVIDIA GPU (no driver,
or no GPU device visible) the install is CPU-only: the GPU rows are n/a and the exit status is
0. With one, every layer must reach it: driver R580 or newer (CUDA 13), torch's CUDA build
seeing the GPU, cuDNN 9, an ONNX Runtime session that really runs on CUDA (a probe of a tiny
in-memory graph: onnxruntime-gpu lists CUDA even where it cannot load it), TensorRT importing.
A failed check exits with status 2 and one line naming the failures; `make setup-gpu` installs
the GPU stack (docs/serving.md#dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.core.errors import BlipDiffError

OK, WARN, FAIL, NA = "ok", "warn", "FAIL", "n/a"
CHECKS = ("NVIDIA driver", "GPUs", "torch", "cuDNN", "ONNX Runtime", "TensorRT")

MIN_DRIVER = 580  # R580: the first driver branch for CUDA 13.0
MIN_CC = (7, 5)  # CUDA 13 dropped Maxwell, Pascal and Volta: Turing (sm75) and newer
CUDA_MAJOR = 13  # onnxruntime-gpu 1.31 and tensorrt-cu13 are built for CUDA 13
TENSORRT_MAJOR = 10  # onnxruntime-gpu 1.31's TensorRT provider links libnvinfer.so.10
FIX = "make setup-gpu (docs/serving.md#dependencies)"
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"

NVIDIA_SMI_TIMEOUT_S = 15
PROC_DRIVER = Path("/proc/driver/nvidia")
DEV = Path("/dev")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the checks as JSON instead of a table")


# ---------------------------------------------------------------- what the probes found
@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int] | None = None


@dataclass(frozen=True)
class Driver:
    """The NVIDIA driver: `version` None when there is none; `gpus` those it shows here."""

    version: str | None = None
    gpus: tuple[Gpu, ...] = ()
    source: str = ""  # "nvidia-smi" or the /proc file it was read from
    note: str = ""  # why nvidia-smi gave nothing, where it exists

    @property
    def present(self) -> bool:
        """A GPU is present: the driver is loaded and shows at least one GPU here."""
        return self.version is not None and bool(self.gpus)


@dataclass(frozen=True)
class TorchInfo:
    version: str = ""
    cuda: str | None = None  # torch.version.cuda: None for the CPU build
    available: bool = False  # torch.cuda.is_available()
    why_unavailable: str = ""  # torch.cuda.init()'s error, for a CUDA build that sees no GPU
    cudnn: int | None = None  # torch.backends.cudnn.version()
    device: dict[str, Any] | None = None  # components.export.tensorrt.device_info() when available
    error: str = ""  # `import torch` failed


@dataclass(frozen=True)
class OrtInfo:
    version: str = ""
    available: tuple[str, ...] = ()  # ort.get_available_providers()
    requested: tuple[str, ...] = ()
    active: tuple[str, ...] = ()  # what the probe session really runs on
    missing: tuple[str, ...] = ()  # CUDA libraries the loader cannot find (when CUDA did not run)
    cpu_package: bool = False  # the CPU package `onnxruntime` is installed (it hides the GPU providers)
    error: str = ""


@dataclass(frozen=True)
class TrtInfo:
    installed: str | None = None  # the tensorrt distribution's version
    usable: bool = False
    detail: str = ""  # tensorrt_status()'s what or why not


@dataclass(frozen=True)
class Check:
    check: str
    status: str
    detail: str


@dataclass
class Report:
    gpu: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def as_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "ok": not self.failed, "checks": [asdict(c) for c in self.checks]}


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, BaseException):
        first = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return first[:limit]


# ---------------------------------------------------------------- probes
def parse_nvidia_smi(text: str, compute_cap: bool = True) -> tuple[str | None, tuple[Gpu, ...]]:
    """`nvidia-smi --query-gpu=driver_version,name[,compute_cap] --format=csv,noheader` output:
    (driver version, GPUs). A name may hold commas: the driver is the first field, the
    compute capability ("9.0"; "[N/A]" where unknown) the last."""
    version, gpus = None, []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < (3 if compute_cap else 2) or not re.fullmatch(r"\d+(\.\d+)+", parts[0]):
            continue
        version = version or parts[0]
        cc = None
        if compute_cap:
            m = re.fullmatch(r"(\d+)\.(\d+)", parts.pop())
            cc = (int(m[1]), int(m[2])) if m else None
        gpus.append(Gpu(", ".join(parts[1:]), cc))
    return version, tuple(gpus)


def parse_proc_version(text: str) -> str | None:
    """The version in /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX [Open ]Kernel
    Module [for x86_64]  580.65.06  ...")."""
    m = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\b", text)
    return m[1] if m else None


def _nvidia_smi(smi: str, fields: str) -> subprocess.CompletedProcess:
    return subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader"], check=False, capture_output=True,
                          text=True, timeout=NVIDIA_SMI_TIMEOUT_S)


def _proc_driver(note: str) -> Driver:
    """The driver from /proc/driver/nvidia, its GPUs counted only when a device node
    (/dev/nvidia0...) is visible: the /proc files show through into containers given no GPU."""
    try:
        version = parse_proc_version((PROC_DRIVER / "version").read_text())
    except OSError:
        return Driver(note=note)
    gpus = []
    if any(DEV.glob("nvidia[0-9]*")):
        for info in sorted(PROC_DRIVER.glob("gpus/*/information")):
            try:
                model = re.search(r"^Model:\s*(.+)$", info.read_text(), re.MULTILINE)
            except OSError:
                continue
            gpus.append(Gpu(model[1].strip() if model else info.parent.name))
    return Driver(version, tuple(gpus), str(PROC_DRIVER / "version"), note)


def probe_driver() -> Driver:
    """nvidia-smi first (version, GPU names, compute capabilities), else /proc/driver/nvidia."""
    smi = shutil.which("nvidia-smi")
    note = ""
    if smi:
        try:
            proc, compute_cap = _nvidia_smi(smi, "driver_version,name,compute_cap"), True
            if proc.returncode != 0:  # nvidia-smi older than the compute_cap field (R510)
                proc, compute_cap = _nvidia_smi(smi, "driver_version,name"), False
            version, gpus = parse_nvidia_smi(proc.stdout, compute_cap) if proc.returncode == 0 else (None, ())
            if version:
                return Driver(version, gpus, "nvidia-smi")
            note = "nvidia-smi failed: " + _one_line(proc.stdout + proc.stderr or f"exit status {proc.returncode}")
        except (OSError, subprocess.SubprocessError) as exc:
            note = "nvidia-smi failed: " + _one_line(exc)
    return _proc_driver(note)


def probe_torch() -> TorchInfo:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 -- a broken install (missing libraries, a bad wheel) is a row
        return TorchInfo(error=_one_line(exc))
    available = torch.cuda.is_available()
    why = ""
    if torch.version.cuda and not available:
        try:
            torch.cuda.init()
        except Exception as exc:  # noqa: BLE001 -- its message says why torch sees no GPU
            why = _one_line(exc)
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001 -- a cuDNN that cannot load is reported as none
        cudnn = None
    device = None
    if available:
        from components.export.tensorrt import device_info

        device = device_info()
    return TorchInfo(torch.__version__, torch.version.cuda, available, why, cudnn, device)


def _probe_model() -> bytes:
    """A one-node graph (Relu on a float vector), built in memory."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "doctor_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    return model.SerializeToString()


def _installed(*names: str) -> str | None:
    """The version of the first of these distributions that is installed."""
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def probe_ort(cuda: bool) -> OrtInfo:
    """The providers a real session runs on: CUDA first when `cuda` (a GPU is present) and
    onnxruntime offers it, else the CPU alone."""
    cpu_package = _installed("onnxruntime") is not None
    try:
        import onnxruntime as ort
    except Exception as exc:  # noqa: BLE001 -- a broken install is a row, not a traceback
        return OrtInfo(cpu_package=cpu_package, error=_one_line(exc))
    available = tuple(ort.get_available_providers())
    requested = (CUDA, CPU) if cuda and CUDA in available else (CPU,)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # A CUDA provider that cannot load logs an error and a warning through the default logger;
    # this check reports it in its own row. 2 (warning) is onnxruntime's default severity.
    ort.set_default_logger_severity(4)
    try:
        active = tuple(ort.InferenceSession(_probe_model(), options, providers=list(requested)).get_providers())
    except Exception as exc:  # noqa: BLE001 -- whatever the session raises is the detail
        return OrtInfo(ort.__version__, available, requested, cpu_package=cpu_package,
                       error=f"a session on {', '.join(requested)} failed: {_one_line(exc)}")
    finally:
        ort.set_default_logger_severity(2)
    missing: tuple[str, ...] = ()
    if cuda and CUDA not in active:
        from serving import backends

        missing = tuple(backends.missing_cuda_libraries())
    return OrtInfo(ort.__version__, available, requested, active, missing, cpu_package)


def probe_tensorrt() -> TrtInfo:
    from components.export.tensorrt import tensorrt_status

    usable, detail = tensorrt_status()
    return TrtInfo(_installed("tensorrt-cu13", "tensorrt", "tensorrt-cu12"), usable, detail)


# ---------------------------------------------------------------- checks
def _major(version: str | None) -> int | None:
    m = re.match(r"\d+", version or "")
    return int(m[0]) if m else None


def cudnn_version(v: int) -> str:
    """torch.backends.cudnn.version(): 92000 -> '9.20.0' (cuDNN 9: major*10000 + minor*100 +
    patch), 8907 -> '8.9.7' (cuDNN 8: major*1000 + minor*100 + patch)."""
    if v >= 10000:
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def _sm(cc: tuple[int, int] | None) -> str:
    from components.export.tensorrt import sm_tag

    return sm_tag(cc) if cc else "compute capability unknown"


def check_driver(d: Driver) -> Check:
    note = f" ({d.note})" if d.note else ""
    if d.version is None:
        return Check("NVIDIA driver", NA, "no NVIDIA GPU; CPU-only install" + note)
    if not d.gpus:
        return Check("NVIDIA driver", WARN, f"{d.version} is loaded but no GPU device is visible here; "
                                            "CPU-only install" + note)
    major = _major(d.version)
    if major is None or major < MIN_DRIVER:
        return Check("NVIDIA driver", FAIL, f"{d.version}: CUDA 13 needs driver R{MIN_DRIVER} or newer; "
                                            "update the NVIDIA driver")
    return Check("NVIDIA driver", OK, f"{d.version} (R{MIN_DRIVER}+, CUDA 13), from {d.source}")


def check_gpus(d: Driver, t: TorchInfo) -> Check:
    if not d.present:
        return Check("GPUs", NA, "none")
    gpus = []
    for g in d.gpus:  # the compute capability from torch where nvidia-smi did not give it
        if g.compute_capability is None and t.device and t.device.get("gpu_name") == g.name:
            g = Gpu(g.name, tuple(t.device["compute_capability"]))
        gpus.append(g)
    detail = "; ".join(f"{g.name} ({_sm(g.compute_capability)})" for g in gpus)
    old = [g for g in gpus if g.compute_capability and tuple(g.compute_capability) < MIN_CC]
    if old:
        return Check("GPUs", FAIL, f"{detail}: CUDA 13 needs compute capability {MIN_CC[0]}.{MIN_CC[1]}+ "
                                   f"({_sm(MIN_CC)}, Turing) or newer")
    return Check("GPUs", OK, detail)


def check_torch(gpu: bool, t: TorchInfo) -> Check:
    if t.error:
        return Check("torch", FAIL, f"import torch failed: {t.error}")
    build = f"CUDA {t.cuda} build" if t.cuda else "CPU build"
    if not gpu:
        return Check("torch", OK, f"{t.version}, {build}; no GPU to use")
    if not t.cuda:
        return Check("torch", FAIL, f"{t.version} is the CPU build: install the CUDA {CUDA_MAJOR} build with {FIX}")
    if not t.available:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return Check("torch", FAIL, f"{t.version} ({build}) sees no GPU: {t.why_unavailable or 'torch.cuda.is_available() is False'}"
                                    f"{hint}")
    on = f"on {t.device['gpu_name']} ({_sm(tuple(t.device['compute_capability']))})" if t.device else "sees the GPU"
    if _major(t.cuda) != CUDA_MAJOR:
        return Check("torch", WARN, f"{t.version}, {build} {on}; onnxruntime-gpu and TensorRT use CUDA {CUDA_MAJOR}: "
                                    f"two CUDA runtimes in one process; {FIX}")
    return Check("torch", OK, f"{t.version}, {build}, {on}")


def check_cudnn(gpu: bool, t: TorchInfo) -> Check:
    have = f"cuDNN {cudnn_version(t.cudnn)} (torch)" if t.cudnn else None
    if not gpu:
        return Check("cuDNN", NA, have + "; no GPU to use" if have else "torch has no cuDNN (CPU build)")
    if t.error:
        return Check("cuDNN", FAIL, "unknown: import torch failed")
    if not t.cudnn:
        return Check("cuDNN", FAIL, f"torch {t.version} has no cuDNN ({'CPU build' if not t.cuda else 'not loadable'}); "
                                    f"{FIX}")
    if t.cudnn < 90000:
        return Check("cuDNN", FAIL, f"{have}: onnxruntime-gpu 1.31 needs cuDNN 9; {FIX}")
    return Check("cuDNN", OK, have)


def check_ort(gpu: bool, o: OrtInfo) -> Check:
    shadow = ("the CPU package `onnxruntime` is installed and hides onnxruntime-gpu's providers: "
              "pip uninstall -y onnxruntime onnxruntime-gpu, then make setup (or setup-gpu)")
    if o.error:
        return Check("ONNX Runtime", FAIL, f"{o.version + ': ' if o.version else ''}{o.error}")
    runs = f"{o.version}, a session runs on {', '.join(o.active)}"
    if not gpu:
        return Check("ONNX Runtime", OK, f"{runs}; no GPU to use")
    if o.cpu_package and CUDA not in o.active:
        return Check("ONNX Runtime", FAIL, f"{o.version}: {shadow}")
    if CUDA not in o.available:
        return Check("ONNX Runtime", FAIL, f"{o.version} has no {CUDA} (available: {', '.join(o.available)}); "
                                           f"install onnxruntime-gpu: {FIX}")
    if CUDA not in o.active:
        why = (f"it cannot load {', '.join(o.missing)}" if o.missing else
               "its CUDA libraries load, so see ONNX Runtime's log (driver, GPU visibility)")
        return Check("ONNX Runtime", FAIL, f"{o.version} was asked for {CUDA} but runs on {o.active[0]}: {why}; {FIX}")
    return Check("ONNX Runtime", OK, runs)


def check_tensorrt(gpu: bool, r: TrtInfo, t: TorchInfo) -> Check:
    installed = f"tensorrt {r.installed}" if r.installed else "tensorrt not installed (the gpu extra)"
    if not gpu:
        return Check("TensorRT", NA, f"{installed}; no GPU to use")
    if not r.usable:
        # engines are built and bound through torch's CUDA: its row says why it sees no GPU
        fix = "see the torch row" if not t.available else FIX
        return Check("TensorRT", FAIL, f"cannot build or run engines: {r.detail}; {fix}")
    if r.installed and _major(r.installed) != TENSORRT_MAJOR:
        return Check("TensorRT", WARN, f"{r.detail}; onnxruntime-gpu 1.31's TensorRT provider needs TensorRT "
                                       f"{TENSORRT_MAJOR} (the gpu extra pins tensorrt-cu13 10.16.1.11)")
    return Check("TensorRT", OK, r.detail)


def diagnose(driver: Driver, torch_info: TorchInfo, ort_info: OrtInfo, trt_info: TrtInfo) -> Report:
    gpu = driver.present
    return Report(gpu, [
        check_driver(driver),
        check_gpus(driver, torch_info),
        check_torch(gpu, torch_info),
        check_cudnn(gpu, torch_info),
        check_ort(gpu, ort_info),
        check_tensorrt(gpu, trt_info, torch_info),
    ])


def collect() -> Report:
    """Probe this machine. torch first: its CUDA libraries, once loaded, serve ONNX Runtime too."""
    driver = probe_driver()
    torch_info = probe_torch()
    return diagnose(driver, torch_info, probe_ort(cuda=driver.present), probe_tensorrt())


def format_table(report: Report) -> str:
    rows = [("check", "status", "detail")] + [(c.check, c.status, c.detail) for c in report.checks]
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 6}")
    return "\n".join(lines)


def summary(report: Report) -> str:
    failed = report.failed
    if failed:
        names = ", ".join(c.check for c in failed)
        if report.gpu:
            return f"an NVIDIA GPU is present but not every layer can use it; failed: {names}; GPU install: {FIX}"
        return f"failed: {names}"
    if report.gpu:
        return "every layer can use the GPU"
    return "no NVIDIA GPU; CPU-only install"


def run(args: argparse.Namespace) -> Report:
    report = collect()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_table(report))
    if report.failed:
        raise BlipDiffError(summary(report))
    if not args.json:
        print(f"\n{summary(report)}")
    return report
