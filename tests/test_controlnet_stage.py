"""Stage `controlnet`: the base model's canny-edge ControlNet (components/stages/controlnet.py,
components/training/controlnet_model.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.cli import main
from components.core import paths
from components.core.config import Params
from components.core.errors import BlipDiffError
from components.model import controlnet, layout
from components.model.tiny.blip_diffusion import build_tiny
from components.stages import controlnet as stage
from components.stages import ingest
from tests.helpers.fast_params import FAST_CONTROLNET, SMALL_INGEST

SMALL = SMALL_INGEST


@pytest.fixture(scope="module")
def subjects_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("subjects")
    ingest.ingest_subjects(Params(ingest=SMALL).ingest, root)
    layout.save(build_tiny(0, image_size=16), root / paths.BASE_DIR)
    return root


def _params(**cfg) -> Params:
    return Params(ingest=SMALL, controlnet={**FAST_CONTROLNET, **cfg})


def test_tiny_controlnet_is_a_controlnet_folder_for_the_base_with_its_check(subjects_root, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(subjects_root, root)
    metrics, samples = stage.run(_params(), root)
    net = controlnet.load_controlnet(root / paths.CONTROLNET_DIR)
    base = layout.load(root / paths.BASE_DIR)
    controlnet.check_fit(net, base.unet, "stage's", "base", base.vae_scale_factor)
    assert "_name_or_path" not in json.loads((root / paths.CONTROLNET_DIR / "config.json").read_text())
    assert metrics["check_views"] == 3 and metrics["controlnet_steps"] == 2
    for key in ("controlnet_loss_first", "controlnet_loss_last", "check_mse_plain", "check_mse_control",
                "check_p_value", "check_nearer_fraction"):
        assert np.isfinite(metrics[key]), key
    grid = np.asarray(Image.open(root / paths.CONTROLNET_GRID))
    assert grid.ndim == 3 and np.array_equal(grid, samples["controlnet_grid"])
    # the stage's folder is what --controlnet takes
    out = tmp_path / "out"
    ref = next((root / "data/subjects/images").rglob("*.png"))
    assert main(["generate", "--checkpoint", str(root / paths.BASE_DIR), "--controlnet", str(root / paths.CONTROLNET_DIR),
                 "--subject-image", str(ref), "--source-subject", "toy", "--prompt", "x", "--steps", "2",
                 "--control-image", str(ref), "--out", str(out)]) == 0
    assert (out / "control/00.png").is_file()


def test_same_seed_same_controlnet_bytes(subjects_root, tmp_path):
    digests = []
    for name in ("a", "b"):
        root = tmp_path / name
        shutil.copytree(subjects_root, root)
        stage.run(_params(), root)
        digests.append((root / paths.CONTROLNET_DIR / "diffusion_pytorch_model.safetensors").read_bytes())
    assert digests[0] == digests[1]


def test_a_controlnet_folder_as_the_source_and_one_that_does_not_fit(subjects_root, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from components.model.tiny.controlnet import build_tiny_controlnet

    root = tmp_path / "r"
    shutil.copytree(subjects_root, root)
    build_tiny_controlnet(layout.load(root / paths.BASE_DIR), seed=4).save_pretrained(root / "mine")
    assert stage.run(_params(source="mine"), root)[0] == {"source": "mine"}
    assert controlnet.load_controlnet(root / paths.CONTROLNET_DIR).config.block_out_channels == [32, 64]
    other = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    ControlNetModel.from_unet(other, conditioning_embedding_out_channels=(8, 16)).save_pretrained(root / "other")
    with pytest.raises(BlipDiffError, match=r"the ControlNet other \(block channels \[16, 32\]\) does not fit the "
                                            r"UNet of models/base \(block channels \[32, 64\]\)"):
        stage.run(_params(source="other"), root)
    with pytest.raises(BlipDiffError, match="no such folder"):
        stage.run(_params(source="missing_folder"), root)


@pytest.mark.slow
def test_default_controlnet_follows_the_edges_of_held_out_views(default_run):
    """The default profile's ControlNet (params.yaml as it is): each held-out view's caption
    drawn with the view's edge map lands nearer the view than the same seed drawn without,
    for more views than a coin would give (p < 1 %), and nearer on average."""
    metrics = json.loads((default_run / "metrics" / "controlnet.json").read_text())
    print("controlnet:", metrics)
    assert metrics["check_views"] >= 30
    assert metrics["check_p_value"] < 0.01 and metrics["check_nearer_fraction"] >= 0.75
    assert metrics["check_mse_control"] < metrics["check_mse_plain"]
    assert metrics["controlnet_loss_last"] < metrics["controlnet_loss_first"]
