"""The DreamBooth dataset (DreamBench): layout, class list, prompts, and its download.

Layout: `<root>/<subject>/NN.jpg` plus `prompts_and_classes.txt`, which holds the
`subject_name,class` table and the two prompt lists (object and live subjects). The live
subjects are the animals (classes dog and cat): the file gives them their own prompts but
no flag, so the split follows the class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from components.core.config import DreamBenchSourceConfig
from components.core.errors import BlipDiffError
from components.core.paths import DREAMBENCH_ENV, external_path

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"dog", "cat"})
# sha256 of every file of the dataset (158 images and the prompt file), so a download is
# verified file by file: archive bytes differ between hosts, image bytes do not.
CHECKSUMS = Path(__file__).with_name("dreambench_sha256.json")


@dataclass(frozen=True)
class DreamBenchInfo:
    classes: dict[str, str]  # subject -> class
    object_prompts: list[str]  # templates with {0} = unique token, {1} = class
    live_prompts: list[str]

    def category(self, subject: str) -> str:
        return "live" if self.classes[subject] in LIVE_CLASSES else "object"


def parse_prompts_and_classes(path: Path) -> DreamBenchInfo:
    """Parse the dataset's `prompts_and_classes.txt` (a CSV table, then two Python lists)."""
    if not path.is_file():
        raise BlipDiffError(f"{path}: not found; a DreamBench folder must contain {PROMPTS_FILE}")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text == "subject_name,class":
            section = "classes"
        elif text.lower().startswith("object prompts"):
            section = "object"
        elif text.lower().startswith("live subject prompts"):
            section = "live"
        elif section == "classes" and "," in text:
            subject, cls = (part.strip() for part in text.split(",", 1))
            classes[subject] = cls
        elif section in lists and (match := re.match(r"^'(.*)'\.format\(", text)):
            lists[section].append(match.group(1))
    if not classes:
        raise BlipDiffError(f"{path}: no 'subject_name,class' table found")
    if not lists["object"] or not lists["live"]:
        raise BlipDiffError(f"{path}: object or live prompt list not found")
    return DreamBenchInfo(classes, lists["object"], lists["live"])


def verify(root: Path) -> None:
    """Check every file of the dataset against the known sha256 sums."""
    expected = json.loads(CHECKSUMS.read_text())
    for rel, digest in expected.items():
        path = root / rel
        if not path.is_file():
            raise BlipDiffError(f"{path}: missing from the DreamBench download")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise BlipDiffError(f"{path}: checksum mismatch in the DreamBench download")


def download(url: str, cache_dir: Path) -> Path:
    """Download and unpack the dataset archive once; later calls reuse the verified cache."""
    target = cache_dir / "dataset"
    marker = cache_dir / "VERIFIED"
    if marker.is_file() and (target / PROMPTS_FILE).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        archive = Path(tmp) / "archive.zip"
        log.info("downloading DreamBench from %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise BlipDiffError(
                f"could not download DreamBench from {url}: {exc}; "
                f"set {DREAMBENCH_ENV} (or ingest.dreambench.path) to a local copy"
            ) from None
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(Path(tmp) / "x")
        except zipfile.BadZipFile:
            raise BlipDiffError(f"{url}: downloaded file is not a zip archive") from None
        found = sorted((Path(tmp) / "x").rglob(PROMPTS_FILE))
        if not found:
            raise BlipDiffError(f"{url}: archive has no {PROMPTS_FILE}")
        verify(found[0].parent)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(found[0].parent), target)
    marker.write_text(url + "\n")
    return target


def local_or_download(cfg: DreamBenchSourceConfig, root: Path, fallback: bool = False) -> Path:
    """The dataset folder `ingest.dreambench` names: `path` (relative paths from the main
    working tree), else the folder in $BLIPDIFF_DREAMBENCH, else the verified download.
    `fallback`: download also when the named folder is absent."""
    setting = cfg.path if cfg.path is not None else os.environ.get(DREAMBENCH_ENV) or None
    if setting is not None:
        what = "ingest.dreambench.path" if cfg.path is not None else DREAMBENCH_ENV
        path = external_path(setting, root)
        if path.is_dir():
            return path
        if not fallback:
            raise BlipDiffError(f"{what}: {path} not found; point it at a DreamBooth dataset folder, "
                                "or leave it unset (null) to download")
        log.warning("%s: %s not found: using the verified download of %s", what, path, cfg.url)
    return download(cfg.url, Path(cfg.cache_dir).expanduser())
