"""Training data that streams: samples are read from disk by DataLoader workers, batch by
batch, in an order that is a function of the position in the run only.

- `StepBatchSampler` yields the row indices of each (step, micro-batch) of a run from the
  per-step generator (`loop.step_generator`), from any start step: a resumed run reads
  exactly the batches the uninterrupted run would have read.
- `make_loader` wraps a dataset and that sampler in a `torch.utils.data.DataLoader` with
  seeded workers (`worker_init_fn`), so any randomness inside a worker is reproducible too.
- `data_hash` fingerprints a stage's input (its manifest and the bytes of every file it
  lists): checkpoints record it and resume refuses a checkpoint made on other data.
- `FeatureCache` keeps outputs of frozen networks (VAE latent moments, image-encoder
  features) on disk, keyed by the content hash of the input file, the network's weights and
  the preprocessing: optional, for runs that repeat on the same data.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from components.core.errors import BlipDiffError
from components.core.io import atomic_path, file_sha256, state_hash


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """The generator of one micro-batch: a function of its position in the run only."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + micro) * 1009 + rank)


def draw_rows(generator: torch.Generator, n: int, batch_size: int) -> torch.Tensor:
    """The first draw of every micro-batch's generator: which rows it trains on."""
    return torch.randint(0, n, (batch_size,), generator=generator)


class StepBatchSampler(Sampler[list[int]]):
    """Row indices of micro-batches (step, micro) for steps `start`..`steps`, in training order."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, start: int, steps: int, accumulation: int):
        if n < 1:
            raise BlipDiffError("no training samples")
        self.n, self.batch_size, self.seed, self.rank = n, batch_size, seed, rank
        self.start, self.steps, self.accumulation = start, steps, accumulation

    def positions(self) -> Iterator[tuple[int, int]]:
        for step in range(self.start, self.steps):
            for micro in range(self.accumulation):
                yield step, micro

    def __iter__(self) -> Iterator[list[int]]:
        for step, micro in self.positions():
            g = step_generator(self.seed, step, micro, self.rank)
            yield draw_rows(g, self.n, self.batch_size).tolist()

    def __len__(self) -> int:
        return max(self.steps - self.start, 0) * self.accumulation


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, *, batch_sampler: Sampler | None = None, batch_size: int | None = None,
                num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader with seeded workers: each worker's torch, numpy and random state is a
    function of `seed` and its worker id."""
    g = torch.Generator().manual_seed(seed)
    extra = {"prefetch_factor": 2, "persistent_workers": False} if num_workers else {}
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, generator=g,
                          worker_init_fn=_seed_worker, pin_memory=torch.cuda.is_available(), **extra)
    return DataLoader(dataset, batch_size=batch_size or 1, shuffle=False, num_workers=num_workers, generator=g,
                      worker_init_fn=_seed_worker, pin_memory=torch.cuda.is_available(), **extra)


# ------------------------------------------------------------------------- hashing
def data_hash(manifest: Path, files: list[Path], producer: str = "the stage that writes them") -> str:
    """sha256 over the manifest's bytes and every listed file's bytes, in the given order. A
    missing file is an error naming the stage that writes it (`producer`)."""
    h = hashlib.sha256()
    h.update(file_sha256(manifest).encode())
    for path in files:
        if not path.is_file():
            raise BlipDiffError(f"{manifest}: image {path} is missing (re-run `dvc repro {producer}`)")
        h.update(str(path.name).encode())
        h.update(file_sha256(path).encode())
    return h.hexdigest()[:16]


def module_hash(module: torch.nn.Module) -> str:
    """Short sha256 of a module's weights (`core.io.state_hash`)."""
    return state_hash(module.state_dict())[:16]


class FeatureCache:
    """Tensors computed by a frozen network from one file, on disk under `folder/<namespace>/`,
    keyed by the file's content hash. `namespace` must name everything else the tensor depends
    on (the network's weights hash, the preprocessing)."""

    def __init__(self, folder: Path, namespace: str):
        self.folder = Path(folder) / namespace
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, content_hash: str) -> Path:
        return self.folder / f"{content_hash}.pt"

    def has(self, content_hash: str) -> bool:
        return self.path(content_hash).is_file()

    def put(self, content_hash: str, tensor: torch.Tensor) -> None:
        with atomic_path(self.path(content_hash)) as tmp:
            torch.save(tensor.detach().cpu().clone(), tmp)

    def get(self, content_hash: str) -> torch.Tensor:
        return torch.load(self.path(content_hash), weights_only=True)


def params_tag(value) -> str:
    """A short stable hash of plain values (preprocessing settings) for cache namespaces."""
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]
