"""Reading subject photos: one normalised form (8-bit RGB, upright, bounded size) for every input.

Whatever a user's folder holds (phone JPEGs with EXIF rotation, RGBA cut-outs, palette
PNGs, CMYK prints, 16-bit scans, grayscale), the rest of the pipeline sees an HxWx3 uint8
array, plus the alpha channel when the file carried a real one.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from components.core.errors import BlipDiffError

# Skip reasons, reported by count in the stage metrics.
NOT_AN_IMAGE = "not_an_image"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
TOO_LARGE = "too_large"
DUPLICATE = "duplicate"
EMPTY_SUBJECT = "empty_subject"

# Images with more pixels are refused before they are decoded: a small file can declare a
# huge canvas (a "decompression bomb"); 100 Mpx is twice a 48 Mpx phone photo.
MAX_PIXELS = 100_000_000


class SkipImage(Exception):
    """This file cannot be used; `reason` is one of the skip reasons above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class LoadedImage:
    rgb: np.ndarray  # HxWx3 uint8
    alpha: np.ndarray | None  # HxW float32 in [0, 1] when the file had real transparency

    @property
    def content_hash(self) -> str:
        return pixel_hash(self.rgb)


def pixel_hash(rgb: np.ndarray) -> str:
    """Hash of the decoded pixels: the same picture saved twice hashes the same."""
    digest = hashlib.sha256(repr(rgb.shape).encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()


@contextmanager
def _own_pixel_limit():
    """Pillow's process-wide decompression-bomb check off: `_open` checks the declared size
    against its own limit, before any pixel is decoded, with a message that says so."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _open(path: Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    with _own_pixel_limit():
        try:
            image = Image.open(path)  # reads the header only
        except UnidentifiedImageError:
            raise SkipImage(NOT_AN_IMAGE, f"{path}: not a recognised image format") from None
        except OSError as exc:
            raise SkipImage(CORRUPT, f"{path}: {exc}") from None
        except Exception as exc:  # some decoders fail on a bad header with other errors
            raise SkipImage(CORRUPT, f"{path}: {type(exc).__name__}: {exc}") from None
        width, height = image.size
        if width * height > max_pixels:
            image.close()
            raise SkipImage(TOO_LARGE, f"{path}: {width}x{height} pixels, more than the limit of "
                                       f"{max_pixels:,} (not decoded)")
        try:
            image.load()
        except OSError as exc:
            reason = TRUNCATED if "truncated" in str(exc).lower() else CORRUPT
            raise SkipImage(reason, f"{path}: {exc}") from None
        except Exception as exc:  # decoders raise SyntaxError, ValueError, zlib errors...
            raise SkipImage(CORRUPT, f"{path}: {type(exc).__name__}: {exc}") from None
    return image


def _high_bit_to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit and 32-bit grayscale: scale to 8 bits (Pillow's convert would clip instead)."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Any Pillow mode -> (HxWx3 uint8, alpha or None)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        gray = _high_bit_to_uint8(image)
        return np.repeat(gray[..., None], 3, axis=2), None
    alpha = None
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        a = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
        if a.min() < 1.0:  # a fully opaque alpha channel carries no mask
            alpha = a
        # Transparent pixels are undefined colour: show them on white, as viewers do.
        image = Image.alpha_composite(
            Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA")
        )
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return rgb, alpha


def load_image(path: Path, max_side: int, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Open, check, orient (EXIF), convert to RGB and cap the longest side at `max_side`;
    a file of more than `max_pixels` pixels is refused before it is decoded."""
    image = _open(path, max_pixels)
    image = ImageOps.exif_transpose(image)
    rgb, alpha = to_rgb(image)
    return cap_size(LoadedImage(rgb=np.ascontiguousarray(rgb), alpha=alpha), max_side)


def cap_size(image: LoadedImage, max_side: int) -> LoadedImage:
    """Downscale (Lanczos) so that the longest side is at most `max_side`; alpha alike."""
    h, w = image.rgb.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = np.asarray(Image.fromarray(image.rgb).resize(size, Image.Resampling.LANCZOS))
    alpha = image.alpha
    if alpha is not None:
        alpha = np.asarray(Image.fromarray(alpha, mode="F").resize(size, Image.Resampling.LANCZOS)).clip(0.0, 1.0)
    return LoadedImage(rgb=np.ascontiguousarray(rgb), alpha=alpha)


def read_rgb(path: Path) -> np.ndarray:
    """Read an image the pipeline itself wrote (already normalised)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_listed_rgb(root: Path, relative: str, manifest: Path, producer: str) -> np.ndarray:
    """An image a manifest lists; a missing file names the stage that writes it."""
    path = root / relative
    if not path.is_file():
        raise BlipDiffError(f"{manifest}: image {path} is missing (re-run `dvc repro {producer}`)")
    return read_rgb(path)


def read_alpha(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def read_subject_images(paths: list[Path], max_side: int = 1024, max_pixels: int = MAX_PIXELS,
                        what: str = "subject image") -> list[np.ndarray]:
    """A user's images (reference images; `what` names them in errors) as RGB arrays; an
    unreadable or too large one is a clear error."""
    refs = []
    for path in paths:
        try:
            refs.append(load_image(path, max_side=max_side, max_pixels=max_pixels).rgb)
        except (SkipImage, OSError) as exc:
            raise BlipDiffError(f"{what} {exc}") from None
    return refs


def save_png(array: np.ndarray, path: Path) -> None:
    """Save uint8 HxW or HxWx3 as PNG; fixed, fast settings so the same pixels give the same bytes."""
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def alpha_to_uint8(alpha: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
