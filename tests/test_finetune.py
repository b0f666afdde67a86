"""Subject fine-tuning: it learns (held-out loss falls), LoRA is small, both load in generation."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from components.cli import main
from components.core.errors import BlipDiffError
from components.data import synthetic
from components.model import finetuned
from components.model.tiny.blip_diffusion import build_tiny
from components.training import finetune as ft


@pytest.fixture(scope="module")
def views():
    return [v.image for v in synthetic.generate(1, 4, 4, 64, seed=0)]


def _fixed_loss(model, embeds, images) -> float:
    """Denoising loss on fixed latents, noise and timesteps: comparable before and after."""
    gen = torch.Generator().manual_seed(123)
    latents = ft.reference_latents(model, images, gen)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (len(images),), generator=gen)
    sched = DDPMScheduler.from_config(model.scheduler.config)
    with torch.no_grad():
        return ft.denoising_loss(model, embeds, ft.prompt_ids(model, "toy", embeds.shape[1]),
                                 sched, latents, noise, t).item()


def test_full_finetune_lowers_the_loss_on_the_subject(views):
    model = build_tiny(seed=0)
    start_embeds = model.subject_embeddings(views, "toy")
    before = _fixed_loss(model, start_embeds, views)
    result = ft.finetune(model, views, "toy", ft.FinetuneConfig(steps=60, learning_rate=1e-3))
    after = _fixed_loss(model, result.subject_embeds, views)
    # Measured: 1.10 -> 0.84 with unit-variance latents. (The same drop is seen on another
    # subject's images: 60 steps teach denoising in general; subject specificity is not
    # shown at this scale.) A trainer that does not update, or updates the wrong way, fails.
    assert after < 0.9 * before, (before, after)
    assert not torch.allclose(result.subject_embeds, start_embeds)  # the embeddings train too
    assert result.seconds > 0 and len(result.losses) == 60


def test_lora_trains_adapters_only_and_round_trips(views, tmp_path):
    model = build_tiny(seed=0)
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cfg = ft.FinetuneConfig(steps=20, learning_rate=1e-2, lora_rank=4)
    result = ft.finetune(model, views, "toy", cfg)
    tuned = model.unet.state_dict()
    for key, value in base.items():  # base weights are untouched (peft wraps them as base_layer)
        match = key if key in tuned else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(tuned[match], value), key
    ft.save(model, result, cfg, "toy", tmp_path / "lora")
    ft.save(build_tiny(seed=0), result, ft.FinetuneConfig(), "toy", tmp_path / "full")
    lora_bytes = (tmp_path / "lora" / finetuned.LORA_FILE).stat().st_size
    unet_bytes = sum(p.stat().st_size for p in (tmp_path / "full" / "unet").iterdir())
    assert lora_bytes < 0.1 * unet_bytes

    fresh = build_tiny(seed=0)
    embeds, meta = finetuned.apply(fresh, tmp_path / "lora")
    assert meta["source_subject"] == "toy"
    kw = dict(num_inference_steps=2, height=32, width=32)
    ours = model.generate(result.subject_embeds.detach(), ["x"], "toy", [0], **kw)
    assert np.abs(fresh.generate(embeds, ["x"], "toy", [0], **kw) - ours).max() < 1e-5
    assert np.abs(build_tiny(seed=0).generate(embeds, ["x"], "toy", [0], **kw) - ours).max() > 1e-3


def test_finetune_cli_then_generate(tmp_path, views, capsys):
    from PIL import Image

    paths = []
    for i, image in enumerate(views):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    out = tmp_path / "toy"
    assert main(["finetune", "--preset", "tiny", "--subject-image", *paths, "--subject", "toy",
                 "--steps", "3", "--lora-rank", "2", "--out", str(out)]) == 0
    record = json.loads((out / "finetune.json").read_text())
    assert record["steps"] == 3 and record["seconds"] > 0 and record["lora_rank"] == 2
    assert main(["generate", "--preset", "tiny", "--finetuned", str(out), "--prompt", "on a beach",
                 "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "gen")]) == 0
    rec = json.loads((tmp_path / "gen" / "records.json").read_text())[0]
    assert rec["target_subject"] == "toy" and rec["finetuned"] == str(out)

    assert main(["finetune", "--preset", "tiny", "--subject-image", *paths, "--subject", "toy",
                 "--steps", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(BlipDiffError, match="not a fine-tuned subject folder"):
        finetuned.apply(build_tiny(seed=0), tmp_path)
