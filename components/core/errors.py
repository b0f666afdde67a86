"""The one exception type the CLI turns into a clear one-line error and a non-zero exit."""


class BlipDiffError(Exception):
    """A problem with the user's input (a file, a key, a value) that the message names."""


class ConfigError(BlipDiffError):
    """A bad key or value in params.yaml (or an override of it)."""


class NonFiniteError(BlipDiffError):
    """A network gave NaN or infinity (an fp16 overflow, a broken engine or checkpoint): the
    images of that call are not written. `blipdiff batch` records the batch's rows as errors."""


def check_finite(name: str, tensor) -> None:
    """Raise NonFiniteError naming `name` and the rows (first axis) holding NaN or infinity."""
    import torch

    finite = torch.isfinite(tensor.reshape(len(tensor), -1)).all(dim=1) if tensor.dim() else torch.isfinite(tensor)
    if bool(finite.all()):
        return
    rows = torch.nonzero(~finite).flatten().tolist()
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    raise NonFiniteError(f"{name} gave NaN or infinity in {len(rows)} of {len(tensor)} rows ({shown})")


# --------------------------------------------------------------------- stage reports
# A stage run that an orchestrator drives (flows/) writes what happened to it into
# $BLIPDIFF_STAGE_REPORTS/<stage>.json: "running" when it starts, then "done" or "failed" with
# the error's type and message. A report still "running" after the stage's process is gone
# means the process died without reporting (killed, out of memory, preempted). The flow reads
# these instead of the stage's log text.
STAGE_REPORTS_ENV = "BLIPDIFF_STAGE_REPORTS"
# Failures worth a retry: the stage's own code raised one of these (a server or a lock that
# may be back a minute later), or its process died without reporting.
TRANSIENT = (ConnectionError, TimeoutError)


class StageReport:
    """The report file of one stage run (no-op when the variable is not set)."""

    def __init__(self, stage: str):
        import os
        from pathlib import Path

        folder = os.environ.get(STAGE_REPORTS_ENV)
        self.stage = stage
        self.path = Path(folder) / f"{stage}.json" if folder else None
        self._write(status="running", pid=os.getpid())

    def _write(self, **fields) -> None:
        import json
        import os

        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stage": self.stage, **fields}) + "\n")
        os.replace(tmp, self.path)

    def done(self) -> None:
        self._write(status="done")

    def failed(self, exc: BaseException) -> None:
        self._write(status="failed", error_type=type(exc).__name__, message=str(exc)[:2000],
                    transient=isinstance(exc, TRANSIENT), user_error=isinstance(exc, BlipDiffError))
