"""Deterministic procedural subjects with ground-truth alpha mattes.

Stand-ins for subject photos (as in the DreamBooth dataset: one object per photo, centred
and large in the frame) so the pipeline can be exercised and its learning checked without
real data. Every subject differs from every other in colour, shape and texture, and each
view varies pose, scale, position, lighting and background.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy.interpolate import PchipInterpolator

from components.data.backgrounds import KINDS, procedural_background, scene

MIN_IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # mask rendered at 4x then box-filtered: 17 alpha levels along edges

# Independent random streams, so e.g. changing how backgrounds draw numbers never moves
# a subject's pose, and a subject's views never depend on how many subjects exist.
_STREAM_SUBJECTS = 0
_STREAM_COUNTS = 1
_STREAM_POSE = 2
_STREAM_BACKGROUND = 3
_STREAM_APPEARANCE = 4


@dataclass(frozen=True)
class SyntheticSubject:
    subject_id: str  # e.g. "red_star_toy": lowercase [a-z0-9_], unique
    class_name: str  # e.g. "toy"
    colour: str  # colour name, e.g. "red"
    shape: str  # shape name, e.g. "star"
    texture: str  # texture name, e.g. "dots"
    caption: str  # e.g. "a red star-shaped toy with dots"


@dataclass(frozen=True)
class SyntheticView:
    subject: SyntheticSubject
    view_index: int
    image: np.ndarray  # HxWx3 uint8 RGB: subject composited on its background
    alpha: np.ndarray  # HxW float32 in [0, 1], ground-truth matte of the subject
    background: str = "gradient"  # the background's kind (components.data.backgrounds.KINDS)

    @property
    def scene(self) -> str:
        """Where the subject is: "on a striped background"."""
        return scene(self.background)


# Saturated, well-separated hues plus white and black; backgrounds are muted, so these pop.
_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "blue": (31, 90, 220),
    "green": (34, 139, 34),
    "orange": (245, 133, 24),
    "purple": (118, 52, 170),
    "yellow": (245, 205, 30),
    "cyan": (40, 205, 225),
    "brown": (130, 80, 40),
    "magenta": (214, 40, 170),
    "teal": (0, 118, 118),
    "pink": (248, 150, 190),
    "lime": (160, 220, 40),
    "white": (242, 242, 238),
    "black": (30, 30, 34),
}

# (colour, shape, texture, class_name, caption). Every colour, shape and texture appears
# exactly once, so any subset of subjects is pairwise distinct in all three; the 14
# subjects share 4 class words (toy 4, pillow 3, badge 3, vase 4), so the class word
# alone never tells a subject from the others of its class: the subject embeddings must.
_TABLE: tuple[tuple[str, str, str, str, str], ...] = (
    ("red", "star", "dots", "toy", "a red star-shaped toy with dots"),
    ("blue", "circle", "stripes", "toy", "a blue round toy with stripes"),
    ("purple", "triangle", "zigzag", "toy", "a purple triangular toy with zigzags"),
    ("magenta", "ring", "speckle", "toy", "a magenta ring-shaped toy with sprinkles"),
    ("yellow", "heart", "spiral", "pillow", "a yellow heart-shaped pillow with a spiral"),
    ("pink", "crescent", "noise", "pillow", "a pink crescent-shaped pillow with a mottled pattern"),
    ("orange", "square", "grid", "pillow", "an orange square pillow with a grid pattern"),
    ("brown", "shield", "rays", "badge", "a brown shield-shaped badge with rays"),
    ("teal", "hexagon", "rings", "badge", "a teal hexagonal badge with concentric rings"),
    ("cyan", "diamond", "split", "badge", "a two-tone cyan diamond-shaped badge"),
    ("green", "vase", "checker", "vase", "a green vase with a checker pattern"),
    ("lime", "bottle", "solid", "vase", "a plain lime-green bottle-shaped vase"),
    ("white", "cup", "bricks", "vase", "a white cup-shaped vase with a brick pattern"),
    ("black", "lamp", "waves", "vase", "a black lamp-shaped vase with wavy lines"),
)

# Objects that stand on a base only tilt a little; symmetric flat objects spin freely.
_UPRIGHT = frozenset({"vase", "bottle", "cup", "lamp", "shield", "heart", "triangle"})


def _subject_id(colour: str, shape: str, class_name: str) -> str:
    return f"{colour}_{shape}" if shape == class_name else f"{colour}_{shape}_{class_name}"


def _check_seed(seed: int) -> int:
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def make_subjects(num_subjects: int, seed: int) -> list[SyntheticSubject]:
    """The first `num_subjects` of a seeded, class-balanced order of the subject table.

    The order deals the classes round-robin (each class's subjects and the classes
    themselves shuffled by the seed), so the first 4k subjects hold k of every class for
    k <= 3: 12 subjects are 3 toys, 3 pillows, 3 badges and 3 vases. Subject k is the same
    for any num_subjects > k, and all are distinct in colour, shape and texture.
    """
    if not 1 <= int(num_subjects) <= len(_TABLE):
        raise ValueError(f"num_subjects must be in [1, {len(_TABLE)}], got {num_subjects}")
    rng = np.random.default_rng([_check_seed(seed), _STREAM_SUBJECTS])
    classes = sorted({row[3] for row in _TABLE})
    by_class = {c: [i for i, row in enumerate(_TABLE) if row[3] == c] for c in classes}
    queues = [list(rng.permutation(by_class[c])) for c in classes]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    order = [q[r] for r in range(max(map(len, queues))) for q in queues if r < len(q)]
    subjects = []
    for i in order[: int(num_subjects)]:
        colour, shape, texture, class_name, caption = _TABLE[int(i)]
        subjects.append(
            SyntheticSubject(_subject_id(colour, shape, class_name), class_name, colour, shape, texture, caption)
        )
    return subjects


# ---------------------------------------------------------------------------------------
# Shapes: lists of (polygon, fill) in local units (y down, roughly within the unit disc).
# Fill 0 cuts holes, so later polygons can open the background through earlier ones.

Polygon = tuple[np.ndarray, int]


def _ellipse(rx: float, ry: float, cx: float = 0.0, cy: float = 0.0, n: int = 128) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _regular(n: int, radius: float, start_deg: float) -> np.ndarray:
    t = np.deg2rad(start_deg) + np.arange(n) * 2.0 * np.pi / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _rounded_rect(x0: float, y0: float, x1: float, y1: float, r: float, n: int = 12) -> np.ndarray:
    pts = []
    corners = ((x1 - r, y0 + r, -90.0), (x1 - r, y1 - r, 0.0), (x0 + r, y1 - r, 90.0), (x0 + r, y0 + r, 180.0))
    for cx, cy, a0 in corners:
        t = np.deg2rad(a0 + np.linspace(0.0, 90.0, n))
        pts.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1))
    return np.concatenate(pts)


def _profile(ys: list[float], half_widths: list[float], n: int = 96) -> np.ndarray:
    """A left-right symmetric outline from half-widths at heights (top to bottom).

    PCHIP keeps the outline smooth without overshooting into bulges the knots don't ask for.
    """
    y = np.linspace(ys[0], ys[-1], n)
    w = PchipInterpolator(ys, half_widths)(y)
    right = np.stack([w, y], axis=1)
    left = np.stack([-w[::-1], y[::-1]], axis=1)
    return np.concatenate([right, left])


def _star() -> list[Polygon]:
    outer, inner = _regular(5, 1.0, -90.0), _regular(5, 0.45, -54.0)
    pts = np.empty((10, 2))
    pts[0::2], pts[1::2] = outer, inner
    return [(pts, 255)]


def _heart() -> list[Polygon]:
    t = np.linspace(0.0, 2.0 * np.pi, 160, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1) / 17.0  # shift so the bounding box is centred
    return [(pts, 255)]


def _shield() -> list[Polygon]:
    s = np.linspace(0.0, 1.0, 48)
    right = np.stack([0.8 * np.cos(s * np.pi / 2), 0.05 + 0.95 * np.sin(s * np.pi / 2)], axis=1)
    left = right[::-1][1:] * np.array([-1.0, 1.0])
    # Top edge bows slightly upwards, like a heater shield.
    x = np.linspace(-0.8, 0.8, 17)
    top = np.stack([x, -0.85 - 0.1 * (1.0 - (x / 0.8) ** 2)], axis=1)
    return [(np.concatenate([top, right, left]), 255)]


def _cup() -> list[Polygon]:
    body = np.array([[-0.8, -0.75], [0.4, -0.75], [0.3, 0.8], [-0.7, 0.8]])
    return [
        (_ellipse(0.4, 0.42, 0.45, -0.05), 255),  # handle
        (_ellipse(0.22, 0.25, 0.45, -0.05), 0),  # hole through the handle
        (body, 255),
        (_ellipse(0.5, 0.1, -0.2, 0.8, 64), 255),  # rounded foot
    ]


def _lamp() -> list[Polygon]:
    shade = np.array([[-0.35, -1.0], [0.35, -1.0], [0.75, -0.2], [-0.75, -0.2]])
    stem = np.array([[-0.1, -0.25], [0.1, -0.25], [0.1, 0.85], [-0.1, 0.85]])
    base = _rounded_rect(-0.55, 0.75, 0.55, 1.0, 0.1)
    return [(shade, 255), (stem, 255), (base, 255)]


_SHAPES: dict[str, Callable[[], list[Polygon]]] = {
    "circle": lambda: [(_ellipse(1.0, 1.0), 255)],
    "square": lambda: [(_rounded_rect(-0.85, -0.85, 0.85, 0.85, 0.12), 255)],
    "triangle": lambda: [(_regular(3, 1.0, -90.0) + np.array([0.0, 0.25]), 255)],
    "star": _star,
    "hexagon": lambda: [(_regular(6, 1.0, 0.0), 255)],
    "heart": _heart,
    "diamond": lambda: [(np.array([[0.0, -1.0], [0.78, -0.3], [0.0, 1.0], [-0.78, -0.3]]), 255)],
    "shield": _shield,
    "ring": lambda: [(_ellipse(1.0, 1.0), 255), (_ellipse(0.45, 0.45), 0)],
    "crescent": lambda: [(_ellipse(1.0, 1.0), 255), (_ellipse(0.85, 0.85, 0.5, -0.25), 0)],
    "vase": lambda: [(_profile([-1.0, -0.7, -0.35, 0.25, 0.8, 1.0], [0.38, 0.24, 0.4, 0.72, 0.45, 0.38]), 255)],
    "bottle": lambda: [
        (_profile([-1.0, -0.9, -0.75, -0.45, -0.1, 0.9, 1.0], [0.19, 0.16, 0.16, 0.2, 0.45, 0.45, 0.4]), 255)
    ],
    "cup": _cup,
    "lamp": _lamp,
}


@functools.lru_cache(maxsize=None)
def _shape(name: str) -> tuple[Polygon, ...]:
    if name not in _SHAPES:
        raise ValueError(f"unknown shape {name!r}; expected one of {', '.join(sorted(_SHAPES))}")
    return tuple((np.asarray(pts, dtype=np.float64), fill) for pts, fill in _SHAPES[name]())


# ---------------------------------------------------------------------------------------
# Textures: weight maps t in [0, 1] (0 = main colour, 1 = accent) over local coordinates,
# so the pattern turns and scales with the subject. Each is written as a signed distance
# (positive inside the accent) and antialiased over one output pixel `px`.

Texture = Callable[[np.ndarray, np.ndarray, float, dict], np.ndarray]


def _aa(d: np.ndarray, px: float) -> np.ndarray:
    return np.clip(0.5 + d / np.float32(px), 0.0, 1.0)


def _band(x: np.ndarray, period: float, duty: float) -> np.ndarray:
    """Signed distance to bands of width duty*period centred on x = period/2 (mod period)."""
    return np.float32(period) * (np.float32(duty / 2.0) - np.abs(x / np.float32(period) % 1.0 - 0.5))


def _tex_solid(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    return np.zeros_like(u)


def _tex_dots(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    period = 0.42
    cu = u - period * np.round(u / period)
    cv = v - period * np.round(v / period)
    return _aa(0.13 - np.sqrt(cu * cu + cv * cv), px)


def _tex_stripes(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    return _aa(_band(v, 0.42, 0.5), px)


def _tex_checker(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    a, b = _band(u, 0.7, 0.5), _band(v, 0.7, 0.5)
    # Cells are the XOR of two band sets; distance to the nearest cell edge either way.
    return _aa(-np.sign(a * b) * np.minimum(np.abs(a), np.abs(b)), px)


def _tex_grid(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    return _aa(np.maximum(_band(u + 0.17, 0.34, 0.2), _band(v + 0.17, 0.34, 0.2)), px)


def _tex_zigzag(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    # Chevron bands; the factor undoes the slope so edges stay about one pixel soft.
    w = v + 0.8 * 0.4 * np.abs(u / np.float32(0.4) % 1.0 - 0.5)
    return _aa(_band(w, 0.34, 0.45) * np.float32(0.78), px)


def _tex_waves(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    w = v + np.float32(0.09) * np.sin(u * np.float32(2.0 * np.pi / 0.5))
    return _aa(_band(w, 0.3, 0.35) * np.float32(0.8), px)


def _tex_rings(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    return _aa(_band(np.sqrt(u * u + v * v), 0.3, 0.5), px)


def _tex_spiral(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    pitch = 0.34
    return _aa(_band(r - np.float32(pitch / (2.0 * np.pi)) * theta, pitch, 0.5), px)


def _tex_rays(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    # Angular distance times radius is arc length, so edges antialias at any radius.
    return _aa(r * _band(theta, 2.0 * np.pi / 8, 0.5), px)


def _tex_split(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    return _aa(u, px)


def _tex_speckle(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    # One sprinkle per lattice cell, jittered by a per-subject table; each stays inside
    # its own cell, so only that cell's sprinkle is ever the nearest.
    cell = 0.2
    i = np.floor(u / cell).astype(np.int64)
    j = np.floor(v / cell).astype(np.int64)
    k = (i % 8) * 8 + (j % 8)
    cu = u - (i + p["jitter"][k, 0]) * cell
    cv = v - (j + p["jitter"][k, 1]) * cell
    return _aa(p["radius"][k] - np.sqrt(cu * cu + cv * cv), px)


def _tex_noise(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    f = np.zeros_like(u)
    for (kx, ky), phase in zip(p["freqs"], p["phases"]):
        f += np.cos(u * np.float32(kx) + v * np.float32(ky) + np.float32(phase))
    # Divide by a typical gradient magnitude to turn the field into an approximate distance.
    return _aa(f / np.float32(p["gradient"]), px)


def _tex_bricks(u: np.ndarray, v: np.ndarray, px: float, p: dict) -> np.ndarray:
    h, w, mortar = 0.24, 0.48, 0.05
    row = np.floor(v / h)
    shifted = u + (row % 2) * np.float32(w / 2)
    return _aa(np.maximum(_band(v + h / 2, h, mortar / h), _band(shifted + w / 2, w, mortar / w)), px)


_TEXTURES: dict[str, Texture] = {
    "solid": _tex_solid,
    "dots": _tex_dots,
    "stripes": _tex_stripes,
    "checker": _tex_checker,
    "grid": _tex_grid,
    "zigzag": _tex_zigzag,
    "waves": _tex_waves,
    "rings": _tex_rings,
    "spiral": _tex_spiral,
    "rays": _tex_rays,
    "split": _tex_split,
    "speckle": _tex_speckle,
    "noise": _tex_noise,
    "bricks": _tex_bricks,
}


def _texture_params(texture: str, rng: np.random.Generator) -> dict:
    """Per-subject random texture details, fixed across views so the subject stays itself."""
    if texture == "speckle":
        return {"jitter": rng.uniform(0.3, 0.7, (64, 2)), "radius": rng.uniform(0.04, 0.06, 64)}
    if texture == "noise":
        angles = rng.uniform(0.0, np.pi, 4)
        mags = rng.uniform(2.0 * np.pi * 0.6, 2.0 * np.pi * 1.1, 4)
        freqs = np.stack([mags * np.cos(angles), mags * np.sin(angles)], axis=1)
        return {"freqs": freqs, "phases": rng.uniform(0.0, 2.0 * np.pi, 4), "gradient": float(mags.mean()) * 1.4}
    return {}


def _accent(rgb: np.ndarray) -> np.ndarray:
    """A dark variant of light colours, a light variant of dark ones, for the pattern."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return rgb * 0.45 if luma > 150 else rgb + (255.0 - rgb) * 0.6


