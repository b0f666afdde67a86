"""`dvc repro context` end to end in a throw-away git checkout of this repo."""

import pandas as pd
import pytest

from components.core import paths
from tests.conftest import sh as _sh

pytestmark = pytest.mark.slow


def test_dvc_repro_context_then_nothing_to_do(checkout):
    work, env = checkout
    out = _sh("dvc repro context", work, env)
    assert "Running stage 'ingest'" in out and "Running stage 'context'" in out
    pairs = pd.read_parquet(work / paths.PAIRS_MANIFEST)
    assert len(pairs) == 3 * 4 * 2
    assert all((work / p).is_file() for p in pairs["input_path"])
    metrics = _sh("dvc metrics show --json", work, env)
    assert "pairs_written" in metrics and "images_written" in metrics
    mtime = (work / paths.PAIRS_MANIFEST).stat().st_mtime_ns

    out = _sh("dvc repro context", work, env)
    assert "Running stage" not in out
    assert "didn't change" in out or "up to date" in out.lower()
    assert (work / paths.PAIRS_MANIFEST).stat().st_mtime_ns == mtime
    assert "up to date" in _sh("dvc status context", work, env).lower()


def test_push_to_the_default_remote_and_pull_into_a_fresh_clone(checkout, tmp_path):
    """The default remote is a folder beside the repository: `dvc push` from one clone and
    `dvc pull` in another gives the same data, hash for hash."""
    work, env = checkout
    _sh("dvc repro ingest && dvc push", work, env)
    remote = (work / ".." / "blipdiff-dvc-remote").resolve()
    assert remote.is_dir() and any(remote.rglob("*"))
    clone = tmp_path / "clone"
    _sh(f"git add -A && git -c user.name=t -c user.email=t@t commit -qm ingest && git clone -q {work} {clone}",
        work, env)
    assert not (clone / paths.SUBJECTS_MANIFEST).exists()
    # both clones sit in one folder, so their default remotes are the same folder
    assert _sh("dvc config remote.local.url", clone, env).strip() == str(remote)
    _sh("dvc pull ingest", clone, env)
    assert (clone / paths.SUBJECTS_MANIFEST).read_bytes() == (work / paths.SUBJECTS_MANIFEST).read_bytes()
    assert "up to date" in _sh("dvc status ingest", clone, env).lower()
    # metrics are in git, not in the remote: the clone has them without a pull
    assert (clone / paths.metrics_file("ingest")).is_file()


def test_runs_of_a_temporary_dvc_experiment_land_in_the_main_store(checkout):
    """`dvc exp run --temp` runs the stage in a throw-away copy under .dvc/tmp: its MLflow run
    must still be in the repository's own default store, tagged with the experiment."""
    import mlflow

    work, env = checkout
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    _sh("dvc exp run --temp -n tempexp -S ingest.seed=1 ingest", work, env)
    store = work / "mlflow.db"
    assert store.is_file(), "the experiment's run went to the temporary copy's store"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if r.info.run_name == "ingest"]
    assert run.data.tags["dvc_experiment"] == "tempexp"
    assert run.data.params["ingest.seed"] == "1"
    assert "tempexp" in _sh("dvc exp list --name-only", work, env)


def test_dvc_repro_evaluate_end_to_end_then_resume(checkout):
    """`dvc repro evaluate` trains the tiny pipeline and scores it on DreamBench (the real
    photos when ../shared is there); a forced re-run reuses every image (persisted output)."""
    import json

    import yaml

    work, env = checkout
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["evaluate"]["benchmark"] = "dreambench"  # the tiny default scores the held-out views instead
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh("dvc repro evaluate", work, env)
    assert "Running stage 'base'" in out and "Running stage 'train_subject'" in out and "Running stage 'evaluate'" in out
    metrics = json.loads(_sh("dvc metrics show --json", work, env))
    flat = json.dumps(metrics)
    for key in ("zero_shot_dino", "zero_shot_clip_i", "zero_shot_clip_t", "oracle_dino", "oracle_clip_i"):
        assert f'"{key}"' in flat
    per_image = pd.read_parquet(work / "reports/dreambench/per_image.parquet")
    assert len(per_image) == 2 * 1 * 2 and set(per_image["category"]) == {"live", "object"}
    html = (work / "reports/dreambench/report.html").read_text()
    assert "BLIP-Diffusion" in html and "0.774" in html
    plots = _sh("dvc plots show --json", work, env)
    assert "per_subject.csv" in plots
    before = (work / "metrics/evaluate.json").read_bytes()

    out = _sh("dvc repro -f -s evaluate", work, env)
    assert "generated 0 images" in out and "reused 4" in out
    assert (work / "metrics/evaluate.json").read_bytes() == before
    assert "up to date" in _sh("dvc status evaluate", work, env).lower()
