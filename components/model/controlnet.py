"""ControlNet-guided generation: where a ControlNet comes from, whether it fits the UNet, and
what it is given (the condition image and, per step, whether it acts).

A ControlNet is a diffusers `ControlNetModel`. It loads from
- a checkpoint in the `Salesforce/blipdiffusion-controlnet` layout (`model_index.json` with a
  `controlnet` entry, a `controlnet/` folder): `layout.load` attaches it to the bundle;
- `--controlnet DIR|HUB_ID`: a `ControlNetModel` folder (its `config.json`), a checkpoint
  folder holding one in `controlnet/`, or a hub id, added to any checkpoint (`attach`).

In generation (`BlipDiffusion.generate(..., control=Control(...))`) every ControlNet sees the
UNet's sample, timestep and text embeddings (both guidance branches) and its condition image;
its residuals, times its scale, are summed over the ControlNets (as diffusers'
`MultiControlNetModel` sums them) and enter the UNet through its down- and mid-block residual
inputs. The condition image is prepared exactly as diffusers' `BlipDiffusionControlNetPipeline`
prepares it (`control_pixels`); `canny` makes an edge map first (LAVIS's recipe).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from components.core.errors import BlipDiffError
from components.core.paths import is_hub_id

log = logging.getLogger(__name__)

# What `--control-type` takes offline. Depth and HED maps need estimator weights from a hub
# (LAVIS pairs those ControlNets with another base checkpoint): make the map elsewhere and
# pass it with `none`.
CONTROL_TYPES = ("canny", "none")
NEEDS_WEIGHTS = {"depth": "a depth estimator (e.g. Intel/dpt-hybrid-midas)",
                 "hed": "the HED edge detector (lllyasviel/Annotators)"}
CANNY_LOW, CANNY_HIGH = 100, 200  # controlnet_aux's defaults; LAVIS's notebook uses 30/70 ("dense edges")
CANNY_SHORT_SIDE, CANNY_MULTIPLE = 512, 64


# -------------------------------------------------------------------- loading
def _folder_of(spec: str) -> Path:
    """The local folder of a `--controlnet` spec (a hub id downloaded, or from the cache)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(spec):
        raise BlipDiffError(f"--controlnet {spec}: no such folder (give a ControlNetModel folder, a checkpoint "
                            "with a controlnet/ folder, or a hub id)")
    from huggingface_hub import snapshot_download

    try:
        # a ControlNetModel repository's files, or a checkpoint's controlnet/ folder (not its UNet, VAE...)
        return Path(snapshot_download(spec, allow_patterns=["config.json", "diffusion_pytorch_model*.safetensors",
                                                            "diffusion_pytorch_model*.json", "controlnet/*"]))
    except Exception as exc:  # offline, unknown id, ...
        raise BlipDiffError(f"--controlnet {spec}: not a local folder and not downloadable "
                            f"({type(exc).__name__})") from None


def controlnet_folder(path: Path) -> Path:
    """The `ControlNetModel` folder in `path`: the folder itself, or its `controlnet/`."""
    for candidate in (path, path / "controlnet"):
        config = candidate / "config.json"
        if config.is_file():
            try:
                name = json.loads(config.read_text()).get("_class_name")
            except ValueError:
                raise BlipDiffError(f"{config}: not valid JSON") from None
            if name == "ControlNetModel":
                return candidate
    raise BlipDiffError(f"{path}: no ControlNet here (a folder whose config.json has _class_name ControlNetModel, "
                        "or a checkpoint with one in controlnet/)")


