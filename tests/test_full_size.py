"""The full-size architecture (the released checkpoint's) takes the released key layout exactly.

tests/fixtures/released_keys.json holds the keys and shapes of the reference classes at full
size (scripts/golden/dump_reference_keys.py, run in the reference environment).
"""

import json
from pathlib import Path

import pytest
import torch

from components.model.full_size import build_full_size
from components.model.qformer import convert_reference_state_dict

RELEASED = json.loads((Path(__file__).parent / "fixtures/released_keys.json").read_text())


@pytest.fixture(scope="module")
def full_size():
    return build_full_size("meta")


@pytest.mark.parametrize("part", ["qformer", "text_encoder", "unet", "vae"])
def test_released_state_dict_loads_with_no_missing_or_unexpected_key(full_size, part):
    model = full_size[part]
    state = {k: torch.empty(shape, device="meta") for k, shape in RELEASED[part].items()}
    if part == "qformer":
        state = convert_reference_state_dict(state)
    if part == "text_encoder":
        # the saved position_ids buffer is declared ignorable by the class
        state = {k: v for k, v in state.items() if k != "text_model.embeddings.position_ids"}
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: list(v.shape) for k, v in state.items()}
    assert sorted(set(theirs) - set(ours)) == []  # unexpected
    assert sorted(set(ours) - set(theirs)) == []  # missing
    assert ours == theirs  # and every shape agrees
    missing, unexpected = model.load_state_dict(state, strict=True, assign=True)
    assert not missing and not unexpected


def test_full_size_parameter_counts(full_size):
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in full_size.items()}
    assert counts["unet"] == 859_520_964  # Stable Diffusion v1.5's UNet
    assert counts["text_encoder"] == 123_060_480
    assert counts["vae"] == 83_653_863
    assert full_size["qformer"].query_tokens.shape == (1, 16, 768)
