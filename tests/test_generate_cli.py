"""`blipdiff generate` end to end on the tiny preset."""

import json

import numpy as np
import pytest
from PIL import Image

from components.cli import main


@pytest.fixture
def ref_images(tmp_path):
    paths = []
    for i in range(2):
        rng = np.random.default_rng(i)
        path = tmp_path / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _args(out, *extra):
    return ["generate", "--preset", "tiny", "--steps", "2", "--height", "32", "--width", "32",
            "--out", str(out), *extra]


def test_generate_writes_images_and_records(tmp_path, ref_images):
    out = tmp_path / "out"
    code = main(_args(out, "--subject-image", *ref_images, "--source-subject", "dog",
                      "--prompt", "in the snow", "--prompt", "on a beach", "--images-per-prompt", "2",
                      "--seed", "10", "--save-embeddings", str(tmp_path / "dog.safetensors")))
    assert code == 0
    records = json.loads((out / "records.json").read_text())
    assert [r["prompt"] for r in records] == ["in the snow"] * 2 + ["on a beach"] * 2
    assert [r["seed"] for r in records] == [10, 11, 12, 13]
    assert records[0]["subject_images"] == ref_images and records[0]["scheduler"] == "pndm"
    assert records[0]["built_prompt"].startswith("a dog in the snow, a dog in the snow")
    for r in records:
        with Image.open(out / r["image"]) as im:
            assert im.size == (32, 32)

    # saved embeddings reproduce the same image without the reference images
    again = tmp_path / "again"
    assert main(_args(again, "--embeddings", str(tmp_path / "dog.safetensors"), "--prompt", "on a beach",
                      "--seeds", "12")) == 0
    rec = json.loads((again / "records.json").read_text())[0]
    assert rec["target_subject"] == "dog"  # taken from the embeddings file
    a = np.asarray(Image.open(out / "images/0002.png"))
    b = np.asarray(Image.open(again / "images/0000.png"))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "   "], "empty --prompt"),
    (["--prompt", "x", "--seeds", "1", "2"], "--seeds has 2 values for 1 prompts"),
    (["--prompt", "x"], "--source-subject"),
])
def test_generate_bad_input_is_one_line_error(tmp_path, ref_images, capsys, extra, message):
    args = _args(tmp_path / "o", "--subject-image", ref_images[0], *extra)
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("blipdiff generate: error:")
    assert not (tmp_path / "o").exists()


def test_generate_unreadable_subject_image(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    code = main(_args(tmp_path / "o", "--subject-image", str(bad), "--source-subject", "dog", "--prompt", "x"))
    assert code == 2 and "bad.jpg: not a recognised image format" in capsys.readouterr().err


def test_generate_refuses_a_finetuned_folder_of_another_base(tmp_path, capsys):
    import torch

    from components.model import finetuned, layout
    from components.model.tiny.blip_diffusion import build_tiny

    base = build_tiny(seed=0)
    folder = tmp_path / "ft"
    finetuned.save(base, folder, torch.zeros(1, 16, 32), "toy", {"lora_rank": 0}, {},
                   finetuned.describe_base(base, "tiny", None))
    other = tmp_path / "other"
    layout.save(build_tiny(seed=1), other)
    code = main(_args(tmp_path / "o", "--finetuned", str(folder), "--checkpoint", str(other), "--prompt", "x"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("blipdiff generate: error:")
    assert f"{folder} was fine-tuned from preset tiny (seed 0)" in err[-1]
    assert f"the model given is checkpoint {other}" in err[-1] and "weights differ" in err[-1]
    assert not (tmp_path / "o").exists()
    # the base it was fine-tuned from is accepted: named again, or (no --preset) as the folder records it
    assert main(_args(tmp_path / "a", "--finetuned", str(folder), "--prompt", "x")) == 0
    no_preset = _args(tmp_path / "b", "--finetuned", str(folder), "--prompt", "x")[3:]
    assert main(["generate", *no_preset]) == 0
    assert json.loads((tmp_path / "b" / "records.json").read_text())[0]["model"] == "tiny"
