"""The held-out bench: the ingested subjects' held-out views (`data/subjects.parquet` rows with
split == "test"), laid out as a DreamBench folder, so the `evaluate` stage runs the same
protocol and metrics on them as on DreamBench's photos.

Layout (what `components.evaluation.protocol.load` reads):
`<out>/dataset/<subject>/NN.png` (the held-out views, under their ingested names) and
`<out>/dataset/prompts_and_classes.txt` (the class table, then the object and the live
prompt lists). The prompts are DreamBench-style templates ("a {0} {1} ...") whose contexts
are the scenes the tiny model is trained on: the synthetic captions end in "on a <kind>
background" (`components.data.backgrounds.scene`), one template per background kind. Object
and live subjects get the same list; live vs object follows the class, as in DreamBench.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from components.core.errors import BlipDiffError
from components.data.backgrounds import KINDS, scene
from components.data.dreambench import PROMPTS_FILE

DATASET = "dataset"  # the DreamBench folder inside the output folder
TEST_SPLIT = "test"


def templates() -> list[str]:
    """One prompt template per background kind, in KINDS order: "a {0} {1} on a striped background"."""
    return [f"a {{0}} {{1}} {scene(kind)}" for kind in KINDS]


def prompts_file_text(classes: dict[str, str], prompts: list[str]) -> str:
    """`prompts_and_classes.txt` as DreamBench writes it: the subject_name,class table, then
    the object and the live prompt lists as Python `'...'.format(unique_token, class_token)` lines."""
    for subject, cls in classes.items():
        if "," in subject or "\n" in subject + cls or not cls.strip():
            raise BlipDiffError(f"held-out bench: subject {subject!r} / class {cls!r} cannot be written "
                                f"to {PROMPTS_FILE}")
    for template in prompts:
        if "'" in template or "\n" in template:
            raise BlipDiffError(f"held-out bench: prompt template {template!r} cannot be written to {PROMPTS_FILE}")
    lines = ["Classes", "subject_name,class", *(f"{s},{c}" for s, c in classes.items()), "", "Prompts"]
    for title in ("Object Prompts", "Live Subject Prompts"):
        lines += [title, "prompt_list = ["]
        lines += [f"'{t}'.format(unique_token, class_token)," for t in prompts]
        lines += ["]", ""]
    return "\n".join(lines)


def write(subjects: pd.DataFrame, root: Path, out: Path) -> Path:
    """Lay out the held-out views of `subjects` (the manifest of `data/subjects.parquet`;
    image paths relative to `root`) as a DreamBench folder under `out`; return that folder
    (`out/dataset`), replacing an earlier one. Deterministic: the same manifest and images
    give the same bytes."""
    for column in ("subject_id", "class_name", "image_path", "split"):
        if column not in subjects.columns:
            raise BlipDiffError(f"held-out bench: the subjects manifest lacks column {column!r}")
    held = subjects[subjects["split"] == TEST_SPLIT]
    if held.empty:
        raise BlipDiffError("evaluate.benchmark=heldout: data/subjects.parquet has no held-out views (split "
                            "'test'); set ingest.test_views_per_subject >= 1 (subjects keep one view for "
                            "training) and re-run ingest, or set evaluate.benchmark=dreambench")
    dataset = out / DATASET
    if dataset.exists():
        shutil.rmtree(dataset)
    dataset.mkdir(parents=True)
    classes: dict[str, str] = {}
    for subject, rows in sorted(held.groupby("subject_id", sort=True), key=lambda kv: str(kv[0])):
        names = sorted(rows["class_name"].dropna().unique())
        if len(names) != 1:
            raise BlipDiffError(f"held-out bench: subject {subject!r} has class names {names} (expected one)")
        classes[str(subject)] = str(names[0])
        folder = dataset / str(subject)
        folder.mkdir()
        for rel in sorted(rows["image_path"]):
            src = root / rel
            if not src.is_file():
                raise BlipDiffError(f"held-out bench: {src} (subject {subject}) not found; re-run ingest")
            target = folder / Path(rel).name
            if target.exists():
                raise BlipDiffError(f"held-out bench: two held-out views of {subject} are named {target.name}")
            shutil.copyfile(src, target)
    (dataset / PROMPTS_FILE).write_text(prompts_file_text(classes, templates()), encoding="utf-8")
    return dataset
