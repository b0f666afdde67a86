"""Reference output of DINO's evaluation transform on real DreamBench photos, made with
torchvision itself (the project's venv has no torchvision; `components.evaluation.evaluators`
re-implements the transform with PIL).

The transform is the one of DINO's `eval_knn.py` / `eval_linear.py`:
`Resize(256, interpolation=BICUBIC)`, `CenterCrop(224)`, `ToTensor()`,
`Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))`, on `Image.open(path).convert("RGB")`.

Every DreamBench photo is square, so the second case crops a portrait region out of a photo
first (a plain PIL crop, repeated by the test): its resized height 343 puts the centre crop's
top at round(59.5) = 60, where `(h - 224) // 2` would give 59.

Writes to tests/fixtures/dino_transform/: one 224x224 PNG per case (the uint8 image after
Resize + CenterCrop) and meta.json (source path relative to the DreamBench root, its sha256,
the crop box, versions, and the per-channel mean of the normalised tensor to 6 decimals).

Run from the repository root in an environment with torchvision (see README.md):

    /work/lavisenv/bin/python scripts/golden/make_dino_transform_golden.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "dino_transform"
DREAMBENCH = REPO.parent / "shared" / "dreambench"
# (name, source relative to the DreamBench root, crop box applied before the transform or None)
CASES = (
    ("bear_plushie_00", "bear_plushie/00.jpg", None),  # 2048x2048: a large bicubic downscale
    ("cat_01_portrait", "cat/01.jpg", (162, 0, 1114, 1277)),  # 952x1277 -> 256x343
)


def main() -> None:
    import PIL
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dreambench", type=Path, default=DREAMBENCH)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    resize = transforms.Resize(256, interpolation=InterpolationMode.BICUBIC)
    crop = transforms.CenterCrop(224)
    to_tensor = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    args.out.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, rel, box in CASES:
        path = args.dreambench / rel
        image = Image.open(path).convert("RGB")
        source_size = image.size
        if box is not None:
            image = image.crop(box)
        resized = resize(image)
        cropped = crop(resized)
        assert cropped.size == (224, 224), cropped.size
        cropped.save(args.out / f"{name}.png")
        tensor = to_tensor(cropped)
        cases.append({
            "name": name, "png": f"{name}.png", "source": rel,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "source_size": list(source_size), "crop_box": list(box) if box else None,
            "input_size": list(image.size), "resized_size": list(resized.size),
            "normalized_mean": [round(float(v), 6) for v in tensor.mean(dim=(1, 2))],
        })
    meta = {
        "transform": "Resize(256, BICUBIC), CenterCrop(224), ToTensor(), "
                     "Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))",
        "versions": {"torchvision": torchvision.__version__, "torch": torch.__version__,
                     "pillow": PIL.__version__},
        "cases": cases,
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
