"""A labelled image grid: small images upscaled (nearest neighbour) so a 32 px sample is
visible, a header over each column and a label left of each row, in PIL's default font.

train_subject draws `reports/samples/grid.png` with it: one row per subject, its reference
view, the base model's prior from its caption and the trained model's zero-shot drawings in
a few contexts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
MISSING = (200, 200, 200)  # a cell without an image


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes: `label_width` px of row labels, `header_height` px of column
    headers, then `tile` x `tile` cells with `pad` px between them and around the grid."""

    rows: int
    columns: int
    tile: int
    pad: int
    label_width: int
    header_height: int

    def origin(self, row: int, column: int) -> tuple[int, int]:
        """The (x, y) of a cell's top-left pixel."""
        return (self.label_width + self.pad + column * (self.tile + self.pad),
                self.header_height + self.pad + row * (self.tile + self.pad))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole grid."""
        return (self.label_width + self.pad + self.columns * (self.tile + self.pad),
                self.header_height + self.pad + self.rows * (self.tile + self.pad))


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text or " ")
    return right - left, bottom - top


def grid_layout(row_labels: Sequence[str], column_labels: Sequence[str], tile: int = 96,
                pad: int = 4) -> GridLayout:
    font = ImageFont.load_default()
    label_width = max([_text_size(font, t)[0] for t in row_labels] + [0]) + 2 * pad
    header_height = max(_text_size(font, t)[1] for t in [*column_labels, "Ag"]) + 2 * pad
    return GridLayout(len(row_labels), len(column_labels), tile, pad, label_width, header_height)


def _as_uint8(image) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return array[..., :3]


def image_grid(cells: Sequence[Sequence], row_labels: Sequence[str], column_labels: Sequence[str],
               tile: int = 96, pad: int = 4) -> np.ndarray:
    """`cells[r][c]`: an HxWx3 (or HxW) image, uint8 or float in [0, 1], or None (a grey
    cell); each is resized to `tile` x `tile` by nearest neighbour. Returns the grid as a
    uint8 HxWx3 array, laid out as `grid_layout` says."""
    if len(cells) != len(row_labels) or any(len(row) != len(column_labels) for row in cells):
        raise ValueError(f"image_grid: {len(cells)} rows of cells for {len(row_labels)} row labels and "
                         f"{len(column_labels)} column labels")
    layout = grid_layout(row_labels, column_labels, tile, pad)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, text in enumerate(column_labels):
        x, _ = layout.origin(0, c)
        width, _ = _text_size(font, text)
        draw.text((x + max(0, (tile - width) // 2), pad), text, fill=INK, font=font)
    for r, (text, row) in enumerate(zip(row_labels, cells)):
        _, y = layout.origin(r, 0)
        _, height = _text_size(font, text)
        draw.text((pad, y + (tile - height) // 2), text, fill=INK, font=font)
        for c, image in enumerate(row):
            x, y = layout.origin(r, c)
            if image is None:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=MISSING)
                continue
            pil = Image.fromarray(_as_uint8(image)).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(pil, (x, y))
    return np.asarray(canvas)


def grid_tile(size: int) -> int:
    """The grid's cell size for images of `size` px: 3x up to 64 px (32 -> 96), else at most 256."""
    return 3 * size if size <= 64 else min(size, 256)
