"""`dvc repro context` end to end in a throw-away git checkout of this repo."""

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _sh(cmd, cwd, env):
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
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    _sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", work, env)
    return work, env


def test_dvc_repro_context_then_nothing_to_do(checkout):
    work, env = checkout
    out = _sh("dvc repro context", work, env)
    assert "Running stage 'ingest'" in out and "Running stage 'context'" in out
    pairs = pd.read_parquet(work / "data/pairs.parquet")
    assert len(pairs) == 3 * 4 * 2
    assert all((work / p).is_file() for p in pairs["input_path"])
    metrics = _sh("dvc metrics show --json", work, env)
    assert "pairs_written" in metrics and "images_written" in metrics
    mtime = (work / "data/pairs.parquet").stat().st_mtime_ns

    out = _sh("dvc repro context", work, env)
    assert "Running stage" not in out
    assert "didn't change" in out or "up to date" in out.lower()
    assert (work / "data/pairs.parquet").stat().st_mtime_ns == mtime
    assert "up to date" in _sh("dvc status", work, env).lower()
