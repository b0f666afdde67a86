"""Stage `evaluate` (DreamBench protocol) and `blipdiff score`: the plan, resumable generation,
the outputs, and bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from components.cli import main
from components.core.config import parse_params
from components.core.errors import BlipDiffError
from components.evaluation import protocol
from components.model.blip_diffusion import BlipDiffusion
from components.stages import evaluate
from tests.helpers import dreambench_mini


@pytest.fixture
def bench_root(tmp_path):
    return dreambench_mini.make(tmp_path / "dreambench")


# ------------------------------------------------------------------------ protocol
@pytest.mark.parametrize("template, cls, phrase, context, text", [
    ("a {0} {1} in the jungle", "dog", "dog", "in the jungle", "a dog in the jungle"),
    ("a red {0} {1}", "backpack", "red backpack", "", "a red backpack"),
    ("a cube shaped {0} {1}", "stuffed animal", "cube shaped stuffed animal", "", "a cube shaped stuffed animal"),
    ("a {0} {1} wearing a black top hat and a monocle", "cat", "cat", "wearing a black top hat and a monocle",
     "a cat wearing a black top hat and a monocle"),
])
def test_templates_split_into_class_phrase_context_and_clip_text(template, cls, phrase, context, text):
    assert protocol.class_phrase(template, cls) == phrase
    assert protocol.context(template) == context
    assert protocol.clip_text(template, cls) == text
    # the text the model is conditioned on (less the subject embeddings) is the CLIP-T text
    assert BlipDiffusion.build_prompt(context, phrase, 1.0, 1) == text


def test_every_real_dreambench_template_gives_the_same_generation_and_clip_text(dreambench_dir):
    bench = protocol.load(dreambench_dir)
    assert len(bench.info.classes) == 30 and sum(len(v) for v in bench.real.values()) == 158
    for subject, cls in bench.info.classes.items():
        templates = bench.prompts(subject)
        assert len(templates) == 25
        for t in templates:
            text = protocol.clip_text(t, cls)
            assert "{" not in text and "  " not in text and cls in text
            assert BlipDiffusion.build_prompt(protocol.context(t), protocol.class_phrase(t, cls), 1.0, 1) == text
    # the full protocol: 30 x 25 x 4 = 3000 images, each with its own seed
    items = protocol.plan(bench, protocol.choose_subjects(bench, "all"), "all", 4, 0)
    assert len(items) == 3000 and len({i.seed for i in items}) == 3000


def test_seeds_are_fixed_per_subject_prompt_and_image_whatever_the_subset(bench_root):
    bench = protocol.load(bench_root)
    small = protocol.plan(bench, ["dog"], 1, 2, 0)
    large = protocol.plan(bench, protocol.choose_subjects(bench, "all"), "all", 3, 0)
    seeds = {(i.subject, i.prompt_index, i.image_index): i.seed for i in large}
    assert all(seeds[(i.subject, i.prompt_index, i.image_index)] == i.seed for i in small)
    assert len(set(seeds.values())) == len(large) == 2 * 3 * 3
    assert protocol.plan(bench, ["dog"], 1, 1, 5)[0].seed != small[0].seed  # the base seed counts


def test_subject_subsets_alternate_object_and_live(bench_root):
    bench = protocol.load(bench_root)
    assert protocol.choose_subjects(bench, 2) == ["backpack", "dog"]
    assert protocol.choose_subjects(bench, 1) == ["backpack"]
    assert [i.category for i in protocol.plan(bench, ["dog"], 2, 1, 0)] == ["live", "live"]
    with pytest.raises(BlipDiffError, match="unknown DreamBench subject.*cat7"):
        protocol.choose_subjects(bench, ["dog", "cat7"])


def test_a_broken_benchmark_folder_is_one_clear_error(tmp_path, bench_root):
    with pytest.raises(BlipDiffError, match="prompts_and_classes.txt"):
        protocol.load(tmp_path)
    for f in (bench_root / "dog").iterdir():
        f.unlink()
    with pytest.raises(BlipDiffError, match=r"without real images: dog \(no image in"):
        protocol.load(bench_root)


# ------------------------------------------------------------------------ the stage
def _root(tmp_path, bench_root, **evaluate_cfg):
    """A repository root with a tiny model folder where train_subject writes it, and params."""
    from components.model import layout
    from components.model.tiny.blip_diffusion import build_tiny

    root = tmp_path / "repo"
    if not (root / "models/blip_diffusion").is_dir():
        layout.save(build_tiny(0), root / "models/blip_diffusion")
    cfg = {"subjects": 2, "prompts_per_subject": 2, "images_per_prompt": 2, "steps": 2, **evaluate_cfg}
    params = parse_params({"ingest": {"dreambench": {"path": str(bench_root)}},
                           "evaluate": {"benchmark": "dreambench", **cfg}})
    return root, params


def test_evaluate_writes_scores_report_and_resumes_without_regenerating(tmp_path, bench_root, monkeypatch):
    root, params = _root(tmp_path, bench_root)
    metrics, grids = evaluate.run(params, root)
    out = root / "reports/dreambench"
    per_image = pd.read_parquet(out / "per_image.parquet")
    assert len(per_image) == metrics["run_images_generated"] == 2 * 2 * 2 and metrics["run_images_reused"] == 0
    assert set(per_image["subject"]) == {"backpack", "dog"}
    assert set(per_image["prompt"]) >= {"a backpack in the jungle", "a dog in the snow"}
    assert per_image[["dino", "clip_i", "clip_t"]].abs().le(1.0).all().all()
    assert all((out / p).is_file() for p in per_image["image"])
    detail = json.loads((out / "metrics.json").read_text())
    zs = detail["modes"]["zero_shot"]
    assert set(zs["by_category"]) == {"live", "object"} and set(zs["per_subject"]) == {"backpack", "dog"}
    assert zs["overall"]["images"] == 8 and len(zs["per_prompt"]) == 4
    assert detail["oracle"]["pairs"] == 2 * 3 * 2  # distinct ordered pairs of 3 views, 2 subjects
    assert metrics["oracle_dino"] == pytest.approx(detail["oracle"]["dino"], abs=1e-6)
    assert metrics["zero_shot_dino"] == pytest.approx(per_image["dino"].mean(), abs=1e-5)
    assert detail["settings"]["steps"] == 2 and detail["settings"]["dino_model"].startswith("tiny")
    bars = pd.read_csv(out / "per_subject.csv")
    assert list(bars["subject"]) == ["backpack", "dog"]
    html = (out / "report.html").read_text()
    assert "0.594" in html and "a dog in the snow" in html and 'src="images/zero_shot/dog/' in html
    assert set(grids) == {"grid_zero_shot_backpack", "grid_zero_shot_dog"}

    # an interrupted run: two images lost, one truncated; the next run makes only those three
    images = sorted(out.glob("images/**/*.png"))
    images[0].unlink()
    images[1].unlink()
    images[2].write_bytes(images[2].read_bytes()[:40])
    calls = []
    original = BlipDiffusion.generate
    monkeypatch.setattr(BlipDiffusion, "generate", lambda self, e, prompts, *a, **k: calls.append(len(prompts))
                        or original(self, e, prompts, *a, **k))
    again, _ = evaluate.run(params, root)
    assert again["run_images_generated"] == 3 == sum(calls) and again["run_images_reused"] == 5
    # same seeds, same images (up to float rounding: another batch size), same scores
    pd.testing.assert_frame_equal(pd.read_parquet(out / "per_image.parquet"), per_image, atol=1e-3)

    # another sampler is another key: everything is made again, the old images are removed
    calls.clear()
    _, params3 = _root(tmp_path, bench_root, steps=3, subjects=["dog"])
    third, _ = evaluate.run(params3, root)
    assert third["run_images_generated"] == 4 == sum(calls) and third["run_images_stale_removed"] == 8
    assert len(list(out.glob("images/**/*.png"))) == 4


def test_finetuned_mode_trains_per_subject_then_generates(tmp_path, bench_root):
    root, params = _root(tmp_path, bench_root, mode="both", subjects=["dog"], prompts_per_subject=1,
                         images_per_prompt=1, finetune={"steps": 2, "learning_rate": 1e-3, "batch_size": 1})
    metrics, _ = evaluate.run(params, root)
    per_image = pd.read_parquet(root / "reports/dreambench/per_image.parquet")
    assert list(per_image["mode"]) == ["zero_shot", "finetuned"]
    assert {"zero_shot_dino", "finetuned_dino", "finetuned_clip_t"} <= set(metrics)
    a, b = (root / "reports/dreambench" / p for p in per_image["image"])
    assert a.read_bytes() != b.read_bytes()  # the fine-tuned UNet draws another image


def test_evaluate_refuses_a_missing_model_and_mixed_evaluators(tmp_path, bench_root):
    params = parse_params({"ingest": {"dreambench": {"path": str(bench_root)}},
                           "evaluate": {"benchmark": "dreambench"}})
    with pytest.raises(BlipDiffError, match="evaluate.model: .*not found.*dvc repro train_subject"):
        evaluate.run(params, tmp_path)
    params = parse_params({"ingest": {"dreambench": {"path": str(bench_root)}},
                           "evaluate": {"benchmark": "dreambench", "dino_model": "tiny",
                                        "clip_model": "openai/clip-vit-base-patch32"}})
    with pytest.raises(BlipDiffError, match="both tiny or neither"):
        evaluate.run(params, tmp_path)


def test_evaluate_params_are_checked():
    with pytest.raises(Exception, match="subjects must be >= 1"):
        parse_params({"evaluate": {"subjects": 0}})
    with pytest.raises(Exception, match="reference must be 'average' or an image index"):
        parse_params({"evaluate": {"reference": -1}})
    assert parse_params({"evaluate": {"subjects": "all", "prompts_per_subject": "all"}}).evaluate.subjects == "all"


# ------------------------------------------------------------------------ blipdiff score
@pytest.fixture
def generated(tmp_path):
    """A `blipdiff generate`-style folder: images/NNNN.png and records.json."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "gen"
    (folder / "images").mkdir(parents=True)
    records = []
    for i, prompt in enumerate(["in the snow", "wearing a red hat"]):
        Image.fromarray(np.full((32, 32, 3), 40 * i + 30, np.uint8)).save(folder / f"images/{i:04d}.png")
        records.append({"image": f"images/{i:04d}.png", "prompt": prompt, "seed": i, "target_subject": "dog",
                        "source_subject": "dog"})
    (folder / "records.json").write_text(json.dumps(records))
    return folder


