"""A static HTML report of a DreamBench evaluation (or of `blipdiff score` over any image folder).

The page opens in a browser from disk, with no server: generated images are referenced by paths
relative to the report's folder (they sit beside it), real images are embedded as small base64
JPEG thumbnails (they live outside the repository). CSS is inline; no scripts, fonts or CDNs.
Every string that came from the user (subjects, prompts, settings) is HTML-escaped.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
from PIL import Image

from components.core.io import atomic_path

# The papers' DreamBench numbers (DINO, CLIP-I, CLIP-T), each measured with the paper's own
# evaluators, prompts and sample counts.
REFERENCE_TABLE: list[dict] = [
    {"method": "BLIP-Diffusion (zero-shot)", "dino": 0.594, "clip_i": 0.779, "clip_t": 0.300,
     "source": "Li et al. 2023, BLIP-Diffusion, Table 1"},
    {"method": "BLIP-Diffusion (fine-tuned)", "dino": 0.670, "clip_i": 0.805, "clip_t": 0.302,
     "source": "Li et al. 2023, BLIP-Diffusion, Table 1"},
    {"method": "DreamBooth (Stable Diffusion)", "dino": 0.668, "clip_i": 0.803, "clip_t": 0.305,
     "source": "Li et al. 2023, BLIP-Diffusion, Table 1"},
    {"method": "Textual Inversion", "dino": 0.569, "clip_i": 0.780, "clip_t": 0.255,
     "source": "Ruiz et al. 2023, DreamBooth, Table 1"},
    {"method": "Re-Imagen", "dino": 0.600, "clip_i": 0.740, "clip_t": 0.270,
     "source": "Chen et al. 2023, SuTI; BLIP-Diffusion, Table 1"},
    {"method": "SuTI", "dino": 0.741, "clip_i": 0.819, "clip_t": 0.304,
     "source": "Chen et al. 2023, SuTI"},
    {"method": "Real images", "dino": 0.774, "clip_i": 0.885, "clip_t": None,
     "source": "Ruiz et al. 2023, DreamBooth, Table 1"},
]

SCORES = ("dino", "clip_i", "clip_t")
SCORE_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
MODE_ORDER = ("zero_shot", "finetuned")
MODE_LABELS = {"zero_shot": "zero-shot", "finetuned": "fine-tuned"}
PLACEHOLDER = "image unreadable"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin: 1em 0 .3em; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.side { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.note { background: #fff6dd; border-left: 4px solid #e0b000; padding: .4em .8em; max-width: 60em; }
.muted { color: #777; font-size: .85em; }
.scores { font-size: .85em; margin: .2em 0 .6em; }
.reals { display: flex; flex-wrap: wrap; gap: .4em; margin: .3em 0 .8em; }
.reals figure, .cell { margin: 0; }
.missing { display: inline-block; border: 1px dashed #c00; color: #c00; padding: .5em; font-size: .8em; }
table.grid td { border: none; padding: .2em .4em; }
table.grid th.prompt { background: none; border: none; max-width: 14em; font-weight: normal; font-style: italic; }
.cap { font-size: .75em; line-height: 1.3; font-variant-numeric: tabular-nums; }
nav.subjects a { margin-right: .8em; white-space: nowrap; }
"""


def write_report(out: Path, per_image: pd.DataFrame, metrics: dict, real_images: dict[str, list[Path]],
                 title: str, settings: dict, thumb_size: int = 128, papers: bool = True) -> Path:
    """Write the report to `out` (atomically, UTF-8) and return `out`.

    per_image: one row per generated image; columns mode, subject, category, prompt, seed, image
    (path relative to `out`'s folder), dino, clip_i, clip_t; optional `class_phrase` (or `class`,
    `class_name`) shown beside the subject's name.
    metrics: {"modes": {mode: {"overall", "by_category", "per_subject", "per_prompt"}}, "oracle",
    "evaluators"}; any key may be absent (summaries then come from per_image's means).
    real_images: subject -> real image paths, embedded as JPEG thumbnails.
    papers: show the papers' DreamBench table beside this run's (False for another benchmark,
    e.g. the held-out bench, whose numbers the papers' do not compare with).
    """
    out = Path(out)
    df = _normalise(per_image, out.parent)
    metrics = metrics or {}
    settings = settings or {}
    modes = _modes(df, metrics)
    body = [
        f"<h1>{escape(str(title))}</h1>",
        _settings_section(settings, metrics.get("evaluators")),
        _results_section(df, metrics, modes, settings, papers),
        _category_section(df, metrics, modes),
        _per_prompt_section(metrics, modes),
        _subjects_section(df, metrics, modes, real_images or {}, int(thumb_size)),
    ]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(str(title))}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(part for part in body if part) + "\n</body>\n</html>\n")
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


