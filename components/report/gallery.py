"""Pictures of many small images, each under its caption: one sheet of pixels on one Axes.

A grid of matplotlib Axes, one per image, draws each one's frame, ticks and title machinery: that
was most of the time of augment's preview and evaluate's gallery of mistakes. Here the images are
laid side by side in one array, each enlarged by a whole factor (so that every cell keeps the
image's aspect to within a pixel however the Axes is shaped) and drawn once; the captions are text
on the same Axes, in a band above each image.

Reads and writes nothing: it draws on the Axes it is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

MIN_CELL_PX = 64  # images are enlarged to at least this many sheet pixels a side
GAP = 0.08  # between neighbouring images, as a share of a cell's width


def draw(ax: Any, images: Sequence[np.ndarray | None], captions: Sequence[tuple[str, dict]],
         cols: int, caption_inches: float) -> None:
    """`images` (H×W×C uint8, one shape; None leaves a cell blank) in rows of `cols`, filling
    `ax`, each as large as its cell allows below a band of `caption_inches` for its caption
    (text, matplotlib text properties)."""
    position, (fig_w, fig_h) = ax.get_position(), ax.figure.get_size_inches()
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h = position.width * fig_w / cols, position.height * fig_h / rows  # inches
    gap = GAP * cell_w
    h, w, c = next(i for i in images if i is not None).shape
    inch = max(1e-3, min((cell_w - gap) / w, (cell_h - caption_inches - gap) / h))  # a pixel's
    k = max(1, math.ceil(MIN_CELL_PX / max(h, w)))
    ppi = k / inch  # sheet pixels per inch, the same both ways: an image pixel is k of them
    cw, ch, band = round(cell_w * ppi), round(cell_h * ppi), round(caption_inches * ppi)
    sheet = np.full((rows * ch, cols * cw, c), 255, np.uint8)
    for n, (image, (text, props)) in enumerate(zip(images, captions, strict=True)):
        if image is None:
            continue
        top = (n // cols) * ch + (ch - k * h - band) // 2 + band
        left = (n % cols) * cw + (cw - k * w) // 2
        sheet[top:top + k * h, left:left + k * w] = image.repeat(k, 0).repeat(k, 1)
        if text:
            ax.text(left + k * w / 2, top - k / 2, text, ha="center", va="bottom", **props)
    ax.imshow(sheet[..., 0] if c == 1 else sheet, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest", aspect="auto")
    ax.set_axis_off()
