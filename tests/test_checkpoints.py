"""Checkpoints saved by other code load exactly, or fail fast with one clear line: the
Q-Former's tokenizer as qformer/config.json names it (relative or absolute path, hub id),
never a silent stand-in."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from components.core.errors import BlipDiffError
from components.model import layout

EXTERNAL = Path(__file__).parent / "fixtures" / "golden_external" / "blipdiffusion-tiny"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    shutil.copytree(EXTERNAL, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _name_tokenizer(ckpt: Path, value) -> None:
    config_file = ckpt / "qformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer"] = value
    config_file.write_text(json.dumps(config))


def test_relative_tokenizer_path_is_resolved_against_the_checkpoint(ckpt, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the checkpoint: the path is the checkpoint's, not the cwd's
    model = layout.load(ckpt)
    assert len(model.qformer_tokenizer) == model.qformer.config.qformer_config.vocab_size
    ids = model.qformer_tokenizer(["dog"]).input_ids[0]
    assert model.qformer_tokenizer.unk_token_id not in ids  # the real vocabulary, not a stand-in


def test_absolute_tokenizer_path(ckpt, tmp_path):
    moved = tmp_path / "elsewhere" / "bert"
    shutil.move(ckpt / "qformer_tokenizer", moved)
    _name_tokenizer(ckpt, str(moved))
    assert layout.qformer_tokenizer_source(ckpt / "qformer") == moved.resolve()
    layout.load(ckpt)


def test_missing_tokenizer_folder_is_one_clear_error(ckpt):
    _name_tokenizer(ckpt, "./no_such_folder")
    with pytest.raises(BlipDiffError, match="tokenizer './no_such_folder' not found"):
        layout.load(ckpt)


@pytest.mark.parametrize("offline_flag", ["1", None])
def test_uncached_hub_tokenizer_fails_fast_offline(ckpt, monkeypatch, tmp_path, offline_flag):
    """The released checkpoint names `bert-base-uncased`. Offline and not cached, transformers
    retries for minutes and then returns a 5-token tokenizer: here it is one line at once,
    with HF_HUB_OFFLINE set or not (this machine has no route to the hub)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache" / "hub"))
    if offline_flag:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_flag)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    _name_tokenizer(ckpt, "blipdiff-tests/no-such-tokenizer")
    start = time.perf_counter()
    with pytest.raises(BlipDiffError, match="Q-Former's tokenizer 'blipdiff-tests/no-such-tokenizer'") as err:
        layout.load(ckpt)
    assert time.perf_counter() - start < 20
    assert "put its vocab.txt in" in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_with_ids_past_the_embeddings_is_refused(ckpt):
    vocab = ckpt / "qformer_tokenizer" / "vocab.txt"
    vocab.write_text(vocab.read_text() + "".join(f"extra{i}\n" for i in range(5)))  # five words more
    with pytest.raises(BlipDiffError, match="word embeddings: ids past the table, not the tokenizer it was"):
        layout.load(ckpt)


def test_padded_word_embedding_table_loads(ckpt):
    """A Q-Former whose word-embedding table is larger than its tokenizer (a padded vocabulary,
    as checkpoints saved by the reference pipeline can have) loads, as the reference loads it."""
    vocab = ckpt / "qformer_tokenizer" / "vocab.txt"
    words = vocab.read_text().split("\n")
    vocab.write_text("\n".join(words[:-6]) + "\n")  # five words fewer than the table's rows
    model = layout.load(ckpt)
    assert len(model.qformer_tokenizer) < model.qformer.config.qformer_config.vocab_size


def test_null_mean_std_use_the_processors_own(ckpt):
    model = layout.load(ckpt)
    processor = json.loads((ckpt / "image_processor" / "preprocessor_config.json").read_text())
    assert list(model.image_processor.mean) == processor["image_mean"]
    assert list(model.image_processor.std) == processor["image_std"]
