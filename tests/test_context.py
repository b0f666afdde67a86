import numpy as np
import pytest

from components.core import paths
from components.core.config import Params
from components.core.errors import BlipDiffError
from components.data.images import read_alpha, read_rgb
from components.data.manifests import (
    PAIRS_SCHEMA,
    SUBJECTS_SCHEMA,
    read_manifest,
    write_parquet,
)
from components.stages import context, ingest


def _params(**context_kw) -> Params:
    return Params(
        ingest={"synthetic": {"num_subjects": 3, "min_views": 4, "max_views": 4, "image_size": 64}},
        context={"backgrounds_per_image": 2, "matting_max_side": None, **context_kw},
    )


@pytest.fixture
def ingested(tmp_path):
    params = _params()
    ingest.ingest_subjects(params.ingest, tmp_path)
    return tmp_path


def test_context_from_ground_truth(ingested):
    params = _params(mask_source="auto")
    metrics, samples = context.run(params, ingested)
    pairs = read_manifest(ingested / paths.PAIRS_MANIFEST, PAIRS_SCHEMA)
    subjects = read_manifest(ingested / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    assert len(pairs) == 2 * len(subjects) == metrics["pairs_written"]
    assert set(pairs["mask_source"]) == {"ground_truth"} and metrics["ground_truth_trimaps"] == 12
    assert pairs["pair_id"].is_unique
    assert set(pairs["target_path"]) == set(subjects["image_path"])
    assert metrics["alpha_mse_mean"] < 0.02 and metrics["alpha_sad_mean"] > 0
    assert 0 < metrics["unknown_fraction_mean"] < 0.5
    assert samples and all(a.dtype == np.uint8 for a in samples.values())

    # each input is the matted subject blended onto a background that differs from the original
    row = pairs.iloc[0]
    target = read_rgb(ingested / row.target_path).astype(int)
    composite = read_rgb(ingested / row.input_path).astype(int)
    alpha = read_alpha(ingested / row.alpha_path)
    inside, outside = alpha > 0.999, alpha < 0.001
    assert np.abs(composite[inside] - target[inside]).mean() < 3  # subject kept
    assert np.abs(composite[outside] - target[outside]).mean() > 10  # background replaced
    # the two composites of one image use different backgrounds
    first_two = pairs[pairs.target_path == row.target_path]
    assert first_two["background_id"].nunique() == 2


def test_context_with_tiny_clipseg_runs_and_is_deterministic(ingested):
    params = _params(mask_source="clipseg", erode=0)
    metrics, _ = context.run(params, ingested)
    first = (ingested / paths.PAIRS_MANIFEST).read_bytes()
    files = sorted(p.read_bytes() for p in (ingested / paths.CONTEXT_DIR).rglob("*.png"))
    metrics2, _ = context.run(params, ingested)
    assert (ingested / paths.PAIRS_MANIFEST).read_bytes() == first
    assert sorted(p.read_bytes() for p in (ingested / paths.CONTEXT_DIR).rglob("*.png")) == files
    assert metrics["clipseg_trimaps"] == 12
    assert metrics["pairs_written"] + 2 * metrics["images_skipped"] == 24
    assert "alpha_mse_mean" in metrics  # synthetic ground truth scores CLIPSeg's mattes too
    assert metrics["seconds_clipseg"] > 0


class _FakeSeg:
    """Stands in for CLIPSeg: a flat map (degenerate) for 'ball' subjects, a disc elsewhere."""

    random_weights = False

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, images, texts):
        maps = []
        for image, text in zip(images, texts):
            h, w = image.shape[:2]
            yy, xx = np.mgrid[:h, :w]
            disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 4) ** 2).astype(np.float32)
            maps.append(np.full((h, w), 0.5, np.float32) if text == "ball" else disc)
        return maps


def _save(subjects, root):
    rows = subjects.astype(object).where(subjects.notna(), None).to_dict("records")
    write_parquet(rows, root / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)


