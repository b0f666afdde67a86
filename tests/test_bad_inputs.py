"""A corpus of odd and hostile image files through every entry point that reads images:
ingest, context backgrounds, generate and finetune. Every case ends in a skip with its
reason or one clear error line: never a traceback, never a half-written output."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.cli import main
from components.core import paths
from components.core.config import IngestConfig, Params
from components.core.errors import BlipDiffError
from components.data.manifests import PAIRS_SCHEMA, SUBJECTS_SCHEMA, read_manifest
from components.stages import context, ingest

# file name -> what reading it must give: a skip reason, or "ok"
EXPECTED = {
    "zero_byte.png": "not_an_image",
    "truncated.jpg": "truncated",
    "not_an_image.jpg": "not_an_image",
    "huge.png": "too_large",  # 16000 x 16000 declared, a few kB on disk
    "cmyk.jpg": "ok",
    "sixteen_bit.png": "ok",
    "palette.png": "ok",
    "la.png": "ok",
    "exif_rotated.jpg": "ok",
    "duplicate.png": "duplicate",  # the same pixels as palette.png... see corpus()
}
BAD = [name for name, want in EXPECTED.items() if want not in ("ok", "duplicate")]


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    return (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


def corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero_byte.png").write_bytes(b"")
    Image.fromarray(_pattern(120, 160, 1)).save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "full.jpg").unlink()
    (folder / "not_an_image.jpg").write_text("this is a text file with an image's name\n")
    Image.new("1", (16000, 16000)).save(folder / "huge.png")
    Image.fromarray(_pattern(48, 64, 2)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(_pattern(40, 52, 3)[..., 0].astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    Image.fromarray(_pattern(44, 60, 4)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    shutil.copy(folder / "palette.png", folder / "duplicate.png")
    gray = _pattern(36, 50, 5)[..., 1]
    Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]), "LA").save(folder / "la.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_pattern(30, 70, 6)).save(folder / "exif_rotated.jpg", exif=exif)
    return folder


@pytest.fixture
def odd(tmp_path) -> Path:
    return corpus(tmp_path / "odd")


@pytest.fixture
def photos(odd, tmp_path) -> tuple[Path, Path]:
    """A user's folder with the corpus as subject `toy`, and an empty repository to ingest into."""
    src = tmp_path / "photos"
    shutil.copytree(odd, src / "toy")
    root = tmp_path / "repo"
    root.mkdir()
    return src, root


