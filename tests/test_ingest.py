import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.core import paths
from components.core.config import IngestConfig
from components.core.errors import BlipDiffError
from components.data import dreambench
from components.data.manifests import SUBJECTS_SCHEMA, read_manifest
from components.stages import ingest


def _write(path, seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _folder_cfg(path, **kw):
    return IngestConfig(source="folder", folder={"path": str(path)}, **kw)


@pytest.fixture
def user_folder(tmp_path):
    src = tmp_path / "photos"
    for i in range(3):
        _write(src / "red_mug" / f"{i}.png", i)
    _write(src / "dog2" / "a.jpg", 10)
    _write(src / "dog2" / "b.png", 11)
    shutil.copy(src / "dog2" / "b.png", src / "dog2" / "b_copy.png")  # exact duplicate
    (src / "dog2" / "notes.txt").write_text("shot on a phone")  # not an image
    _write(src / "dog2" / "c.jpg", 12, size=(200, 200))
    data = (src / "dog2" / "c.jpg").read_bytes()
    (src / "dog2" / "c.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (src / "empty_subject").mkdir()
    (src / ".hidden").mkdir()
    return src


def test_folder_ingest_counts_every_skip(tmp_path, user_folder):
    root = tmp_path / "repo"
    root.mkdir()
    metrics, _ = ingest.ingest_subjects(_folder_cfg(user_folder, max_skipped_fraction=0.5,
                                                    test_views_per_subject=1), root)
    frame = read_manifest(root / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    assert metrics["files_found"] == 8
    assert metrics["images_written"] == 5 and len(frame) == 5
    assert metrics["skipped_duplicate"] == 1
    assert metrics["skipped_not_an_image"] == 1
    assert metrics["skipped_truncated"] == 1
    assert metrics["skipped_empty_subject"] == 1
    assert metrics["unreadable_fraction"] == pytest.approx(2 / 8)
    assert sorted(frame["subject_id"].unique()) == ["dog2", "red_mug"]
    assert dict(zip(frame["subject_id"], frame["class_name"])) == {"dog2": "dog", "red_mug": "red mug"}
    assert frame["content_hash"].is_unique
    # last image of each subject is held out
    assert (frame.groupby("subject_id")["split"].apply(lambda s: list(s)[-1]) == "test").all()
    assert (frame["split"] == "test").sum() == 2
    for row in frame.itertuples():
        with Image.open(root / row.image_path) as im:
            assert im.mode == "RGB" and im.size == (row.width, row.height)
    assert frame["mask_path"].isna().all()


def test_too_many_unreadable_files_fails_and_writes_nothing(tmp_path, user_folder):
    root = tmp_path / "repo"
    root.mkdir()
    with pytest.raises(BlipDiffError, match=r"2 of 8 files unreadable .*max_skipped_fraction=0.1"):
        ingest.ingest_subjects(_folder_cfg(user_folder, max_skipped_fraction=0.1), root)
    assert not (root / paths.SUBJECTS_MANIFEST).exists()
    assert not (root / paths.SUBJECTS_DIR).exists()
    assert not any(p.name.startswith(".") for p in (root / "data").iterdir())  # no temp left


def test_classes_csv(tmp_path, user_folder):
    csv = tmp_path / "classes.csv"
    pd.DataFrame({"subject": ["red_mug", "dog2", "empty_subject"], "class": ["mug", "dog", "x"]}).to_csv(csv, index=False)
    root = tmp_path / "repo"
    root.mkdir()
    cfg = IngestConfig(source="folder", max_skipped_fraction=0.5,
                       folder={"path": str(user_folder), "classes_csv": str(csv)})
    ingest.ingest_subjects(cfg, root)
    frame = read_manifest(root / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    assert set(frame.loc[frame.subject_id == "red_mug", "class_name"]) == {"mug"}
    pd.DataFrame({"subject": ["dog2"], "class": ["dog"]}).to_csv(csv, index=False)
    with pytest.raises(BlipDiffError, match="'empty_subject' has no class"):
        ingest.ingest_subjects(cfg, root)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BlipDiffError, match="subject folder not found"):
        ingest.ingest_subjects(_folder_cfg(tmp_path / "nope"), tmp_path)


def test_synthetic_ingest_is_deterministic_with_masks(tmp_path):
    cfg = IngestConfig(synthetic={"num_subjects": 3, "min_views": 4, "max_views": 5, "image_size": 64})
    outputs = []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        metrics, _ = ingest.ingest_subjects(cfg, root)
        outputs.append({p.relative_to(root).as_posix(): p.read_bytes()
                        for p in sorted(root.rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1]  # same seed, same bytes
    assert metrics["subjects_written"] == 3 and metrics["skipped_total"] == 0
    frame = read_manifest(tmp_path / "a" / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    assert frame["mask_path"].notna().all() and frame["caption"].notna().all()
    assert frame["class_name"].nunique() == 3


def test_dreambench_folder(tmp_path, dreambench_dir):
    cfg = IngestConfig(source="dreambench", dreambench={"path": str(dreambench_dir)})
    metrics, _ = ingest.ingest_subjects(cfg, tmp_path)
    frame = read_manifest(tmp_path / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    assert metrics["subjects_written"] == 30 and frame["subject_id"].nunique() == 30
    assert metrics["images_written"] == 158 and len(frame) == 158
    assert metrics["skipped_total"] == 0
    classes = dict(zip(frame["subject_id"], frame["class_name"]))
    assert classes["bear_plushie"] == "stuffed animal" and classes["dog5"] == "dog"
    assert classes["pink_sunglasses"] == "glasses"
    live = set(frame.loc[frame.category == "live", "subject_id"])
    assert live == {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
    assert (frame[["width", "height"]].max(axis=1) <= cfg.max_side).all()
    prompts = (tmp_path / paths.SUBJECTS_DIR / "dreambench_prompts.json").read_text()
    assert "a {0} {1} in the jungle" in prompts


def test_parse_prompts_and_classes(dreambench_dir):
    info = dreambench.parse_prompts_and_classes(dreambench_dir / dreambench.PROMPTS_FILE)
    assert len(info.classes) == 30
    assert len(info.object_prompts) == 25 and len(info.live_prompts) == 25
    assert info.live_prompts[10] == "a {0} {1} wearing a red hat"


def test_download_verifies_checksums(tmp_path, dreambench_dir):
    archive = tmp_path / "dreambooth-main.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(dreambench_dir.rglob("*")):
            if path.is_file():
                zf.write(path, f"dreambooth-main/dataset/{path.relative_to(dreambench_dir)}")
    got = dreambench.download(archive.as_uri(), tmp_path / "cache")
    assert (got / "dog" / "00.jpg").is_file()
    assert dreambench.download("file:///nonexistent.zip", tmp_path / "cache") == got  # cached

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:-10] + b"x" * 10 if item.filename.endswith("dog/00.jpg") else data)
    with pytest.raises(BlipDiffError, match=r"dog/00.jpg: checksum mismatch"):
        dreambench.download(bad.as_uri(), tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "dataset").exists()
    with pytest.raises(BlipDiffError, match="could not download"):
        dreambench.download((tmp_path / "missing.zip").as_uri(), tmp_path / "cache3")


def test_default_synthetic_subjects_share_class_words_and_record_their_scene(tmp_path):
    """12 subjects in 4 classes of 3 (colour, shape and texture differ within a class, so the
    class word never names the subject); each view records its scene, and a manifest written
    before the scene column existed reads it as null."""
    import pyarrow.parquet as pq

    from components.data import synthetic
    from components.data.backgrounds import BACKGROUND_PHRASES

    subjects = synthetic.make_subjects(12, 0)
    by_class = {}
    for s in subjects:
        by_class.setdefault(s.class_name, []).append(s)
    assert sorted(len(v) for v in by_class.values()) == [3, 3, 3, 3]
    for members in by_class.values():
        for field in ("colour", "shape", "texture"):
            assert len({getattr(s, field) for s in members}) == 3
    assert [s.subject_id for s in synthetic.make_subjects(5, 0)] == [s.subject_id for s in subjects[:5]]

    cfg = IngestConfig(synthetic={"num_subjects": 2, "min_views": 3, "max_views": 3, "image_size": 48})
    ingest.ingest_subjects(cfg, tmp_path)
    frame = read_manifest(tmp_path / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    phrases = {f"on a {p} background" for p in BACKGROUND_PHRASES.values()}
    assert set(frame["scene"]) <= phrases and frame["scene"].nunique() > 1
    assert not frame["caption"].str.contains("background").any()  # the caption says what, the scene where
    table = pq.read_table(tmp_path / paths.SUBJECTS_MANIFEST).drop_columns(["scene"])
    pq.write_table(table, tmp_path / "old.parquet")
    assert read_manifest(tmp_path / "old.parquet", SUBJECTS_SCHEMA)["scene"].isna().all()
