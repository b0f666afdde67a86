"""`blipdiff doctor`: the real command on this (CPU) machine, then GPU machines made of stand-in
probes (driver, torch, ONNX Runtime, TensorRT), the ONNX Runtime probe against a session that
falls back to the CPU, and the driver probe against a stand-in `nvidia-smi`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

from components.cli import doctor, main
from components.cli.doctor import CPU, CUDA, FAIL, NA, OK, WARN

REPO = Path(__file__).resolve().parents[1]
TRT_EP = "TensorrtExecutionProvider"
H100 = "NVIDIA H100 80GB HBM3"

REAL_PROBE_ORT = doctor.probe_ort  # before the `machine` fixture replaces it

GOOD_DRIVER = doctor.Driver("580.65.06", (doctor.Gpu(H100, (9, 0)),), "nvidia-smi")
GOOD_TORCH = doctor.TorchInfo("2.13.0+cu130", "13.0", True, cudnn=92000,
                              device={"compute_capability": (9, 0), "gpu_name": H100, "cuda_version": "13.0"})
CPU_TORCH = doctor.TorchInfo("2.13.0+cpu", None, False)
GOOD_ORT = doctor.OrtInfo("1.31.1", (TRT_EP, CUDA, CPU), (CUDA, CPU), (CUDA, CPU))
GOOD_TRT = doctor.TrtInfo("10.16.1.11", True, f"TensorRT 10.16.1.11 on {H100} (sm90)")


def rows(out: str) -> dict[str, tuple[str, str]]:
    """The table's rows: check -> (status, detail)."""
    lines = out.splitlines()
    assert re.match(r"check\s+status\s+detail$", lines[0]), out
    table = {}
    for line in lines[2:]:
        if not line.strip():
            break
        name, status, detail = re.split(r"\s{2,}", line, maxsplit=2)
        table[name] = (status, detail)
    assert list(table) == list(doctor.CHECKS), out
    return table


