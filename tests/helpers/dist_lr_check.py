"""Run under `accelerate launch` (or plainly, for one process): print the learning rate
after each optimizer step of `training.make_schedule` for both schedule kinds, as JSON."""

import json
import sys
import tempfile
from pathlib import Path

import torch

from components.training import loop as training


def rates(steps: int = 12, warmup: int = 3) -> dict:
    out = {}
    for kind in ("constant", "cosine"):
        accelerator = training.make_accelerator(1, "no", "lr_check", Path(tempfile.mkdtemp()))
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
        schedule = training.make_schedule(kind, optimizer, accelerator, warmup, steps)
        model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
        seen = []
        for _ in range(steps):
            optimizer.step()
            schedule.step()
            seen.append(schedule.get_last_lr()[0])
        out[kind] = seen
        out["processes"] = accelerator.num_processes
    return out


if __name__ == "__main__":
    result = rates()
    if training.make_accelerator(1, "no", "lr_check", Path(tempfile.mkdtemp())).is_main_process:
        json.dump(result, sys.stdout)
