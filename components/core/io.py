"""Writing outputs so that a failed stage leaves nothing half-written.

Every output is written under a temporary name next to its final path and renamed into
place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory); rename it onto `final` on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def round_floats(data: Any, digits: int = 6) -> Any:
    """Floats (also inside dicts and lists) to `digits` significant digits: metrics files keep
    the same bytes across machines, whose float arithmetic differs in the last bits."""
    if isinstance(data, float):
        return float(f"{data:.{digits}g}")
    if isinstance(data, dict):
        return {k: round_floats(v, digits) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [round_floats(v, digits) for v in data]
    return data


def write_json(data: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def folder_hash(folder: Path) -> str:
    """Short sha256 over every file of a folder (relative path and content), e.g. a model
    folder: the key of work done with that model (evaluation images) and its runs' tag."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder).as_posix()}:{file_sha256(path)};".encode())
    return h.hexdigest()[:16]


def state_hash(state: dict) -> str:
    """sha256 of a state dict: every tensor by name, with its dtype, shape and bytes (any dtype,
    bf16 included). Used for model bases, cache keys and checkpoints' fingerprints."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
