"""`blipdiff batch` on a Dask cluster (--dask-workers, --dask-address, BLIPDIFF_DASK_ADDRESS):
the bytes, records, error rows and journal of an in-process run; resume; non-finite batches
and bad rows as error rows; a worker's exception raised as it is; each worker loads the model
once; clear one-line errors for a bad address or flag. Tiny preset, CPU, offline.

One test starts a LocalCluster of 2 worker processes (--dask-workers 2, as a user does); the
others share one cluster of a worker thread in this process, reached by its tcp address (the
batches and results still go through the scheduler, pickled), so a test can patch the
generator the workers run."""

from __future__ import annotations

import json
import socket
import sys
import time
import types
from pathlib import Path

import pandas as pd
import pytest

from components.core.errors import NonFiniteError
from components.data import synthetic
from components.data.images import save_png
from components.model import layout
from components.model.tiny.blip_diffusion import build_tiny
from serving import batch
from serving.generator import Generator

FAST = ["--steps", "2", "--height", "16", "--width", "16"]  # the batch command's smallest useful run
ADDRESS_ENV = "BLIPDIFF_DASK_ADDRESS"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny model, subject images and a manifest of 5 batches of 3 at --batch-size 3 (one
    with rows of other steps), with bad rows: one caught when the manifest is read (no
    prompt), two when their batch runs (an unreadable subject image, an unknown class)."""
    folder = tmp_path_factory.mktemp("batch_dask")
    layout.save(build_tiny(0), folder / "model")
    for i, view in enumerate(synthetic.generate(2, 2, 2, 64, seed=0)):
        save_png(view.image, folder / f"s{i}.png")
    (folder / "bad.png").write_bytes(b"not an image")
    rows = [f"r{i},s{i % 3}.png,dog,,prompt {i},2,{10 * i}," for i in range(5)]
    rows += ["bad,bad.png,dog,,x,1,0,", "noprompt,s0.png,dog,,,1,0,", "odd,s1.png,???,,x,1,0,",
             "cat,s1.png,dog,cat,on a beach,2,3,3"]
    (folder / "jobs.csv").write_text("id,subject_images,source_subject,target_subject,prompt,num_images,seed,steps\n"
                                     + "\n".join(rows) + "\n")
    return folder


@pytest.fixture
def no_dask_env(monkeypatch):
    monkeypatch.delenv(ADDRESS_ENV, raising=False)


@pytest.fixture(scope="module")
def scheduler():
    """The address of a cluster of one worker thread in this process, over tcp."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def _batch(folder: Path, out: Path, *extra: str) -> int:
    from components.cli import main

    return main(["batch", "--manifest", str(folder / "jobs.csv"), "--model", str(folder / "model"), "--out", str(out),
                 "--batch-size", "3", *FAST, *extra])


def _png_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def _journal(out: Path) -> list[dict]:
    """The journal's entries, without the batches' timings."""
    entries = [json.loads(line) for line in (out / "batches.jsonl").read_text().splitlines()]
    for entry in entries:
        entry["records"] = [{k: v for k, v in r.items() if not k.startswith("seconds_")} for r in entry["records"]]
    return entries


def _records(out: Path) -> pd.DataFrame:
    records = pd.read_parquet(out / "records.parquet")
    return records[[c for c in records.columns if not c.startswith("seconds_")]]


