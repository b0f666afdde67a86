import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow

from components.cli import main
from components.core import paths, tracking
from flows.servers import free_port

REPO = Path(__file__).resolve().parents[1]


def _runs(uri):
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    return client.search_runs([exp.experiment_id])


def test_stage_run_tags_params_and_nesting(tmp_path, monkeypatch):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(tracking.DEFAULT_EXPERIMENT)
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="flow") as parent:
        pass
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent.info.run_id)
    params = {"ingest": {"seed": 3, "synthetic": {"num_subjects": 2}}}
    with tracking.stage_run("ingest", params, REPO) as run:
        tracking.log_metrics({"images_written": 7, "flag": True, "name": "x"})
    got = mlflow.get_run(run.info.run_id)
    assert got.info.run_name == "ingest"
    assert got.data.tags["dvc_stage"] == "ingest"
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert got.data.tags["params_hash"] == tracking.params_hash(params)
    assert len(got.data.tags["git_commit"]) in (7, 40) or got.data.tags["git_commit"] == "unknown"
    assert got.data.params == {"ingest.seed": "3", "ingest.synthetic.num_subjects": "2"}
    assert got.data.metrics == {"images_written": 7.0}


def test_default_store_is_in_the_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_cli_stage_writes_metrics_json_and_mlflow_run(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    code = main(["ingest", "-S", "ingest.synthetic.num_subjects=2", "-S", "ingest.synthetic.image_size=48"])
    assert code == 0
    metrics = json.loads((tmp_path / paths.metrics_file("ingest")).read_text())
    assert metrics["subjects_written"] == 2
    assert not [k for k in metrics if k.startswith("seconds_")]  # timings: MLflow only
    (run,) = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert run.data.metrics["seconds_wall"] > 0
    assert run.data.metrics["images_written"] == metrics["images_written"]
    assert run.data.params["ingest.synthetic.num_subjects"] == "2"
    artifacts = mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="samples")
    assert len(artifacts) == 2
    first = (tmp_path / paths.metrics_file("ingest")).read_bytes()
    assert main(["ingest", "-S", "ingest.synthetic.num_subjects=2", "-S", "ingest.synthetic.image_size=48"]) == 0
    assert (tmp_path / paths.metrics_file("ingest")).read_bytes() == first  # same params, same bytes


