"""Stage `controlnet`: a canny-edge ControlNet for the base model, in `models/controlnet/`
(a diffusers `ControlNetModel` folder: what `blipdiff generate --controlnet` and
`export.controlnet` take).

- tiny (the default): trained here on the ingested train split's edge maps, on the base
  model's frozen UNet (`components.training.controlnet_model`). The control check: each
  held-out view's caption drawn twice with the same seed, without and with the view's edge
  map; the ControlNet follows the edges when its drawing is nearer the view (pixel MSE) than
  the plain one, for more views than a coin would give (a one-sided sign test). The grid
  `reports/samples/controlnet.png` shows the views, their edge maps and both drawings.
- full presets: `controlnet.source` (a ControlNet folder, a checkpoint with `controlnet/`, or a
  hub id; default: the preset's canny ControlNet), checked to fit the base model's UNet.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from components.core.config import ControlNetConfig, Params
from components.core.io import atomic_path
from components.core.paths import CONTROLNET_DIR, CONTROLNET_GRID, SUBJECTS_MANIFEST
from components.data.images import save_png
from components.model import controlnet as control
from components.model import layout, presets

log = logging.getLogger(__name__)

SECTIONS = ("preset", "controlnet")
OUTPUTS = (CONTROLNET_DIR,)
PLOTS = (CONTROLNET_GRID,)
DATASETS = ((SUBJECTS_MANIFEST, "training"),)
# The full presets' canny ControlNets (the released BLIP-Diffusion one sits in its checkpoint).
HUB_SOURCES = {"blipdiffusion": "Salesforce/blipdiffusion-controlnet", "sd15-blip2": "lllyasviel/sd-controlnet-canny"}
GRID_ROWS = 12
GRID_COLUMNS = ("held-out view", "its edges", "base prior", "with ControlNet")


def run(params: Params, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    cfg = params.controlnet
    model = presets.start_model(params.preset, cfg.base, root, seed=cfg.seed)
    if cfg.source or params.preset != "tiny":
        spec = cfg.source or HUB_SOURCES[params.preset]
        local = root / spec if not Path(spec).is_absolute() and (root / spec).exists() else Path(spec)
        net = control.load_controlnet(local if local.exists() else spec)
        control.check_fit(net, model.unet, spec, cfg.base or f"preset {params.preset}", model.vae_scale_factor)
        save(net, root)
        return {"source": spec}, {}
    return train_tiny(model, cfg, root)


def train_tiny(model, cfg: ControlNetConfig, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from components.training import controlnet_model
    from components.training.base_model import read_data

    train, held = read_data(root)
    size = model.native_size
    net, metrics = controlnet_model.train_controlnet(model, train, cfg, size)
    model.controlnets.append(net)
    check, grid = control_check(model, held, cfg, size)
    metrics.update(check, train_images=len(train), heldout_images=len(held))
    save(net, root)
    with atomic_path(root / CONTROLNET_GRID) as tmp:
        save_png(grid, tmp)
    log.info("controlnet: drawings nearer their view with the edges for %d of %d held-out views (p = %.2g); "
             "MSE %.4f -> %.4f", metrics["check_nearer"], metrics["check_views"], metrics["check_p_value"],
             metrics["check_mse_plain"], metrics["check_mse_control"])
    return metrics, {"controlnet_grid": grid}


@torch.no_grad()
def control_check(model, held, cfg: ControlNetConfig, size: int) -> tuple[dict, np.ndarray]:
    """Every held-out view's caption drawn without and with its edge map (same seeds); how
    much nearer to the view the controlled drawings are, and the grid."""
    from scipy.stats import binom

    from components.evaluation.grid import grid_tile, image_grid
    from components.training.base_model import resize
    from components.training.base_model import uint8_images
    from components.training.controlnet_model import condition_images

    conditions, maps = condition_images(held, size, cfg.canny_low, cfg.canny_high)
    seeds = [cfg.seed * 100_000 + i for i in range(len(held))]
    kw = dict(guidance_scale=cfg.check.guidance_scale, num_inference_steps=cfg.check.steps, height=size, width=size)
    plain = model.generate(None, held.captions, "", seeds, **kw)
    guided = model.generate(None, held.captions, "", seeds, control=control.Control([conditions], [1.0]), **kw)
    views = uint8_images(resize(held.pixels, size)).astype(np.float32) / 255
    mse_plain = ((plain - views) ** 2).mean(axis=(1, 2, 3))
    mse_control = ((guided - views) ** 2).mean(axis=(1, 2, 3))
    nearer = int((mse_control < mse_plain).sum())
    metrics = {"check_views": len(held), "check_nearer": nearer, "check_nearer_fraction": nearer / len(held),
               "check_p_value": float(binom.sf(nearer - 1, len(held), 0.5)),
               "check_mse_plain": float(mse_plain.mean()), "check_mse_control": float(mse_control.mean())}
    # one held-out view per subject first, then the rest, up to GRID_ROWS rows
    order = sorted(range(len(held)), key=lambda i: (list(held.labels[:i]).count(held.labels[i]), held.labels[i]))
    rows = order[:GRID_ROWS]
    cells = [[views[i], conditions[i].permute(1, 2, 0).numpy(), plain[i], guided[i]] for i in rows]
    grid = image_grid(cells, [held.subjects[held.labels[i]] for i in rows], list(GRID_COLUMNS), tile=grid_tile(size))
    return metrics, grid


def save(net, root: Path) -> None:
    """The ControlNet as a diffusers folder, without the load path diffusers records."""
    with atomic_path(root / CONTROLNET_DIR) as tmp:
        net.save_pretrained(tmp, safe_serialization=True)
        layout.drop_load_path(tmp / "config.json")