def _processes_left() -> list:
    """Child processes of this one, less multiprocessing's resource tracker."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]


def _free_address() -> str:
    with socket.socket() as s:  # a free port: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------ the same outputs
def test_two_local_workers_write_the_bytes_records_errors_and_journal_of_an_in_process_run(folder, tmp_path,
                                                                                           no_dask_env, capsys):
    assert _batch(folder, tmp_path / "here") == 0
    assert _batch(folder, tmp_path / "dask", "--dask-workers", "2") == 0
    assert "12 images generated, 0 already there, 3 bad rows" in capsys.readouterr().out
    here, dask = tmp_path / "here", tmp_path / "dask"
    assert len(_png_bytes(here)) == 12 and _png_bytes(dask) == _png_bytes(here)
    pd.testing.assert_frame_equal(_records(dask), _records(here))
    assert (dask / "errors.jsonl").read_bytes() == (here / "errors.jsonl").read_bytes()
    errors = {e["id"]: e["error"] for e in map(json.loads, (dask / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == ["bad", "noprompt", "odd"] and "unknown class '???'" in errors["odd"]
    journal = _journal(dask)
    assert journal == _journal(here) and [e["batch"] for e in journal] == [0, 1, 2, 3, 4]  # in plan order
    assert not _processes_left(), "the LocalCluster was left running"


# ------------------------------------------------------------------ resume, error rows, worker errors
def test_resume_over_dask_skips_done_batches_and_each_worker_loads_the_model_once(folder, tmp_path, scheduler,
                                                                                  no_dask_env, capsys):
    out = tmp_path / "out"
    loads = batch._WORKER.loads  # the cluster's worker is a thread of this process
    assert _batch(folder, out, "--dask-address", scheduler) == 0
    assert batch._WORKER.loads - loads <= 1  # 5 batches, one load (none if an earlier test left this model)
    first = _png_bytes(out)
    assert len(first) == 12
    # batch 1 (r1_1, r2_0, r2_1) cut short: an image gone, its journal line gone
    (out / "images" / "r2_0.png").unlink()
    lines = (out / "batches.jsonl").read_text().splitlines()
    (out / "batches.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["batch"] != 1))
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    time.sleep(0.01)
    capsys.readouterr()
    loads = batch._WORKER.loads
    assert _batch(folder, out, "--dask-address", scheduler) == 0
    assert "3 images generated, 9 already there" in capsys.readouterr().out
    assert batch._WORKER.loads == loads  # the worker kept its generator from the run before
    assert _png_bytes(out) == first
    touched = sorted(p.name for p in (out / "images").glob("*.png") if p.stat().st_mtime_ns != mtimes.get(p.name))
    assert touched == ["r1_1.png", "r2_0.png", "r2_1.png"]
    assert sorted(e["batch"] for e in _journal(out)) == [0, 1, 2, 3, 4] and len(_records(out)) == 12


def test_a_non_finite_batch_and_bad_rows_come_back_as_error_rows(folder, tmp_path, scheduler, no_dask_env,
                                                                 monkeypatch):
    real = Generator.generate

    def generate(self, embeds, prompts, *args, **kwargs):
        if "prompt 3" in prompts:  # batch 2: r3_0, r3_1, r4_0
            raise NonFiniteError("unet gave NaN or infinity in 1 of 3 rows (0)")
        return real(self, embeds, prompts, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate", generate)
    assert _batch(folder, tmp_path / "here") == 0
    assert _batch(folder, tmp_path / "dask", "--dask-address", scheduler) == 0
    here, dask = tmp_path / "here", tmp_path / "dask"
    assert (dask / "errors.jsonl").read_bytes() == (here / "errors.jsonl").read_bytes()
    errors = {e["id"]: e["error"] for e in map(json.loads, (dask / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == ["bad", "noprompt", "odd", "r3", "r4"]
    assert errors["r3"] == errors["r4"] == "batch 2: unet gave NaN or infinity in 1 of 3 rows (0)"
    assert _png_bytes(dask) == _png_bytes(here) and not {"r3_0.png", "r3_1.png", "r4_0.png"} & set(_png_bytes(dask))
    assert _journal(dask) == _journal(here)


def test_a_workers_other_exception_is_raised_as_it_is_and_the_done_batches_stay(folder, tmp_path, scheduler,
                                                                                no_dask_env, monkeypatch):
    real = Generator.generate

    def generate(self, embeds, prompts, *args, **kwargs):
        if "prompt 3" in prompts:
            raise RuntimeError("a CUDA error")
        return real(self, embeds, prompts, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate", generate)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="a CUDA error"):
        _batch(folder, out, "--dask-address", scheduler)
    assert [e["batch"] for e in _journal(out)] == [0, 1] and not (out / "records.parquet").exists()
    monkeypatch.setattr(Generator, "generate", real)
    assert _batch(folder, out, "--dask-address", scheduler) == 0  # the cluster still serves
    assert len(_png_bytes(out)) == 12


def test_a_worker_with_another_model_stops_the_run(folder, tmp_path, scheduler, no_dask_env, monkeypatch, capsys):
    """The plan (journal keys, records) is made with one worker's model: a batch made with
    another (files that differ between machines) stops the run before it is written."""
    real = batch._OnDask.describe

    def describe(self):  # as if the worker that described the model had other files
        native_size, info = real(self)
        return native_size, {**info, "model_hash": "0" * 16}

    monkeypatch.setattr(batch._OnDask, "describe", describe)
    assert _batch(folder, tmp_path / "out", "--dask-address", scheduler) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("blipdiff batch: error: batch 0 was made with ") and "the run was planned with" in err
    assert "model hash 0000000000000000" in err and not _png_bytes(tmp_path / "out")
    assert not (tmp_path / "out" / "batches.jsonl").exists()


# ------------------------------------------------------------------ clear errors
def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_a_bad_address_fails_fast_with_one_line_naming_it(folder, tmp_path, no_dask_env, monkeypatch, capsys):
    monkeypatch.setattr(Generator, "load", _no_model)
    address = _free_address()
    start = time.perf_counter()
    assert _batch(folder, tmp_path / "out", "--dask-address", address, "--dask-timeout", "1") == 2
    assert time.perf_counter() - start < 15
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"blipdiff batch: error: --dask-address {address}: no Dask scheduler "
                                              "answered within 1 s")
    assert "leave it out to run in this process" in err
    # the environment variable, named as such; the flag wins over it
    monkeypatch.setenv(ADDRESS_ENV, address)
    assert _batch(folder, tmp_path / "out", "--dask-timeout", "1", "--dask-workers", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"blipdiff batch: error: {ADDRESS_ENV} {address}: no Dask scheduler") and "unset" in err
    assert _batch(folder, tmp_path / "out", "--dask-address", "tcp://127.0.0.1:notaport") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--dask-address tcp://127.0.0.1:notaport: not a Dask scheduler address" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--dask-workers", "-1"], "--dask-workers must be >= 0 (0: in this process), got -1"),
    (["--dask-workers", "1000"], "--dask-workers 1000: Input should be less than or equal to 256"),
    (["--dask-timeout", "0"], "--dask-timeout must be a positive number of seconds, got 0.0"),
    (["--dask-timeout", "nan"], "--dask-timeout must be a positive number of seconds, got nan"),
    (["--dask-address", " "], "--dask-address is empty"),
    (["--dask-address", "http://127.0.0.1:8786"], "not a Dask scheduler address (unknown address scheme 'http'"),
])
def test_bad_dask_flags_are_one_line_errors(flags, message, folder, tmp_path, no_dask_env, monkeypatch, capsys):
    monkeypatch.setattr(Generator, "load", _no_model)
    assert _batch(folder, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("blipdiff batch: error: ") and message in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ without Dask; which local cluster
def test_without_dask_flags_the_batches_run_here_without_importing_dask(folder, tmp_path, no_dask_env, monkeypatch):
    for name in ("dask", "distributed"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of either fails
    assert _batch(folder, tmp_path / "out") == 0
    assert len(_png_bytes(tmp_path / "out")) == 12


def test_a_gpu_backend_gets_one_local_cuda_worker_per_gpu_where_dask_cuda_is(monkeypatch):
    from components import cluster as distributed

    made = {}

    class Started(Exception):
        pass

    def local_cuda_cluster(**kwargs):
        import dask

        made.update(kwargs, nanny_env=dict(dask.config.get("distributed.nanny.pre-spawn-environ")))
        raise Started  # the arguments are what this test checks; no cluster is started

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=local_cuda_cluster))
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert distributed._gpus() == 2
    env = {"OMP_NUM_THREADS": "1", "MALLOC_TRIM_THRESHOLD_": None}
    with pytest.raises(Started), distributed.open_cluster(None, 4, gpu=True, worker_env=env):
        pass
    assert made["n_workers"] == 2 and made["host"] == "127.0.0.1" and made["dashboard_address"] is None
    assert made["env"] == {"OMP_NUM_THREADS": "1"} and "processes" not in made
    # None: a variable that Dask's nannies set is left unset (None in their config); the others stay
    assert made["nanny_env"]["MALLOC_TRIM_THRESHOLD_"] is None and made["nanny_env"]["OMP_NUM_THREADS"] == 1
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # not installed: a LocalCluster
    assert distributed._gpus() == 0


@pytest.mark.parametrize("spec, gpu", [
    ({"backend": "torch", "device": "cpu"}, False), ({"backend": "torch", "device": "auto"}, True),
    ({"backend": "onnxruntime", "providers": ("CPUExecutionProvider",)}, False),
    ({"backend": "onnxruntime"}, True), ({"backend": "tensorrt"}, True),
])
def test_which_generator_specs_run_on_a_gpu(spec, gpu):
    assert batch.GeneratorSpec("models/x", **spec).gpu is gpu


def test_local_workers_get_this_process_torch_threads(monkeypatch):
    """On a CPU the thread count can change a result's last bits: a local worker runs with the
    threads an in-process run would have."""
    from components import cluster as distributed

    monkeypatch.setattr("torch.get_num_threads", lambda: 3)
    assert distributed.torch_worker_env() == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3",
                                              "MALLOC_TRIM_THRESHOLD_": None}