# ---------------------------------------------------------------- inputs

def _normalise(per_image: pd.DataFrame | None, folder: Path) -> pd.DataFrame:
    df = pd.DataFrame() if per_image is None else per_image.copy()
    defaults = {"mode": "generated", "subject": "", "category": None, "prompt": "", "seed": None,
                "image": "", "dino": float("nan"), "clip_i": float("nan"), "clip_t": float("nan")}
    for col, value in defaults.items():
        if col not in df.columns:
            df[col] = value
    for col in ("mode", "subject", "prompt", "image"):
        df[col] = df[col].map(lambda v: "" if _missing(v) else str(v))
    for col in SCORES:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["image"] = df["image"].map(lambda p: _relative(p, folder))
    return df.reset_index(drop=True)


def _relative(path: str, folder: Path) -> str:
    """A generated image's path relative to the report's folder, with forward slashes."""
    if not path:
        return path
    if os.path.isabs(path):
        try:
            path = os.path.relpath(path, folder.resolve())
        except ValueError:  # another drive (Windows): leave it, the browser may still cope
            return Path(path).as_posix()
    return path.replace(os.sep, "/")


def _modes(df: pd.DataFrame, metrics: dict) -> list[str]:
    found = list(dict.fromkeys([*df["mode"].tolist(), *(metrics.get("modes") or {})]))
    return [m for m in MODE_ORDER if m in found] + sorted(m for m in found if m not in MODE_ORDER)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _mode_metrics(metrics: dict, mode: str) -> dict:
    return (metrics.get("modes") or {}).get(mode) or {}


def _summary(rows: pd.DataFrame) -> dict:
    summary = {key: (float(rows[key].mean()) if rows[key].notna().any() else None) for key in SCORES}
    summary["images"] = len(rows)
    return summary


def _tiny_evaluators(settings: dict, evaluators: Any) -> bool:
    if str(settings.get("evaluators", "")).lower() == "tiny":
        return True

    def ids(data: Any, key: str = "") -> Iterable[tuple[str, str]]:
        if isinstance(data, dict):
            for k, v in data.items():
                yield from ids(v, f"{key}.{k}".lower())
        elif isinstance(data, str):
            yield key, data.lower()

    for key, value in [*ids(settings), *ids(evaluators or {}, "evaluators")]:
        if any(word in key for word in ("dino", "clip", "eval")) and (
                value.startswith("tiny") or value.rsplit("/", 1)[-1].startswith("tiny")):
            return True
    return False


# ---------------------------------------------------------------- formatting

def _num(value: Any) -> str:
    if _missing(value):
        return "—"
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return escape(str(value))


def _count(value: Any) -> str:
    if _missing(value):
        return "—"
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return escape(str(value))


def _mode_label(mode: str) -> str:
    return escape(MODE_LABELS.get(mode, mode))


