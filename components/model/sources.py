"""Where a model comes from, decided once: a spec resolves to its kind, a local folder and a
content hash.

A spec is
- a model folder in the released layout (model_index.json): kind "model", hashed by its files;
- an export folder (export.json, e.g. models/onnx): kind "export", hashed by its files;
- a registered model, `models:/NAME@ALIAS` or `models:/NAME/VERSION`: kind "registry", its
  checkpoint downloaded (frozen parts rebuilt from the recorded base) into a temporary
  folder that lives as long as the `resolve` block, hashed by the registered artifact;
- a hub id, "owner/name": kind "hub", no local folder, the id is its own key.

One hub-id rule (`components.core.paths.is_hub_id`, also used by `layout.load`): exactly
one slash, not starting with ".", "/" or "~", and neither the path nor its parent is a
local folder (so `models/blip_diffusion`, not trained yet, is a missing folder).
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from components.core.errors import BlipDiffError
from components.core.io import folder_hash
from components.core.paths import EXPORT_FILE, REGISTRY_PREFIX, is_hub_id

log = logging.getLogger(__name__)

MODEL_FILE = "model_index.json"
KINDS = ("model", "export", "registry", "hub")
NAMES = {"model": "a model folder", "export": "an export folder",
         "registry": "a registered model models:/NAME@ALIAS or models:/NAME/VERSION", "hub": "a hub id owner/name"}


@dataclass(frozen=True)
class Source:
    spec: str  # as given (relative paths stay relative: what the stages record)
    kind: str  # one of KINDS
    path: Path | None  # the local folder; None for a hub id
    hash: str  # content hash of the folder or registered artifact; the id for a hub model
    version: str | None = None  # "NAME version N" for a registered model

    @property
    def load_from(self) -> str:
        """What `layout.load` takes: the local folder, or the hub id."""
        return str(self.path) if self.path is not None else self.spec

    def describe(self) -> str:
        return f"{self.spec} ({self.version})" if self.version else self.spec


def _local(spec: str, root: Path | None) -> Path:
    path = Path(spec).expanduser()
    return path if root is None or path.is_absolute() else root / path


def folder_kind(path: Path) -> str:
    """"model" or "export" for a local folder; a clear error for anything else."""
    if (path / EXPORT_FILE).is_file():
        return "export"
    if (path / MODEL_FILE).is_file():
        return "model"
    raise BlipDiffError(f"{path}: neither a model folder ({MODEL_FILE}) nor an export folder ({EXPORT_FILE})")


@contextmanager
def resolve(spec: str | Path, root: Path | None = None, what: str = "model",
            kinds: tuple[str, ...] = KINDS, hint: str = "") -> Iterator[Source]:
    """The source `spec` names, relative paths taken from `root` (default: the working
    directory). `what` names the setting in errors (e.g. "evaluate.model"), `hint` says what
    to do when nothing is found; `kinds` are the ones the caller accepts. A registered
    model's temporary folder is removed on exit."""
    text = str(spec)
    if text.startswith(REGISTRY_PREFIX):
        _accept("registry", text, what, kinds)
        from components.model.registry import registered_folder

        with tempfile.TemporaryDirectory(prefix="blipdiff-registry-") as tmp:
            folder, digest, version = registered_folder(text, Path(tmp))
            log.info("%s is %s", text, version)
            yield Source(text, "registry", folder, digest, version)
        return
    local = _local(text, root)
    if local.is_dir():
        kind = folder_kind(local)
        _accept(kind, text, what, kinds)
        yield Source(text, kind, local, folder_hash(local))
        return
    if is_hub_id(text, root):
        _accept("hub", text, what, kinds)
        yield Source(text, "hub", None, text)
        return
    hint = hint or "give " + " or ".join(NAMES[k] for k in kinds)
    raise BlipDiffError(f"{what}: {local} not found ({hint})")


def _accept(kind: str, spec: str, what: str, kinds: tuple[str, ...]) -> None:
    if kind not in kinds:
        raise BlipDiffError(f"{what}: {spec} is {NAMES[kind].split(' models:/')[0]}; give "
                            + " or ".join(NAMES[k] for k in kinds))


def check(spec: str | Path, what: str, kinds: tuple[str, ...] = KINDS, root: Path | None = None) -> str:
    """The kind of a local or hub source, or the clear error `resolve` gives (a registered
    model is only named here, not downloaded)."""
    if str(spec).startswith(REGISTRY_PREFIX):
        _accept("registry", str(spec), what, kinds)
        return "registry"
    with resolve(spec, root, what, kinds) as source:
        return source.kind
