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

And the training stages' datasets, which hold paths and strings, not pixels:

- `CaptionData` (pretrain_qformer): images and their candidate captions, the manifest's
  caption else class templates ("a photo of a dog"); `candidate_captions` are the
  retrieval check's texts.
- `PairDataset` (train_subject): composite and original of each pair (or their cached
  frozen-network outputs), the class text and the prompt `training_prompt` builds.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from components.core.errors import BlipDiffError
from components.core.io import atomic_path, file_sha256, state_hash
from components.core.paths import PAIRS_MANIFEST, SUBJECTS_MANIFEST
from components.data.images import read_listed_rgb
from components.model.blip_diffusion import BlipDiffusion

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------- pretrain_qformer's data
CLASS_TEMPLATES = ("a photo of a {}", "a picture of the {}", "a close-up photo of a {}", "a {} on its own")


def row_captions(caption: str | None, class_name: str) -> list[str]:
    """The texts one image may be paired with: its caption, else the class templates."""
    if isinstance(caption, str) and caption.strip():
        return [caption.strip()]
    return [t.format(class_name) for t in CLASS_TEMPLATES]


class CaptionData(Dataset):
    """Images read from disk when a batch needs them (paths kept, not pixels) and their
    tokenized candidate texts."""

    def __init__(self, frame, root: Path, image_processor, tokenizer, max_length: int):
        per_row = [row_captions(c, k) for c, k in zip(frame["caption"], frame["class_name"])]
        self.texts = list(dict.fromkeys(t for texts in per_row for t in texts))
        index = {t: i for i, t in enumerate(self.texts)}
        self.row_texts = [[index[t] for t in texts] for texts in per_row]
        self.root, self.paths, self.processor = root, list(frame["image_path"]), image_processor
        self.ids, self.mask = tokenize(tokenizer, self.texts, max_length)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        image = read_listed_rgb(self.root, self.paths[i], SUBJECTS_MANIFEST, "ingest")
        return {"index": i, "pixels": self.processor([image])[0]}

    def batch(self, rows) -> dict:
        return default_collate([self[int(i)] for i in rows])


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def candidate_captions(frame, tokenizer, max_length: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The retrieval candidates: each image's first text (its caption, or "a photo of a
    [class]"), once each, tokenized. Texts only: no image is read for them."""
    captions = list(dict.fromkeys(row_captions(c, k)[0] for c, k in zip(frame["caption"], frame["class_name"])))
    return (captions, *tokenize(tokenizer, captions, max_length))


# -------------------------------------------------------------- train_subject's data
def training_prompt(model, caption: str | None, class_text: str, text_mode: str) -> str:
    """The text a training sample conditions on: `generate`'s prompt for that class, with the
    caption (caption mode) or nothing (neutral) as the context."""
    context = caption if text_mode == "caption" and isinstance(caption, str) else ""
    return model.build_prompt(context, class_text)


class PairDataset(Dataset):
    """Training pairs read from disk one at a time: the composite for the Q-Former (or its
    cached image-encoder features), the original for the VAE (or its cached latent
    moments), the class text and the built prompt. Holds paths and strings only."""

    def __init__(self, model, frame, root: Path, resolution: int, text_mode: str):
        self.root, self.resolution = root, resolution
        self.processor = model.image_processor
        self.inputs, self.targets = list(frame["input_path"]), list(frame["target_path"])
        self.subjects = sorted(frame["subject_id"].unique())
        self.subject_index = [self.subjects.index(s) for s in frame["subject_id"]]
        classes = dict(zip(frame["subject_id"], frame["subject_text"]))
        self.subject_classes = [classes[s] for s in self.subjects]
        self.class_texts = list(frame["subject_text"])
        self.prompts = [training_prompt(model, c, t, text_mode) for c, t in zip(frame["caption"], self.class_texts)]
        self.features: FeatureCache | None = None
        self.moments: FeatureCache | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def image(self, relative: str) -> np.ndarray:
        return read_listed_rgb(self.root, relative, PAIRS_MANIFEST, "context")

    def __getitem__(self, i: int) -> dict:
        item = {"index": i, "class_text": self.class_texts[i], "prompt": self.prompts[i]}
        if self.features is not None:
            item["image_embeds"] = self.features.get(self.input_hashes[i])
        else:
            item["pixels"] = self.processor([self.image(self.inputs[i])])[0]
        if self.moments is not None:
            item["moments"] = self.moments.get(self.target_hashes[i])
        else:
            item["target"] = BlipDiffusion.vae_pixels(self.image(self.targets[i]), self.resolution)
        return item

    def batch(self, rows) -> dict:
        return default_collate([self[int(i)] for i in rows])

    def rows_of(self, k: int) -> list[int]:
        return [i for i, s in enumerate(self.subject_index) if s == k]

    def use_cache(self, model, folder: Path, num_workers: int, is_main: bool) -> None:
        """Compute (main process) or find the frozen networks' outputs for every file, then
        read them instead of the images."""
        latent_ns = f"vae-{module_hash(model.vae)}-{self.resolution}px"
        p = self.processor
        feature_ns = (f"image-{module_hash(model.qformer.visual_encoder)}-{p.size}-{p.crop_size}-"
                      f"{params_tag((p.mean, p.std))}")
        self.input_hashes = [file_sha256(self.root / r) for r in self.inputs]
        self.target_hashes = [file_sha256(self.root / r) for r in self.targets]
        features = FeatureCache(folder, feature_ns)
        moments = FeatureCache(folder, latent_ns)
        if is_main:
            todo = sorted({i for i, h in enumerate(self.input_hashes) if not features.has(h)}
                          | {i for i, h in enumerate(self.target_hashes) if not moments.has(h)})
            if todo:
                log.info("caching image features and latents of %d pairs in %s", len(todo), folder)
            loader = make_loader(Subset(self, todo), batch_size=32, num_workers=num_workers)
            with torch.no_grad():
                for batch in loader:
                    feats = model.qformer.visual_encoder(batch["pixels"].to(model.device, model.qformer.dtype))
                    mom = model.latent_moments(batch["target"])
                    for j, i in enumerate(batch["index"].tolist()):
                        features.put(self.input_hashes[i], feats[j])
                        moments.put(self.target_hashes[i], mom[j])
        self.features, self.moments = features, moments
