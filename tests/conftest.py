"""Shared fixtures: every test tracks to a throw-away MLflow store, never the repo's, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import dreambench_mini

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "dreambench"


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
        pytest.skip(f"DreamBench folder not found at {DREAMBENCH}")
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
    # the real DreamBench where it is (../shared beside the repository), else a small stand-in
    bench = DREAMBENCH if (DREAMBENCH / "prompts_and_classes.txt").is_file() else \
        dreambench_mini.make(tmp_path / "dreambench")
    params["ingest"]["dreambench"]["path"] = str(bench)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", work, env)
    return work, env
