"""Model presets: where a BLIP-Diffusion bundle comes from.

- `tiny` (default): every network from a small config with seeded random weights
  (`components.model.tiny`); offline, on a CPU.
- `blipdiffusion`: the released checkpoint, by hub id (or a local copy via `checkpoint`).
- `sd15-blip2`: Stable Diffusion v1.5 with a BLIP-2 Q-Former, where pre-training starts.
"""

from __future__ import annotations

from pathlib import Path

from components.core.errors import BlipDiffError
from components.core.paths import local_path
from components.model import layout
from components.model.blip_diffusion import BlipDiffusion

PRESETS = ("tiny", "blipdiffusion", "sd15-blip2")
HUB_ID = "Salesforce/blipdiffusion"


def from_preset(preset: str, checkpoint: str | None = None, seed: int = 0) -> BlipDiffusion:
    """`checkpoint` (a folder or hub id) wins; otherwise the preset's source."""
    if checkpoint:
        return layout.load(checkpoint)
    if preset == "tiny":
        from components.model.tiny.blip_diffusion import build_tiny

        return build_tiny(seed)
    if preset == "blipdiffusion":
        return layout.load(HUB_ID)
    if preset == "sd15-blip2":
        from components.model import sd15_blip2

        # Untrained subject encoder: the starting point of pre-training, not a generator yet.
        return sd15_blip2.build(seed=seed)
    raise BlipDiffError(f"unknown preset {preset!r}; choose tiny, blipdiffusion or sd15-blip2")


def start_model(preset: str, base: str | None, root: Path, seed: int = 0) -> BlipDiffusion:
    """Where stages 1 and 2 start: the base stage's folder (`base`, relative to `root`), or,
    with `base` null, the preset's own networks (tiny: seeded random, for tests)."""
    if base is None:
        return from_preset(preset, seed=seed)
    folder = local_path(base, root)
    if not (folder / "model_index.json").is_file():
        raise BlipDiffError(f"{folder}: no base model here (run `dvc repro base`, or set base: null to start "
                            "from the preset's own networks)")
    return layout.load(folder)


def from_base(base: dict):
    """The model a recorded base names ({"preset", "seed"} or {"checkpoint"}): a registered
    model's base.json, a fine-tuned folder's `base`."""
    return from_preset(base.get("preset", "tiny"), base.get("checkpoint"), seed=int(base.get("seed", 0)))
