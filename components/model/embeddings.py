"""Subject embeddings saved to a file (safetensors) and read back, to reuse a subject without
its reference images (`blipdiff generate --save-embeddings` / `--embeddings`)."""

from __future__ import annotations

from pathlib import Path

import torch

from components.core.errors import BlipDiffError
from components.core.io import atomic_path

KEY = "subject_embeds"


def save_embeddings(path: Path, embeds: torch.Tensor, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({KEY: embeds.detach().float().cpu().contiguous()}, tmp, metadata=meta)


def load_embeddings(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise BlipDiffError(f"{path}: embeddings file not found")
    try:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(KEY), dict(f.metadata() or {})
    except Exception as exc:
        raise BlipDiffError(f"{path}: not a subject embeddings file ({exc})") from None