def _setting(value: Any) -> str:
    if _missing(value):
        return "—"
    if isinstance(value, str) and not value:
        return '<span class="muted">(empty)</span>'
    if isinstance(value, float):
        return escape(f"{value:g}")
    if isinstance(value, (dict, list, tuple)):
        return escape(json.dumps(value, sort_keys=True, default=str))
    return escape(str(value))


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """head and cells are HTML already; cells starting with '\x00' are numeric."""
    def cell(c: str) -> str:
        return f'<td class="num">{c[1:]}</td>' if c.startswith("\x00") else f"<td>{c}</td>"
    attr = f' class="{cls}"' if cls else ""
    return (f"<table{attr}><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows) + "</tbody></table>")


def _n(html: str) -> str:
    return "\x00" + html


# ---------------------------------------------------------------- sections

def _settings_section(settings: dict, evaluators: Any) -> str:
    parts = []
    if settings:
        rows = [[escape(str(k)), _setting(v)] for k, v in settings.items()]
        parts.append("<h2>Settings</h2>" + _table(["setting", "value"], rows, "settings"))
    if isinstance(evaluators, dict):  # only what the settings table does not already show
        rows = [[escape(str(k)), _setting(v)] for k, v in evaluators.items() if settings.get(k) != v]
    else:
        rows = []
    if rows:
        parts.append("<h3>Evaluators</h3>" + _table(["evaluator", "value"], rows, "evaluators"))
    return "\n".join(parts)


def _results_section(df: pd.DataFrame, metrics: dict, modes: list[str], settings: dict, papers: bool = True) -> str:
    rows = []
    for mode in modes:
        overall = _mode_metrics(metrics, mode).get("overall") or _summary(df[df["mode"] == mode])
        rows.append([_mode_label(mode), *(_n(_num(overall.get(k))) for k in SCORES),
                     _n(_count(overall.get("images")))])
    oracle = metrics.get("oracle") or {}
    if oracle:
        rows.append(["real images (this evaluator)", _n(_num(oracle.get("dino"))), _n(_num(oracle.get("clip_i"))),
                     _n("n/a"), _n(_count(oracle.get("pairs")) + " pairs")])
    ours = ("<div><h3>This run</h3>"
            + _table(["", "DINO", "CLIP-I", "CLIP-T", "images"], rows, "this-run") + "</div>")
    ref_rows = [[escape(r["method"]), *(_n(_num(r[k]) if r[k] is not None else "n/a") for k in SCORES),
                 f'<span class="muted">{escape(r["source"])}</span>'] for r in REFERENCE_TABLE]
    table = ("<div><h3>Papers (DreamBench)</h3>"
             + _table(["method", "DINO", "CLIP-I", "CLIP-T", "source"], ref_rows, "reference") + "</div>")
    tiny = _tiny_evaluators(settings, metrics.get("evaluators"))
    if not papers:
        table = ""
        note = ("<p class=\"note\">This benchmark is not DreamBench: the papers' DreamBench numbers do not "
                "apply and are not shown; compare runs on the same benchmark and settings only."
                + (" The evaluators of this run are <b>tiny</b> random networks: their numbers are "
                   "meaningless in scale." if tiny else "") + "</p>")
    elif tiny:
        note = ("<p class=\"note\">The evaluators of this run are <b>tiny</b> random networks: their DINO, "
                "CLIP-I and CLIP-T numbers are meaningless in scale and cannot be compared with the papers'. "
                "They only show that the pipeline runs end to end.</p>")
    else:
        note = ("<p class=\"note\">The papers' numbers were measured with their own evaluators, prompts and "
                "sample counts; this run's compare with them only where those match.</p>")
    return f'<h2>Results</h2>\n<div class="side">{ours}{table}</div>\n{note}'


def _category_section(df: pd.DataFrame, metrics: dict, modes: list[str]) -> str:
    rows = []
    for mode in modes:
        by_cat = dict(_mode_metrics(metrics, mode).get("by_category") or {})
        if not by_cat:
            sub = df[(df["mode"] == mode) & df["category"].map(lambda c: not _missing(c))]
            by_cat = {str(cat): _summary(rows_) for cat, rows_ in sub.groupby("category", sort=True)}
        for cat, values in sorted(by_cat.items(), key=lambda kv: str(kv[0])):
            values = values or {}
            rows.append([_mode_label(mode), escape(str(cat)), *(_n(_num(values.get(k))) for k in SCORES),
                         _n(_count(values.get("images")))])
    if not rows:
        return ""
    return ("<h2>Live subjects vs objects</h2>"
            + _table(["mode", "category", "DINO", "CLIP-I", "CLIP-T", "images"], rows, "categories"))


def _per_prompt_section(metrics: dict, modes: list[str]) -> str:
    parts = []
    for mode in modes:
        per_prompt = _mode_metrics(metrics, mode).get("per_prompt") or {}
        if not per_prompt:
            continue
        rows = [[escape(str(p)), *(_n(_num((v or {}).get(k))) for k in SCORES), _n(_count((v or {}).get("images")))]
                for p, v in per_prompt.items()]
        parts.append(f"<details><summary>{_mode_label(mode)}: per prompt ({len(rows)})</summary>"
                     + _table(["prompt", "DINO", "CLIP-I", "CLIP-T", "images"], rows, "per-prompt")
                     + "</details>")
    return ("<h2>Per prompt</h2>\n" + "\n".join(parts)) if parts else ""


def _subjects_section(df: pd.DataFrame, metrics: dict, modes: list[str], real_images: dict,
                      thumb_size: int) -> str:
    subjects = sorted({s for s in df["subject"] if s} | {str(s) for s in real_images})
    if not subjects:
        return ""
    oracle_per = (metrics.get("oracle") or {}).get("per_subject") or {}
    nav = " ".join(f'<a href="#subject-{i}">{escape(s)}</a>' for i, s in enumerate(subjects))
    parts = [f'<h2>Subjects</h2>\n<nav class="subjects">{nav}</nav>']
    for i, subject in enumerate(subjects):
        rows = df[df["subject"] == subject]
        parts.append(f'<section id="subject-{i}">')
        parts.append(f"<h2>{escape(subject)}{_subject_kind(rows)}</h2>")
        lines = []
        for mode in modes:
            mode_rows = rows[rows["mode"] == mode]
            stats = (_mode_metrics(metrics, mode).get("per_subject") or {}).get(subject)
            if not stats and mode_rows.empty:
                continue
            stats = stats or _summary(mode_rows)
            lines.append(f"<b>{_mode_label(mode)}</b>: " + _score_line(stats)
                         + f" ({_count(stats.get('images'))} images)")
        if subject in oracle_per:
            o = oracle_per[subject] or {}
            lines.append(f"<b>real images (this evaluator)</b>: DINO {_num(o.get('dino'))} · "
                         f"CLIP-I {_num(o.get('clip_i'))}")
        if lines:
            parts.append('<div class="scores">' + "<br>".join(lines) + "</div>")
        parts.append(_real_thumbnails(real_images.get(subject, []), thumb_size))
        for mode in modes:
            mode_rows = rows[rows["mode"] == mode]
            if not mode_rows.empty:
                parts.append(f"<h3>{_mode_label(mode)}</h3>" + _grid(mode_rows, thumb_size))
        parts.append("</section>")
    return "\n".join(parts)


def _subject_kind(rows: pd.DataFrame) -> str:
    bits = []
    for col in ("class_phrase", "class", "class_name"):
        if col in rows.columns:
            values = [v for v in rows[col] if not _missing(v)]
            if values:
                bits.append(str(values[0]))
                break
    categories = [v for v in rows["category"] if not _missing(v)]
    if categories:
        bits.append(str(categories[0]))
    return f' <span class="muted">({escape(", ".join(bits))})</span>' if bits else ""


def _score_line(stats: dict) -> str:
    return " · ".join(f"{SCORE_LABELS[k]} {_num(stats.get(k))}" for k in SCORES)


def _real_thumbnails(paths: list, thumb_size: int) -> str:
    if not paths:
        return '<p class="muted">no real images</p>'
    figures = []
    for path in paths:
        name = escape(Path(path).name)
        uri = _thumbnail_uri(Path(path), thumb_size)
        if uri is None:
            figures.append(f'<figure><span class="missing" title="{name}">{PLACEHOLDER}: {name}</span></figure>')
        else:
            figures.append(f'<figure><img src="{uri}" alt="{name}" title="{name}"></figure>')
    return '<div class="reals">' + "".join(figures) + "</div>"


def _thumbnail_uri(path: Path, thumb_size: int) -> str | None:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
        image.thumbnail((thumb_size, thumb_size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    except Exception:  # noqa: BLE001 -- unreadable, truncated, not an image, too large: a placeholder, not a crash
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(rows: pd.DataFrame, thumb_size: int) -> str:
    out = ['<table class="grid"><tbody>']
    for prompt, group in rows.groupby("prompt", sort=False):
        cells = []
        for _, r in group.iterrows():
            src = escape(quote(r["image"], safe="/"), quote=True)  # ':' quoted too: no URL scheme
            alt = escape(f"{r['subject']}: {prompt}", quote=True)
            seed = "" if _missing(r["seed"]) else f"<br>seed {_count(r['seed'])}"
            scores = "<br>".join(f"{SCORE_LABELS[k]} {_num(r[k])}" for k in SCORES)
            cells.append(f'<td class="cell"><a href="{src}"><img src="{src}" alt="{alt}" loading="lazy" '
                         f'width="{thumb_size}"></a><div class="cap">{scores}{seed}</div></td>')
        out.append(f'<tr><th class="prompt">{escape(prompt)}</th>{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    return "".join(out)


__all__ = ["REFERENCE_TABLE", "write_report"]
