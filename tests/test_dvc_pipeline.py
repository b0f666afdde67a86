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