# ---------------------------------------------------------------------------------------
# Rendering


def _subject_key(subject: SyntheticSubject) -> int:
    # crc32 rather than hash(): stable across processes, independent of table position.
    return zlib.crc32(subject.subject_id.encode("utf-8"))


def _render_view(
    subject: SyntheticSubject, key: int, view_index: int, image_size: int, seed: int
) -> SyntheticView:
    size = image_size
    pose = np.random.default_rng([seed, _STREAM_POSE, key, view_index])
    polys = _shape(subject.shape)

    max_rot = np.deg2rad(25.0) if subject.shape in _UPRIGHT else np.pi
    theta = pose.uniform(-max_rot, max_rot)
    fill_fraction = pose.uniform(0.45, 0.75)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])

    # Size and place by the rotated bounding box, so the subject spans the intended
    # fraction of the frame and never leaves it.
    solid = np.concatenate([pts for pts, fill in polys if fill]) @ rot.T
    lo, hi = solid.min(axis=0), solid.max(axis=0)
    scale = fill_fraction * size / float((hi - lo).max())
    margin = max(1.0, 0.02 * size)
    room = (size - scale * (hi - lo)) / 2.0 - margin
    shift = pose.uniform(-1.0, 1.0, 2) * np.clip(np.minimum(room, 0.06 * size), 0.0, None)
    origin = size / 2.0 + shift - scale * (lo + hi) / 2.0  # pixel position of local (0, 0)

    # Matte: polygons at supersampled resolution, box-filtered down. Integer sums keep the
    # interior exactly 1.0 and the far background exactly 0.0.
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, fill in polys:
        # PIL puts pixel centres on integer coordinates, hence the half-pixel offset.
        xy = (origin + scale * (pts @ rot.T)) * ss - 0.5
        draw.polygon(xy.ravel().tolist(), fill=fill)
    counts = np.asarray(canvas).reshape(size, ss, size, ss).sum(axis=(1, 3), dtype=np.uint32)
    alpha = (counts.astype(np.float32) / np.float32(255 * ss * ss)).astype(np.float32)

    # Local coordinates of every pixel centre: invert p = origin + scale * R q.
    coords = np.arange(size, dtype=np.float32) + np.float32(0.5)
    dx = (coords - np.float32(origin[0]))[None, :]
    dy = (coords - np.float32(origin[1]))[:, None]
    inv = np.float32(1.0 / scale)
    u = (dx * np.float32(c) + dy * np.float32(s)) * inv
    v = (dy * np.float32(c) - dx * np.float32(s)) * inv

    base = np.asarray(_COLOURS[subject.colour], dtype=np.float32)
    accent = _accent(base).astype(np.float32)
    tex_rng = np.random.default_rng([_STREAM_APPEARANCE, key])
    t = _TEXTURES[subject.texture](u, v, 1.0 / scale, _texture_params(subject.texture, tex_rng))
    colour = base + (accent - base) * t[..., None]

    # Lighting: a linear shading ramp across the subject only, then a global exposure.
    light_dir = pose.uniform(0.0, 2.0 * np.pi)
    strength = np.float32(pose.uniform(0.1, 0.35))
    half_extent = np.float32(scale * float((hi - lo).max()) / 2.0)
    ramp = (dx * np.float32(np.cos(light_dir)) + dy * np.float32(np.sin(light_dir))) / half_extent
    shade = 1.0 + strength * np.clip(ramp, -1.0, 1.0)
    exposure = np.float32(pose.uniform(0.85, 1.15))
    fg = np.clip(colour * (shade * exposure)[..., None], 0.0, 255.0)

    bg_rng = np.random.default_rng([seed, _STREAM_BACKGROUND, key, view_index])
    kind = KINDS[(key + view_index) % len(KINDS)]  # consecutive views never share a kind
    bg = np.clip(procedural_background(bg_rng, size, size, kind).astype(np.float32) * exposure, 0.0, 255.0)

    a = alpha[..., None]
    image = np.clip(np.rint(a * fg + (1.0 - a) * bg), 0, 255).astype(np.uint8)
    return SyntheticView(subject=subject, view_index=view_index, image=image, alpha=alpha, background=kind)


