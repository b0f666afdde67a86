"""Where models run: CUDA when asked for or available, else the CPU."""

from __future__ import annotations

import torch

from components.errors import BlipDiffError


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when torch sees a GPU; asking for `cuda` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BlipDiffError("device 'cuda' requested but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    return torch.device(device)
