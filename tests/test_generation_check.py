"""train_subject's generation check and sample grid: the fixed subject classifier, the chance
and p-value arithmetic, the check's plumbing on a tiny random model, the grid's layout, and
(slow) that the default profile's stage 2 draws its held-out subjects far above chance."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.core import paths
from components.core.config import IngestConfig, Params, load_params
from components.evaluation.grid import grid_layout, image_grid
from components.evaluation.subject_classifier import (SubjectClassifier, mask_array, subject_classes, subject_rows,
                                                      subject_weights, to_rgb_array)
from components.training.subject_objective import at_least, chance_metrics, generation_accuracy


# ----------------------------------------------------------------------- classifier
@pytest.fixture(scope="module")
def subjects_root(tmp_path_factory):
    """12 synthetic subjects in 4 classes, 6 views each, the last 2 held out."""
    from components.stages.ingest import ingest_subjects

    root = tmp_path_factory.mktemp("subjects")
    cfg = IngestConfig(test_views_per_subject=2,
                       synthetic={"num_subjects": 12, "min_views": 6, "max_views": 6, "image_size": 64})
    ingest_subjects(cfg, root)
    return root


def test_classifier_names_real_held_out_views(subjects_root):
    """Fitted on the training views (with their masks), it names the real held-out views,
    classified at 32 px without masks as generated images are: the sanity number
    `gen_classifier_real_accuracy` must be high for the check to mean anything."""
    train, test = subject_rows(subjects_root, "train"), subject_rows(subjects_root, "test")
    classifier = SubjectClassifier.fit(train, subjects_root, size=32)
    assert len(classifier.subjects) == 12 and classifier.size == 32
    assert len(set(subject_classes(train).values())) == 4
    accuracy = classifier.accuracy(test, subjects_root)
    print("classifier on 24 real held-out views at 32 px:", accuracy)
    assert accuracy >= 0.9
    # generated images come as floats in [0, 1]: the same verdicts as their uint8 pixels
    from components.data.images import read_rgb

    images = [read_rgb(subjects_root / p) for p in test["image_path"]]
    assert classifier.predict([im / 255.0 for im in images]) == classifier.predict(images)
    # fitted without masks too (a source without alpha), it still names most of them
    unmasked = SubjectClassifier.fit(train.assign(mask_path=None), subjects_root, size=32)
    assert unmasked.accuracy(test, subjects_root) >= 0.8


def test_estimated_region_covers_the_subject(subjects_root):
    """Without a mask, the estimated subject region weighs the subject's pixels far above the
    background's (the ground truth tells which is which)."""
    from components.data.images import read_alpha, read_rgb

    rows = subject_rows(subjects_root, "test")
    inside, outside = [], []
    for row in rows.itertuples():
        weights = subject_weights(to_rgb_array(read_rgb(subjects_root / row.image_path), 32))
        truth = mask_array(read_alpha(subjects_root / row.mask_path), 32)
        inside.append(weights[truth > 0.9].mean())
        outside.append(weights[truth < 0.1].mean())
    assert np.mean(inside) > 3 * np.mean(outside), (np.mean(inside), np.mean(outside))


# ------------------------------------------------------------------------ arithmetic
def _binomial_tail(k: int, n: int, p: float) -> float:
    return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_chance_metrics_and_p_values():
    m = chance_metrics("gen", 0, 72, 1 / 12)
    assert m == {"gen_accuracy": 0.0, "gen_chance": 1 / 12, "gen_images": 72, "gen_over_chance": 0.0,
                 "gen_p_value": 1.0}
    m = chance_metrics("id", 9, 36, 1 / 12)
    assert m["id_accuracy"] == 0.25 and m["id_over_chance"] == pytest.approx(3.0)
    assert m["id_p_value"] == pytest.approx(_binomial_tail(9, 36, 1 / 12), rel=1e-9)
    assert m["id_p_value"] == pytest.approx(0.002281, abs=1e-6)  # 9 of 36 at chance 1/12: p = 0.23 %
    assert chance_metrics("gen", 72, 72, 1 / 12)["gen_p_value"] == pytest.approx((1 / 12) ** 72)
    assert chance_metrics("gen", 1, 1, 0.5)["gen_p_value"] == pytest.approx(0.5)
    # the Poisson binomial tail: the binomial one for equal chances, by hand for unequal ones
    assert at_least(9, [1 / 12] * 36) == pytest.approx(_binomial_tail(9, 36, 1 / 12), rel=1e-9)
    assert at_least(0, [0.5, 0.25]) == 1.0
    assert at_least(1, [0.5, 0.25]) == pytest.approx(1 - 0.5 * 0.75)
    assert at_least(2, [0.5, 0.25]) == pytest.approx(0.125)
    assert at_least(3, [0.5, 0.25]) == 0.0