def test_degenerate_trimaps_are_counted_and_skipped(ingested, monkeypatch):
    import components.context.clipseg

    monkeypatch.setattr(components.context.clipseg, "ClipSeg", _FakeSeg)
    subjects = read_manifest(ingested / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    classes = list(subjects["class_name"])
    # make one subject's class 'ball' so its maps are flat
    subjects.loc[subjects.subject_id == subjects.subject_id.iloc[0], "class_name"] = "ball"
    _save(subjects, ingested)
    n_ball = int((subjects.class_name == "ball").sum())
    assert n_ball > 0 and len(classes) > n_ball

    metrics, _ = context.run(_params(mask_source="clipseg"), ingested)
    assert metrics["skipped_no_foreground"] == n_ball
    pairs = read_manifest(ingested / paths.PAIRS_MANIFEST, PAIRS_SCHEMA)
    assert "ball" not in set(pairs["subject_text"])
    assert len(pairs) == 2 * (len(subjects) - n_ball)

    # all degenerate: a clear error, and the previous outputs are left as they were
    before = (ingested / paths.PAIRS_MANIFEST).read_bytes()
    subjects["class_name"] = "ball"
    _save(subjects, ingested)
    with pytest.raises(BlipDiffError, match="every trimap was degenerate"):
        context.run(_params(mask_source="clipseg"), ingested)
    assert (ingested / paths.PAIRS_MANIFEST).read_bytes() == before
    assert not [p for p in (ingested / "data").iterdir() if p.name.startswith(".")]


def test_bad_inputs(tmp_path, ingested):
    with pytest.raises(BlipDiffError, match="manifest not found"):
        context.run(_params(), tmp_path / "empty")
    (ingested / paths.SUBJECTS_DIR / "images").rename(ingested / paths.SUBJECTS_DIR / "moved")
    with pytest.raises(BlipDiffError, match="is missing"):
        context.run(_params(), ingested)


def test_folder_backgrounds(ingested, tmp_path):
    from PIL import Image

    bg_dir = tmp_path / "bgs"
    bg_dir.mkdir()
    Image.new("RGB", (100, 30), (0, 255, 0)).save(bg_dir / "green.png")
    params = _params(background_source="folder", background_dir=str(bg_dir), backgrounds_per_image=1)
    context.run(params, ingested)
    pairs = read_manifest(ingested / paths.PAIRS_MANIFEST, PAIRS_SCHEMA)
    assert set(pairs["background_id"]) == {"green.png"}
    row = pairs.iloc[0]
    composite = read_rgb(ingested / row.input_path)
    alpha = read_alpha(ingested / row.alpha_path)
    assert np.all(composite[alpha < 0.001] == [0, 255, 0])


@pytest.mark.slow
def test_dreambench_ingest_and_context_end_to_end(tmp_path, dreambench_dir):
    """Real photos through both stages with the tiny (random) CLIPSeg: every image gets a pair."""
    params = Params(
        ingest={"source": "dreambench", "dreambench": {"path": str(dreambench_dir)}},
        context={"mask_source": "auto", "backgrounds_per_image": 1, "matting_max_side": 64},
    )
    ingest.ingest_subjects(params.ingest, tmp_path)
    metrics, _ = context.run(params, tmp_path)
    pairs = read_manifest(tmp_path / paths.PAIRS_MANIFEST, PAIRS_SCHEMA)
    assert metrics["clipseg_trimaps"] == 158  # no ground truth for real photos
    assert metrics["pairs_written"] + metrics["images_skipped"] == 158 == len(pairs) + metrics["images_skipped"]
    assert pairs["subject_id"].nunique() >= 28
    assert set(pairs["mask_source"]) == {"clipseg"}
    row = pairs.iloc[0]
    assert read_rgb(tmp_path / row.input_path).shape == read_rgb(tmp_path / row.target_path).shape


class _FindsNothing:
    """A real CLIPSeg's answer where the subject is not found: low probabilities everywhere,
    with a faint blob (0.02 to 0.06)."""

    random_weights = False

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, images, texts):
        maps = []
        for image in images:
            h, w = image.shape[:2]
            yy, xx = np.mgrid[:h, :w]
            blob = np.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (2 * (h / 5) ** 2))
            maps.append((0.02 + 0.04 * blob).astype(np.float32))
        return maps


@pytest.mark.parametrize("normalize_probs, preset", [("auto", "blipdiffusion"), (False, "tiny")])
def test_an_empty_map_from_a_real_clipseg_is_skipped(ingested, monkeypatch, normalize_probs, preset):
    """With a real CLIPSeg (any preset but tiny), normalize_probs: auto keeps the map's scale:
    a map that finds nothing is a degenerate trimap, skipped and counted."""
    import components.context.clipseg

    monkeypatch.setattr(components.context.clipseg, "ClipSeg", _FindsNothing)
    params = Params(**{**_params(mask_source="clipseg").model_dump(), "preset": preset,
                       "context": {**_params(mask_source="clipseg").context.model_dump(),
                                   "normalize_probs": normalize_probs}})
    with pytest.raises(BlipDiffError, match="every trimap was degenerate"):
        context.run(params, ingested)


def test_normalize_probs_stretches_an_empty_map_when_asked(ingested, monkeypatch):
    """What auto avoids: rescaled, the same empty map becomes a confident trimap."""
    import components.context.clipseg

    monkeypatch.setattr(components.context.clipseg, "ClipSeg", _FindsNothing)
    metrics, _ = context.run(_params(mask_source="clipseg", normalize_probs=True), ingested)
    assert metrics["pairs_written"] > 0


