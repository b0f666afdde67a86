"""The MLflow UI comparing two real `train_subject` stage runs, in headless Chromium.

    python scripts/mlflow_screenshot.py                  # -> docs/img/mlflow_compare.png, mlflow_loss.png
    python scripts/mlflow_screenshot.py --out-dir /tmp/shots --steps 300

Starts a throw-away MLflow server on 127.0.0.1 (sqlite in a temporary folder), runs the
pipeline's stages in a temporary copy of this repository on the default (tiny) profile,
tracked to that server as `dvc repro` tracks them: ingest, context and pretrain_qformer once,
then `blipdiff train_subject` twice, with `train_subject.learning_rate` 1e-4 and 3e-4. Then it
photographs the UI's run-comparison page of the two runs and their loss curves. The
pictures are driven through the DevTools protocol (closes the assistant panel, shows only
the params that differ); tests/test_servers.py uses the same runs (`run_stage_pair`) with
the plain command-line helpers below (`dump_dom`, `screenshot`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# MLflow 3's UI opens an experiment on its GenAI overview unless the "Model training" workflow
# is chosen: `workflowType=machine_learning` in the URL (the UI also keeps the last choice in
# the browser's localStorage). The experiment's `mlflow.experimentKind` tag (set by
# components.core.tracking) marks it as model training for the SDK; the 3.17 UI's hash routes
# go by the workflow type.
WORKFLOW = "workflowType=machine_learning"


# --------------------------------------------------------------------------- runs
# What each compared stage needs before it can run (dvc.yaml's order).
UPSTREAM = {"pretrain_qformer": ["ingest", "base"], "train_subject": ["ingest", "context", "base", "pretrain_qformer"]}


def make_workdir(dest: Path, params: dict | None = None) -> Path:
    """A copy of this repository's files (tracked and untracked, not ignored) in `dest`, as a git
    repository of its own, with `params` ({section: {key: value}}) merged into params.yaml."""
    import yaml

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    values = yaml.safe_load((dest / "params.yaml").read_text())
    for section, update in (params or {}).items():
        if isinstance(update, dict):
            _merge(values.setdefault(section, {}), update)
        else:
            values[section] = update
    (dest / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    git = ["git", "-c", "user.name=blipdiff", "-c", "user.email=blipdiff@localhost"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "screenshot workdir"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def run_stage_pair(work: Path, tracking_uri: str, stage: str = "train_subject", key: str = "learning_rate",
                   values: tuple = (1e-4, 3e-4), log=print) -> tuple[str, list[str]]:
    """Real stage runs to compare: the stages `stage` needs, once, then `blipdiff <stage>` once
    per value of `<stage>.<key>` (`-S`), all tracked to `tracking_uri` as the pipeline tracks
    them. Returns (experiment id, the compared runs' ids, in the order of `values`)."""
    import mlflow

    from components.core import tracking

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "TQDM_DISABLE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop(tracking.PARENT_RUN_ENV, None)
    for name in UPSTREAM.get(stage, []):
        _blipdiff(work, env, [name], log)
    run_ids = []
    client = mlflow.MlflowClient(tracking_uri)
    for value in values:
        _blipdiff(work, env, [stage, "-S", f"{stage}.{key}={value}"], log)
        experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
        newest = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{stage}'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
        run_ids.append(newest[0].info.run_id)
    return experiment.experiment_id, run_ids


def _blipdiff(work: Path, env: dict, args: list[str], log) -> None:
    start = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).parent / "blipdiff"), *args], cwd=work, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"blipdiff {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    log(f"blipdiff {' '.join(args)}: {time.monotonic() - start:.0f} s")


# --------------------------------------------------------------------------- URLs
def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The UI's run-comparison page (its route: `#/compare-runs?runs=[...]&experiments=[...]`)."""
    return (f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(run_ids))}"
            f"&experiments={urllib.parse.quote(json.dumps(experiment_ids))}&{WORKFLOW}")


def experiment_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}?{WORKFLOW}"