def _check_subject(subject: SyntheticSubject) -> None:
    for field, table in (("colour", _COLOURS), ("shape", _SHAPES), ("texture", _TEXTURES)):
        value = getattr(subject, field)
        if value not in table:
            raise ValueError(f"unknown {field} {value!r}; expected one of {', '.join(sorted(table))}")


def render_views(subject: SyntheticSubject, num_views: int, image_size: int, seed: int) -> list[SyntheticView]:
    """`num_views` views of `subject` at image_size x image_size.

    View v depends only on (seed, subject_id, v): never on other subjects or num_views.
    """
    if int(image_size) < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if int(num_views) < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    _check_subject(subject)
    seed, key = _check_seed(seed), _subject_key(subject)
    return [_render_view(subject, key, v, int(image_size), seed) for v in range(int(num_views))]


def generate(num_subjects: int, min_views: int, max_views: int, image_size: int, seed: int) -> list[SyntheticView]:
    """All views of `num_subjects` subjects, ordered by subject then view.

    Each subject's view count is drawn in [min_views, max_views] from (seed, subject), so
    adding subjects never changes the views of the existing ones.
    """
    if int(min_views) < 1 or int(max_views) < int(min_views):
        raise ValueError(f"need 1 <= min_views <= max_views, got min_views={min_views}, max_views={max_views}")
    if int(image_size) < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    seed = _check_seed(seed)
    views: list[SyntheticView] = []
    for subject in make_subjects(num_subjects, seed):
        counts = np.random.default_rng([seed, _STREAM_COUNTS, _subject_key(subject)])
        n = int(counts.integers(int(min_views), int(max_views) + 1))
        views.extend(render_views(subject, n, image_size, seed))
    return views
