"""DVC driven through its Python API (`dvc.repo.Repo`), with results as data, not log text.

- `reproduce(root, targets)`: `Repo.reproduce`; what ran is the list of stages it returns.
- `run_experiment(root, targets, overrides, name)`: `Repo.experiments.run(params=..., name=...,
  tmp_dir=True)`, i.e. `dvc exp run --temp -S key=value -n NAME`. The experiment runs in a
  temporary copy, so the working tree (and its params.yaml) is never left modified by a flow
  run; `dvc exp show` lists it. What DVC reproduced is read from the experiment commit's
  `dvc.lock`: the stages whose lock entry differs from the working tree's.
- Either way, `executed` lists the stages whose command ran (their report says done); a stage
  DVC reproduced without it was restored from DVC's run cache.

Each stage run writes a report file (components.core.errors.StageReport) into a folder this
module chooses; a failure is described from those reports (which stage, its error type and
message, whether it is worth a retry) and from DVC's own exception types (a repository lock
held by another process).

The flow runs this module as a child process (`python -m flows.dvc_ops RESULT.json repro ...`):
the stages' output streams into the flow log line by line, and a stage that crashes or is
killed cannot take the flow run's process (or DVC's repository lock) with it. The result is
the JSON file, written whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from components.core.errors import STAGE_REPORTS_ENV

LOCK = "lock"  # another DVC process holds the repository lock
STAGE_FAILED = "stage_failed"  # a stage reported an error
STAGE_KILLED = "stage_killed"  # a stage's process died without reporting (killed, OOM)
DVC_ERROR = "dvc_error"  # anything else DVC refused (bad dvc.yaml, missing dependency, ...)
PARAMS = "params"  # an override that params.yaml's schema refuses


def stages(root: Path) -> list[str]:
    """Stage names in dvc.yaml order (pipeline order)."""
    return list(yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"])


def override_args(overrides: dict[str, Any]) -> list[str]:
    """{"train_subject.steps": 300} -> ["train_subject.steps=300"] as `dvc exp run -S` and
    `blipdiff -S` take them (values in YAML/JSON syntax: strings quoted, lists and null kept)."""
    out = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) and _plain(value) else json.dumps(value)
        out.append(f"{key}={text}")
    return out


def _plain(text: str) -> bool:
    """A string that reads back as the same string without quotes."""
    return bool(text) and yaml.safe_load(text) == text and not any(c in text for c in ",[]{}'\"=")


def check_overrides(root: Path, overrides: dict[str, Any]) -> None:
    """Refuse unknown keys and bad values before DVC starts (the same typed params the stages
    load)."""
    from components.core.config import load_params

    load_params(Path(root) / "params.yaml", override_args(overrides))


def _lock_entries(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    return (yaml.safe_load(text) or {}).get("stages", {})


def _failure(exc: BaseException, reports: Path) -> dict[str, Any]:
    """What went wrong, as data."""
    from dvc.lock import LockError

    chain, cause = [], exc
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(e, LockError) for e in chain):
        return {"kind": LOCK, "transient": True, "message": str(exc)}
    found = [json.loads(p.read_text()) for p in sorted(reports.glob("*.json"))]
    for report in found:
        if report.get("status") == "failed":
            return {"kind": STAGE_FAILED, "stage": report["stage"], "transient": bool(report.get("transient")),
                    "error_type": report.get("error_type"),
                    "message": f"{report['stage']}: {report.get('error_type')}: {report.get('message')}"}
    for report in found:
        if report.get("status") == "running":
            return {"kind": STAGE_KILLED, "stage": report["stage"], "transient": True,
                    "message": f"{report['stage']}: the stage's process died without reporting an error "
                               f"(killed or out of memory); DVC: {' <- '.join(str(e) for e in chain)}"}
    return {"kind": DVC_ERROR, "transient": False, "message": " <- ".join(str(e) for e in chain)}


def executed(reports: Path, order: list[str]) -> list[str]:
    """The stages whose command ran to the end in this DVC call (their report says done), in
    pipeline order. DVC also "reproduces" a stage by restoring its outputs from the run cache,
    without running its command: such a stage has no report."""
    done = {report["stage"] for report in (json.loads(p.read_text()) for p in reports.glob("*.json"))
            if report.get("status") == "done"}
    return [stage for stage in order if stage in done]


def _with_reports(fn):
    def wrapped(root, *args, **kwargs) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="blipdiff-reports-") as reports:
            os.environ[STAGE_REPORTS_ENV] = reports
            try:
                result = fn(Path(root), *args, **kwargs)
                if "ok" in result:  # refused before DVC started
                    return result
                return {"ok": True, **result, "executed": executed(Path(reports), stages(root))}
            except Exception as exc:
                return {"ok": False, "error": _failure(exc, Path(reports))}
            finally:
                os.environ.pop(STAGE_REPORTS_ENV, None)
    return wrapped


@_with_reports
def reproduce(root: Path, targets: list[str] | None = None, single_item: bool = False) -> dict[str, Any]:
    """`dvc repro [-s] [targets]`: {"ran": [stage, ...] in order, "rev": HEAD}. `single_item`:
    the targets alone, not the stages they depend on (`-s`)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        ran = repo.reproduce(targets=targets or None, single_item=single_item)
        rev = repo.scm.get_rev()
    return {"mode": "repro", "ran": [stage.name for stage in ran], "rev": rev, "experiment": None}