# ------------------------------------------------------------------ the check itself
class _HeldOut:
    """What `generation_accuracy` reads of a held-out PairDataset: three subjects (two of
    class toy, one vase), one view each."""

    subjects = ["a_toy", "b_toy", "c_vase"]
    subject_index = [0, 1, 2]
    class_texts = ["toy", "toy", "vase"]
    targets = ["a.png", "b.png", "c.png"]

    def __len__(self):
        return 3

    def image(self, relative: str) -> np.ndarray:
        colour = {"a.png": (220, 30, 30), "b.png": (30, 30, 220), "c.png": (30, 200, 30)}[relative]
        return np.full((32, 32, 3), colour, np.uint8)


def test_generation_check_draws_per_view_and_counts_per_image():
    """Each view's embeddings draw `gen_images_per_view` images with the empty prompt (the
    text "a [class]") and seeds seed + j; the text-only control draws each (class, seed) once;
    every image is counted, chance is 1 / subjects, the class chance 1 / subjects of the class."""
    from components.model.tiny.blip_diffusion import build_tiny

    model = build_tiny(0)
    calls = []
    generate = model.generate

    def spy(embeds, prompts, classes, seeds, **options):
        calls.append((None if embeds is None else tuple(embeds.shape), list(prompts), list(classes), list(seeds),
                      options))
        return generate(embeds, prompts, classes, seeds, **options)

    model.generate = spy
    cfg = Params(train_subject={"seed": 5, "gen_images_per_view": 2, "gen_steps": 2, "gen_batch_size": 4}).train_subject
    seen = []

    def classify(images):  # names every image "a_toy"
        seen.extend(images)
        return ["a_toy"] * len(images)

    classes = {"a_toy": "toy", "b_toy": "toy", "c_vase": "vase"}
    metrics = generation_accuracy(model, _HeldOut(), classify, classes, cfg, size=16)
    assert metrics["gen_images"] == 6 and metrics["gen_accuracy"] == pytest.approx(2 / 6)
    assert metrics["gen_chance"] == pytest.approx(1 / 3) and metrics["gen_over_chance"] == pytest.approx(1.0)
    assert metrics["gen_p_value"] == pytest.approx(_binomial_tail(2, 6, 1 / 3))
    assert metrics["gen_class_chance"] == pytest.approx((0.5 * 4 + 1.0 * 2) / 6)
    assert metrics["gen_class_p_value"] == pytest.approx(at_least(2, [0.5] * 4 + [1.0] * 2))
    assert metrics["gen_text_only_accuracy"] == pytest.approx(2 / 6)
    # with subject: 6 images in batches of 4; the prompt is empty, the class per view
    subject_calls = [c for c in calls if c[0] is not None]
    assert [c[0][0] for c in subject_calls] == [4, 2]
    assert sum((c[1] for c in subject_calls), []) == [""] * 6
    assert sum((c[2] for c in subject_calls), []) == ["toy", "toy", "toy", "toy", "vase", "vase"]
    assert sum((c[3] for c in subject_calls), []) == [5, 6, 5, 6, 5, 6]
    assert all(c[4]["prompt_reps"] == 1 and c[4]["num_inference_steps"] == 2 and c[4]["height"] == 16
               and c[4]["guidance_scale"] == cfg.gen_guidance_scale for c in calls)
    # text only: one image per (class, seed), the built text as the whole prompt
    (text_call,) = [c for c in calls if c[0] is None]
    assert text_call[1] == ["a toy", "a toy", "a vase", "a vase"] and text_call[3] == [5, 6, 5, 6]
    assert len(seen) == 6 + 4 and all(im.shape == (16, 16, 3) for im in seen)


# ------------------------------------------------------------------------------ grid
def test_grid_lays_out_tiles_headers_and_labels():
    colours = [[(255, 0, 0), (0, 255, 0), None], [(0, 0, 255), (255, 255, 0), (0, 255, 255)]]
    cells = [[None if c is None else np.full((8, 8, 3), c, np.uint8) for c in row] for row in colours]
    cells[1][2] = cells[1][2] / 255.0  # floats in [0, 1] too
    rows, columns = ["subject_a", "b"], ["reference", "prior", "striped"]
    grid = image_grid(cells, rows, columns, tile=24, pad=4)
    layout = grid_layout(rows, columns, tile=24, pad=4)
    assert grid.shape == (layout.size[1], layout.size[0], 3) and grid.dtype == np.uint8
    assert layout.size[0] == layout.label_width + 4 + 3 * 28 and layout.size[1] == layout.header_height + 4 + 2 * 28
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            x, y = layout.origin(r, c)
            cell = grid[y:y + 24, x:x + 24]
            expected = (200, 200, 200) if colour is None else colour
            assert (cell == expected).all(), (r, c)  # nearest neighbour: the whole tile, no blending
            assert (grid[y - 1, x:x + 24] == 255).all() and (grid[y:y + 24, x - 1] == 255).all()  # padding
    assert (grid[:layout.header_height, layout.label_width:] < 128).any()  # column headers drawn
    assert (grid[layout.header_height:, :layout.label_width] < 128).any()  # row labels drawn
    with pytest.raises(ValueError, match="rows of cells"):
        image_grid(cells, ["one"], columns)


