"""Procedural backgrounds: cheap, varied stand-ins for the scenes behind subject photos.

Used by the synthetic subject generator and by the compositing stage that pastes cut-out
subjects onto new backgrounds. Everything is vectorised numpy driven by the caller's
Generator, so the same generator state always gives the same bytes.
"""

from __future__ import annotations

import colorsys

import numpy as np

KINDS: tuple[str, ...] = ("gradient", "stripes", "checker", "blobs", "noise", "rings")
# How captions and prompts name each kind: "... on a striped background".
BACKGROUND_PHRASES: dict[str, str] = {"gradient": "gradient", "stripes": "striped", "checker": "checkered",
                                     "blobs": "blotchy", "noise": "noisy", "rings": "ringed"}


def scene(kind: str) -> str:
    """The context words for a background kind: "on a striped background"."""
    return f"on a {BACKGROUND_PHRASES[kind]} background"


def with_scene(caption: str, where: str | None) -> str:
    """A caption and where the subject is: "a red star-shaped toy with dots on a striped
    background" (the caption alone when the scene is unknown)."""
    return f"{caption} {where}" if isinstance(where, str) and where else caption


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A muted random colour (float32 RGB in 0..255).

    Saturation and value are kept away from the extremes so that saturated, white or
    black subjects still stand out against any background.
    """
    h = rng.random()
    s = rng.uniform(0.05, 0.4)
    v = rng.uniform(0.3, 0.9)
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _coords(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as (H,1) and (1,W) arrays, longer side spanning [0, 1].

    One unit for both axes keeps patterns undistorted on non-square canvases, and the
    broadcastable shapes avoid materialising full meshgrids.
    """
    scale = np.float32(1.0 / max(height, width))
    y = ((np.arange(height, dtype=np.float32) + 0.5) * scale)[:, None]
    x = ((np.arange(width, dtype=np.float32) + 0.5) * scale)[None, :]
    return y, x