def test_auto_normalizes_the_tiny_random_clipseg_only(ingested, monkeypatch):
    from components.context import matting
    from components.context.clipseg import ClipSeg

    seen = []
    real = matting.trimap_from_probs

    def spy(probs, fg, bg, erode=0, normalize=True):
        seen.append(normalize)
        return real(probs, fg, bg, erode, normalize)

    monkeypatch.setattr(matting, "trimap_from_probs", spy)
    assert ClipSeg("tiny", None, 0).random_weights
    auto, _ = context.run(_params(mask_source="clipseg", erode=0), ingested)
    assert auto["pairs_written"] > 0 and set(seen) == {True}

    seen.clear()
    import components.context.clipseg

    monkeypatch.setattr(components.context.clipseg, "ClipSeg", _FakeSeg)  # random_weights False
    context.run(_params(mask_source="clipseg"), ingested)
    assert set(seen) == {False}


# --------------------------------------------------------------------------- Dask
def _outputs(root) -> dict[str, bytes]:
    files = sorted(p for p in (root / paths.CONTEXT_DIR).rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files + [root / paths.PAIRS_MANIFEST]}


def _stable(metrics: dict) -> dict:
    from components.stages.runner import MACHINE_DEPENDENT

    return {k: v for k, v in metrics.items() if not k.startswith(MACHINE_DEPENDENT)}


def _with_dask(params: Params, **dask) -> Params:
    return params.model_copy(update={"dask": params.dask.model_copy(update=dask)})


def _processes_left() -> list:
    """Child processes of this one, less multiprocessing's resource tracker (it lives as long
    as the interpreter): a LocalCluster's nannies and workers would be here."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]


@pytest.fixture
def no_dask_env(monkeypatch):
    from components.cluster import ADDRESS_ENV

    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    return ADDRESS_ENV


def test_dask_workers_give_the_same_bytes_as_in_process(ingested, no_dask_env):
    """Shards on a LocalCluster of 2 worker processes: every output file, the manifest, the
    samples and the non-timing metrics are the in-process run's; each worker builds CLIPSeg
    once (3 shards, 2 workers); `dask` is no DVC param of the stage."""
    assert "dask" not in context.SECTIONS
    # 3 shards of 4 (the tiny CLIPSeg's batches), ground truth for SAD/MSE
    params = _params(mask_source="clipseg", erode=0, clipseg_batch_size=4)
    serial, serial_samples = context.run(params, ingested)
    expected = _outputs(ingested)
    assert serial["run_dask_workers"] == 0 and serial["run_clipseg_loads"] == 1

    metrics, samples = context.run(_with_dask(params, workers=2), ingested)
    assert _outputs(ingested) == expected
    assert _stable(metrics) == _stable(serial) and "alpha_sad_mean" in metrics
    assert samples.keys() == serial_samples.keys()
    assert all(np.array_equal(samples[k], serial_samples[k]) for k in samples)
    assert metrics["run_dask_workers"] == 2 and 1 <= metrics["run_clipseg_loads"] <= 2
    assert metrics["samples_per_s"] > 0
    assert not _processes_left(), "the stage's LocalCluster was left running"


def test_a_worker_error_is_the_serial_error_and_the_cluster_is_closed(ingested, no_dask_env):
    """A BlipDiffError raised on a worker (a CLIPSeg folder that does not exist) reaches the
    stage as it is; the previous outputs stay; no worker process is left behind."""
    context.run(_params(), ingested)
    before = _outputs(ingested)
    params = _with_dask(_params(mask_source="clipseg", clipseg_model=str(ingested / "no-such-clipseg")), workers=1)
    with pytest.raises(BlipDiffError, match="CLIPSeg .*no-such-clipseg.* could not be loaded"):
        context.run(params, ingested)
    assert _outputs(ingested) == before
    assert not [p for p in (ingested / "data").iterdir() if p.name.startswith(".")]
    assert not _processes_left()


def test_a_bad_dask_address_fails_fast_naming_it(ingested, no_dask_env, monkeypatch):
    import socket
    import time

    with socket.socket() as s:  # a free port: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    params = _with_dask(_params(), address=address, connect_timeout_s=1)
    start = time.perf_counter()
    with pytest.raises(BlipDiffError, match=f"dask.address {address}: no Dask scheduler answered within 1 s"):
        context.run(params, ingested)
    assert time.perf_counter() - start < 15
    # the environment variable overrides params.yaml, and the error names it
    monkeypatch.setenv(no_dask_env, address)
    with pytest.raises(BlipDiffError, match=f"^{no_dask_env} {address}: no Dask scheduler"):
        context.run(_with_dask(_params(), connect_timeout_s=1), ingested)
    assert not (ingested / paths.PAIRS_MANIFEST).exists()
