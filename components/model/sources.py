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
one slash, not starting with ".", "/" or "~", not in the pipeline's own folders, and
neither the path nor its parent is a local folder (so `models/blip_diffusion`, not trained
yet, is a missing folder).

`check` names the kind without downloading or hashing anything; a folder's hash is computed
when first asked for (an export folder can hold gigabytes of weights that a caller never
needs hashed).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from components.core.errors import BlipDiffError
from components.core.io import folder_hash
from components.core.paths import EXPORT_FILE, REGISTRY_PREFIX, is_hub_id, local_path

log = logging.getLogger(__name__)

MODEL_FILE = "model_index.json"
KINDS = ("model", "export", "registry", "hub")
NAMES = {"model": "a model folder", "export": "an export folder",
         "registry": "a registered model models:/NAME@ALIAS or models:/NAME/VERSION", "hub": "a hub id owner/name"}


@dataclass
class Source:
    spec: str  # as given (relative paths stay relative: what the stages record)
    kind: str  # one of KINDS
    path: Path | None  # the local folder; None for a hub id
    version: str | None = None  # "NAME version N" for a registered model
    digest: str | None = None  # the hash when known up front (a registered artifact's)

    @functools.cached_property
    def hash(self) -> str:
        """Content hash of the folder (or the registered artifact); the id for a hub model."""
        if self.digest is not None:
            return self.digest
        return folder_hash(self.path) if self.path is not None else self.spec

    @property
    def load_from(self) -> str:
        """What `layout.load` takes: the local folder, or the hub id."""
        return str(self.path) if self.path is not None else self.spec

    def describe(self) -> str:
        return f"{self.spec} ({self.version})" if self.version else self.spec


def folder_kind(path: Path) -> str:
    """"model" or "export" for a local folder; a clear error for anything else."""
    if (path / EXPORT_FILE).is_file():
        return "export"
    if (path / MODEL_FILE).is_file():
        return "model"
    raise BlipDiffError(f"{path}: neither a model folder ({MODEL_FILE}) nor an export folder ({EXPORT_FILE})")


def _classify(spec: str, root: Path | None, what: str, kinds: tuple[str, ...], hint: str) -> tuple[str, Path | None]:
    """(kind, local folder or None), from names and the file system alone; the clear error
    when `spec` names nothing or a kind the caller does not take."""
    if spec.startswith(REGISTRY_PREFIX):
        kind, local = "registry", None
    else:
        local = local_path(spec, root)
        if local.is_dir():
            kind = folder_kind(local)
        elif is_hub_id(spec, root):
            kind, local = "hub", None
        else:
            hint = hint or "give " + " or ".join(NAMES[k] for k in kinds)
            raise BlipDiffError(f"{what}: {local} not found ({hint})")
    if kind not in kinds:
        raise BlipDiffError(f"{what}: {spec} is {NAMES[kind].split(' models:/')[0]}; give "
                            + " or ".join(NAMES[k] for k in kinds))
    return kind, local


def check(spec: str | Path, what: str, kinds: tuple[str, ...] = KINDS, root: Path | None = None,
          hint: str = "") -> str:
    """The kind `spec` names, or the clear error `resolve` would give; nothing is downloaded
    or hashed."""
    return _classify(str(spec), root, what, kinds, hint)[0]


@contextmanager
def resolve(spec: str | Path, root: Path | None = None, what: str = "model",
            kinds: tuple[str, ...] = KINDS, hint: str = "") -> Iterator[Source]:
    """The source `spec` names, relative paths taken from `root` (default: the working
    directory). `what` names the setting in errors (e.g. "evaluate.model"), `hint` says what
    to do when nothing is found; `kinds` are the ones the caller accepts. A registered
    model's temporary folder is removed on exit."""
    text = str(spec)
    kind, local = _classify(text, root, what, kinds, hint)
    if kind != "registry":
        yield Source(text, kind, local)
        return
    from components.model.registry import registered_folder

    with tempfile.TemporaryDirectory(prefix="blipdiff-registry-") as tmp:
        folder, digest, version = registered_folder(text, Path(tmp))
        log.info("%s is %s", text, version)
        yield Source(text, "registry", folder, version, digest)