def load_controlnet(spec: str | Path):
    """A diffusers `ControlNetModel` from a folder, a checkpoint's `controlnet/`, or a hub id."""
    from diffusers import ControlNetModel

    folder = controlnet_folder(_folder_of(str(spec)))
    try:
        net = ControlNetModel.from_pretrained(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise BlipDiffError(f"{folder}: could not load the ControlNet: {str(exc).splitlines()[0][:300]}") from None
    return net.eval()


def _shape(config) -> dict:
    return {"block channels": list(config.block_out_channels), "cross-attention": config.cross_attention_dim,
            "latent channels": config.in_channels, "layers per block": config.layers_per_block,
            "down blocks": len(config.down_block_types)}


def check_fit(controlnet, unet, controlnet_name: str, model_name: str, vae_scale_factor: int | None = None) -> None:
    """One line naming both when the ControlNet's residuals cannot enter this UNet."""
    mine, theirs = _shape(controlnet.config), _shape(unet.config)
    wrong = [k for k in mine if mine[k] != theirs[k]]
    if wrong:
        def say(d):
            return ", ".join(f"{k} {d[k]}" for k in wrong)

        raise BlipDiffError(f"the ControlNet {controlnet_name} ({say(mine)}) does not fit the UNet of {model_name} "
                            f"({say(theirs)})")
    if vae_scale_factor is not None:
        down = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
        if down != vae_scale_factor:
            raise BlipDiffError(f"the ControlNet {controlnet_name} shrinks its condition image {down}x but the VAE "
                                f"of {model_name} {vae_scale_factor}x: it was made for another base model")


def attach(model, specs: Sequence[str | Path], model_name: str) -> None:
    """Load each `--controlnet` and add it to the bundle's ControlNets (after the checkpoint's
    own), each checked to fit the UNet."""
    for spec in specs:
        net = load_controlnet(spec)
        check_fit(net, model.unet, str(spec), model_name, model.vae_scale_factor)
        model.controlnets.append(net.to(model.device, model.dtype))


# -------------------------------------------------------------------- condition images
def check_control_type(control_type: str, name: str = "--control-type") -> None:
    """One line when `control_type` cannot make a condition map here; `name` is the setting
    as the user wrote it (a flag, or a manifest column)."""
    if control_type in NEEDS_WEIGHTS:
        raise BlipDiffError(f"{name} {control_type} needs {NEEDS_WEIGHTS[control_type]}, which cannot be loaded "
                            f"offline: make the map elsewhere and pass it with {name} none")
    if control_type not in CONTROL_TYPES:
        raise BlipDiffError(f"unknown {name.lstrip('-').replace('-', ' ')} {control_type!r}; choose one of "
                            f"{', '.join(CONTROL_TYPES)}")


def check_canny_thresholds(low: int, high: int, name: str = "canny thresholds") -> None:
    if not 0 <= low <= high:
        raise BlipDiffError(f"{name} must satisfy 0 <= low <= high, got {low}/{high}")


def canny_side(height: int, width: int) -> int:
    """The short side the edge map is made at for an output of height x width: the output's
    short side rounded to a multiple of 64 (at least 64), so 512 for the released model's 512 px
    images, as LAVIS's notebook. Edges made at 512 px and shrunk to a 32 px output would be
    1/16 px wide, all but gone."""
    return max(CANNY_MULTIPLE, int(round(min(height, width) / CANNY_MULTIPLE)) * CANNY_MULTIPLE)


def canny(image: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH,
          short_side: int = CANNY_SHORT_SIDE) -> np.ndarray:
    """An edge map as LAVIS's notebook makes it: the short side to `short_side` (512 there;
    `canny_side` for other output sizes; Lanczos), both sides rounded to multiples of 64,
    `cv2.Canny` on the 3-channel image; white edges on black, 3 channels (HxWx3 uint8)."""
    import cv2

    check_canny_thresholds(low, high)
    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    size = (max(CANNY_MULTIPLE, int(np.round(w * scale / CANNY_MULTIPLE)) * CANNY_MULTIPLE),
            max(CANNY_MULTIPLE, int(np.round(h * scale / CANNY_MULTIPLE)) * CANNY_MULTIPLE))
    resized = np.asarray(Image.fromarray(image).convert("RGB").resize(size, Image.Resampling.LANCZOS))
    edges = cv2.Canny(np.ascontiguousarray(resized), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def condition_map(image: np.ndarray, control_type: str, low: int = CANNY_LOW, high: int = CANNY_HIGH,
                  short_side: int = CANNY_SHORT_SIDE) -> np.ndarray:
    """What the ControlNet is given for a user's image: its canny edges, or (`none`) the image
    itself, already a condition map (a depth or HED map made elsewhere)."""
    check_control_type(control_type)
    return canny(image, low, high, short_side) if control_type == "canny" else np.asarray(image)


def control_pixels(images: Sequence[np.ndarray], height: int, width: int) -> torch.Tensor:
    """The ControlNet's condition input, as diffusers' `BlipDiffusionControlNetPipeline`
    prepares it (`BlipImageProcessor.preprocess(size=(H, W))`, no crop, no normalisation):
    RGB, bicubic resize to (height, width), rescaled to [0, 1] (x * 1/255 in float64, then
    float32). (N, 3, H, W) float32."""
    out = []
    for image in images:
        pil = Image.fromarray(np.asarray(image)).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        arr = (np.asarray(pil).astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    return torch.stack(out)


# -------------------------------------------------------------------- in the sampling loop
@dataclass
class Control:
    """The control of one `generate` call, one entry per ControlNet of the networks.

    - `images`: per ControlNet, condition images in [0, 1] at the output size: (1, 3, H, W),
      shared by every image of the call, or (N, 3, H, W), one per image (`control_pixels`).
    - `scales`: per ControlNet, one scale for all images or one per image.
    - `start`, `end`: the guidance window, fractions of the steps (diffusers' `control_guidance_start`/
      `_end`): the ControlNets act at step i of n when i/n >= start and (i+1)/n <= end.
    """

    images: list[torch.Tensor]
    scales: list[float | Sequence[float]] = field(default_factory=list)
    start: float = 0.0
    end: float = 1.0

    def check(self, count: int, num_controlnets: int, height: int, width: int) -> None:
        if num_controlnets == 0:
            raise BlipDiffError("a control image was given but the model has no ControlNet (add one with "
                                "--controlnet, or load a checkpoint with a controlnet/ folder)")
        if len(self.images) != num_controlnets:
            raise BlipDiffError(f"{len(self.images)} control images for {num_controlnets} ControlNets: give one "
                                "per ControlNet")
        if self.scales and len(self.scales) != num_controlnets:
            raise BlipDiffError(f"{len(self.scales)} ControlNet scales for {num_controlnets} ControlNets")
        for image in self.images:
            if image.ndim != 4 or image.shape[1] != 3 or len(image) not in (1, count):
                raise BlipDiffError(f"control images of shape {tuple(image.shape)}: expected (1 or {count}, 3, H, W)")
            if tuple(image.shape[2:]) != (height, width):
                raise BlipDiffError(f"control image of {image.shape[3]}x{image.shape[2]} for an output of "
                                    f"{width}x{height}: prepare it at the output size (control_pixels)")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise BlipDiffError(f"control window {self.start}..{self.end}: need 0 <= start < end <= 1")

    def scale_rows(self, count: int) -> torch.Tensor:
        """(ControlNets, count) float32 scales."""
        scales = self.scales or [1.0] * len(self.images)
        rows = []
        for s in scales:
            values = [float(s)] * count if np.isscalar(s) else [float(v) for v in s]
            if len(values) != count:
                raise BlipDiffError(f"{len(values)} ControlNet scales for {count} images")
            rows.append(values)
        return torch.tensor(rows, dtype=torch.float32)

    def rows(self, start: int, stop: int) -> "Control":
        """The control of images start..stop of the call (a batch of it)."""
        images = [img if len(img) == 1 else img[start:stop] for img in self.images]
        scales = [s if np.isscalar(s) else list(s)[start:stop] for s in (self.scales or [1.0] * len(self.images))]
        return Control(images, scales, self.start, self.end)

    def active(self, step: int, steps: int) -> bool:
        """diffusers' `controlnet_keep`: on at step i of n unless i/n < start or (i+1)/n > end."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def residuals(nets, control_inputs: list[torch.Tensor], scales: torch.Tensor, sample: torch.Tensor,
              timestep: torch.Tensor, hidden: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """The summed, scaled residuals of every ControlNet with a non-zero scale, or None when no
    ControlNet acts (the UNet then runs exactly as without one). `control_inputs[k]` and
    `scales[k]` (rows of the UNet batch) belong to ControlNet k."""
    down, mid = None, None
    for k, (cond, scale) in enumerate(zip(control_inputs, scales)):
        if not bool(scale.any()):
            continue
        d, m = nets.controlnet(k, sample, timestep, hidden, cond)
        s = scale.to(m.device, m.dtype)[:, None, None, None]
        d, m = [x * s for x in d], m * s
        if down is None:
            down, mid = d, m
        else:  # as diffusers' MultiControlNetModel merges them
            down, mid = [a + b for a, b in zip(down, d)], mid + m
    return None if down is None else (down, mid)
