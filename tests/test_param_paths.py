"""Paths in params mean the same in `dvc repro` and in an experiment's temporary copy
(relative to the main working tree), and DreamBench's default is the verified download,
with a local copy named by $BLIPDIFF_DREAMBENCH."""

from __future__ import annotations

import subprocess

import pytest

from components.core.config import Params
from components.core.errors import BlipDiffError
from components.core.paths import DREAMBENCH_ENV, external_path, main_worktree
from components.data import dreambench


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv(DREAMBENCH_ENV, raising=False)
    main = tmp_path / "repo"
    main.mkdir()
    subprocess.run(["git", "init", "-q", str(main)], check=True)
    (tmp_path / "bench").mkdir()
    return main


def test_a_relative_path_resolves_from_the_main_tree_also_in_an_experiments_copy(repo, tmp_path, monkeypatch):
    assert external_path("../bench", repo) == tmp_path / "bench"
    temp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc"  # where `dvc exp run --temp` runs a stage
    temp_copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(repo))  # as DVC sets it there
    assert main_worktree(temp_copy) == repo.resolve()
    assert external_path("../bench", temp_copy) == tmp_path / "bench"
    assert external_path(tmp_path / "elsewhere", temp_copy) == tmp_path / "elsewhere"  # absolute as given


def test_dreambench_default_is_the_download_and_the_env_var_names_a_local_copy(repo, tmp_path, monkeypatch):
    cfg = Params.model_validate({}).ingest.dreambench
    assert cfg.path is None
    asked = []
    monkeypatch.setattr(dreambench, "download", lambda url, cache: asked.append(url) or tmp_path / "downloaded")
    assert dreambench.local_or_download(cfg, repo) == tmp_path / "downloaded" and asked == [cfg.url]
    monkeypatch.setenv(DREAMBENCH_ENV, str(tmp_path / "bench"))
    assert dreambench.local_or_download(cfg, repo) == tmp_path / "bench"
    monkeypatch.setenv(DREAMBENCH_ENV, str(tmp_path / "missing"))
    with pytest.raises(BlipDiffError, match=f"{DREAMBENCH_ENV}: .*missing not found"):
        dreambench.local_or_download(cfg, repo)
    # an explicit param wins over the environment, relative to the main working tree
    explicit = Params.model_validate({"ingest": {"dreambench": {"path": "../bench"}}}).ingest.dreambench
    assert dreambench.local_or_download(explicit, repo) == tmp_path / "bench"
