"""Where subject photos come from: each source offers candidates (one image each, loaded lazily
so a bad file fails on its own) with their subject id, class and, where known, caption.

- synthetic: procedural subjects with ground-truth alpha (`components.data.synthetic`);
- folder: `<root>/<subject>/<images>`, classes from a CSV or the folder names;
- dreambench: the DreamBooth dataset layout, classes and categories from its class list.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from components.core.config import IngestConfig
from components.core.errors import BlipDiffError
from components.data import images, synthetic

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One image a source offers, loaded lazily so a bad file fails on its own."""

    subject_id: str
    class_name: str
    source_path: str
    load: Callable[[], images.LoadedImage]
    category: str | None = None
    caption: str | None = None
    scene: str | None = None  # where the subject is, when the source knows ("on a striped background")


def subject_id_from_name(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not slug:
        raise BlipDiffError(f"subject folder name {name!r} has no letters or digits")
    return slug


def class_from_name(name: str) -> str:
    """`dog2` -> `dog`, `bear_plushie` -> `bear plushie`: a folder name read as a class."""
    return re.sub(r"[_\-\s]+", " ", re.sub(r"\d+$", "", name)).strip() or name


def synthetic_candidates(cfg: IngestConfig) -> Iterator[Candidate]:
    s = cfg.synthetic
    views = synthetic.generate(s.num_subjects, s.min_views, s.max_views, s.image_size, cfg.seed)
    for view in views:
        subject = view.subject
        yield Candidate(
            subject_id=subject.subject_id,
            class_name=subject.class_name,
            source_path=f"synthetic://{subject.subject_id}/{view.view_index:02d}",
            load=lambda v=view: images.cap_size(images.LoadedImage(rgb=v.image, alpha=v.alpha), cfg.max_side),
            caption=subject.caption,
            scene=view.scene,
        )


def folder_candidates(
    root: Path,
    cfg: IngestConfig,
    classes: dict[str, str] | None,
    category: Callable[[str], str | None],
    skipped: Counter,
) -> Iterator[Candidate]:
    """`root/<subject>/<files>`: every visible file in a subject folder is a candidate."""
    if not root.is_dir():
        raise BlipDiffError(f"{root}: subject folder not found")
    subject_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subject_dirs:
        raise BlipDiffError(f"{root}: no subject folders inside (expected <root>/<subject>/<images>)")
    seen: dict[str, str] = {}
    for folder in subject_dirs:
        subject_id = subject_id_from_name(folder.name)
        if subject_id in seen:
            raise BlipDiffError(
                f"{folder}: subject id {subject_id!r} clashes with folder {seen[subject_id]!r}"
            )
        seen[subject_id] = folder.name
        if classes is not None and folder.name not in classes:
            raise BlipDiffError(f"{folder}: subject {folder.name!r} has no class in the class list")
        class_name = classes[folder.name] if classes is not None else class_from_name(folder.name)
        files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        if not files:
            skipped[images.EMPTY_SUBJECT] += 1
            log.warning("skipped subject %s: %s", folder, images.EMPTY_SUBJECT)
        for path in files:
            yield Candidate(
                subject_id=subject_id,
                class_name=class_name,
                source_path=str(path),
                load=lambda p=path: images.load_image(p, cfg.max_side, cfg.max_image_pixels),
                category=category(folder.name),
            )


def read_classes_csv(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise BlipDiffError(f"{path}: classes CSV not found")
    table = pd.read_csv(path, dtype=str)
    if not {"subject", "class"} <= set(table.columns):
        raise BlipDiffError(f"{path}: needs the columns 'subject' and 'class', has {list(table.columns)}")
    return dict(zip(table["subject"].str.strip(), table["class"].str.strip()))
