"""Golden parity with the reference (diffusers 0.32.2's BlipDiffusionPipeline).

tests/fixtures/golden*/ were made by scripts/golden/make_golden.py in the reference
environment (see scripts/golden/README.md): a tiny checkpoint in the released layout and
the reference's outputs on it. Here our loader reads the same folder and must match.

Two checkpoints, as other code saves them: `golden` as the released one (explicit mean/std,
the Q-Former's vocab.txt in qformer/), `golden_external` as a pipeline constructed with its
defaults (model_index.json mean/std null: the image processor's own values, here ImageNet's)
and with the Q-Former's tokenizer named by qformer/config.json (a folder beside qformer/).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from components.model.layout import load
from tests.helpers.text_reference import encode_negative, encode_prompts

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"


@pytest.fixture(scope="module", params=["golden", "golden_external"])
def folder(request):
    return FIXTURES / request.param


@pytest.fixture(scope="module")
def golden(folder):
    return load_file(folder / "golden.safetensors"), json.loads((folder / "inputs.json").read_text())


@pytest.fixture(scope="module")
def model(folder):
    return load(folder / "blipdiffusion-tiny")


@pytest.fixture(scope="module")
def reference_image(folder):
    return Image.open(folder / "reference.png").convert("RGB")


def test_external_checkpoint_is_what_it_says():
    """The second fixture really has null mean/std, no tokenizer in qformer/, and a processor
    whose values differ from CLIP's (so using CLIP's defaults would fail the parity below)."""
    ckpt = FIXTURES / "golden_external" / "blipdiffusion-tiny"
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["mean"] is None and index["std"] is None
    assert not (ckpt / "qformer" / "vocab.txt").exists()
    assert json.loads((ckpt / "qformer" / "config.json").read_text())["tokenizer"] == "qformer_tokenizer"
    processor = json.loads((ckpt / "image_processor" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406]
    assert load(ckpt).image_processor.mean == (0.485, 0.456, 0.406)


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
    cond = encode_prompts(model, [built], tensors["query_embeds"])
    assert (cond - tensors["text_embeds_cond"]).abs().max() < 1e-4
    uncond = encode_negative(model, call["neg_prompt"], 1)
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
