"""Trimaps, closed-form matting and alpha blending (paper Sec. 4.2.2, context generation).

probability map -> trimap (1 = foreground, 0.5 = unknown, 0 = background) -> closed-form
alpha (pymatting's estimate_alpha_cf) -> foreground colours (estimate_foreground_ml) ->
alpha blend onto a new background.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pymatting import estimate_alpha_cf, estimate_foreground_ml
from scipy.ndimage import binary_erosion

FG, UNKNOWN, BG = 1.0, 0.5, 0.0
# Degenerate trimap reasons, counted by the context stage.
NO_FOREGROUND = "no_foreground"
NO_BACKGROUND = "no_background"
# The closed-form Laplacian couples pixels that share a 3x3 window, i.e. up to 2 pixels
# apart: a crop this much larger than the unknown region gives the same solution.
_LAPLACIAN_REACH = 2


def _erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    # border_value=1: the image edge does not eat into a known region.
    return binary_erosion(mask, iterations=pixels, border_value=1)


def trimap_from_probs(
    probs: np.ndarray,
    fg_threshold: float,
    bg_threshold: float,
    erode: int = 0,
    normalize: bool = True,
) -> np.ndarray:
    """Two thresholds on a probability map; known regions optionally shrunk by `erode` px."""
    p = probs.astype(np.float64)
    if normalize:
        lo, hi = p.min(), p.max()
        p = (p - lo) / (hi - lo) if hi - lo > 1e-6 else np.full_like(p, UNKNOWN)
    trimap = np.full(p.shape, UNKNOWN)
    trimap[_erode(p >= fg_threshold, erode)] = FG
    trimap[_erode(p <= bg_threshold, erode)] = BG
    return trimap


def trimap_from_alpha(alpha: np.ndarray, band: int) -> np.ndarray:
    """Trimap from a known alpha: the fractional edge plus `band` px each side is unknown."""
    trimap = np.full(alpha.shape, UNKNOWN)
    trimap[_erode(alpha >= 1.0 - 1e-3, band)] = FG
    trimap[_erode(alpha <= 1e-3, band)] = BG
    return trimap


def degenerate_reason(trimap: np.ndarray, min_fraction: float) -> str | None:
    """Why this trimap cannot be matted (too little sure foreground or background), or None."""
    n = trimap.size
    min_pixels = max(1, int(min_fraction * n))
    if np.count_nonzero(trimap == FG) < min_pixels:
        return NO_FOREGROUND
    if np.count_nonzero(trimap == BG) < min_pixels:
        return NO_BACKGROUND
    return None


def unknown_fraction(trimap: np.ndarray) -> float:
    return float(np.count_nonzero(trimap == UNKNOWN) / trimap.size)


def _resize(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """Resize a float HxW(xC) array to size=(w, h), channel by channel in float precision."""
    if array.ndim == 2:
        return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize(size, resample))
    return np.stack([_resize(array[..., c], size, resample) for c in range(array.shape[2])], axis=-1)


def _downscale_trimap(trimap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average, then keep a pixel known only if its whole footprint was known."""
    fg = _resize((trimap == FG).astype(np.float32), size, Image.Resampling.BOX)
    bg = _resize((trimap == BG).astype(np.float32), size, Image.Resampling.BOX)
    small = np.full(fg.shape, UNKNOWN)
    small[fg >= 1.0 - 1e-6] = FG
    small[bg >= 1.0 - 1e-6] = BG
    return small


def closed_form_alpha(image: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    """estimate_alpha_cf on the bounding box of the unknown region only (same solution).

    `image` is float64 HxWx3 in [0, 1]. Known pixels far from the unknown region take no
    part in the linear system, so building the Laplacian over them is wasted work.
    """
    unknown = trimap == UNKNOWN
    if not unknown.any():
        return trimap.copy()
    rows, cols = np.flatnonzero(unknown.any(1)), np.flatnonzero(unknown.any(0))
    h, w = trimap.shape
    y0, y1 = max(rows[0] - _LAPLACIAN_REACH, 0), min(rows[-1] + _LAPLACIAN_REACH + 1, h)
    x0, x1 = max(cols[0] - _LAPLACIAN_REACH, 0), min(cols[-1] + _LAPLACIAN_REACH + 1, w)
    crop = trimap[y0:y1, x0:x1]
    if not ((crop == FG).any() and (crop == BG).any()):
        # pymatting needs both kinds of known pixel in its system: solve the whole image.
        return estimate_alpha_cf(image, trimap)
    alpha = trimap.copy()
    alpha[y0:y1, x0:x1] = estimate_alpha_cf(np.ascontiguousarray(image[y0:y1, x0:x1]), crop)
    return alpha


def estimate_alpha(image: np.ndarray, trimap: np.ndarray, max_side: int | None = None) -> np.ndarray:
    """Alpha matte of a uint8 RGB image, matting at most `max_side` px and upsampling back.

    Known trimap pixels keep their value at full resolution; only the unknown region
    takes the (possibly upsampled) closed-form solution.
    """
    h, w = trimap.shape
    scale = 1.0 if max_side is None else min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return closed_form_alpha(image.astype(np.float64) / 255.0, trimap)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small_image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    small_trimap = _downscale_trimap(trimap, size)
    if not ((small_trimap == FG).any() and (small_trimap == BG).any()):
        return closed_form_alpha(image.astype(np.float64) / 255.0, trimap)
    small_alpha = closed_form_alpha(small_image.astype(np.float64) / 255.0, small_trimap)
    alpha = _resize(small_alpha, (w, h), Image.Resampling.BILINEAR).astype(np.float64)
    alpha = np.clip(alpha, 0.0, 1.0)
    alpha[trimap == FG] = 1.0
    alpha[trimap == BG] = 0.0
    return alpha


def estimate_foreground(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Foreground colours (float64 HxWx3 in [0, 1]) so edges blend without the old background."""
    return estimate_foreground_ml(image.astype(np.float64) / 255.0, alpha)


def blend(foreground: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Alpha-blend a float foreground in [0, 1] onto a uint8 background; uint8 result."""
    a = alpha[..., None]
    out = foreground * a + (background.astype(np.float64) / 255.0) * (1.0 - a)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def alpha_errors(alpha: np.ndarray, truth: np.ndarray, trimap: np.ndarray) -> dict[str, float]:
    """SAD (in thousands, the alphamatting.com convention) and MSE over the unknown region."""
    diff = alpha.astype(np.float64) - truth.astype(np.float64)
    unknown = trimap == UNKNOWN
    mse = float(np.mean(diff[unknown] ** 2)) if unknown.any() else 0.0
    return {"sad": float(np.abs(diff).sum() / 1000.0), "mse": mse}
