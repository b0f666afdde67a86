"""One model resolver (components.model.sources): a spec -> kind, local folder, hash; one
hub-id rule; a registered model's download lives exactly as long as the `resolve` block."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.core.errors import BlipDiffError
from components.core.io import folder_hash
from components.core.paths import is_hub_id
from components.model import sources


def _folder(root: Path, name: str, marker: str) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / marker).write_text("{}")
    return path


def test_local_folders_resolve_to_their_kind_and_content_hash(tmp_path):
    model = _folder(tmp_path, "models/blip_diffusion", "model_index.json")
    export = _folder(tmp_path, "models/onnx", "export.json")
    with sources.resolve("models/blip_diffusion", tmp_path) as src:
        assert (src.kind, src.path, src.hash, src.spec) == ("model", model, folder_hash(model), "models/blip_diffusion")
    with sources.resolve(export) as src:  # absolute, no root
        assert (src.kind, src.load_from) == ("export", str(export))
    (model / "model_index.json").write_text('{"changed": 1}')
    with sources.resolve("models/blip_diffusion", tmp_path) as src:
        assert src.hash == folder_hash(model)  # the content decides the hash, not the name


def test_one_hub_id_rule(tmp_path):
    assert is_hub_id("Salesforce/blipdiffusion", tmp_path)
    assert not is_hub_id("models/blip_diffusion", tmp_path)  # the pipeline's own folder, not made yet
    (tmp_path / "runs").mkdir()
    assert not is_hub_id("runs/model", tmp_path)  # its parent is here: a folder not made yet
    for spec in ("./a/b", "/a/b", "~/a", "a/b/c", "plain", "models/not_made_yet", "data/x"):
        assert not is_hub_id(spec, tmp_path), spec
    with sources.resolve("Salesforce/blipdiffusion", tmp_path) as src:
        assert (src.kind, src.path, src.hash, src.load_from) == ("hub", None, "Salesforce/blipdiffusion",
                                                                 "Salesforce/blipdiffusion")


def test_bad_specs_are_one_line_errors_naming_the_setting(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(BlipDiffError, match=r"evaluate\.model: .*models/nope not found \(run it\)"):
        with sources.resolve("models/nope", tmp_path, "evaluate.model", hint="run it"):
            pass
    _folder(tmp_path, "odd", "README.md")
    with pytest.raises(BlipDiffError, match="neither a model folder"):
        sources.check(tmp_path / "odd", "x")
    _folder(tmp_path, "models/onnx", "export.json")
    with pytest.raises(BlipDiffError, match=r"--checkpoint: models/onnx is an export folder; give a model folder"):
        sources.check("models/onnx", "--checkpoint", kinds=("model", "hub"), root=tmp_path)
    with pytest.raises(BlipDiffError, match="is a registered model"):
        sources.check("models:/blip-diffusion@champion", "--checkpoint", kinds=("model", "hub"))


def test_a_registered_model_lives_in_a_temporary_folder_owned_by_the_block(tmp_path, monkeypatch):
    from components.model import registry

    def fake_registered_folder(uri, dst):
        folder = _folder(dst, "checkpoint", "model_index.json")
        return folder, "abc123", "blip-diffusion version 3"

    monkeypatch.setattr(registry, "registered_folder", fake_registered_folder)
    with sources.resolve("models:/blip-diffusion@champion") as src:
        assert src.kind == "registry" and src.path.is_dir() and src.hash == "abc123"
        assert src.describe() == "models:/blip-diffusion@champion (blip-diffusion version 3)"
        held = src.path
    assert not held.exists()
    with pytest.raises(RuntimeError):  # removed on error too
        with sources.resolve("models:/blip-diffusion/3") as src:
            held = src.path
            raise RuntimeError
    assert not held.exists()


def test_naming_the_kind_hashes_nothing_and_a_folder_is_hashed_once_when_asked(tmp_path, monkeypatch):
    """An export folder can hold gigabytes of weights: `check` and a `resolve` whose hash is
    never read must not read them."""
    export = _folder(tmp_path, "models/onnx", "export.json")
    hashed = []
    monkeypatch.setattr(sources, "folder_hash", lambda path: hashed.append(path) or "h")
    assert sources.check(export, "x") == "export" and hashed == []
    with sources.resolve(export) as src:
        assert src.kind == "export" and hashed == []
        assert src.hash == src.hash == "h" and hashed == [export]
