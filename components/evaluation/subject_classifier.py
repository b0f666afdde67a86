"""A fixed subject classifier: which ingested subject does an image show?

train_subject's generation check classifies the images the trained model draws; the base
stage's prior check can use it the same way. It is deliberately simple, with nothing
learned but one centroid per subject, so its verdict does not depend on a network that
could share the model's blind spots:

- **Same footing for every image.** Each image is resized (bicubic) to `size`, the model's
  native size (tiny: 32 px; at most MAX_SIZE, 64 px, for larger models), before anything
  else, so a real photo and a generated image are measured alike.
- **Subject region.** A per-pixel weight in [0, 1]: the ground-truth mask where the
  manifest has one (the training views of synthetic subjects), else an estimate
  (`subject_weights`): pixels far in colour from the image's border (the background's
  colours), or saturated, or near white or black (the synthetic subjects' colours;
  backgrounds are muted procedural textures), times a soft centre prior (subjects are
  centred and large).
- **Features.** A soft (trilinear) RGB histogram, BINS (4) per channel, of the subject
  region's pixels weighted by the region, as square roots (Hellinger), plus
  rotation-invariant shape statistics of the region (elongation and a radial mass profile
  around its centroid), scaled by SHAPE_WEIGHT (0.5).
- **Decision.** Nearest centroid (Euclidean) over the subjects, each centroid the mean
  feature of that subject's training views (`data/subjects.parquet` rows with split
  "train").

Its own sanity number is its accuracy on the real held-out views (split "test", classified
without their masks, as generated images are): `SubjectClassifier.accuracy`, reported by
train_subject as `gen_classifier_real_accuracy`.

    train = subject_rows(root, "train")
    classifier = SubjectClassifier.fit(train, root, size=32)     # the model's size
    classifier.accuracy(subject_rows(root, "test"), root)   # real held-out views
    classifier.predict(list(images))                        # generated: uint8 or float in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from components.core.errors import BlipDiffError
from components.core.paths import SUBJECTS_MANIFEST

BINS = 4  # histogram bins per RGB channel (64 in all)
SHAPE_WEIGHT = 0.5  # the shape statistics' weight beside the colour histogram
RADIAL_BINS = 6  # radial mass profile: distances from the centroid in region-radius units, up to 2.4
DEFAULT_SIZE = 32  # the tiny model's native size
MAX_SIZE = 64  # classification size cap: colour and coarse shape need no more, and the border search is O(side^3)


# ---------------------------------------------------------------------------- pixels
def to_rgb_array(image, size: int) -> np.ndarray:
    """An image (HxWx3 uint8, float in [0, 1], or PIL) as float32 RGB in [0, 1] at size x size
    (bicubic, as the VAE's input is resized)."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
        pil = Image.fromarray(array).convert("RGB")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.float32) / 255.0


def mask_array(mask, size: int) -> np.ndarray:
    """A matte (HxW float in [0, 1] or uint8) at size x size (bilinear), float32 in [0, 1]."""
    array = np.asarray(mask, dtype=np.float32)
    if array.max(initial=0.0) > 1.0:
        array = array / 255.0
    pil = Image.fromarray(array, mode="F")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(pil, dtype=np.float32), 0.0, 1.0)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of the image side, centred on 0: (H,1), (1,W)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return c[:, None], c[None, :]