def test_ingest_skips_each_bad_file_with_its_reason(photos):
    src, root = photos
    metrics, _ = ingest.ingest_subjects(IngestConfig(source="folder", folder={"path": str(src)},
                                                     max_skipped_fraction=1.0), root)
    assert metrics["files_found"] == len(EXPECTED)
    assert metrics["skipped_not_an_image"] == 2
    assert metrics["skipped_truncated"] == 1
    assert metrics["skipped_too_large"] == 1
    assert metrics["skipped_duplicate"] == 1
    assert metrics["skipped_corrupt"] == 0
    # only files that could not be read count towards max_skipped_fraction
    assert metrics["unreadable_fraction"] == pytest.approx(3 / len(EXPECTED))
    frame = read_manifest(root / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    assert len(frame) == 5
    sizes = {Path(s).name: (w, h) for s, w, h in zip(frame["source_path"], frame["width"], frame["height"])}
    assert sizes["exif_rotated.jpg"] == (30, 70)  # turned upright
    assert sizes["cmyk.jpg"] == (64, 48)


def test_ingest_threshold_counts_unreadable_files_only(photos):
    src, root = photos
    (src / "empty").mkdir()
    cfg = IngestConfig(source="folder", folder={"path": str(src)}, max_skipped_fraction=0.29)
    with pytest.raises(BlipDiffError) as err:  # 3 of 10 unreadable = 30%
        ingest.ingest_subjects(cfg, root)
    message = str(err.value)
    assert "3 of 10 files unreadable (not_an_image 2, truncated 1; 30.0%)" in message
    assert "also skipped, not counted: duplicate 1, empty_subject 1, too_large 1" in message
    assert not (root / paths.SUBJECTS_MANIFEST).exists() and not (root / paths.SUBJECTS_DIR).exists()
    # duplicates, too large images and empty subjects do not count: 3/10 passes at 0.3
    ingest.ingest_subjects(cfg.model_copy(update={"max_skipped_fraction": 0.3}), root)


def test_ingest_pixel_limit_is_a_param(photos):
    src, root = photos
    metrics, _ = ingest.ingest_subjects(IngestConfig(source="folder", folder={"path": str(src)},
                                                     max_skipped_fraction=1.0, max_image_pixels=2500), root)
    # over 2500 pixels, refused from the header alone: 64x48 CMYK, 60x44 palette and its duplicate,
    # the 160x120 truncated JPEG and the 16000x16000 PNG; 52x40 16-bit, 50x36 LA and 70x30 EXIF pass
    assert metrics["skipped_too_large"] == 5
    assert metrics["images_written"] == 3


def test_context_skips_and_counts_bad_backgrounds(odd, tmp_path):
    root = tmp_path / "repo"
    params = Params(ingest={"synthetic": {"num_subjects": 2, "min_views": 2, "max_views": 2, "image_size": 48}},
                    context={"background_source": "folder", "background_dir": str(odd),
                             "backgrounds_per_image": 3, "matting_max_side": None})
    ingest.ingest_subjects(params.ingest, root)
    metrics, _ = context.run(params, root)
    assert metrics["backgrounds_skipped"] == len(BAD)
    assert metrics["backgrounds_used"] == len(EXPECTED) - len(BAD)
    pairs = read_manifest(root / paths.PAIRS_MANIFEST, PAIRS_SCHEMA)
    assert len(pairs) == 4 * 3
    assert not set(pairs["background_id"]) & set(BAD)


def test_context_with_only_bad_backgrounds_is_one_error(odd, tmp_path):
    only_bad = tmp_path / "bad_bgs"
    only_bad.mkdir()
    for name in BAD:
        shutil.copy(odd / name, only_bad / name)
    root = tmp_path / "repo"
    params = Params(ingest={"synthetic": {"num_subjects": 1, "min_views": 2, "max_views": 2, "image_size": 48}},
                    context={"background_source": "folder", "background_dir": str(only_bad)})
    ingest.ingest_subjects(params.ingest, root)
    with pytest.raises(BlipDiffError, match="no readable images in .*skipped"):
        context.run(params, root)
    assert not (root / paths.PAIRS_MANIFEST).exists() and not (root / paths.CONTEXT_DIR).exists()


def _cli(*argv: str) -> tuple[int, str]:
    """`blipdiff ...` in its own process, as a user runs it: exit status and stderr."""
    proc = subprocess.run([sys.executable, "-m", "components.cli", *argv], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    return proc.returncode, proc.stderr


def _one_line_error(err: str, expected: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], err


@pytest.mark.parametrize("name", BAD)
def test_generate_refuses_a_bad_reference_image_in_one_line(odd, tmp_path, name):
    out = tmp_path / "out"
    code, err = _cli("generate", "--preset", "tiny", "--subject-image", str(odd / name), "--source-subject", "toy",
                     "--prompt", "on a table", "--steps", "1", "--height", "32", "--width", "32", "--out", str(out))
    assert code == 2
    _one_line_error(err, f"blipdiff generate: error: subject image {EXPECTED[name]}: {odd / name}")
    assert not out.exists()


def test_generate_reads_every_odd_but_valid_format(odd, tmp_path):
    ok = [str(odd / n) for n, want in EXPECTED.items() if want in ("ok", "duplicate")]
    out = tmp_path / "out"
    assert main(["generate", "--preset", "tiny", "--subject-image", *ok, "--source-subject", "toy",
                 "--prompt", "on a table", "--steps", "1", "--height", "32", "--width", "32",
                 "--out", str(out)]) == 0
    assert (out / "images" / "0000.png").is_file()


@pytest.mark.parametrize("name", BAD)
def test_finetune_refuses_a_bad_reference_image_in_one_line(odd, tmp_path, name):
    good = str(odd / "cmyk.jpg")
    out = tmp_path / "ft"
    code, err = _cli("finetune", "--preset", "tiny", "--subject-image", good, str(odd / name), "--subject", "toy",
                     "--steps", "1", "--out", str(out))
    assert code == 2
    _one_line_error(err, f"blipdiff finetune: error: subject image {EXPECTED[name]}: {odd / name}")
    assert not out.exists()


def test_generate_pixel_limit_flag(odd, tmp_path):
    code, err = _cli("generate", "--preset", "tiny", "--subject-image", str(odd / "cmyk.jpg"), "--source-subject",
                     "toy", "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32",
                     "--max-image-pixels", "1000", "--out", str(tmp_path / "out"))
    assert code == 2
    _one_line_error(err, "subject image too_large")
