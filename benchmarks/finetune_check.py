"""Fine-tuned against zero-shot, on synthetic subjects stage 2 never saw.

Reads the default profile's outputs (run `make repro` first): `models/blip_diffusion/`, the
ingested training views and params.yaml. The subjects are the synthetic table's subjects
beyond `ingest.synthetic.num_subjects` (rendered as ingest renders them: same generator,
same seed). For each, its first `--refs` views are the reference images:

- zero-shot: subject embeddings of the references, then `--images` images of "a [class]";
- fine-tuned: `blipdiff finetune`'s training (`components.training.finetune`, whole UNet)
  on the references, then `--images` images from the fine-tuned model and its embeddings.

The subject classifier (components/evaluation/subject_classifier.py) is fitted on the
ingested training views plus the new subject's references (with their masks, as the stage's
check fits it); it names every image. Prints
how often each mode's images are named as the subject, and the chance level.

    python benchmarks/finetune_check.py [--root .] [--images 16] [--steps 40] [--learning-rate 5e-6]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from components.core.config import load_params
from components.core.paths import BLIP_DIFFUSION_DIR
from components.data import synthetic
from components.data.images import read_alpha
from components.evaluation.subject_classifier import SubjectClassifier, read_views, subject_rows
from components.model import layout
from components.training.finetune import FinetuneConfig, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--refs", type=int, default=4, help="reference views of each new subject")
    parser.add_argument("--images", type=int, default=16, help="images per subject and mode")
    parser.add_argument("--steps", type=int, default=FinetuneConfig.steps, help="fine-tuning steps")
    parser.add_argument("--learning-rate", type=float, default=FinetuneConfig.learning_rate)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args()
    root = args.root
    params = load_params(root / "params.yaml")
    syn, seed = params.ingest.synthetic, params.ingest.seed
    new = synthetic.make_subjects(14, seed)[syn.num_subjects:]
    if not new:
        raise SystemExit("every synthetic subject is in the training data: lower ingest.synthetic.num_subjects")
    train = subject_rows(root, "train")
    known_images, known_labels = read_views(train, root), list(train["subject_id"])
    known_masks = [read_alpha(root / m) if isinstance(m, str) else None for m in train["mask_path"]]
    print(f"model {root / BLIP_DIFFUSION_DIR}; {len(new)} unseen subjects; {args.refs} references, "
          f"{args.images} images per mode; fine-tuning {args.steps} steps at lr {args.learning_rate}")
    totals = {"zero_shot": [], "finetuned": []}
    for subject in new:
        views = synthetic.render_views(subject, args.refs, syn.image_size, seed)
        refs = [v.image for v in views]
        classifier = SubjectClassifier.fit_images(known_images + refs,
                                                  known_labels + [subject.subject_id] * len(refs), size=32,
                                                  masks=known_masks + [v.alpha for v in views])
        chance = 1.0 / len(classifier.subjects)
        model = layout.load(root / BLIP_DIFFUSION_DIR)
        size = model.native_size
        seeds = list(range(args.images))

        def draw(embeds) -> list[np.ndarray]:
            images = model.generate(embeds, [""] * len(seeds), subject.class_name, seeds,
                                    guidance_scale=args.guidance, num_inference_steps=args.sample_steps,
                                    height=size, width=size)
            return list((images * 255).round().astype(np.uint8))

        zero = draw(model.subject_embeddings(refs, subject.class_name))
        start = time.perf_counter()
        with torch.enable_grad():
            result = finetune(model, refs, subject.class_name,
                              FinetuneConfig(steps=args.steps, learning_rate=args.learning_rate, seed=0))
        seconds = time.perf_counter() - start
        tuned = draw(result.subject_embeds.detach())
        for mode, images in (("zero_shot", zero), ("finetuned", tuned)):
            hits = [p == subject.subject_id for p in classifier.predict(images)]
            totals[mode].extend(hits)
            print(f"{subject.subject_id:24s} {mode:10s} named as the subject: {sum(hits)}/{len(hits)} "
                  f"(chance {chance:.3f})" + (f"; fine-tuning {seconds:.1f} s" if mode == "finetuned" else ""))
    for mode, hits in totals.items():
        print(f"all unseen subjects, {mode}: {np.mean(hits):.3f} ({sum(hits)}/{len(hits)})")


if __name__ == "__main__":
    main()