def test_cli_bad_params_one_line_error_nonzero_exit(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("max_side: 512", "max_sde: 512"))
    proc = subprocess.run(
        [sys.executable, "-m", "components.cli", "ingest", "--params", str(params)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("blipdiff ingest: error: ") and "ingest.max_sde: unknown key" in lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()


# ----------------------------------------------------------------------- outages
SMALL = ["-S", "ingest.synthetic.num_subjects=2", "-S", "ingest.synthetic.image_size=48"]


def _repo(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path



def test_unreachable_tracking_server_does_not_stop_a_stage(tmp_path, monkeypatch, caplog):
    import time

    root = _repo(tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setattr(tracking, "RETRY_WAIT_S", 0.05)
    start = time.perf_counter()
    assert main(["ingest", *SMALL]) == 0
    assert time.perf_counter() - start < 60
    assert json.loads((root / paths.metrics_file("ingest")).read_text())["subjects_written"] == 2
    assert (root / paths.SUBJECTS_MANIFEST).is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("MLflow: opening the ingest run" in w for w in warnings)
    assert any("records of the ingest run could not be written" in w for w in warnings)


def test_failed_writes_are_kept_and_written_at_the_end(tmp_path, monkeypatch):
    """The store fails for a while in the middle of training: every step's metrics still reach
    the run, in order, when it is back."""
    root = _repo(tmp_path, monkeypatch)
    assert main(["ingest", *SMALL]) == 0
    real = tracking._log_metrics
    calls = {"n": 0}

    def flaky(client, run_id, values, step):
        calls["n"] += 1
        if 2 <= calls["n"] <= 4:  # the 2nd write fails all 3 tries (e.g. sqlite locked)
            raise RuntimeError("database is locked")
        return real(client, run_id, values, step)

    monkeypatch.setattr(tracking, "_log_metrics", flaky)
    monkeypatch.setattr(tracking, "RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(tracking, "RECHECK_S", 0.0)
    assert main(["pretrain_qformer", *SMALL, "-S", "pretrain_qformer.steps=4", "-S", "pretrain_qformer.batch_size=4",
                 "-S", "pretrain_qformer.log_every=1", "-S", "pretrain_qformer.checkpoint_every=10",
                 "-S", "pretrain_qformer.base=null"]) == 0
    run = [r for r in _runs(os.environ["MLFLOW_TRACKING_URI"]) if r.info.run_name == "pretrain_qformer"][0]
    client = mlflow.tracking.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert "itc_r1" in run.data.metrics and run.info.status == "FINISHED"
    assert (root / paths.QFORMER_DIR / "model.safetensors").is_file()


def test_failed_registration_keeps_the_stage_and_register_later(tmp_path, monkeypatch, caplog):
    import yaml

    from components.model import registry
    from components.stages import context, ingest

    root = _repo(tmp_path, monkeypatch)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["ingest"]["synthetic"].update(num_subjects=2, image_size=48, min_views=2, max_views=2)
    raw["train_subject"].update(steps=2, batch_size=2, resolution=16, log_every=1, id_draws=1, qformer=None, base=None)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = __import__("components.core.config", fromlist=["x"]).load_params(root / "params.yaml")
    ingest.run(params, root)
    context.run(params, root)

    def down(*args, **kwargs):
        raise ConnectionError("registry unreachable")

    real = registry.log_and_register
    monkeypatch.setattr(registry, "log_and_register", down)
    assert main(["train_subject"]) == 0
    assert (root / paths.BLIP_DIFFUSION_DIR / "unet").is_dir()
    assert any("register the model later with `blipdiff register`" in r.getMessage() for r in caplog.records)
    client = mlflow.tracking.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert not client.search_model_versions("name='blip-diffusion'")

    monkeypatch.setattr(registry, "log_and_register", real)  # the registry is back
    assert main(["register"]) == 0
    (version,) = client.search_model_versions("name='blip-diffusion'")
    assert client.get_run(version.run_id).info.run_name == "register"
    reqs = (Path(mlflow.artifacts.download_artifacts(f"models:/blip-diffusion/{version.version}"))
            / "requirements.txt").read_text()
    assert "torch==2.13.0" in reqs and "diffusers==" in reqs  # pinned from constraints.txt
    assert main(["register", "--model-dir", str(tmp_path / "nope")]) == 2


def test_default_store_follows_the_main_working_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    main_tree = tmp_path / "repo"
    main_tree.mkdir()
    subprocess.run("git init -q && git -c user.name=t -c user.email=t@t commit -q --allow-empty -m i "
                   "&& git worktree add -q ../wt", shell=True, cwd=main_tree, check=True)
    assert tracking.store_root(tmp_path / "wt") == main_tree.resolve()
    monkeypatch.setenv("DVC_ROOT", str(main_tree))  # as DVC sets it for `dvc exp run --temp` / `--queue`
    assert tracking.tracking_uri(tmp_path / "elsewhere") == f"sqlite:///{main_tree.resolve() / 'mlflow.db'}"


def test_stage_run_records_dvc_inputs_and_dirty_tree(tmp_path, monkeypatch):
    root = tmp_path
    (root / "dvc.yaml").write_text("stages:\n  context:\n    deps: [data/subjects, components/x.py]\n")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  ingest:\n    outs:\n"
                                   "    - path: data/subjects\n      md5: abc.dir\n")
    subprocess.run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm i", shell=True,
                   cwd=root, check=True)
    with tracking.stage_run("context", {"context": {}}, root) as run:
        pass
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["dvc.input.data/subjects"] == "abc.dir" and tags["git_dirty"] == "false"
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text() + "\n")
    with tracking.stage_run("context", {"context": {}}, root) as run:
        pass
    assert mlflow.get_run(run.info.run_id).data.tags["git_dirty"] == "true"
