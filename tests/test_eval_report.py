"""The static DreamBench HTML report: self-contained, relative links, escaped, every image once."""

import base64
import io
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.evaluation.report import PLACEHOLDER, REFERENCE_TABLE, write_report

EVIL = "<script>alert(1)</script>"


class Page(HTMLParser):
    """Collects img srcs, start tags, table cells' text and all text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.srcs: list[str] = []
        self.tags: list[str] = []
        self.cells: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _png(path: Path, seed: int, size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _fixture(tmp_path: Path, modes=("zero_shot", "finetuned"), subjects=("dog", "red cartoon")):
    """A report folder with generated PNGs, real JPEGs outside it, per_image rows and metrics."""
    report_dir = tmp_path / "report"
    real_dir = tmp_path / "dreambench"
    rows, real = [], {}
    rng = np.random.default_rng(0)
    for s_i, subject in enumerate(subjects):
        real[subject] = []
        for k in range(2):
            p = real_dir / subject / f"{k:02d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(p, quality=90)
            real[subject].append(p)
        for mode in modes:
            for p_i, prompt in enumerate(["a {} in the jungle", "a {} on the beach"]):
                for seed in (11, 12):
                    rel = f"images/{mode}/{subject}/{p_i:03d}_s{seed}.png"
                    _png(report_dir / rel, seed + 7 * p_i + 100 * s_i)
                    rows.append({"mode": mode, "subject": subject, "category": "live" if s_i == 0 else "object",
                                 "prompt": prompt.format(subject), "seed": seed, "class_phrase": f"{subject} toy", "image": rel,
                                 "dino": float(rng.uniform(0.2, 0.8)), "clip_i": float(rng.uniform(0.5, 0.9)),
                                 "clip_t": float(rng.uniform(0.2, 0.35))})
    df = pd.DataFrame(rows)
    metrics = {"modes": {}, "oracle": {"dino": 0.7714, "clip_i": 0.8812, "pairs": 2,
                                       "per_subject": {s: {"dino": 0.7, "clip_i": 0.88} for s in subjects}}}
    for mode in modes:
        sub = df[df["mode"] == mode]

        def summary(x):
            return {"dino": x["dino"].mean(), "clip_i": x["clip_i"].mean(), "clip_t": x["clip_t"].mean(),
                    "images": len(x)}
        metrics["modes"][mode] = {
            "overall": summary(sub),
            "by_category": {c: summary(g) for c, g in sub.groupby("category")},
            "per_subject": {s: summary(g) for s, g in sub.groupby("subject")},
            "per_prompt": {p: summary(g) for p, g in sub.groupby("prompt")},
        }
    settings = {"model": "tiny", "model_hash": "abc123", "scheduler": "pndm", "steps": 2, "guidance": 7.5,
                "negative_prompt": "", "seed_rule": "base + index", "evaluators": "real", "subjects": len(subjects)}
    return report_dir, df, metrics, real, settings


def _write(tmp_path, **kw):
    report_dir, df, metrics, real, settings = _fixture(tmp_path, **{k: kw.pop(k) for k in ("modes", "subjects")
                                                                   if k in kw})
    args = {"per_image": df, "metrics": metrics, "real_images": real, "title": "DreamBench run",
            "settings": settings, **kw}
    out = write_report(report_dir / "report.html", **args)
    return out, df, Page(out.read_text(encoding="utf-8"))


def test_links_are_relative_or_embedded_and_each_image_appears_once(tmp_path):
    out, df, page = _write(tmp_path)
    assert out == tmp_path / "report" / "report.html" and out.is_file()
    assert page.srcs
    for src in page.srcs:
        if src.startswith("data:"):
            assert src.startswith("data:image/jpeg;base64,")
            continue
        assert not src.startswith(("/", "http", "file:")) and ":" not in src, src
        assert (out.parent / unquote(src)).is_file(), src
    generated = [unquote(s) for s in page.srcs if not s.startswith("data:")]
    assert sorted(generated) == sorted(df["image"])  # every generated image exactly once, nothing else
    embedded = [s for s in page.srcs if s.startswith("data:")]
    assert len(embedded) == 4  # 2 subjects x 2 real images
    # no server needed: no external resources of any kind
    assert "script" not in page.tags and "link" not in page.tags and "http" not in out.read_text()
    # nothing left over from the atomic write
    assert sorted(p.name for p in out.parent.iterdir()) == ["images", "report.html"]


def test_thumbnails_are_small_jpegs(tmp_path):
    _, _, page = _write(tmp_path, thumb_size=64)
    for src in (s for s in page.srcs if s.startswith("data:")):
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "JPEG" and max(image.size) == 64 and image.size[0] < image.size[1]


def test_scores_seeds_and_prompts_in_grid_cells(tmp_path):
    _, df, page = _write(tmp_path)
    row = df.iloc[5]
    cell = next(c for c in page.cells if f"DINO {row['dino']:.3f}" in c)
    assert f"CLIP-I {row['clip_i']:.3f}" in cell and f"CLIP-T {row['clip_t']:.3f}" in cell
    assert f"seed {row['seed']}" in cell
    assert f"{row['dino']:.4f}" not in " ".join(page.text)  # 3 decimals, not more
    assert row["prompt"] in page.cells  # prompt text labels its row
    overall = next(c for c in page.cells if c == "zero-shot")
    assert overall and f"{df[df['mode'] == 'zero_shot']['dino'].mean():.3f}" in page.cells


def test_user_strings_are_escaped(tmp_path):
    out, _, page = _write(tmp_path, subjects=("dog", EVIL))
    text = out.read_text()
    assert "<script" not in text.lower() and "script" not in page.tags
    assert "&lt;script&gt;" in text
    assert any(EVIL in t for t in page.text)  # shown as text, intact
    assert all((out.parent / unquote(s)).is_file() for s in page.srcs if not s.startswith("data:"))


def test_reference_table_and_oracle_row(tmp_path):
    _, _, page = _write(tmp_path)
    for number in ("0.594", "0.779", "0.300", "0.670", "0.805", "0.302", "0.741", "0.774", "0.885"):
        assert number in page.cells, number
    assert {r["method"] for r in REFERENCE_TABLE} <= set(page.cells)
    assert "Li et al. 2023, BLIP-Diffusion, Table 1" in page.cells
    assert "real images (this evaluator)" in page.cells
    assert "0.771" in page.cells and "0.881" in page.cells and "2 pairs" in page.cells
    assert "live" in page.cells and "object" in page.cells
    assert "(dog toy, live)" in " ".join(page.text)  # subject heading: class phrase and category


def test_tiny_evaluators_note(tmp_path):
    _, _, page = _write(tmp_path)
    assert "meaningless in scale" not in " ".join(page.text)
    report_dir, df, metrics, real, settings = _fixture(tmp_path / "b")
    for tiny in ({"evaluators": "tiny"}, {"evaluators": "real", "dino_model": "tiny(seed=0)"}):
        out = write_report(report_dir / "r.html", df, metrics, real, "t", {**settings, **tiny})
        assert "meaningless in scale" in " ".join(Page(out.read_text()).text), tiny


def test_unreadable_real_image_gives_placeholder(tmp_path):
    report_dir, df, metrics, real, settings = _fixture(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    real["dog"] = [broken, tmp_path / "missing.jpg", *real["dog"]]
    out = write_report(report_dir / "report.html", df, metrics, real, "t", settings)
    page = Page(out.read_text())
    text = " ".join(page.text)
    assert f"{PLACEHOLDER}: broken.jpg" in text and f"{PLACEHOLDER}: missing.jpg" in text
    assert sum(s.startswith("data:") for s in page.srcs) == 4  # the readable ones still embedded


def test_two_modes_give_two_grids_one_mode_one(tmp_path):
    out, _, page = _write(tmp_path)
    text = out.read_text()
    assert text.count('<table class="grid">') == 4  # 2 subjects x 2 modes
    assert text.count("<h3>zero-shot</h3>") == 2 and text.count("<h3>fine-tuned</h3>") == 2
    out1, _, page1 = _write(tmp_path / "one", modes=("zero_shot",))
    text1 = out1.read_text()
    assert text1.count('<table class="grid">') == 2 and "<h3>fine-tuned</h3>" not in text1
    assert "fine-tuned" in page.cells and "fine-tuned" not in page1.cells  # no fine-tuned row in this run's table


def test_sparse_metrics_and_absolute_paths(tmp_path):
    """`blipdiff score`: no metrics beyond per_image, no oracle, no category, absolute image paths."""
    report_dir, df, _, _, _ = _fixture(tmp_path, modes=("zero_shot",), subjects=("cat",))
    df = df.assign(category=None, image=[str(report_dir / p) for p in df["image"]])
    out = write_report(report_dir / "sub" / "report.html", df, {}, {}, "score", {})
    page = Page(out.read_text())
    generated = [s for s in page.srcs if not s.startswith("data:")]
    assert len(generated) == len(df)
    assert all(s.startswith("../images/") and (out.parent / unquote(s)).is_file() for s in generated)
    assert f"{df['dino'].mean():.3f}" in page.cells  # overall from per_image when metrics lack it
    assert "real images (this evaluator)" not in page.cells


@pytest.mark.parametrize("name", ["my dog #1?.png", "odd:name.png"])
def test_image_names_are_url_quoted(tmp_path, name):
    report_dir, df, metrics, real, settings = _fixture(tmp_path, modes=("zero_shot",), subjects=("dog",))
    first = report_dir / df.loc[0, "image"]
    first.rename(first.with_name(name))
    df.loc[0, "image"] = str(Path(df.loc[0, "image"]).with_name(name).as_posix())
    out = write_report(report_dir / "report.html", df, metrics, real, "t", settings)
    srcs = [s for s in Page(out.read_text()).srcs if not s.startswith("data:")]
    assert all(":" not in s and "#" not in s and "?" not in s and " " not in s for s in srcs)
    assert (out.parent / unquote(srcs[0])).is_file()
