"""The DreamBench protocol (DreamBooth paper Sec. 4.1, used by BLIP-Diffusion): which subjects,
prompts and seeds an evaluation generates, and the texts each image is made and scored with.

Each prompt template of the dataset ("a {0} {1} in the jungle", "a red {0} {1}") has a slot
for the unique identifier ({0}) and one for the class ({1}). BLIP-Diffusion needs no
identifier: its prompt is `build_prompt` of a context and a class phrase, "a [class phrase]
[context]", subject embeddings after "a". The template splits there: the words between "a"
and {0} join the class phrase ("a red {0} {1}" -> class "red dog", no context) and the text
after {1} is the context ("in the jungle"). CLIP-T scores the image against the template
with the identifier dropped and the class noun in: "a dog in the jungle", "a red dog".

Seeds are fixed per (subject, prompt, image index), from a hash, not from positions: an
image keeps its seed when the subset grows, so a larger run reuses what a smaller one made.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from components.core.errors import BlipDiffError
from components.data import dreambench

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Item:
    """One image the protocol asks for."""

    subject: str
    class_name: str
    category: str  # live | object
    prompt_index: int  # in the subject's category list
    template: str
    image_index: int
    seed: int

    @property
    def class_phrase(self) -> str:
        return class_phrase(self.template, self.class_name)

    @property
    def context(self) -> str:
        return context(self.template)

    @property
    def clip_text(self) -> str:
        return clip_text(self.template, self.class_name)


def _split(template: str) -> tuple[str, str]:
    """(modifier words between the article and the identifier, text after the class)."""
    match = re.fullmatch(r"\s*an?\s+(.*?)\{0\}\s*\{1\}(.*)", template)
    if not match:
        raise BlipDiffError(f"prompt template {template!r}: expected 'a ... {{0}} {{1}} ...'")
    return match.group(1).strip(), match.group(2).strip()


def class_phrase(template: str, class_name: str) -> str:
    modifier, _ = _split(template)
    return f"{modifier} {class_name}".strip()


def context(template: str) -> str:
    return _split(template)[1]


def clip_text(template: str, class_name: str) -> str:
    """The CLIP-T text: the template with the class noun and no identifier."""
    return " ".join(template.format("", class_name).split())


def item_seed(base: int, subject: str, prompt_index: int, image_index: int) -> int:
    digest = hashlib.sha256(f"{subject}|{prompt_index}|{image_index}".encode()).digest()
    return (base + int.from_bytes(digest[:4], "big")) % (2**31)


@dataclass(frozen=True)
class Benchmark:
    root: Path
    info: dreambench.DreamBenchInfo
    real: dict[str, list[Path]]  # subject -> its real images, sorted
    name: str = "DreamBench"  # what error messages call it (the held-out bench has DreamBench's layout)

    def prompts(self, subject: str) -> list[str]:
        info = self.info
        return info.live_prompts if info.category(subject) == "live" else info.object_prompts


def load(root: Path, name: str = "DreamBench") -> Benchmark:
    """A folder in DreamBench's layout: the class list, both prompt lists and every subject's
    images. A class-list subject without a folder or without an image is an error naming it."""
    info = dreambench.parse_prompts_and_classes(root / dreambench.PROMPTS_FILE)
    real, problems = {}, []
    for subject in sorted(info.classes):
        folder = root / subject
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            problems.append(f"{subject} ({'no image in' if folder.is_dir() else 'no folder'} {folder})")
        real[subject] = files
    if problems:
        raise BlipDiffError(f"{root}: {name} subjects without real images: {', '.join(problems)}")
    for templates in (info.object_prompts, info.live_prompts):
        for template in templates:
            _split(template)
    return Benchmark(root, info, real, name)


def choose_subjects(bench: Benchmark, subjects: int | str | list[str]) -> list[str]:
    """`all`, a count (object and live subjects alternating, each in name order, so a small
    subset has both kinds), or a list of names."""
    known = sorted(bench.info.classes)
    if subjects == "all":
        return known
    if isinstance(subjects, list):
        unknown = [s for s in subjects if s not in bench.info.classes]
        if unknown:
            raise BlipDiffError(f"evaluate.subjects: unknown {bench.name} subject(s) {', '.join(unknown)}; "
                                f"known: {', '.join(known)}")
        return list(dict.fromkeys(subjects))
    objects = [s for s in known if bench.info.category(s) == "object"]
    live = [s for s in known if bench.info.category(s) == "live"]
    order = [s for pair in zip(objects, live) for s in pair]
    order += [s for s in objects + live if s not in order]
    return order[: int(subjects)]


def plan(bench: Benchmark, subjects: list[str], prompts_per_subject: int | str, images_per_prompt: int,
         seed: int) -> list[Item]:
    """Every image to generate: subject x first N prompts of its category x images."""
    items = []
    for subject in subjects:
        templates = bench.prompts(subject)
        count = len(templates) if prompts_per_subject == "all" else min(int(prompts_per_subject), len(templates))
        for p, template in enumerate(templates[:count]):
            for i in range(images_per_prompt):
                items.append(Item(subject, bench.info.classes[subject], bench.info.category(subject), p,
                                  template, i, item_seed(seed, subject, p, i)))
    return items
