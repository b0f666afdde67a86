"""DreamBench scores from features: raw cosine similarities (not x100, not clamped), in float64.

- subject fidelity (DINO, CLIP-I): per generated image, the mean cosine to every real image
  of its subject;
- text alignment (CLIP-T): the cosine between a generated image and its prompt;
- oracle (the papers' "real images" row): the same fidelity between distinct real images of
  one subject (ordered pairs i != j, never an image with itself).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

SCORES = ("dino", "clip_i", "clip_t")

Features = torch.Tensor | np.ndarray


def _rows(feats: Features) -> torch.Tensor:
    tensor = torch.as_tensor(feats).to(torch.float64)
    if tensor.ndim != 2:
        raise ValueError(f"expected features of shape (N, D), got {tuple(tensor.shape)}")
    return F.normalize(tensor, dim=1)


def cosine_matrix(a: Features, b: Features) -> torch.Tensor:
    """(len(a), len(b)): the cosine of every row of `a` with every row of `b`."""
    return _rows(a) @ _rows(b).T


def subject_fidelity(generated: Features, real: Features) -> torch.Tensor:
    """(N,): each generated image's mean cosine to all real images of its subject."""
    if len(real) == 0:
        raise ValueError("subject fidelity needs at least one real image")
    return cosine_matrix(generated, real).mean(dim=1)


def text_alignment(image_feats: Features, text_feats: Features) -> torch.Tensor:
    """(N,): the cosine of each image with its own text (row i with row i)."""
    images, texts = _rows(image_feats), _rows(text_feats)
    if images.shape != texts.shape:
        raise ValueError(f"{tuple(images.shape)} image features but {tuple(texts.shape)} text features")
    return (images * texts).sum(dim=1)


def oracle_pairs(real: Features) -> float | None:
    """The mean cosine over the ordered pairs i != j of one subject's real images (None if < 2)."""
    n = len(real)
    if n < 2:
        return None
    sims = cosine_matrix(real, real)
    return float(sims[~torch.eye(n, dtype=torch.bool)].mean())


def _summary(rows: pd.DataFrame) -> dict:
    summary = {}
    for key in SCORES:
        mean = float(rows[key].mean())
        summary[key] = None if math.isnan(mean) else mean
    summary["images"] = len(rows)
    return summary


def summarize(per_image: pd.DataFrame) -> dict:
    """Means of the scores (None where a score has no value) and image counts: overall, per
    category (those present), per subject and per prompt. Other columns are ignored."""
    missing = [col for col in ("subject", "category", "prompt", *SCORES) if col not in per_image.columns]
    if missing:
        raise ValueError(f"per-image scores lack the columns {missing}")

    def groups(col: str) -> dict:
        return {str(key): _summary(rows) for key, rows in per_image.groupby(col, sort=True)}

    return {"overall": _summary(per_image), "by_category": groups("category"),
            "per_subject": groups("subject"), "per_prompt": groups("prompt")}