def metric_url(base: str, metric: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The curves of `metric` of the runs against the step."""
    q = urllib.parse.quote
    return (f"{base}/#/metric/{q(metric)}?runs={q(json.dumps(run_ids))}&metric={q(json.dumps(metric))}"
            f"&experiments={q(json.dumps(experiment_ids))}&plot_metric_keys={q(json.dumps([metric]))}"
            f"&plot_layout={q('{}')}&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=false"
            f"&deselected_curves={q('[]')}&last_linear_y_axis_range={q('[]')}&{WORKFLOW}")


# --------------------------------------------------------------------------- Chromium
def chromium() -> str | None:
    """The Chromium (or Chrome) binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _run_chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """One headless Chromium command, in a session of its own, killed whole on the way out."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH")
    profile = tempfile.mkdtemp(prefix="blipdiff-chromium-")
    proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # renderers, zygotes: none outlives the command
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def dump_dom(url: str, budget_ms: int = 20000, size: tuple[int, int] = (1600, 1200), timeout: float = 180) -> str:
    """The page's DOM once scripts ran for `budget_ms` of virtual time."""
    done = _run_chromium([f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}",
                          "--dump-dom", url], timeout)
    return done.stdout


def screenshot(url: str, path: Path, budget_ms: int = 20000, size: tuple[int, int] = (1600, 1200),
               timeout: float = 180) -> Path:
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _run_chromium([f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}",
                          f"--screenshot={path}", url], timeout)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return path


class _DevTools:
    """A minimal DevTools-protocol session on one page of a headless Chromium."""

    def __init__(self, log_dir: Path, size: tuple[int, int]):
        from websockets.sync.client import connect

        from flows import servers

        self.profile = Path(tempfile.mkdtemp(prefix="blipdiff-chromium-"))
        port_file = self.profile / "DevToolsActivePort"
        self.browser = servers.start(
            "chromium", [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--hide-scrollbars", "--remote-debugging-address=127.0.0.1",
                         "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                         f"--window-size={size[0]},{size[1]}", "about:blank"],
            url="", log_dir=log_dir, ready=lambda: port_file.is_file() and port_file.read_text().count("\n") >= 1,
            timeout=60)
        port = int(port_file.read_text().split()[0])
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(p for p in pages if p.get("type") == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.next_id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            answer = json.loads(self.ws.recv(timeout=120))
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def open(self, url: str, ready_js: str, timeout: float = 90) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.js(ready_js):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: not ready ({ready_js}) after {timeout:.0f} s")
            time.sleep(0.5)

    def click(self, selector: str) -> bool:
        return bool(self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                            "if (e) e.click(); return !!e; })()"))

    def png(self, path: Path, clip: tuple[int, int, int, int] | None = None) -> None:
        import base64

        params = {"format": "png"}
        if clip:
            params["clip"] = {"x": clip[0], "y": clip[1], "width": clip[2], "height": clip[3], "scale": 1}
        Path(path).write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.browser.stop(grace=3)
            shutil.rmtree(self.profile, ignore_errors=True)


def _shrink(path: Path, max_bytes: int = 300_000) -> None:
    """A palette PNG (the UI has few colours): a fraction of the size, no visible change."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    for colors in (256, 128, 64):
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True)
        if path.stat().st_size <= max_bytes:
            return


def make_screenshots(out_dir: Path, steps: int, size: tuple[int, int] = (1500, 1260)) -> list[Path]:
    from flows import servers

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="blipdiff-shot-") as tmp:
        tmp = Path(tmp)
        work = make_workdir(tmp / "work", {"train_subject": {"steps": steps, "log_every": 10}})
        with servers.mlflow_server(f"sqlite:///{tmp / 'mlflow.db'}", tmp / "artifacts", log_dir=tmp) as mlflow:
            exp_id, run_ids = run_stage_pair(work, mlflow.url, "train_subject", "learning_rate", (1e-4, 3e-4))
            page = _DevTools(tmp, size)
            try:
                page.open(compare_url(mlflow.url, run_ids, [exp_id]),
                          "document.body.innerText.includes('id_accuracy') && "
                          "!!document.querySelector('.js-plotly-plot')")
                page.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
                page.click('[aria-label="Parameters - Show diff only"]')
                page.click('[aria-label="Tags - Show diff only"]')
                time.sleep(2)
                written.append(out_dir / "mlflow_compare.png")
                page.png(written[-1])
                page.open(metric_url(mlflow.url, "loss", run_ids, [exp_id]),
                          "!!document.querySelector('.js-plotly-plot .scatterlayer .trace')")
                page.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
                time.sleep(2)
                written.append(out_dir / "mlflow_loss.png")
                page.png(written[-1], clip=(0, 0, size[0], 760))
            finally:
                page.close()
    for path in written:
        _shrink(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--steps", type=int, default=600, help="train_subject steps of each compared run")
    args = parser.parse_args(argv)
    if chromium() is None:
        print("no chromium on PATH", file=sys.stderr)
        return 1
    for path in make_screenshots(args.out_dir, args.steps):
        print(f"{path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
