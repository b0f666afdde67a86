"""A small folder in DreamBench's layout (class list, both prompt lists, a few photos per
subject), for tests that must not depend on ../shared being there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

OBJECT = ["a {0} {1} in the jungle", "a {0} {1} on the beach", "a red {0} {1}"]
LIVE = ["a {0} {1} in the snow", "a {0} {1} wearing a red hat", "a purple {0} {1}"]


def make(root: Path, subjects: dict[str, str] | None = None, views: int = 3, size: int = 48) -> Path:
    """`subjects`: name -> class (dog and cat are live subjects). Each subject's photos share a
    colour, so subjects differ in what the evaluators see."""
    subjects = subjects or {"backpack": "backpack", "dog": "dog"}
    root.mkdir(parents=True, exist_ok=True)
    lines = ["Classes", "subject_name,class", *(f"{s},{c}" for s, c in subjects.items()), "",
             "Prompts", "Object Prompts", "prompt_list = ["]
    lines += [f"'{t}'.format(unique_token, class_token)," for t in OBJECT] + ["]", "", "Live Subject Prompts",
                                                                              "prompt_list = ["]
    lines += [f"'{t}'.format(unique_token, class_token)," for t in LIVE] + ["]"]
    (root / "prompts_and_classes.txt").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(0)
    for k, subject in enumerate(subjects):
        (root / subject).mkdir(exist_ok=True)
        colour = np.array([(97 * k) % 256, (151 * k + 60) % 256, (203 * k + 120) % 256])
        for v in range(views):
            noise = rng.integers(-40, 40, (size, size + 8 * v, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / subject / f"{v:02d}.jpg", quality=90)
    return root