def _mix(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Blend two colours with a weight map t (HxW) -> HxWx3 float32."""
    return c0 + (c1 - c0) * t[..., None]


def _soft_wave(rng: np.random.Generator, phase: np.ndarray) -> np.ndarray:
    """Two-tone weight from a phase map: soft sinusoid or near-hard bands, at random.

    Large gains give crisp bands whose sub-pixel transition still antialiases.
    """
    gain = np.float32(rng.uniform(0.6, 8.0))
    return np.clip(0.5 + 0.5 * gain * np.sin(phase), 0.0, 1.0)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix that upsamples a 1-D grid with a cubic B-spline.

    The B-spline is C2, so upsampled random grids read as soft cloudy variation rather
    than the visible square cells that (smoothstep-)linear interpolation leaves.
    """
    g = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(g).astype(np.int64)
    f = g - i0
    weights = (
        (1.0 - f) ** 3 / 6.0,
        (3.0 * f**3 - 6.0 * f**2 + 4.0) / 6.0,
        (-3.0 * f**3 + 3.0 * f**2 + 3.0 * f + 1.0) / 6.0,
        f**3 / 6.0,
    )
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for tap, w in enumerate(weights):
        # Clamped taps repeat the edge value, so rows still sum to one.
        np.add.at(m, (rows, np.clip(i0 + tap - 1, 0, n_in - 1)), w)
    return m.astype(np.float32)


def _gradient(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    c0, c1 = _colour(rng), _colour(rng)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    proj = x * np.float32(np.cos(theta)) + y * np.float32(np.sin(theta))
    lo, hi = proj.min(), proj.max()
    t = (proj - lo) / max(float(hi - lo), 1e-6)
    return _mix(c0, c1, t)


def _stripes(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    c0, c1 = _colour(rng), _colour(rng)
    theta = rng.uniform(0.0, np.pi)
    period = rng.uniform(0.04, 0.2)
    proj = x * np.float32(np.cos(theta)) + y * np.float32(np.sin(theta))
    phase = proj * np.float32(2.0 * np.pi / period) + np.float32(rng.uniform(0.0, 2.0 * np.pi))
    return _mix(c0, c1, _soft_wave(rng, phase))


def _checker(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    c0, c1 = _colour(rng), _colour(rng)
    cell = rng.uniform(0.04, 0.18)
    # Half the time axis-aligned (tiles, floors), otherwise at a random angle.
    theta = 0.0 if rng.random() < 0.5 else rng.uniform(0.0, np.pi / 2)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    k = np.float32(np.pi / cell)
    u = (x * c + y * s) * k + np.float32(rng.uniform(0.0, np.pi))
    v = (y * c - x * s) * k + np.float32(rng.uniform(0.0, np.pi))
    gain = np.float32(rng.uniform(2.0, 10.0))
    t = np.clip(0.5 + 0.5 * gain * (np.sin(u) * np.sin(v)), 0.0, 1.0)
    return _mix(c0, c1, t)


def _blobs(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    base = _colour(rng)
    n = int(rng.integers(3, 8))
    cols = np.stack([_colour(rng) for _ in range(n)])  # (n, 3)
    ymax, xmax = float(y[-1, 0]) + float(y[0, 0]), float(x[0, -1]) + float(x[0, 0])
    cy = rng.uniform(-0.1, 1.1, n) * ymax
    cx = rng.uniform(-0.1, 1.1, n) * xmax
    sigma = rng.uniform(0.06, 0.3, n)
    weight = rng.uniform(0.6, 1.5, n)
    # Each gaussian is separable, so the normalised weighted sum of all blobs is two small
    # matrix products per channel instead of n full-image passes.
    gy = (np.exp(-((y - cy[None, :]) ** 2) / (2.0 * sigma**2)) * weight).astype(np.float32)  # (H, n)
    gx = np.exp(-((x.T - cx[None, :]) ** 2) / (2.0 * sigma**2)).astype(np.float32)  # (W, n)
    w0 = np.float32(0.25)  # weight of the base colour: blobs fade into it away from centres
    den = gy @ gx.T + w0
    out = np.empty(den.shape + (3,), dtype=np.float32)
    for ch in range(3):
        out[..., ch] = ((gy * cols[:, ch]) @ gx.T + w0 * base[ch]) / den
    return out


def _noise(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    h, w = y.shape[0], x.shape[1]
    palette = np.stack([_colour(rng) for _ in range(3)])  # (3 colours, 3 channels)
    out = np.zeros((h, w, 3), dtype=np.float32)
    # A coarse octave of palette mixtures plus a finer, weaker octave of brightness detail.
    cells = int(rng.integers(3, 8))
    gh, gw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    mix = rng.dirichlet(np.ones(3), size=(gh, gw)).astype(np.float32)  # (gh, gw, 3)
    grid = mix @ palette  # (gh, gw, 3)
    my, mx = _interp_matrix(h, gh), _interp_matrix(w, gw)
    for ch in range(3):
        out[..., ch] = my @ grid[..., ch] @ mx.T
    fh, fw = gh * 3, gw * 3
    detail = rng.uniform(-1.0, 1.0, (fh, fw)).astype(np.float32) * np.float32(rng.uniform(10.0, 35.0))
    out += (_interp_matrix(h, fh) @ detail @ _interp_matrix(w, fw).T)[..., None]
    return out


def _rings(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    c0, c1 = _colour(rng), _colour(rng)
    cy, cx = rng.uniform(-0.3, 1.3, 2)
    period = rng.uniform(0.03, 0.15)
    r = np.sqrt((y - np.float32(cy)) ** 2 + (x - np.float32(cx)) ** 2)
    phase = r * np.float32(2.0 * np.pi / period) + np.float32(rng.uniform(0.0, 2.0 * np.pi))
    return _mix(c0, c1, _soft_wave(rng, phase))


_PAINTERS = {
    "gradient": _gradient,
    "stripes": _stripes,
    "checker": _checker,
    "blobs": _blobs,
    "noise": _noise,
    "rings": _rings,
}


def procedural_background(
    rng: np.random.Generator, height: int, width: int, kind: str | None = None
) -> np.ndarray:
    """An HxWx3 uint8 background of `kind` (one of KINDS; None picks one with rng)."""
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be >= 1, got height={height}, width={width}")
    if kind is None:
        kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind not in _PAINTERS:
        raise ValueError(f"unknown background kind {kind!r}; expected one of {', '.join(KINDS)}")
    height, width = int(height), int(width)
    y, x = _coords(height, width)
    out = _PAINTERS[kind](rng, y, x)
    # Lens-like vignette and sensor grain, so no background is perfectly clean.
    centre_y, centre_x = height / (2.0 * max(height, width)), width / (2.0 * max(height, width))
    d2 = (y - np.float32(centre_y)) ** 2 + (x - np.float32(centre_x)) ** 2
    d2 = d2 / np.float32(centre_y**2 + centre_x**2)
    out *= (1.0 - np.float32(rng.uniform(0.0, 0.3)) * d2)[..., None]
    grain = np.float32(rng.uniform(0.0, 3.0))
    out += rng.standard_normal((height, width, 1), dtype=np.float32) * grain
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def background_pool(num: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    """`num` deterministic backgrounds, cycling through every kind so the pool is varied.

    Background i depends only on (seed, i), so a larger pool extends a smaller one.
    """
    if int(num) < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return [
        procedural_background(np.random.default_rng([int(seed), i]), height, width, KINDS[i % len(KINDS)])
        for i in range(int(num))
    ]