@_with_reports
def run_experiment(root: Path, targets: list[str] | None, overrides: dict[str, Any],
                   name: str, single_item: bool = False) -> dict[str, Any]:
    """`dvc exp run --temp [-s] -S ... -n NAME [targets]`: {"ran", "experiment", "rev", "baseline"}."""
    from dvc.repo import Repo

    try:
        check_overrides(root, overrides)
    except Exception as exc:
        return {"ok": False, "error": {"kind": PARAMS, "transient": False, "message": str(exc)}}
    # The experiment starts from the working tree (DVC copies its uncommitted changes, dvc.lock
    # included): a stage ran when its lock entry differs from the working tree's, not HEAD's.
    lock = root / "dvc.lock"
    before = _lock_entries(lock.read_text() if lock.is_file() else None)
    with Repo(str(root)) as repo:
        baseline = repo.scm.get_rev()
        results = repo.experiments.run(targets=targets or None, params=override_args(overrides), name=name,
                                       tmp_dir=True, single_item=single_item)
        if not results:
            raise RuntimeError(f"dvc exp run produced no experiment for {name}")
        rev = next(iter(results))
        after = _lock_entries(_read_rev(repo, rev, "dvc.lock"))
    ran = [stage for stage in after if after[stage] != before.get(stage)]
    return {"mode": "experiment", "ran": ran, "experiment": name, "rev": rev, "baseline": baseline}


def _read_rev(repo, rev: str, path: str) -> str | None:
    fs = repo.scm.get_fs(rev)
    try:
        with fs.open(path, mode="r") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def metrics(root: Path, stage_names: list[str], rev: str | None = None) -> dict[str, dict[str, Any]]:
    """Each stage's DVC metrics (metrics/<stage>.json, as dvc.yaml declares them) in the
    working tree, or at a commit or experiment: {stage: {name: value}}."""
    import dvc.api

    from components.core.paths import metrics_file

    out: dict[str, dict[str, Any]] = {}
    root = Path(root).resolve()
    for stage in stage_names:
        # an absolute target: DVC resolves a relative one against the current directory
        target = str(root / metrics_file(stage))
        try:
            out[stage] = dvc.api.metrics_show(target, repo=str(root), rev=rev)
        except FileNotFoundError:  # a stage that has not written its metrics yet
            out[stage] = {}
    return out


def experiments(root: Path) -> dict[str, str]:
    """The experiments based on the current commit, as `dvc exp show` lists them: {name: rev}."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = repo.experiments.ls(rev=[repo.scm.get_rev()])
    return {name: rev for entries in found.values() for name, rev in entries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.dvc_ops", description=__doc__.split("\n")[0])
    parser.add_argument("result", type=Path, help="where to write the result JSON")
    parser.add_argument("mode", choices=["repro", "exp"])
    parser.add_argument("targets", nargs="*")
    parser.add_argument("--root", type=Path, default=Path.cwd())
    parser.add_argument("--overrides", default="{}", help="JSON object of param overrides (exp)")
    parser.add_argument("--name", help="experiment name (exp)")
    parser.add_argument("--single-item", action="store_true", help="the targets alone, not their upstream stages")
    args = parser.parse_args(argv)
    if args.mode == "repro":
        result = reproduce(args.root, args.targets, args.single_item)
    else:
        result = run_experiment(args.root, args.targets, json.loads(args.overrides), args.name, args.single_item)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(f"dvc_ops: {'ok' if result['ok'] else 'failed'}: {json.dumps(result)}", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
