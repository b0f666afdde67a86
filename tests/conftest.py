"""Shared fixtures: every test tracks to a throw-away MLflow store, never the repo's, offline.
And the `gpu` marker: `@pytest.mark.gpu` skips a test where torch sees no CUDA GPU,
`@pytest.mark.gpu(tensorrt=True)` also where TensorRT engines cannot be built and run."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from components.core.paths import DREAMBENCH_ENV
from tests.helpers import dreambench_mini

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
