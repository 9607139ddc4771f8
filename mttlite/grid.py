"""The picture of a synthetic set: one row per class, one column per image of that class.

A distilled set is small enough to look at whole. The picture puts class r's images in row r, in
the set's storage order, each upscaled by an integer factor s (nearest neighbour: every pixel
becomes an s × s block, nothing is smoothed), with the class names in a column at the left::

    rows = K classes, cols = ipc (images per class), tiles of s·H × s·W pixels, pad px apart

    width  = label_width + cols · s·W + (cols + 1) · pad
    height =               rows · s·H + (rows + 1) · pad
    cell (r, c) starts at x = label_width + pad + c · (s·W + pad),  y = pad + r · (s·H + pad)

A pixel p ∈ [0, 1] is stored as the byte ⌊255 p + 0.5⌋ (torchvision's ``save_image`` rounding).
The default s makes the longer image side at least ``MIN_TILE`` = 112 px (×4 for 28 × 28), unless
the picture would then exceed ``MAX_SIDE`` px, where s shrinks (never below 1). Class names are
drawn with Pillow's default font; they are also stored in the PNG's text chunk ``class_names``
(JSON), so a program reading the file gets them without reading pixels. A class with fewer than
``ipc`` images leaves its last cells empty (background).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .io import atomic_write

#: The default upscaling makes the longer side of each image at least this many pixels.
MIN_TILE = 112
#: ... unless the whole picture would then be longer than this on its longer side.
MAX_SIDE = 4096
#: Pixels between tiles (and around them).
PAD = 2
#: Background and text colours (grey levels).
BACKGROUND, INK = 255, 0
#: Left margin of the class names, and the longest name drawn (longer ones end in "..").
LABEL_MARGIN, MAX_LABEL_CHARS = 4, 24


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes in the picture (module docstring's formulas)."""

    rows: int  # K classes
    cols: int  # images per class
    h: int  # image height H
    w: int  # image width W
    scale: int  # s
    pad: int = PAD
    label_width: int = 0  # the class-name column (0: no names drawn)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        s, p = self.scale, self.pad
        return (self.label_width + self.cols * s * self.w + (self.cols + 1) * p,
                self.rows * s * self.h + (self.rows + 1) * p)

    def cell(self, r: int, c: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of row r, column c."""
        s, p = self.scale, self.pad
        return self.label_width + p + c * (s * self.w + p), p + r * (s * self.h + p)


def auto_scale(rows: int, cols: int, h: int, w: int, label_width: int = 0, pad: int = PAD) -> int:
    """s = ⌈MIN_TILE / max(H, W)⌉, lowered (to at least 1) until the longer side of the picture ≤ MAX_SIDE."""
    s = max(1, math.ceil(MIN_TILE / max(h, w)))
    while s > 1 and max(GridLayout(rows, cols, h, w, s, pad, label_width).size) > MAX_SIDE:
        s -= 1
    return s


def by_class(labels: Tensor, num_classes: int) -> list[list[int]]:
    """Row r of the picture: the indices of class r's images, in storage order. labels: (n,) int."""
    rows: list[list[int]] = [[] for _ in range(num_classes)]
    for i, c in enumerate(labels.tolist()):
        rows[int(c)].append(i)
    return rows


def to_bytes(pixels: Tensor) -> np.ndarray:
    """(n, C, H, W) pixels in [0, 1] → (n, H, W, C) uint8, b = ⌊255 p + 0.5⌋ (clamped to 0 … 255)."""
    b = (pixels.detach().float().cpu() * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8)
    return b.permute(0, 2, 3, 1).numpy()


def _label(name: str) -> str:
    """A class name as drawn: at most MAX_LABEL_CHARS characters, latin-1 (what every Pillow font can draw)."""
    if len(name) > MAX_LABEL_CHARS:
        name = name[: MAX_LABEL_CHARS - 2] + ".."
    return name.encode("latin-1", "replace").decode("latin-1")


def default_font(size: int):
    """Pillow's default font at ``size`` px (a scalable one on Pillow ≥ 10.1 with FreeType, else its
    fixed bitmap font); None when Pillow can give none (names are then not drawn)."""
    try:
        from PIL import ImageFont
    except ImportError:
        return None
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or built without FreeType
        try:
            return ImageFont.load_default()
        except OSError:
            return None


def render(pixels: Tensor, labels: Tensor, class_names: list[str], scale: int | None = None,
           names: bool = True):
    """The picture as a PIL image ("L" for one channel, "RGB" for three).

    pixels: (n, C, H, W) in [0, 1], C ∈ {1, 3}; labels: (n,) int64 class indices in [0, K);
    class_names: K names; scale: s (None: ``auto_scale``); names: draw the class names.
    """
    from PIL import Image, ImageDraw

    n, C, H, W = pixels.shape
    if C not in (1, 3):
        raise ValueError(f"a picture needs images with 1 or 3 channels, got C = {C}")
    K = len(class_names)
    rows = by_class(labels, K)
    cols = max(1, max((len(r) for r in rows), default=1))
    texts = [_label(c) for c in class_names]
    font = default_font(max(8, min(16, (scale or auto_scale(K, cols, H, W)) * H // 2))) if names else None
    label_width = 0
    if font is not None:
        label_width = 2 * LABEL_MARGIN + max(int(math.ceil(font.getbbox(t)[2])) for t in texts)
    if scale is None:
        scale = auto_scale(K, cols, H, W, label_width)
    if not (isinstance(scale, int) and scale >= 1):
        raise ValueError(f"scale must be an integer >= 1 (None: automatic), got {scale!r}")
    layout = GridLayout(K, cols, H, W, scale, PAD, label_width)
    width, height = layout.size
    canvas = np.full((height, width, C), BACKGROUND, dtype=np.uint8)
    b = to_bytes(pixels)
    for r, members in enumerate(rows):
        for c, i in enumerate(members):
            x, y = layout.cell(r, c)
            canvas[y:y + scale * H, x:x + scale * W] = b[i].repeat(scale, 0).repeat(scale, 1)  # nearest
    image = Image.fromarray(np.ascontiguousarray(canvas[..., 0]) if C == 1 else canvas)  # "L" or "RGB"
    if font is not None:
        draw, ink = ImageDraw.Draw(image), INK if C == 1 else (INK,) * 3
        for r, text in enumerate(texts):
            top, bottom = font.getbbox(text)[1::2]
            _, y = layout.cell(r, 0)
            draw.text((LABEL_MARGIN, y + (scale * H - (bottom + top)) // 2), text, fill=ink, font=font)
    return image


def png_bytes(pixels: Tensor, labels: Tensor, class_names: list[str], scale: int | None = None,
              names: bool = True) -> bytes:
    """The picture as PNG bytes; the class names are also in its text chunk ``class_names`` (JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("class_names", json.dumps(list(class_names)))
    buf = io.BytesIO()
    render(pixels, labels, class_names, scale, names).save(buf, format="png", pnginfo=info)
    return buf.getvalue()


def save_png(path, pixels: Tensor, labels: Tensor, class_names: list[str], scale: int | None = None,
             names: bool = True) -> Path:
    """Write the picture to ``path`` atomically (``io.atomic_write``)."""
    data = png_bytes(pixels, labels, class_names, scale, names)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