def subject_weights(rgb: np.ndarray) -> np.ndarray:
    """Estimated subject region of an image without a mask (HxWx3 float in [0, 1]): HxW in
    [0, 1]. Half from the colour distance to the border's colours (the mean distance to the 8
    nearest of the outer ring's pixels: a many-coloured background is still its own border),
    half from how saturated, white or black a pixel is; times a soft centre prior."""
    h = rgb.shape[0]
    ring = max(1, h // 16)
    border = np.concatenate([rgb[:ring].reshape(-1, 3), rgb[-ring:].reshape(-1, 3),
                             rgb[ring:-ring, :ring].reshape(-1, 3), rgb[ring:-ring, -ring:].reshape(-1, 3)])
    pixels = rgb.reshape(-1, 1, 3)
    dist = np.sqrt(((pixels - border[None]) ** 2).sum(-1))  # (HW, border pixels)
    k = min(8, dist.shape[1])
    near = np.partition(dist, k - 1, axis=1)[:, :k].mean(1).reshape(rgb.shape[:2])
    contrast = np.clip((near - 0.08) / 0.15, 0.0, 1.0)
    top, bottom = rgb.max(-1), rgb.min(-1)
    saturation = np.where(top > 0, (top - bottom) / np.maximum(top, 1e-6), 0.0)
    vivid = np.clip((saturation - 0.3) / 0.25, 0.0, 1.0)  # background colours: saturation <= 0.4
    extreme = np.maximum(np.clip((top - 0.85) / 0.1, 0.0, 1.0), np.clip((0.25 - top) / 0.1, 0.0, 1.0))
    y, x = _grid(h)
    centre = np.exp(-(y**2 + x**2) / (2 * 0.3**2))
    return (0.5 * contrast + 0.5 * np.maximum(vivid, extreme)) * centre


# -------------------------------------------------------------------------- features
def colour_histogram(rgb: np.ndarray, weights: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Soft RGB histogram (each pixel spread over its 8 nearest bin centres) of the pixels
    weighted by `weights`, normalised to sum 1, as square roots: (bins**3,)."""
    x = rgb.reshape(-1, 3) * (bins - 1)
    lo = np.clip(np.floor(x), 0, bins - 2).astype(np.int64)
    frac = x - lo
    w = weights.reshape(-1).astype(np.float64)
    hist = np.zeros(bins**3)
    for corner in range(8):
        step = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        share = np.prod(np.where(step, frac, 1.0 - frac), axis=1)
        index = ((lo[:, 0] + step[0]) * bins + lo[:, 1] + step[1]) * bins + lo[:, 2] + step[2]
        hist += np.bincount(index, weights=w * share, minlength=bins**3)
    total = hist.sum()
    return np.sqrt(hist / total) if total > 0 else hist


def shape_statistics(weights: np.ndarray) -> np.ndarray:
    """Rotation-invariant statistics of a region (HxW weights): the ratio of its second
    moments' eigenvalues (1 round, 0 a line) and its mass at RADIAL_BINS distances from its
    centroid, in units of its RMS radius (a ring has little mass near 0)."""
    total = float(weights.sum())
    if total <= 0:
        return np.zeros(1 + RADIAL_BINS)
    m = weights / total
    y, x = _grid(weights.shape[0])
    dy, dx = y - (m * y).sum(), x - (m * x).sum()
    cov = np.array([[(m * dy * dy).sum(), (m * dy * dx).sum()], [(m * dy * dx).sum(), (m * dx * dx).sum()]])
    low, high = np.linalg.eigvalsh(cov)
    radius = np.sqrt(dy**2 + dx**2) / np.sqrt(max(low + high, 1e-12))
    profile = np.histogram(radius, bins=RADIAL_BINS, range=(0.0, 2.4), weights=m)[0]
    return np.concatenate([[low / max(high, 1e-12)], profile])


def features(image, size: int, mask=None, shape_weight: float = SHAPE_WEIGHT) -> np.ndarray:
    """The feature vector of one image, its subject region from `mask` where given."""
    rgb = to_rgb_array(image, size)
    weights = subject_weights(rgb) if mask is None else mask_array(mask, size)
    return np.concatenate([colour_histogram(rgb, weights), shape_weight * shape_statistics(weights)])


# ------------------------------------------------------------------------ classifier
@dataclass(frozen=True)
class SubjectClassifier:
    subjects: list[str]  # sorted subject ids
    centroids: np.ndarray  # (subjects, features)
    size: int  # images are resized to size x size first

    @classmethod
    def fit(cls, frame, root: Path, size: int = DEFAULT_SIZE) -> "SubjectClassifier":
        """Fitted on rows of `data/subjects.parquet` (give it the split "train" rows): their
        images, with their masks (`mask_path`) where present."""
        from components.data.images import read_alpha

        if frame.empty:
            raise BlipDiffError(f"{SUBJECTS_MANIFEST}: no training views to fit the subject classifier on")
        masks = [read_alpha(root / m) if isinstance(m, str) and (root / m).is_file() else None
                 for m in frame["mask_path"]]
        return cls.fit_images(read_views(frame, root), list(frame["subject_id"]), size, masks)

    @classmethod
    def fit_images(cls, images: Sequence, labels: Sequence[str], size: int = DEFAULT_SIZE,
                   masks: Sequence | None = None) -> "SubjectClassifier":
        """One centroid per label: the mean feature of its images (their masks where given;
        a None mask is estimated), all resized to min(size, MAX_SIZE)."""
        size = min(int(size), MAX_SIZE)
        if not len(images):
            raise BlipDiffError("subject classifier: no training images")
        masks = [None] * len(images) if masks is None else list(masks)
        feats = np.stack([features(im, size, m) for im, m in zip(images, masks)])
        subjects = sorted(set(labels))
        labels = np.asarray(labels)
        return cls(subjects, np.stack([feats[labels == s].mean(0) for s in subjects]), size)

    def predict(self, images: Sequence) -> list[str]:
        """The nearest subject of each image (no masks: the region is estimated)."""
        if not len(images):
            return []
        feats = np.stack([features(im, self.size) for im in images])
        dist = ((feats[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        return [self.subjects[i] for i in dist.argmin(1)]

    def score(self, images: Sequence, labels: Sequence[str]) -> float:
        """The share of `images` named as their label (NaN for none)."""
        predicted = self.predict(images)
        return float(np.mean([p == t for p, t in zip(predicted, labels)])) if predicted else float("nan")

    def accuracy(self, frame, root: Path) -> float:
        """The share of manifest rows (give it the split "test" rows: real held-out views) of
        the subjects it knows that it names right, each classified without its mask, as a
        generated image is."""
        frame = frame[frame["subject_id"].isin(set(self.subjects))]
        return self.score(read_views(frame, root), list(frame["subject_id"]))


# -------------------------------------------------------------- on the ingested data
def read_views(frame, root: Path) -> list[np.ndarray]:
    """The images of manifest rows (as ingest wrote them)."""
    from components.data.images import read_listed_rgb

    return [read_listed_rgb(root, p, SUBJECTS_MANIFEST, "ingest") for p in frame["image_path"]]


def subject_rows(root: Path, split: str):
    """The rows of `data/subjects.parquet` in one split ("train" or "test")."""
    from components.data.manifests import SUBJECTS_SCHEMA, read_manifest

    frame = read_manifest(root / SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    return frame[frame["split"] == split]


def subject_classes(frame) -> dict[str, str]:
    """Each subject of manifest rows, and its class."""
    return dict(zip(frame["subject_id"], frame["class_name"]))