def test_stage_writes_the_grid_and_the_generation_metrics(tmp_path):
    """train_subject on a tiny set, started from a base model folder: the metrics hold the
    generation check, the grid is written (one row per subject, 5 columns, 3x tiles; the prior
    column drawn by the base model) and returned for MLflow."""
    from components.model import layout
    from components.model.tiny.blip_diffusion import build_tiny
    from components.stages import context, ingest, train_subject

    params = Params(ingest={"test_views_per_subject": 1,
                            "synthetic": {"num_subjects": 3, "min_views": 3, "max_views": 3, "image_size": 48}},
                    context={"backgrounds_per_image": 1, "matting_max_side": None},
                    train_subject={"steps": 2, "batch_size": 2, "resolution": 16, "warmup_steps": 1, "log_every": 1,
                                   "checkpoint_every": 100, "id_draws": 1, "qformer": None, "base": "models/base",
                                   "gen_steps": 2})
    ingest.ingest_subjects(params.ingest, tmp_path)
    context.run(params, tmp_path)
    layout.save(build_tiny(0, image_size=16), tmp_path / "models" / "base")
    metrics, samples = train_subject.run(params, tmp_path)
    assert metrics["gen_images"] == 3 * params.train_subject.gen_images_per_view and metrics["gen_chance"] == pytest.approx(1 / 3)
    for key in ("gen_accuracy", "gen_p_value", "gen_over_chance", "gen_class_chance", "gen_class_p_value",
                "gen_text_only_accuracy", "gen_classifier_real_accuracy", "id_p_value"):
        assert key in metrics, key
    grid = np.asarray(Image.open(tmp_path / paths.SAMPLES_GRID))
    train, _ = train_subject.read_splits(tmp_path)
    layout_ = grid_layout(sorted(train["subject_id"].unique()), list(train_subject.GRID_COLUMNS), tile=48)
    assert grid.shape == (layout_.size[1], layout_.size[0], 3)
    assert (samples["grid"] == grid).all()
    for column in range(5):  # every cell drawn, the base model's prior too (not the grey of a missing one)
        x, y = layout_.origin(0, column)
        assert not (grid[y:y + 48, x:x + 48] == 200).all(), column
    # without a base model (base: null) the prior cells are grey
    assert (train_subject.base_priors(tmp_path, ["a toy"], ["toy"], params.train_subject.model_copy(
        update={"base": None}), "cpu") == [None])


# ------------------------------------------------------------- the default profile
def _default_grid_layout(root: Path):
    import pandas as pd

    from components.stages.train_subject import GRID_COLUMNS

    pairs = pd.read_parquet(root / paths.PAIRS_MANIFEST)
    subjects = sorted(pairs[pairs["split"] == "train"]["subject_id"].unique())
    return subjects, grid_layout(subjects, list(GRID_COLUMNS), tile=96)


@pytest.mark.slow
def test_generation_check_far_above_chance(default_run):
    """Stage 2 learned subjects: drawn from one held-out view's embeddings with the text
    "a [class]", the images show that view's subject (named by the fixed classifier) at 3x
    chance or more (12 subjects: chance 1/12), which a random guesser reaches with p < 1 %;
    the classifier itself names the real held-out views; the grid is there, 12 x 5 cells of 96 px."""
    metrics = json.loads((default_run / paths.metrics_file("train_subject")).read_text())
    print("generation check:", {k: v for k, v in metrics.items() if k.startswith("gen_")})
    assert metrics["gen_classifier_real_accuracy"] > 0.8, metrics
    per_view = load_params(default_run / "params.yaml").train_subject.gen_images_per_view
    assert metrics["gen_images"] == 36 * per_view and metrics["gen_chance"] == pytest.approx(1 / 12)
    assert metrics["gen_accuracy"] >= 3 * metrics["gen_chance"], metrics
    assert metrics["gen_p_value"] < 0.01, metrics
    subjects, layout = _default_grid_layout(default_run)
    assert len(subjects) == 12
    grid = Image.open(default_run / paths.SAMPLES_GRID)
    assert grid.size == layout.size and grid.mode == "RGB"


@pytest.mark.slow
def test_generation_uses_the_subject_not_only_the_class_word(default_run):
    """The text names the class, and 3 subjects share each class word: a model that ignored
    the subject embeddings but drew its class well would score up to 1/3, 4x the 1/12 chance.
    So the images must also beat a guesser that knows the class (p < 1 %), and beat the same
    drawings without the subject embeddings (`gen_text_only_accuracy`)."""
    metrics = json.loads((default_run / paths.metrics_file("train_subject")).read_text())
    print("generation check:", {k: v for k, v in metrics.items() if k.startswith("gen_")})
    assert metrics["gen_class_p_value"] < 0.01, metrics
    assert metrics["gen_accuracy"] > metrics["gen_text_only_accuracy"], metrics
