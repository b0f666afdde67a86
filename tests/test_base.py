"""Stage `base`: the model stages 1 and 2 start from (components/stages/base.py,
components/training/base_model.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.core import paths
from components.core.config import Params
from components.core.errors import BlipDiffError
from components.model import layout
from components.model.presets import start_model
from components.stages import base, ingest
from components.training import base_model
from tests.helpers.fast_params import FAST_BASE, SMALL_INGEST

SMALL = SMALL_INGEST


@pytest.fixture(scope="module")
def subjects_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("subjects")
    ingest.ingest_subjects(Params(ingest=SMALL).ingest, root)
    return root


def _params(**base_cfg) -> Params:
    return Params(ingest=SMALL, base={**FAST_BASE, **base_cfg})


def test_tiny_base_is_a_model_folder_with_a_manifest_and_its_metrics(subjects_root, tmp_path):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(subjects_root, root)
    metrics, samples = base.run(_params(), root)
    folder = root / paths.BASE_DIR
    model = layout.load(folder)  # the released layout: loadable like any model folder
    assert model.native_size == FAST_BASE["resolution"]
    manifest = json.loads((folder / base.MANIFEST).read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != base.MANIFEST)
    assert sorted(manifest["files"]) == files and "vae/diffusion_pytorch_model.safetensors" in files
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest
    for key in ("psnr_heldout", "colour_error_heldout", "scaling_factor", "image_encoder_probe_random",
                "image_encoder_probe_trained", "prior_loss_first", "prior_loss_last", "prior_accuracy",
                "prior_p_value", "subject_chance", "classifier_real_accuracy"):
        assert np.isfinite(metrics[key]), key
    assert metrics["subject_chance"] == pytest.approx(1 / 3) and metrics["prior_images"] == 3
    assert set(samples) == {"reconstructions", "prior_samples"}
    # stages 1 and 2 start from it
    started = start_model("tiny", "models/base", root)
    assert torch.equal(started.vae.decoder.conv_out.weight, model.vae.decoder.conv_out.weight)


def test_a_model_saved_after_loading_does_not_record_where_it_was_loaded_from(tmp_path):
    """Stage 2 loads the base from models/base and saves the trained model: its folder must not
    hold that absolute path (diffusers' `_name_or_path`), or the same run on another machine
    or checkout gives other bytes (and another dvc.lock)."""
    from components.model.tiny.blip_diffusion import build_tiny

    layout.save(build_tiny(0, image_size=16), tmp_path / "a")
    layout.save(layout.load(tmp_path / "a"), tmp_path / "b")
    for sub in ("unet", "vae", "text_encoder", "qformer"):
        text = (tmp_path / "b" / sub / "config.json").read_text()
        assert str(tmp_path) not in text, sub
        assert text == (tmp_path / "a" / sub / "config.json").read_text(), sub


def test_same_seed_same_base_bytes(subjects_root, tmp_path):
    import shutil

    digests = []
    for name in ("a", "b"):
        root = tmp_path / name
        shutil.copytree(subjects_root, root)
        base.run(_params(), root)
        digests.append(json.loads((root / paths.BASE_DIR / base.MANIFEST).read_text())["files"])
    assert digests[0] == digests[1]


def test_latent_calibration_is_exact_for_the_decoder_and_gives_unit_variance():
    """The per-channel latent mean folded into the VAE's biases: the decoder draws the same
    image from the shifted latent, and the scaled latents have zero mean and unit variance."""
    from components.model.tiny.blip_diffusion import build_tiny

    vae = build_tiny(0, image_size=16).vae
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(12, 3, 24, 24, generator=gen) * 2 - 1
    data = base_model.BaseData(pixels, ["x"] * 12, np.zeros(12, dtype=int), ["s"])
    x = base_model.resize(pixels, 16)
    with torch.no_grad():
        before_latent = vae.encode(x).latent_dist.mean
        before_image = vae.decode(before_latent).sample
        base_model.calibrate_latents(vae, data, 16)
        after_latent = vae.encode(x).latent_dist.mean
        after_image = vae.decode(after_latent).sample
    torch.testing.assert_close(after_image, before_image, atol=1e-4, rtol=1e-4)
    scaled = after_latent * vae.config.scaling_factor
    assert scaled.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert scaled.std().item() == pytest.approx(1.0, abs=1e-3)


def test_text_only_generation_encodes_the_whole_prompt_without_a_subject():
    """`generate(None, ...)`: plain text-to-image (the base's prior), the prompt encoded at
    full length by the plain text encoder; another prompt gives another image."""
    from components.model.blip_diffusion import TorchNetworks
    from components.model.conditioning import encode_text, prompt_ids
    from components.model.tiny.blip_diffusion import build_tiny

    model = build_tiny(0, image_size=16)
    nets = TorchNetworks(model)
    prompts = ["a red star-shaped toy", "a blue ball"]
    got = model.text_conditioning(nets, None, prompts, None)
    ids = model.tokenizer(prompts, padding="max_length", max_length=model.text_length, truncation=True,
                          return_tensors="pt").input_ids
    torch.testing.assert_close(got, encode_text(model.text_encoder, ids, None, model.ctx_begin_pos))
    q = model.qformer.config.num_query_tokens
    assert torch.equal(prompt_ids(model.tokenizer, prompts, model.text_length, q, [False, False]), ids)
    a = model.generate(None, prompts[:1], "", [0], num_inference_steps=2, height=16, width=16)
    b = model.generate(None, prompts[1:], "", [0], num_inference_steps=2, height=16, width=16)
    assert np.abs(a - b).max() > 1e-4


def test_bad_inputs_are_one_line_each(subjects_root, tmp_path):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(subjects_root, root)
    with pytest.raises(BlipDiffError, match=r"run `dvc repro ingest`|not found"):
        base.run(_params(), tmp_path / "empty")
    no_held = tmp_path / "noheld"
    ingest.ingest_subjects(Params(ingest={**SMALL, "test_views_per_subject": 0}).ingest, no_held)
    with pytest.raises(BlipDiffError, match=r"no held-out views.*test_views_per_subject"):
        base.run(_params(), no_held)
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(BlipDiffError, match="checkpoint folder|incomplete checkpoint"):
        base.run(_params(source=str(tmp_path / "notamodel")), root)
    # a full preset offline without the Hugging Face cache (the tests run with HF_HUB_OFFLINE=1)
    with pytest.raises(BlipDiffError, match=r"Salesforce/blipdiffusion@main .*huggingface-cli download"):
        base.run(Params(preset="blipdiffusion", base={"seed": 0}), root)
    with pytest.raises(BlipDiffError, match=r"no base model here \(run `dvc repro base`"):
        start_model("tiny", "models/base", tmp_path / "nowhere")
    assert not (root / paths.BASE_DIR).exists()


def test_a_local_model_folder_as_the_base(subjects_root, tmp_path):
    from components.model.tiny.blip_diffusion import build_tiny

    folder = tmp_path / "mine"
    layout.save(build_tiny(3, image_size=16), folder)
    root = tmp_path / "r"
    root.mkdir()
    metrics, _ = base.run(_params(source=str(folder)), root)
    assert metrics["files"] > 5
    manifest = json.loads((root / paths.BASE_DIR / base.MANIFEST).read_text())
    assert manifest["source"] == str(folder)
    assert torch.equal(layout.load(root / paths.BASE_DIR).unet.conv_in.weight, layout.load(folder).unet.conv_in.weight)


@pytest.mark.slow
def test_default_base_reconstructs_and_draws_its_subjects(default_run):
    """The default profile's base (params.yaml as it is): the autoencoder reconstructs held-out
    views at >= 24 dB, the trained image encoder tells subjects apart better than the random
    one, and the prior draws each subject from its caption: the classifier names the drawn
    subject at >= 3x chance, p < 1 % for a random guesser."""
    metrics = json.loads((default_run / "metrics" / "base.json").read_text())
    print("base:", metrics)
    assert metrics["psnr_heldout"] >= 24.0
    assert metrics["image_encoder_probe_trained"] > metrics["image_encoder_probe_random"]
    assert metrics["prior_accuracy"] >= 3 * metrics["subject_chance"] and metrics["prior_p_value"] < 0.01
    assert metrics["classifier_real_accuracy"] >= 0.9
