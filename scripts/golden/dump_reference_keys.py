"""Dump the state-dict keys and shapes of the reference BLIP-Diffusion networks at full size.

Run in the reference environment (see scripts/golden/README.md), from the repo root:

    /work/refenv/bin/python scripts/golden/dump_reference_keys.py

The released `Salesforce/blipdiffusion` checkpoint was saved from these classes, so their
keys are its key layout. Writes tests/fixtures/released_keys.json, which
tests/test_full_size.py loads our full-size architecture against.
"""

import json
import sys
from pathlib import Path
from unittest import mock

import torch
from transformers import BertTokenizer, Blip2Config, CLIPTextConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from components.model.full_size import full_size_configs  # noqa: E402  (plain dicts only)


def main() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import (
        ContextCLIPTextModel,
    )

    cfg = full_size_configs()
    # The reference Q-Former fetches bert-base-uncased's tokenizer in __init__: not needed here.
    fake = mock.MagicMock()
    with mock.patch.object(BertTokenizer, "from_pretrained", return_value=fake), torch.device("meta"):
        models = {
            "qformer": Blip2QFormerModel(Blip2Config(**cfg["qformer"])),
            "text_encoder": ContextCLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
        }
    keys = {name: {k: list(v.shape) for k, v in m.state_dict().items()} for name, m in models.items()}
    out = Path(__file__).resolve().parents[2] / "tests/fixtures/released_keys.json"
    out.write_text(json.dumps(keys, indent=0, sort_keys=True) + "\n")
    print({name: len(k) for name, k in keys.items()}, "->", out)


if __name__ == "__main__":
    main()
