"""Shared fixtures: every test tracks to a throw-away MLflow store, never the repo's, offline.
And the `gpu` marker: `@pytest.mark.gpu` skips a test where torch sees no CUDA GPU,
`@pytest.mark.gpu(tensorrt=True)` also where TensorRT engines cannot be built and run."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.core.paths import DREAMBENCH_ENV
from tests.helpers import dreambench_mini
from tests.helpers.fast_params import FAST_BASE, FAST_CONTROLNET

REPO = Path(__file__).resolve().parents[1]
# A local DreamBench copy (the DreamBooth dataset folder), as users give one: CI sets it.
DREAMBENCH = Path(os.environ.get(DREAMBENCH_ENV) or "/nonexistent").expanduser()


@functools.cache
def _gpu_missing(tensorrt: bool) -> str | None:
    """Why a `gpu` test cannot run here, or None. Asked once, when the first such test runs."""
    if tensorrt:
        from components.export.tensorrt import tensorrt_status

        ok, why = tensorrt_status()  # the GPU first, then the package
        return None if ok else f"TensorRT engines cannot run here: {why}"
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA GPU: torch sees no CUDA GPU"


def pytest_runtest_setup(item):
    mark = item.get_closest_marker("gpu")
    if mark is not None:
        why = _gpu_missing(bool(mark.kwargs.get("tensorrt", False)))
        if why:
            pytest.skip(why)


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory, monkeypatch):
    store = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.delenv("BLIPDIFF_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # Tests never reach a model hub: fail fast instead of hanging on a download.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def dreambench_dir() -> Path:
    if not (DREAMBENCH / "prompts_and_classes.txt").is_file():
        pytest.skip(f"no DreamBench copy: set {DREAMBENCH_ENV} to a DreamBooth dataset folder")
    return DREAMBENCH


def sh(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, shell=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def checkout(tmp_path):
    work = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, work / rel)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["ingest"]["synthetic"].update(num_subjects=3, min_views=4, max_views=4, image_size=64)
    params["base"].update(FAST_BASE)
    params["controlnet"].update(FAST_CONTROLNET)
    params["pretrain_qformer"].update(steps=3, batch_size=4, log_every=1)
    params["train_subject"].update(steps=3, batch_size=2, resolution=16, log_every=1, id_draws=1)
    params["evaluate"].update(subjects=2, prompts_per_subject=1, images_per_prompt=2, steps=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the user's params (ingest.dreambench.path: null) and a local copy as users give one: the
    # real DreamBench where $BLIPDIFF_DREAMBENCH names it, else a small stand-in
    bench = DREAMBENCH if (DREAMBENCH / "prompts_and_classes.txt").is_file() else \
        dreambench_mini.make(tmp_path / "dreambench")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", DREAMBENCH_ENV: str(bench)}
    sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", work, env)
    return work, env


# The outputs a test of the default profile reads (a copy: tests never write the workspace's).
DEFAULT_RUN_OUTPUTS = ("data/subjects", "data/subjects.parquet", "data/context", "data/pairs.parquet",
                       "models/base", "models/controlnet", "models/qformer", "models/blip_diffusion", "metrics",
                       "reports/samples")
DEFAULT_RUN_STAGES = ("ingest", "context", "base", "controlnet", "pretrain_qformer", "train_subject")


def _workspace_is_current() -> bool:
    """The workspace holds the default profile's outputs of the current code and params
    (`dvc status` of train_subject, controlnet and their upstream stages is clean): `make repro` ran."""
    if not all((REPO / rel).exists() for rel in DEFAULT_RUN_OUTPUTS):
        return False
    dvc = Path(sys.executable).parent / "dvc"
    proc = subprocess.run([str(dvc), "status", "train_subject", "controlnet", "--json"], cwd=REPO,
                          capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.strip() in ("{}", "")


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """A folder holding the default profile's pipeline up to train_subject (params.yaml as it
    is: 12 synthetic subjects, the trained tiny base, its ControlNet, stages 1 and 2) with each stage's metrics
    file. A copy of the workspace's outputs when `dvc status` says they are current (CI runs
    `make repro` first), else the stages run here (about 10 minutes on 2 cores)."""
    root = tmp_path_factory.mktemp("default_run")
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    if _workspace_is_current():
        for rel in DEFAULT_RUN_OUTPUTS:
            (shutil.copytree if (REPO / rel).is_dir() else shutil.copy2)(REPO / rel, root / rel)
        return root
    from components.stages.runner import run_stage

    store = tmp_path_factory.mktemp("default_run_mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        for stage in DEFAULT_RUN_STAGES:
            run_stage(stage, root / "params.yaml", [], root)
    return root