def run_doctor(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["doctor", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def machine(monkeypatch):
    """A GPU machine where every layer works; a test replaces what it breaks. Records the
    `cuda` argument the ONNX Runtime probe was called with."""
    state = {"driver": GOOD_DRIVER, "torch": GOOD_TORCH, "ort": GOOD_ORT, "trt": GOOD_TRT, "ort_cuda": []}

    def probe_ort(cuda):
        state["ort_cuda"].append(cuda)
        return state["ort"]

    monkeypatch.setattr(doctor, "probe_driver", lambda: state["driver"])
    monkeypatch.setattr(doctor, "probe_torch", lambda: state["torch"])
    monkeypatch.setattr(doctor, "probe_ort", probe_ort)
    monkeypatch.setattr(doctor, "probe_tensorrt", lambda: state["trt"])
    return state


def _cpu_only_here():
    if doctor.probe_driver().present:
        pytest.skip("an NVIDIA GPU is present here: the CPU-only expectations do not apply")


# ---------------------------------------------------------------- the real command
def test_real_command_on_this_cpu_machine_exits_0_with_the_table():
    _cpu_only_here()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "components.cli", "doctor"], check=False, cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    assert table["NVIDIA driver"][0] == NA and table["NVIDIA driver"][1].startswith("no NVIDIA GPU; CPU-only install")
    for gpu_row in ("GPUs", "cuDNN", "TensorRT"):
        assert table[gpu_row][0] == NA, table
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    assert table["torch"] == (OK, f"{torch.__version__}, {build}; no GPU to use")
    assert table["ONNX Runtime"][0] == OK and "runs on CPUExecutionProvider" in table["ONNX Runtime"][1]
    assert proc.stdout.rstrip().endswith("no NVIDIA GPU; CPU-only install")
    assert proc.stderr == ""  # no ONNX Runtime log lines, no warnings
    assert seconds < 30, f"blipdiff doctor took {seconds:.1f} s"  # ~1 s here; a hang (nvidia-smi) shows


def test_json_lists_every_check(capsys):
    _cpu_only_here()
    rc, out, _ = run_doctor(capsys, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["gpu"] is False and report["ok"] is True
    assert [c["check"] for c in report["checks"]] == list(doctor.CHECKS)
    assert all(c["status"] in (OK, WARN, FAIL, NA) and c["detail"] for c in report["checks"])


def test_json_of_a_failing_gpu_machine_is_still_json_and_exits_nonzero(machine, capsys):
    machine["torch"] = CPU_TORCH
    rc, out, err = run_doctor(capsys, "--json")
    assert rc == 2
    report = json.loads(out)  # stdout is the JSON alone; the error line goes to stderr
    assert report["gpu"] is True and report["ok"] is False
    assert {c["check"]: c["status"] for c in report["checks"]}["torch"] == FAIL
    assert err.startswith("blipdiff doctor: error:")


# ---------------------------------------------------------------- GPU machines (stand-in probes)
def test_everything_fine_exits_0(machine, capsys):
    rc, out, err = run_doctor(capsys)
    assert rc == 0, out + err
    table = rows(out)
    assert {status for status, _ in table.values()} == {OK}, table
    assert table["GPUs"][1] == f"{H100} (sm90)"
    assert table["cuDNN"][1] == "cuDNN 9.20.0 (torch)"
    assert machine["ort_cuda"] == [True]  # the session probe asked for CUDA
    assert out.rstrip().endswith("every layer can use the GPU")


def test_gpu_with_the_cpu_torch_build_fails_naming_the_build_and_the_fix(machine, capsys):
    machine["torch"] = CPU_TORCH
    machine["trt"] = doctor.TrtInfo("10.16.1.11", False, "torch sees no CUDA GPU")
    rc, out, err = run_doctor(capsys)
    assert rc == 2
    table = rows(out)
    status, detail = table["torch"]
    assert status == FAIL
    assert "2.13.0+cpu is the CPU build" in detail
    assert "make setup-gpu" in detail and "docs/serving.md#dependencies" in detail
    assert table["cuDNN"][0] == FAIL and "CPU build" in table["cuDNN"][1]
    assert table["TensorRT"] == (FAIL, "cannot build or run engines: torch sees no CUDA GPU; see the torch row")
    assert table["ONNX Runtime"][0] == OK  # only what is broken fails
    assert err.strip().splitlines() == [(
        "blipdiff doctor: error: an NVIDIA GPU is present but not every layer can use it; failed: torch, cuDNN, "
        "TensorRT; GPU install: make setup-gpu (docs/serving.md#dependencies)")]


@pytest.mark.parametrize("version, status", [("575.57.08", FAIL), ("470.256.02", FAIL), ("580.65.06", OK),
                                             ("595.12", OK)])
def test_driver_older_than_r580_fails(machine, capsys, version, status):
    machine["driver"] = doctor.Driver(version, GOOD_DRIVER.gpus, "nvidia-smi")
    rc, out, _ = run_doctor(capsys)
    table = rows(out)
    assert table["NVIDIA driver"][0] == status
    assert "R580" in table["NVIDIA driver"][1]
    assert rc == (2 if status == FAIL else 0)
    assert [name for name, (s, _) in table.items() if s != OK] == (["NVIDIA driver"] if status == FAIL else [])


def test_gpu_older_than_turing_fails(machine, capsys):
    machine["driver"] = doctor.Driver("580.65.06", (doctor.Gpu("Tesla V100-SXM2-16GB", (7, 0)),), "nvidia-smi")
    rc, out, _ = run_doctor(capsys)
    assert rc == 2
    assert rows(out)["GPUs"] == (FAIL, ("Tesla V100-SXM2-16GB (sm70): CUDA 13 needs compute capability 7.5+ "
                                        "(sm75, Turing) or newer"))


def test_torch_cuda_build_that_sees_no_gpu_fails_with_the_reason(machine, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    machine["torch"] = doctor.TorchInfo("2.13.0", "13.0", False, "RuntimeError: No CUDA GPUs are available",
                                        cudnn=92000)
    rc, out, _ = run_doctor(capsys)
    assert rc == 2
    assert rows(out)["torch"] == (FAIL, ("2.13.0 (CUDA 13.0 build) sees no GPU: RuntimeError: No CUDA GPUs are "
                                         "available (CUDA_VISIBLE_DEVICES='')"))


def test_ort_with_the_cpu_package_beside_it_fails(machine, capsys):
    machine["ort"] = doctor.OrtInfo("1.31.1", (CPU,), (CPU,), (CPU,), cpu_package=True)
    rc, out, _ = run_doctor(capsys)
    assert rc == 2
    status, detail = rows(out)["ONNX Runtime"]
    assert status == FAIL and "the CPU package `onnxruntime` is installed" in detail


# ---------------------------------------------------------------- the ONNX Runtime probe
class _CpuFallbackSession:
    """onnxruntime-gpu where the CUDA provider cannot load: a CPU session, whatever was asked."""

    asked: ClassVar[list[list[str]]] = []

    def __init__(self, model, options, providers):
        assert isinstance(model, bytes) and model  # the in-memory probe graph
        _CpuFallbackSession.asked.append(list(providers))

    def get_providers(self):
        return [CPU]


def test_ort_cuda_inactive_fails_naming_the_missing_libraries(machine, capsys, monkeypatch):
    import onnxruntime

    from serving import backends

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [TRT_EP, CUDA, CPU])
    monkeypatch.setattr(onnxruntime, "InferenceSession", _CpuFallbackSession)
    monkeypatch.setattr(backends, "missing_cuda_libraries", lambda: ["libcudnn.so.9", "libcufft.so.12"])
    _CpuFallbackSession.asked.clear()
    info = REAL_PROBE_ORT(cuda=True)
    assert _CpuFallbackSession.asked == [[CUDA, CPU]]
    assert info.active == (CPU,) and info.missing == ("libcudnn.so.9", "libcufft.so.12")
    machine["ort"] = info
    rc, out, _ = run_doctor(capsys)
    assert rc == 2
    status, detail = rows(out)["ONNX Runtime"]
    assert status == FAIL
    assert detail == ("1.31.1 was asked for CUDAExecutionProvider but runs on CPUExecutionProvider: it cannot load "
                      "libcudnn.so.9, libcufft.so.12; make setup-gpu (docs/serving.md#dependencies)")


def test_ort_probe_here_sees_the_cpu_fallback_and_names_what_is_missing(capfd):
    """The real probe on this machine: onnxruntime-gpu offers CUDA, the session runs on the CPU."""
    import onnxruntime
    import torch

    from serving import backends

    if torch.cuda.is_available() or CUDA not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu on a machine without a usable GPU")
    capfd.readouterr()
    info = REAL_PROBE_ORT(cuda=True)
    assert info.requested == (CUDA, CPU) and info.active[0] == CPU and not info.error
    assert info.missing == tuple(backends.missing_cuda_libraries()) and info.missing
    assert "CUDAExecutionProvider" not in capfd.readouterr().err  # its log is silenced; the row says it
    assert REAL_PROBE_ORT(cuda=False).active == (CPU,)


# ---------------------------------------------------------------- the driver probe
def test_parse_nvidia_smi_and_proc_version():
    out = "580.65.06, NVIDIA H100 80GB HBM3, 9.0\n580.65.06, NVIDIA RTX A6000, 8.6\n580.65.06, Odd, Name, [N/A]\n"
    assert doctor.parse_nvidia_smi(out) == ("580.65.06", (doctor.Gpu(H100, (9, 0)), doctor.Gpu("NVIDIA RTX A6000", (8, 6)),
                                                          doctor.Gpu("Odd, Name", None)))
    assert doctor.parse_nvidia_smi("No devices were found\n") == (None, ())
    assert doctor.parse_nvidia_smi("535.104.05, Tesla T4\n", compute_cap=False) == (
        "535.104.05", (doctor.Gpu("Tesla T4"),))
    assert doctor.parse_proc_version("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release "
                                     "Build  (dvs-builder@U16-I3-B03-4-3)  Thu Jul 24 2025") == "580.65.06"
    assert doctor.parse_proc_version("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 "
                                     "01:15:15 UTC 2023\nGCC version:  gcc version 12.2.0") == "535.104.05"


def _fake_nvidia_smi(folder: Path, script: str, monkeypatch) -> None:
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + script)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_probe_driver_reads_nvidia_smi(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, 'case "$1" in *compute_cap*) echo "575.57.08, NVIDIA GeForce RTX 4090, 8.9";; esac\n',
                     monkeypatch)
    driver = doctor.probe_driver()
    assert driver == doctor.Driver("575.57.08", (doctor.Gpu("NVIDIA GeForce RTX 4090", (8, 9)),), "nvidia-smi")
    assert driver.present


def test_probe_driver_without_compute_cap_retries_without_it(tmp_path, monkeypatch):
    # nvidia-smi older than R510 rejects the field
    _fake_nvidia_smi(tmp_path, 'case "$1" in *compute_cap*) echo \'Field "compute_cap" is not a valid field to '
                               'query.\'; exit 2;; esac\necho "470.256.02, Tesla T4"\n', monkeypatch)
    assert doctor.probe_driver() == doctor.Driver("470.256.02", (doctor.Gpu("Tesla T4"),), "nvidia-smi")


def test_probe_driver_falls_back_to_proc_and_needs_a_device_node(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA '
                               'driver."; exit 9\n', monkeypatch)
    proc, dev = tmp_path / "proc", tmp_path / "dev"
    (proc / "gpus" / "0000:01:00.0").mkdir(parents=True)
    dev.mkdir()
    (proc / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.82.07  Release Build\n")
    (proc / "gpus" / "0000:01:00.0" / "information").write_text("Model: \t\t NVIDIA L4\nIRQ:   123\n")
    monkeypatch.setattr(doctor, "PROC_DRIVER", proc)
    monkeypatch.setattr(doctor, "DEV", dev)
    driver = doctor.probe_driver()  # the module loaded, no /dev/nvidia0: a container given no GPU
    assert driver.version == "580.82.07" and driver.gpus == () and not driver.present
    assert "couldn't communicate" in driver.note
    assert doctor.check_driver(driver).status == WARN
    (dev / "nvidia0").touch()
    driver = doctor.probe_driver()
    assert driver.gpus == (doctor.Gpu("NVIDIA L4"),) and driver.present
    assert driver.source == str(proc / "version")


def test_no_driver_at_all_is_cpu_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.setattr(doctor, "PROC_DRIVER", tmp_path / "missing")
    driver = doctor.probe_driver()
    assert driver == doctor.Driver() and not driver.present
    assert doctor.check_driver(driver) == doctor.Check("NVIDIA driver", NA, "no NVIDIA GPU; CPU-only install")