def _score(*args):
    return main(["score", "--dino-model", "tiny", "--clip-model", "tiny", *map(str, args)])


def test_score_a_generate_folder_against_one_subject(generated, bench_root, tmp_path, capsys):
    out = tmp_path / "scores"
    assert _score("--records", generated / "records.json", "--real", bench_root / "dog", "--out", out) == 0
    detail = json.loads((out / "scores.json").read_text())
    assert detail["modes"]["scored"]["overall"]["images"] == 2 and detail["counts"]["real_images"] == 3
    per_image = pd.read_parquet(out / "per_image.parquet")
    assert list(per_image["prompt"]) == ["a dog in the snow", "a dog wearing a red hat"]
    assert list(per_image["subject"]) == ["dog", "dog"]
    assert 'src="../gen/images/0000.png"' in (out / "report.html").read_text()
    assert '"images_scored": 2' in capsys.readouterr().out


def test_score_a_csv_with_an_identifier_against_a_dreambench_folder(generated, bench_root, tmp_path):
    csv = generated / "images.csv"
    pd.DataFrame({"image": ["images/0000.png", "images/0001.png", "images/missing.png"],
                  "prompt": ["a sks dog in the jungle", "a sks backpack on the beach", "a sks dog"],
                  "class": ["dog", "backpack", "dog"], "subject": ["dog", "backpack", "dog"]}).to_csv(csv, index=False)
    out = tmp_path / "scores"
    assert _score("--csv", csv, "--real", bench_root, "--identifier", "sks", "--out", out) == 0
    per_image = pd.read_parquet(out / "per_image.parquet")
    assert list(per_image["prompt"]) == ["a dog in the jungle", "a backpack on the beach"]
    assert list(per_image["category"]) == ["live", "object"]
    detail = json.loads((out / "scores.json").read_text())
    assert detail["counts"]["images_skipped"] == 1  # the unreadable one is counted, not fatal


