from pathlib import Path

import pytest
import yaml

from components.core.config import Params, load_params, parse_params
from components.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_load_and_match_code_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.preset == "tiny"  # offline by default
    # params.yaml spells out every key, so DVC tracks each one; the code defaults agree.
    assert params == Params()


def test_unknown_key_names_key_and_allowed_keys():
    raw = repo_params()
    raw["ingest"]["sorce"] = "synthetic"
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    msg = str(err.value)
    assert "ingest.sorce: unknown key" in msg
    assert "source" in msg and "max_side" in msg


def test_unknown_nested_key():
    raw = repo_params()
    raw["ingest"]["synthetic"]["num_subject"] = 3
    with pytest.raises(ConfigError, match=r"ingest\.synthetic\.num_subject: unknown key.*num_subjects"):
        parse_params(raw)


def test_out_of_range_value_names_key_and_bound():
    raw = repo_params()
    raw["context"]["fg_threshold"] = 1.5
    with pytest.raises(ConfigError, match=r"context\.fg_threshold: Input should be less than 1 \(got 1\.5\)"):
        parse_params(raw)


def test_bad_choice_lists_allowed_values():
    raw = repo_params()
    raw["ingest"]["source"] = "imagenet"
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert "ingest.source" in str(err.value)
    assert "'synthetic', 'dreambench' or 'folder'" in str(err.value)
    assert "'imagenet'" in str(err.value)


def test_cross_field_rules():
    raw = repo_params()
    raw["context"]["bg_threshold"] = 0.8
    with pytest.raises(ConfigError, match="bg_threshold .* must be below fg_threshold"):
        parse_params(raw)
    raw = repo_params()
    raw["ingest"]["source"] = "folder"
    with pytest.raises(ConfigError, match="folder.path"):
        parse_params(raw)


def test_overrides_and_bad_override(tmp_path):
    params = load_params(REPO / "params.yaml", ["ingest.synthetic.num_subjects=3", "preset=tiny"])
    assert params.ingest.synthetic.num_subjects == 3
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_params(REPO / "params.yaml", ["ingest.seed"])
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_each_preset_trains_with_its_own_defaults():
    """`preset: sd15-blip2` alone trains at the paper's settings, not at tiny's 32 px and rates;
    an explicit value still wins; params.yaml leaves the size-dependent keys on `auto`."""
    from components.core.config import PRESET_TRAINING, load_params
    from tests.conftest import REPO

    tiny = load_params(REPO / "params.yaml")
    assert (tiny.train_subject.resolution, tiny.train_subject.learning_rate) == (32, 1e-4)
    for preset in ("sd15-blip2", "blipdiffusion"):
        full = load_params(REPO / "params.yaml", [f"preset={preset}"])
        t = full.train_subject
        assert (t.resolution, t.learning_rate, t.ema_decay) == (512, 2e-6, 0.9999)
        assert t.batch_size * t.gradient_accumulation_steps == 16
        assert full.pretrain_qformer.learning_rate == 1e-4
    mine = load_params(REPO / "params.yaml", ["preset=sd15-blip2", "train_subject.resolution=256"])
    assert mine.train_subject.resolution == 256 and mine.train_subject.learning_rate == 2e-6
    raw = (REPO / "params.yaml").read_text()
    for section, keys in PRESET_TRAINING["tiny"].items():
        block = raw.split(f"\n{section}:", 1)[1].split("\n\n", 1)[0]
        for key in keys:
            assert f"\n  {key}: auto" in block, f"{section}.{key} is not auto in params.yaml"
