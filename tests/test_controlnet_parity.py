"""ControlNet generation against diffusers 0.32.2's `BlipDiffusionControlNetPipeline`.

tests/fixtures/golden_controlnet/ was made by scripts/golden/make_controlnet_golden.py in the
reference environment (scripts/golden/README.md): a tiny checkpoint in the
`Salesforce/blipdiffusion-controlnet` layout (mean/std null), whose ControlNet's
zero-initialised layers were re-drawn with seeded noise so that its residuals are not zero,
and what the reference pipeline computed with it: the prepared condition image, the step-0
residuals, the per-step latents and the image.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from components.cli import main
from components.model import controlnet, layout
from components.model.controlnet import Control, control_pixels

FIXTURES = Path(__file__).parent / "fixtures"
FOLDER = FIXTURES / "golden_controlnet"
CHECKPOINT = FOLDER / "blipdiffusion-controlnet-tiny"
PLAIN = FIXTURES / "golden" / "blipdiffusion-tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    return load_file(FOLDER / "golden.safetensors"), json.loads((FOLDER / "inputs.json").read_text())


def _rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(FOLDER / name).convert("RGB"))


def _run(model, golden):
    """Our generate on the reference call's inputs; the step-0 residuals and per-step latents
    captured on the way."""
    tensors, inputs = golden
    call = inputs["pipeline_call"]
    captured = {"residuals": [], "latents": []}
    net = model.controlnets[0]
    hook = net.register_forward_hook(lambda mod, args, out: captured["residuals"].append(out))
    make = model.make_scheduler

    def scheduler(name):
        sched = make(name)
        step = sched.step

        def recorded(noise, t, latents, *a, **kw):
            out = step(noise, t, latents, *a, **kw)
            captured["latents"].append(out.prev_sample.clone())
            return out

        sched.step = recorded
        return sched

    model.make_scheduler = scheduler
    try:
        embeds = model.subject_embeddings([_rgb("reference.png")], call["source_subject_category"][0])
        control = Control([control_pixels([_rgb("control.png")], call["height"], call["width"])])
        image = model.generate(
            embeds, call["prompt"], call["target_subject_category"][0], [call["generator_seed"]],
            negative_prompt=call["neg_prompt"], guidance_scale=call["guidance_scale"],
            num_inference_steps=call["num_inference_steps"], height=call["height"], width=call["width"],
            prompt_strength=call["prompt_strength"], prompt_reps=call["prompt_reps"], control=control)
    finally:
        hook.remove()
        del model.make_scheduler
    return image, captured


@pytest.fixture(scope="module")
def ours(golden):
    torch.set_num_threads(1)
    model = layout.load(CHECKPOINT)
    return model, *_run(model, golden)


def test_the_fixture_is_what_it_says(golden):
    index = json.loads((CHECKPOINT / "model_index.json").read_text())
    assert index["_class_name"] == "BlipDiffusionControlNetPipeline" and index["controlnet"] == [
        "diffusers", "ControlNetModel"]
    assert index["mean"] is None and index["std"] is None
    tensors, inputs = golden
    # its zero-initialised layers were re-drawn: the ControlNet moves the reference's image
    assert (tensors["image"] - tensors["image_without_controlnet"]).abs().max() > 0.05
    assert all(tensors[f"controlnet_down_t0_{i}"].abs().max() > 0.01 for i in range(4))


def test_condition_image_is_prepared_as_the_reference(golden):
    tensors, inputs = golden
    call = inputs["pipeline_call"]
    ours = control_pixels([_rgb("control.png")], call["height"], call["width"])
    torch.testing.assert_close(torch.cat([ours] * 2), tensors["control_image"], atol=0, rtol=0)


def test_step0_residuals_latents_and_image_match_the_reference(golden, ours):
    tensors, _ = golden
    model, image, captured = ours
    down, mid = captured["residuals"][0]
    assert len(down) == 4
    for i, d in enumerate(down):
        assert (d - tensors[f"controlnet_down_t0_{i}"]).abs().max() < TOL, f"down residual {i}"
    assert (mid - tensors["controlnet_mid_t0"]).abs().max() < TOL
    steps = torch.stack(captured["latents"])
    assert steps.shape == tensors["latents_per_step"].shape
    assert (steps - tensors["latents_per_step"]).abs().max() < TOL
    assert image.shape == tuple(tensors["image"].shape)
    assert np.abs(image - tensors["image"].numpy()).max() < TOL


def test_the_same_controlnet_added_to_the_plain_checkpoint_gives_the_same_image(golden, ours, tmp_path):
    tensors, inputs = golden
    plain = layout.load(PLAIN)
    assert plain.controlnets == []
    controlnet.attach(plain, [CHECKPOINT], str(PLAIN))
    image, _ = _run(plain, golden)
    assert np.abs(image - tensors["image"].numpy()).max() < TOL
    # and through the CLI, --controlnet naming the checkpoint (its controlnet/ folder)
    call = inputs["pipeline_call"]
    out = tmp_path / "out"
    assert main(["generate", "--checkpoint", str(PLAIN), "--controlnet", str(CHECKPOINT),
                 "--subject-image", str(FOLDER / "reference.png"), "--source-subject", "dog",
                 "--prompt", call["prompt"][0], "--seeds", "0", "--steps", str(call["num_inference_steps"]),
                 "--guidance-scale", str(call["guidance_scale"]), "--height", "64", "--width", "64",
                 "--control-image", str(FOLDER / "control.png"), "--control-type", "none", "--out", str(out)]) == 0
    png = np.asarray(Image.open(out / "images/0000.png"), dtype=np.float32) / 255
    assert np.abs(png - tensors["image"][0].numpy()).max() <= 1 / 255 + 1e-6
