"""Golden parity with the reference (diffusers 0.32.2's BlipDiffusionPipeline).

tests/fixtures/golden/ was made by scripts/golden/make_golden.py in the reference
environment (see scripts/golden/README.md): a tiny checkpoint in the released layout and
the reference's outputs on it. Here our loader reads the same folder and must match.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from components.model.layout import load

GOLDEN = Path(__file__).parent / "fixtures" / "golden"


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN / "golden.safetensors"), json.loads((GOLDEN / "inputs.json").read_text())


@pytest.fixture(scope="module")
def model():
    return load(GOLDEN / "blipdiffusion-tiny")


@pytest.fixture(scope="module")
def reference_image():
    return Image.open(GOLDEN / "reference.png").convert("RGB")


def test_preprocessing_matches(model, golden, reference_image):
    tensors, _ = golden
    pixels = model.image_processor([reference_image])
    assert torch.allclose(pixels, tensors["reference_pixel_values"], atol=1e-5)


def test_subject_embeddings_match(model, golden, reference_image):
    tensors, inputs = golden
    subject = inputs["pipeline_call"]["source_subject_category"][0]
    ours = model.subject_embeddings([reference_image], subject)
    assert ours.shape == tensors["query_embeds"].shape
    assert (ours - tensors["query_embeds"]).abs().max() < 1e-4


def test_text_embeddings_match(model, golden):
    tensors, inputs = golden
    call = inputs["pipeline_call"]
    built = model.build_prompt(call["prompt"][0], call["target_subject_category"][0],
                               call["prompt_strength"], call["prompt_reps"])
    assert built == inputs["built_prompt"][0]
    cond = model.encode_prompts([built], tensors["query_embeds"])
    assert (cond - tensors["text_embeds_cond"]).abs().max() < 1e-4
    uncond = model.encode_negative(call["neg_prompt"], 1)
    assert (uncond - tensors["text_embeds_uncond"]).abs().max() < 1e-4


def test_unet_noise_prediction_matches(model, golden):
    tensors, _ = golden
    text = torch.cat([tensors["text_embeds_uncond"], tensors["text_embeds_cond"]])
    latents = torch.cat([tensors["init_latents"]] * 2)
    with torch.inference_mode():
        noise = model.unet(latents, tensors["timesteps"][0], encoder_hidden_states=text).sample
    assert (noise - tensors["unet_noise_pred_t0"]).abs().max() < 1e-4


def test_final_image_matches(model, golden, reference_image):
    tensors, inputs = golden
    call = inputs["pipeline_call"]
    embeds = model.subject_embeddings([reference_image], call["source_subject_category"][0])
    image = model.generate(
        embeds, call["prompt"], call["target_subject_category"][0], [call["generator_seed"]],
        negative_prompt=call["neg_prompt"], guidance_scale=call["guidance_scale"],
        num_inference_steps=call["num_inference_steps"], height=call["height"], width=call["width"],
        scheduler="pndm", prompt_strength=call["prompt_strength"], prompt_reps=call["prompt_reps"],
    )
    expected = tensors["image"].numpy()
    assert image.shape == expected.shape
    assert np.abs(image - expected).max() < 1e-3
