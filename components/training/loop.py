"""What the training stages share: accelerate set-up, learning-rate schedules, per-step
random draws, resumable checkpoints, the training loop, throughput and peak memory. The
loop's test hooks (stop or kill after a step) are in `faults`.

Every training stage runs under accelerate (`accelerate launch ... -m components.cli
<stage>` for several processes). Each micro-batch draws its data, noise and timesteps
from a generator seeded by (seed, step, micro-batch, process), so a run resumed from a
checkpoint ends with the same weights as an uninterrupted one.

Checkpoints: accelerate's `ProjectConfiguration` (automatic checkpoint naming, the two
newest kept) under `models/.checkpoints/<stage>/checkpoints/checkpoint_<n>`. A fresh run
empties that folder first; each checkpoint records its step and the hashes of the params
and of the input data, and resume refuses a checkpoint whose hashes differ.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from components.core import tracking
from components.core.errors import BlipDiffError
from components.core.io import atomic_path, round_floats
from components.training import faults
from components.training.data import step_generator  # noqa: F401  (the stages' per-step draws)

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2


def mixed_precision(value: str, section: str) -> str:
    """`auto` -> fp16 on a GPU, no on the CPU; fp16/bf16 asked for without a GPU is an error."""
    if value != "auto":
        if value != "no" and not torch.cuda.is_available():
            raise BlipDiffError(f"{section}.mixed_precision={value} needs a GPU; use auto or no")
        return value
    return "fp16" if torch.cuda.is_available() else "no"


def make_accelerator(gradient_accumulation_steps: int, precision: str, section: str, ckpt_root: Path):
    """An Accelerator whose `save_state` writes numbered checkpoints under `ckpt_root`, keeping
    the newest `KEEP_CHECKPOINTS`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    return Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision(precision, section), cpu=not torch.cuda.is_available(),
        project_config=ProjectConfiguration(project_dir=str(ckpt_root), automatic_checkpoint_naming=True,
                                            total_limit=KEEP_CHECKPOINTS),
        # Dropped subject prompts leave some parameters without a gradient in a step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def make_schedule(kind: str, optimizer, accelerator, warmup_steps: int, total_steps: int):
    """Warmup then constant or cosine, in optimizer steps of one process.

    accelerate's prepared scheduler steps once per process for every optimizer step (it
    assumes each process's batch counts), so the schedule is laid out over
    `num_processes` times the steps, as diffusers' training scripts do: every process count
    then sees the same learning rate at the same optimizer step.
    """
    from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    n = accelerator.num_processes
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps * n)
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps * n, total_steps * n)
    raise BlipDiffError(f"unknown learning-rate schedule {kind!r}")


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def explain_out_of_memory(stage: str, hint: str) -> Callable:
    """Decorator: an allocation failure in a stage becomes one clear error naming what to
    lower. Outputs are written atomically at the end, so nothing is left half-written."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (RuntimeError, MemoryError) as exc:
                if not _is_out_of_memory(exc):
                    raise
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BlipDiffError(f"{stage}: out of memory ({first[:160]}); {hint}") from None

        return run

    return wrap


def finish(accelerator) -> None:
    """End a (possibly multi-process) run. Call it after dropping every reference to the
    prepared (DDP-wrapped) module.

    The DDP reducer must be freed while the process group is still registered: if it held
    the group's last reference, the gloo group would be destroyed in the reducer's
    destructor with the GIL held, while a gloo worker thread waits for the GIL to free a
    finished collective's tensors: a deadlock seen as a rank that never exits (torch 2.13).
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def throughput_metrics(seconds: float, steps_run: int, cfg, num_processes: int) -> dict[str, float]:
    """A training run's time, throughput and peak memory (machine-dependent: MLflow only).
    `steps_run` optimizer steps of `cfg.batch_size` x `cfg.gradient_accumulation_steps`
    samples on each of `num_processes` processes took `seconds`."""
    return {
        "seconds_training": round(seconds, 3),
        "seconds_per_step": round(seconds / max(steps_run, 1), 4),
        "samples_per_s": round(steps_run * cfg.batch_size * cfg.gradient_accumulation_steps
                               * num_processes / max(seconds, 1e-9), 3),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }


def checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (those with their training state written), oldest first."""
    found = [p for p in (ckpt_root / "checkpoints").glob("checkpoint_*") if (p / "training_state.json").is_file()]
    return sorted(found, key=lambda p: int(re.findall(r"\d+$", p.name)[0]))


def start_fresh(accelerator, ckpt_root: Path) -> None:
    """A run without --resume starts from an empty checkpoint folder: nothing of an earlier
    run can be resumed into this one."""
    if accelerator.is_main_process and ckpt_root.exists():
        shutil.rmtree(ckpt_root)
        log.info("cleared %s (fresh run)", ckpt_root)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, step: int, fingerprint: dict, ema=None, curve: list[dict] | None = None) -> Path:
    """accelerate's save_state (numbered, rotated by accelerate) plus the step, the params and
    data hashes (`fingerprint`) and the training curve so far."""
    accelerator.wait_for_everyone()
    target = Path(accelerator.save_state())
    if accelerator.is_main_process:
        if ema is not None:
            torch.save(ema.state_dict(), target / "ema.pt")
        state = {"step": step, **fingerprint, "curve": curve or []}
        (target / "training_state.json").write_text(json.dumps(state) + "\n")
    accelerator.wait_for_everyone()
    return target


def begin(accelerator, ckpt_root: Path, resume: str | None, fingerprint: dict, stage: str,
          ema=None) -> tuple[int, list[dict]]:
    """Where a run starts: (step, curve so far). No `resume`: fresh, from an empty checkpoint
    folder. "latest" or a folder: that checkpoint, refused when its params or data differ.
    "auto" (a flow retrying the stage): the newest checkpoint made with these params and
    data if there is one, else fresh."""
    if resume == "auto":
        matching = [p for p in checkpoints(ckpt_root) if _matches(p, fingerprint)]
        if matching:
            return load_checkpoint(accelerator, ckpt_root, str(matching[-1]), fingerprint, stage, ema)
        log.info("no checkpoint of this run's params and data in %s: starting fresh", ckpt_root)
        resume = None
    if not resume:
        start_fresh(accelerator, ckpt_root)
        return 0, []
    return load_checkpoint(accelerator, ckpt_root, resume, fingerprint, stage, ema)


def _matches(path: Path, fingerprint: dict) -> bool:
    try:
        state = json.loads((path / "training_state.json").read_text())
    except (OSError, ValueError):
        return False
    return all(state.get(key) == fingerprint[key] for key in ("config_hash", "data_hash"))


def load_checkpoint(accelerator, ckpt_root: Path, resume: str, fingerprint: dict, stage: str,
                    ema=None) -> tuple[int, list[dict]]:
    """Restore `resume` ("latest" or a folder); refuse one made with other params or other
    input data. Returns its step and the training curve up to it."""
    if resume == "latest":
        found = checkpoints(ckpt_root)
        if not found:
            raise BlipDiffError(f"--resume latest: no checkpoint in {ckpt_root / 'checkpoints'}")
        path = found[-1]
    else:
        path = Path(resume)
    state_file = path / "training_state.json"
    if not state_file.is_file():
        raise BlipDiffError(f"{path}: not a {stage} checkpoint (no training_state.json)")
    state = json.loads(state_file.read_text())
    for key, what in (("config_hash", f"other {stage}/preset params"), ("data_hash", "other input data")):
        if state.get(key) != fingerprint[key]:
            raise BlipDiffError(f"{path}: checkpoint was made with {what} ({key} {state.get(key)} != "
                                f"{fingerprint[key]}); start fresh without --resume")
    accelerator.load_state(str(path))
    # Later saves continue the numbering after the newest checkpoint there.
    numbers = [int(re.findall(r"\d+$", p.name)[0]) for p in (ckpt_root / "checkpoints").glob("checkpoint_*")]
    accelerator.project_configuration.iteration = max(numbers, default=-1) + 1
    if ema is not None and (path / "ema.pt").is_file():
        ema.load_state_dict(torch.load(path / "ema.pt"))
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), list(state.get("curve", []))


RESULT_NEUTRAL = ("num_workers",)  # params that cannot change a run's weights: resume may change them


def config_hash(params, section: str) -> str:
    values = {k: v for k, v in getattr(params, section).model_dump().items() if k not in RESULT_NEUTRAL}
    return tracking.params_hash({"preset": params.preset, section: values})


def fingerprint(params, section: str, manifest: Path, files: list[Path], producer: str) -> dict:
    """What a checkpoint must match to be resumed: the stage's params and its input data
    (`producer`: the stage that writes the files, named when one is missing)."""
    from components.training.data import data_hash

    return {"config_hash": config_hash(params, section), "data_hash": data_hash(manifest, files, producer)}


def train_loop(accelerator, module, optimizer, lr_schedule, trainable: list, cfg, *, stage: str, start: int,
               fingerprint: dict, loss_fn: Callable, ema=None,
               log_extra: Callable[[], dict] | None = None,
               after_step: Callable[[int], None] | None = None,
               curve: list[dict] | None = None) -> tuple[list[dict[str, float]], float]:
    """Steps `start`..`cfg.steps` of a stage: accumulate, clip, step; EMA; log; checkpoint.

    `loss_fn(step, micro)` returns a dict of scalar losses whose "loss" is optimised.
    Every `log_every` steps the mean of each loss over those steps, the learning rate,
    samples/s and `log_extra()` go to MLflow against the step, and a row (step, losses,
    learning rate) is appended to `curve` (the stage's DVC plot; kept in checkpoints, so a
    resumed run has the whole curve). Returns each step's losses (averaged over processes)
    and the seconds spent.
    """
    curve = [] if curve is None else curve
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    for step in range(start, cfg.steps):
        for micro in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(module):
                losses = loss_fn(step, micro)
                if not torch.isfinite(losses["loss"]):
                    raise BlipDiffError(f"{stage}: loss is {losses['loss'].item()} at step {step}; "
                                        f"lower {stage}.learning_rate")
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trainable)
        history.append({k: accelerator.gather(v.detach()[None]).mean().item() for k, v in losses.items()})
        done = step + 1
        if done % cfg.log_every == 0 and accelerator.is_main_process:
            rate = (done - start) * per_step / (time.perf_counter() - t0)
            recent = {k: float(np.mean([h[k] for h in history[-cfg.log_every:]])) for k in history[-1]}
            lr = lr_schedule.get_last_lr()[0]
            curve.append({"step": done, **recent, "lr": lr})
            tracking.log_step({**recent, **(log_extra() if log_extra else {}), "lr": lr,
                               "samples_per_s": rate}, step=done)
            log.info("step %d/%d %s (%.1f samples/s)", done, cfg.steps,
                     " ".join(f"{k} {v:.4f}" for k, v in recent.items()), rate)
        if after_step is not None:
            after_step(done)
        regular = done % cfg.checkpoint_every == 0
        if regular:
            save_checkpoint(accelerator, done, fingerprint, ema, curve)
        faults.after_step(stage, done, functools.partial(save_checkpoint, accelerator, done, fingerprint, ema, curve),
                          regular)
    return history, time.perf_counter() - t0


def write_curve(curve: list[dict], path: Path) -> None:
    """The training curve as CSV (step, losses, lr) at fixed precision: the stage's DVC plot."""
    with atomic_path(path) as tmp:
        pd.DataFrame([round_floats(row) for row in curve]).to_csv(tmp, index=False)