def test_score_bad_input_is_one_clear_error(generated, bench_root, tmp_path, capsys):
    out = tmp_path / "scores"
    assert _score("--records", generated / "records.json", "--real", bench_root, "--out", out) == 2
    assert "which subject? --real has 2 (backpack, dog)" in capsys.readouterr().err
    assert _score("--records", generated / "records.json", "--real", bench_root, "--subject", "cat",
                  "--out", out) == 2
    assert "unknown subject 'cat'" in capsys.readouterr().err
    (generated / "records.json").write_text("{not json")
    assert _score("--records", generated / "records.json", "--real", bench_root / "dog", "--out", out) == 2
    assert "--records" in capsys.readouterr().err
    assert _score("--records", generated / "nope.json", "--real", tmp_path / "none", "--out", out) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_negative_prompt_longer_than_the_text_encoder_is_truncated():
    """LAVIS's default negative prompt is 183 tokens for the tiny character-level tokenizer."""
    from components.core.config import NEGATIVE_PROMPT
    from components.model.conditioning import encode_text, prompt_ids
    from components.model.tiny.blip_diffusion import build_tiny

    model = build_tiny(0)
    assert len(model.tokenizer(NEGATIVE_PROMPT).input_ids) > 77
    ids = prompt_ids(model.tokenizer, [NEGATIVE_PROMPT] * 2, model.text_length, 16, [False, False])
    assert encode_text(model.text_encoder, ids, None, model.ctx_begin_pos).shape[:2] == (2, 77)


def test_generation_on_a_local_dask_cluster_writes_the_in_process_bytes(tmp_path, bench_root, caplog):
    """`dask.workers: 2`: the subjects' images are made on two worker processes and written
    here, byte for byte those of an in-process run, with the same scores."""
    here, params = _root(tmp_path / "here", bench_root)
    there, params_dask = _root(tmp_path / "there", bench_root)
    params_dask = params_dask.model_copy(update={"dask": params_dask.dask.model_copy(update={"workers": 2})})
    evaluate.run(params, here)
    with caplog.at_level("INFO", logger=evaluate.__name__):
        metrics, _ = evaluate.run(params_dask, there)
    assert "generating on a Dask LocalCluster (2 workers, 2 threads)" in caplog.text
    assert "zero_shot dog: 4 images" not in caplog.text  # made in the workers, whose log stays there
    assert metrics["run_images_generated"] == 8
    out = "reports/dreambench"
    images = sorted(p.relative_to(here / out) for p in (here / out).glob("images/**/*.png"))
    assert len(images) == 8
    assert all((here / out / p).read_bytes() == (there / out / p).read_bytes() for p in images)
    pd.testing.assert_frame_equal(pd.read_parquet(here / out / "per_image.parquet"),
                                  pd.read_parquet(there / out / "per_image.parquet"))
