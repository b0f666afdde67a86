"""Local services on loopback (flows/servers.py, flows/supervisor.py): processes stopped with every child, a
failing start that says why, `make serve` as a user runs it, the MLflow server on a real
PostgreSQL, and the MLflow UI comparing two real stage runs in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from components.core import tracking
from flows import servers
from scripts import mlflow_screenshot as shots
from tests.helpers.fast_params import FAST_BASE
from tests.helpers.servers import postgres_bin, postgres_server

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- processes
# A parent that starts a child in a session of its own (as a Prefect worker starts its flow
# runs) and a grandchild; both children ignore SIGINT and SIGTERM.
_STUBBORN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); " \\
           "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    subprocess.Popen([sys.executable, "-c", code])
    print("started", flush=True)
    time.sleep(600)
""")


def test_stop_takes_every_descendant_also_in_other_sessions(tmp_path):
    service = servers.start("stubborn", [sys.executable, "-c", _STUBBORN], url="", log_dir=tmp_path,
                            ready=lambda: "started" in (tmp_path / "stubborn.log").read_text())
    deadline = time.monotonic() + 30
    while len(service.processes()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(service.processes()) == 3, service.leftovers()
    service.stop(grace=1.0)
    assert service.leftovers() == []
    assert not service.running()


def test_a_service_that_exits_says_why_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('no database at /nowhere'); sys.exit(3)"]
    with pytest.raises(servers.ServiceError, match=r"(?s)broken exited with code 3.*no database at /nowhere"):
        servers.start("broken", cmd, url="http://127.0.0.1:1", log_dir=tmp_path, ready=lambda: False, timeout=30)


def test_a_service_that_never_answers_times_out_and_is_stopped(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('listening soon', flush=True); time.sleep(600)"]
    started = time.monotonic()
    with pytest.raises(servers.ServiceError, match=r"(?s)silent not ready at http://127.0.0.1:9 after 2 s.*listening soon"):
        servers.start("silent", cmd, url="http://127.0.0.1:9", log_dir=tmp_path, ready=lambda: False, timeout=2)
    assert time.monotonic() - started < 30
    left = [p for p in psutil.process_iter(["cmdline"]) if "listening soon" in " ".join(p.info["cmdline"] or [])]
    assert not left


def test_postgres_uri_gets_the_installed_driver():
    uri = servers.sqlalchemy_uri("postgresql://u:p@127.0.0.1:5432/mlflow")
    assert uri.startswith(("postgresql://", "postgresql+psycopg2://"))
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:  # psycopg2-binary is the dependency
        assert uri == "postgresql+psycopg2://u:p@127.0.0.1:5432/mlflow"
    assert servers.sqlalchemy_uri("sqlite:///x.db") == "sqlite:///x.db"


# --------------------------------------------------------------------------- MLflow server
@pytest.mark.slow
def test_mlflow_server_stops_with_its_workers(tmp_path):
    """`mlflow server --workers 2` runs uvicorn workers (and, in MLflow 3, job consumers) of its
    own: all of them are gone after stop()."""
    with servers.mlflow_server(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "artifacts", log_dir=tmp_path,
                               workers=2) as ml:
        client = mlflow.MlflowClient(ml.url)
        experiment = client.create_experiment("probe")
        assert client.get_experiment(experiment).name == "probe"
        assert len(ml.processes()) >= 3, ml.leftovers()  # the server and its two workers at least
    assert ml.leftovers() == []


def _stage(work: Path, env: dict, *args: str) -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "blipdiff"), *args], cwd=work, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_mlflow_server_on_postgresql_tracks_a_stage(checkout, tmp_path):
    """The documented multi-user backend: a real PostgreSQL server (Debian's `postgresql`),
    `mlflow server` on it with proxied artifacts, two stage runs tracked to it; the runs are in
    PostgreSQL's tables and their artifacts in the artifacts folder."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    work, env = checkout
    artifacts = tmp_path / "artifacts"
    with postgres_server(log_dir=tmp_path) as (pg, uri), \
            servers.mlflow_server(uri, artifacts, log_dir=tmp_path) as ml:
        stage_env = {**env, "MLFLOW_TRACKING_URI": ml.url, "TQDM_DISABLE": "1"}
        _stage(work, stage_env, "ingest")
        _stage(work, stage_env, "context")
        client = mlflow.MlflowClient(ml.url)
        experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
        assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
        (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'ingest'")
        expected = json.loads((work / "metrics" / "ingest.json").read_text())
        assert run.data.metrics["images_written"] == expected["images_written"]
        assert run.info.status == "FINISHED"
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["subjects"]
        (context_run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'context'")
        logged = client.list_artifacts(context_run.info.run_id, "samples")
        assert logged, "the context stage logged no sample images"
        on_disk = [p for p in artifacts.rglob("*") if p.is_file()]
        assert on_disk, f"no artifact reached {artifacts}"

        import sqlalchemy

        engine = sqlalchemy.create_engine(uri)
        try:
            with engine.connect() as db:
                assert db.execute(sqlalchemy.text("select version()")).scalar().startswith("PostgreSQL")
                rows = db.execute(sqlalchemy.text("select name, status from runs where run_uuid = :id"),
                                  {"id": run.info.run_id}).all()
        finally:
            engine.dispose()
        assert rows == [("ingest", "FINISHED")]
    assert pg.leftovers() == [] and ml.leftovers() == []


# --------------------------------------------------------------------------- the UI in Chromium
@pytest.mark.slow
def test_mlflow_ui_compares_two_stage_runs_in_chromium(tmp_path):
    """Two real `pretrain_qformer` runs (learning rates 1e-3 and 3e-3) tracked to a test server;
    headless Chromium opens the UI's run-comparison page: both runs, the compared metrics and
    the differing param are on it; the screenshot is a real picture of it."""
    if shots.chromium() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    work = shots.make_workdir(tmp_path / "work", {
        "ingest": {"test_views_per_subject": 1,
                   "synthetic": {"num_subjects": 3, "min_views": 3, "max_views": 3, "image_size": 64}},
        "base": FAST_BASE,
        "pretrain_qformer": {"steps": 4, "batch_size": 4, "log_every": 1},
    })
    with servers.mlflow_server(f"sqlite:///{tmp_path / 'ui.db'}", tmp_path / "artifacts", log_dir=tmp_path) as ml:
        experiment_id, run_ids = shots.run_stage_pair(work, ml.url, "pretrain_qformer", "learning_rate",
                                                      (1e-3, 3e-3), log=lambda line: None)
        metrics = json.loads((work / "metrics" / "pretrain_qformer.json").read_text())
        url = shots.compare_url(ml.url, run_ids, [experiment_id])
        dom = shots.dump_dom(url, budget_ms=30000)
        png = shots.screenshot(url, tmp_path / "compare.png", budget_ms=30000)
        runs = [mlflow.MlflowClient(ml.url).get_run(run_id) for run_id in run_ids]
    assert ml.leftovers() == []

    assert "Comparing 2 Runs from 1 Experiment" in dom, dom[:2000]
    for run_id in run_ids:  # a column per run, headed by its id
        assert run_id in dom
    text = re.sub(r"<[^>]+>", " ", dom)
    # The metrics table: one row per metric of the runs, in name order, in a virtualized grid
    # that renders the rows in its viewport (and a few more), so the first ones are in the DOM.
    names = sorted(set().union(*(run.data.metrics for run in runs)))
    rendered = re.findall(r'title="Plot chart" href="[^"]*">([^<]+)<i', dom)
    assert len(rendered) >= 10 and rendered == names[:len(rendered)], (rendered, names)
    # the stage's own DVC metrics, compared: both runs' values on the page
    for name in ("fixed_batch_loss_end", "itc_r1", "fixed_batch_loss_start"):
        assert name in metrics and name in rendered
    for run in runs:
        assert f"{run.data.metrics['fixed_batch_loss_end']:.3f}" in text
    # the param that differs, with both values
    assert "pretrain_qformer.learning_rate" in text
    assert {run.data.params["pretrain_qformer.learning_rate"] for run in runs} == {"0.001", "0.003"}

    from PIL import Image, ImageStat

    with Image.open(png) as image:
        assert image.size == (1600, 1200)
        spread = ImageStat.Stat(image.convert("L")).stddev[0]
    assert spread > 10, "the screenshot is blank"


# --------------------------------------------------------------------------- make serve
@pytest.mark.slow
def test_make_serve_starts_everything_and_ctrl_c_stops_it(tmp_path):
    """`python -m flows.servers up` (what `make serve` runs): the Prefect server with the
    project's two deployments on the process pool, an online worker and the MLflow server, on
    free loopback ports; Ctrl-C (SIGINT) stops every process it started and exits 0."""
    mlflow_port, prefect_port = servers.free_port(), servers.free_port()
    home, logs = tmp_path / "prefect-home", tmp_path / "logs"
    cmd = [sys.executable, "-m", "flows.servers", "up", "--mlflow-port", str(mlflow_port), "--prefect-port",
           str(prefect_port), "--prefect-home", str(home), "--log-dir", str(logs),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'serve.db'}", "--artifacts-destination",
           str(tmp_path / "artifacts")]
    up = servers.start("serve", cmd, url="", log_dir=tmp_path, cwd=REPO, env={**os.environ, "PREFECT_HOME": str(home)},
                       ready=lambda: "Ctrl-C stops everything" in (tmp_path / "serve.log").read_text(), timeout=400)
    try:
        out = (tmp_path / "serve.log").read_text()
        api = f"http://127.0.0.1:{prefect_port}/api"
        assert f"export PREFECT_API_URL={api} MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in out
        assert servers.http_ok(f"http://127.0.0.1:{mlflow_port}/health") == b"OK"
        deployments = json.loads(servers.http_ok(f"{api}/deployments/filter", data=b"{}"))
        names = {(d["name"], d["work_pool_name"]) for d in deployments}
        assert names == {("pipeline", servers.POOL), ("evaluate-champion", servers.POOL)}, names
        workers = json.loads(servers.http_ok(f"{api}/work_pools/{servers.POOL}/workers/filter", data=b"{}"))
        assert any(w["status"] == "ONLINE" for w in workers), workers
        assert len(up.processes()) >= 4  # up, MLflow, Prefect server, worker (and their children)
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole group
        assert up.process.wait(timeout=120) == 0, up.log_tail()
    finally:
        up.stop(grace=5.0)
    assert "stopped" in up.log_tail()
    assert up.leftovers() == []
    for port in (mlflow_port, prefect_port):
        import socket

        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


def test_a_service_started_with_sigint_ignored_still_stops_on_sigint(tmp_path):
    """A process started with SIGINT ignored (a script's background job, nohup) hands that on
    to its children, and `make serve`'s Ctrl-C would never reach them: the supervisor resets
    SIGINT to its default in every service it starts."""
    from flows import supervisor

    script = "import signal, time; print(signal.getsignal(signal.SIGINT), flush=True); time.sleep(60)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        service = supervisor.start("sleeper", [sys.executable, "-c", script], url="", log_dir=tmp_path, ready=None)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.time() + 20
        while "default_int_handler" not in service.log.read_text() and time.time() < deadline:
            time.sleep(0.2)
        assert "default_int_handler" in service.log.read_text(), service.log_tail()
        os.killpg(service.process.pid, signal.SIGINT)
        assert service.process.wait(timeout=10) != 0  # KeyboardInterrupt ended it
    finally:
        service.stop(grace=1.0)
