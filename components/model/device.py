"""Where models run: CUDA when asked for or available, else the CPU; and in which precision."""

from __future__ import annotations

import torch

from components.core.errors import BlipDiffError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when torch sees a GPU; asking for `cuda` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BlipDiffError("device 'cuda' requested but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    return torch.device(device)


def placement(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for inference: `auto` dtype is fp16 on a GPU, fp32 on the CPU."""
    dev = resolve_device(device)
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dev.type == "cpu" and dtype == "fp16":
        raise BlipDiffError("fp16 is for GPUs; on CPU use --dtype fp32 or bf16")
    return dev, DTYPES[dtype]
