"""Manifests: parquet files with a fixed schema, one row per subject image or training pair.

Paths inside them are relative to the repository root, posix style, so data stays portable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.core.errors import BlipDiffError
from components.core.io import atomic_path

# One row per subject image (stage ingest).
SUBJECTS_SCHEMA = pa.schema(
    [
        ("subject_id", pa.string()),
        ("class_name", pa.string()),
        ("category", pa.string()),  # dreambench: live | object; else null
        ("image_path", pa.string()),  # relative to the repo root
        ("mask_path", pa.string()),  # ground-truth alpha when known, else null
        ("split", pa.string()),  # train | test
        ("content_hash", pa.string()),  # sha256 of the normalised pixels
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),  # what the subject is; null when the source has none
        ("source_path", pa.string()),  # where the image came from
        ("scene", pa.string()),  # where it is ("on a striped background"); null when unknown
    ]
)
# Columns added after manifests were first written: read as null from a manifest without them.
OPTIONAL_COLUMNS = ("scene",)

# One row per training pair (stage context).
PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("subject_id", pa.string()),
        ("input_path", pa.string()),  # subject alpha-blended onto a new background
        ("target_path", pa.string()),  # the original image
        ("alpha_path", pa.string()),  # estimated alpha matte
        ("subject_text", pa.string()),  # the class name
        ("caption", pa.string()),
        ("background_id", pa.string()),
        ("split", pa.string()),
        ("mask_source", pa.string()),  # clipseg | ground_truth
    ]
)


def write_parquet(rows: list[dict[str, Any]], path: Path, schema: pa.Schema) -> pd.DataFrame:
    """Write rows with exactly `schema`'s columns, atomically; return them as a DataFrame."""
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return table.to_pandas()


def read_manifest(path: Path, schema: pa.Schema) -> pd.DataFrame:
    """Read a manifest, failing with a clear message when it is missing or of another schema."""
    if not path.is_file():
        raise BlipDiffError(f"{path}: manifest not found (run the stage that writes it first)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BlipDiffError(f"{path}: not a readable parquet file: {exc}") from None
    missing = [name for name in schema.names if name not in table.column_names]
    if [name for name in missing if name not in OPTIONAL_COLUMNS]:
        raise BlipDiffError(f"{path}: missing columns {missing}")
    for name in missing:
        table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
    return table.select(schema.names).to_pandas()


def relpath(path: Path, root: Path) -> str:
    """Manifest paths are relative to the repo root, posix style, so data stays portable."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()
