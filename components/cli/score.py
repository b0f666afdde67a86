"""`blipdiff score`: DINO, CLIP-I and CLIP-T of any generated images against real subject
images, with the DreamBench protocol's metrics and report (images of other systems too).

    blipdiff score --records out/records.json --real ../shared/dreambench/dog --out scores/
    blipdiff score --csv images.csv --real ../shared/dreambench --identifier sks --out scores/

`--records` is the records.json `blipdiff generate` writes (CLIP-T text: "a [target class]
[prompt]"). `--csv` has columns image, prompt, class and optionally subject: the CLIP-T text
is the prompt with `--identifier` removed, or "a [class] [prompt]" when it lacks the class.
`--real` is one subject's folder of images, or a folder of subject folders (DreamBench's
layout; records then name their subject, or `--subject` names it for all). Writes
scores.json, per_image.parquet and report.html (images by relative path) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path

from components.core.errors import BlipDiffError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--records", type=Path, help="records.json of `blipdiff generate`")
    src.add_argument("--csv", type=Path, help="CSV with columns image,prompt,class[,subject] (paths relative to it)")
    p.add_argument("--real", type=Path, required=True,
                   help="real images: one subject's folder, or a folder of subject folders")
    p.add_argument("--subject", help="the subject (a folder of --real) of every image")
    p.add_argument("--identifier", help="a rare token to drop from the prompts for CLIP-T (e.g. sks)")
    p.add_argument("--dino-model", default="facebook/dino-vits16", help="hub id, local folder, or tiny")
    p.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="hub id, local folder, or tiny")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True, help="output folder")


def real_subjects(real: Path) -> dict[str, list[Path]]:
    """subject -> its real images: the folder itself, or each of its subfolders with images."""
    from components.evaluation.protocol import IMAGE_SUFFIXES

    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    if not real.is_dir():
        raise BlipDiffError(f"--real {real}: not a folder")
    if own := images(real):
        return {real.resolve().name: own}
    subjects = {d.name: images(d) for d in sorted(real.iterdir()) if d.is_dir()}
    subjects = {k: v for k, v in subjects.items() if v}
    if not subjects:
        raise BlipDiffError(f"--real {real}: no images, and no subfolders with images")
    return subjects


def _clip_text(prompt: str, class_name: str, identifier: str | None) -> str:
    if identifier:
        prompt = re.sub(rf"\b{re.escape(identifier)}\b", " ", prompt)
    prompt = " ".join(prompt.split())
    if re.search(rf"\b{re.escape(class_name)}\b", prompt, flags=re.IGNORECASE):
        return prompt
    return " ".join(f"a {class_name} {prompt}".split())


def read_items(args, subjects: dict[str, list[Path]]):
    """The table scoring reads: mode, subject, category, prompt (CLIP-T text), seed, image (absolute)."""
    import pandas as pd

    from components.model.blip_diffusion import BlipDiffusion

    rows = []
    if args.records:
        try:
            records = json.loads(args.records.read_text())
        except (OSError, ValueError) as exc:
            raise BlipDiffError(f"--records {args.records}: {exc}") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise BlipDiffError(f"--records {args.records}: expected a list of records (generate's records.json)")
        for i, rec in enumerate(records):
            try:
                text = BlipDiffusion.build_prompt(rec["prompt"], rec["target_subject"])
                rows.append({"subject": rec.get("subject", args.subject), "prompt": text,
                             "seed": int(rec.get("seed", i)), "image": args.records.parent / rec["image"]})
            except KeyError as exc:
                raise BlipDiffError(f"--records {args.records}: record {i} lacks {exc}") from None
    else:
        try:
            table = pd.read_csv(args.csv)
        except (OSError, ValueError) as exc:
            raise BlipDiffError(f"--csv {args.csv}: {exc}") from None
        missing = {"image", "prompt", "class"} - set(table.columns)
        if missing:
            raise BlipDiffError(f"--csv {args.csv}: missing column(s) {', '.join(sorted(missing))}")
        for i, rec in enumerate(table.to_dict("records")):
            subject = rec.get("subject") if isinstance(rec.get("subject"), str) else args.subject
            rows.append({"subject": subject, "prompt": _clip_text(str(rec["prompt"]), str(rec["class"]), args.identifier),
                         "seed": int(rec["seed"]) if "seed" in rec and rec["seed"] == rec["seed"] else i,
                         "image": args.csv.parent / str(rec["image"])})
    if not rows:
        raise BlipDiffError("no images to score")
    for row in rows:
        if row["subject"] is None:
            if len(subjects) != 1:
                raise BlipDiffError(f"which subject? --real has {len(subjects)} ({', '.join(subjects)}): "
                                    "give --subject or a subject column")
            row["subject"] = next(iter(subjects))
        if row["subject"] not in subjects:
            raise BlipDiffError(f"unknown subject {row['subject']!r}: --real has {', '.join(subjects)}")
    categories = _categories(args.real)
    frame = pd.DataFrame(rows)
    frame.insert(0, "mode", "scored")
    frame.insert(2, "category", [categories.get(s) for s in frame["subject"]])
    return frame


def _categories(real: Path) -> dict[str, str]:
    """live/object per subject when --real is a DreamBench folder (its class list), else none."""
    from components.data import dreambench

    listing = real / dreambench.PROMPTS_FILE
    if not listing.is_file():
        return {}
    info = dreambench.parse_prompts_and_classes(listing)
    return {s: info.category(s) for s in info.classes}


def run(args) -> dict:
    from components.core.io import round_floats, write_json
    from components.evaluation import report, scoring
    from components.evaluation.evaluators import Evaluators
    from components.model.device import resolve_device

    if args.batch_size < 1:
        raise BlipDiffError(f"--batch-size must be >= 1, got {args.batch_size}")
    if (args.dino_model == "tiny") != (args.clip_model == "tiny"):
        raise BlipDiffError("--dino-model and --clip-model: both tiny or neither")
    subjects = real_subjects(args.real)
    items = read_items(args, subjects)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # paths relative to the report, so that it opens from the folder in any browser
    items["image"] = [os.path.relpath(Path(p).resolve(), out) for p in items["image"]]
    tiny = args.dino_model == "tiny"
    ev = Evaluators.build(None if tiny else args.dino_model, None if tiny else args.clip_model, tiny=tiny,
                          device=str(resolve_device(args.device)), batch_size=args.batch_size)
    used = {s: subjects[s] for s in sorted(set(items["subject"]))}
    per_image, oracle_row, stats = scoring.score(items, used, ev, out, args.batch_size)
    detail = round_floats(scoring.summary(per_image, oracle_row, ev.describe()))
    detail["counts"] = {k: stats[k] for k in ("images_scored", "images_skipped", "real_images")}
    detail["settings"] = {"source": str(args.records or args.csv), "real": str(args.real),
                          "identifier": args.identifier or "", **ev.describe()}
    write_json(detail, out / "scores.json")
    per_image.to_parquet(out / "per_image.parquet", index=False)
    report.write_report(out / "report.html", per_image, detail, used, title="Image scores",
                        settings=detail["settings"])
    overall = detail["modes"]["scored"]["overall"]
    print(json.dumps({"overall": overall, "oracle": {k: detail["oracle"].get(k) for k in ("dino", "clip_i")},
                      **detail["counts"]}, indent=2))
    log.info("wrote %s (scores.json, per_image.parquet, report.html)", out)
    return detail
