"""Charts of a calibration's scales, one image per ensemble member (the CalibriPlot node's engine).

Each chart shows one bar per site, drawn from the identity line (scale 1) to the site's scale, with the
sites grouped by block: block groups are separated by faint lines and labelled with their container
and index range. The title names the family, granularity, member, its output weight ω (written "weight": the default
font has no Greek letters) and its prompt.
Drawn with Pillow's default font only. This module is pure: no torch, no ComfyUI.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .calibration import Calibration

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)
IDENTITY = (200, 40, 40)
# One colour per site kind (what follows the block in the name: "", "attn", "img.mlp", ...).
PALETTE = ((60, 110, 190), (230, 140, 40), (70, 160, 90), (150, 90, 180), (120, 120, 120), (190, 80, 120))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _block(site: str) -> tuple[str, int, str]:
    """``double_blocks.7.img.attn`` → (``double_blocks``, 7, ``img.attn``)."""
    parts = site.split(".")
    try:
        return parts[0], int(parts[1]), ".".join(parts[2:])
    except (IndexError, ValueError):
        return site, 0, ""


def _nice_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(min(values), 0.0), max(max(values), 2.0)
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def plot_calibration(calibration: Calibration, height: int = 384, min_width: int = 640,
                     max_width: int = 2400) -> np.ndarray:
    """Render every member of ``calibration`` as a bar chart.

    Args:
        calibration: the calibration to draw (any family, granularity and member count).
        height: image height in pixels.
        min_width, max_width: bounds on the width, which otherwise grows with the number of sites.

    Returns:
        float32 array [N, height, width, 3] in [0, 1], one chart per member (ComfyUI's IMAGE layout).
    """
    sites = calibration.sites
    width = int(min(max(120 + 8 * len(sites), min_width), max_width))
    all_values = [s for m in calibration.members for s in m.scales]
    y_lo, y_hi = _nice_range(all_values)
    return np.stack([_chart(calibration, i, width, height, y_lo, y_hi) for i in range(len(calibration.members))])


def _chart(calibration: Calibration, index: int, width: int, height: int, y_lo: float, y_hi: float) -> np.ndarray:
    member = calibration.members[index]
    sites = calibration.sites
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    title_font, font = _font(16), _font(11)
    left, right, top, bottom = 52, width - 12, 48, height - 46
    plot_w = right - left

    def y_of(value: float) -> float:
        return bottom - (value - y_lo) / (y_hi - y_lo) * (bottom - top)

    title = (f"{calibration.family} · {calibration.granularity} · member {index + 1}/{len(calibration.members)}"
             f" · weight = {member.weight:.4g} · prompt: {member.prompt}")
    draw.text((left, 8), title, fill=INK, font=title_font)

    # y grid and labels at round steps
    step = 10 ** math.floor(math.log10((y_hi - y_lo) / 2))
    while (y_hi - y_lo) / step > 8:
        step *= 2
    tick = math.ceil(y_lo / step) * step
    while tick <= y_hi:
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((4, y - 6), f"{tick:.3g}", fill=INK, font=font)
        tick += step

    kinds = list(dict.fromkeys(_block(s)[2] for s in sites))
    slot = plot_w / len(sites)
    bar = max(1.0, slot * 0.7)
    y_one = y_of(1.0)

    # block groups: separators, and one label per container with its index range
    groups: list[tuple[str, int, int, int]] = []  # container, first index, first column, last column
    previous_block = None
    for j, site in enumerate(sites):
        container, number, _ = _block(site)
        if (container, number) != previous_block:
            if j:
                x = left + j * slot
                draw.line([(x, top), (x, bottom)], fill=GRID if container == previous_block[0] else INK)
            previous_block = (container, number)
        if not groups or groups[-1][0] != container:
            groups.append((container, number, j, j))
        else:
            groups[-1] = groups[-1][:3] + (j,)
    for container, first, j0, j1 in groups:
        last = _block(sites[j1])[1]
        label = f"{container} {first}-{last}" if last != first else f"{container} {first}"
        x0, x1 = left + j0 * slot, left + (j1 + 1) * slot
        draw.line([(x0 + 1, bottom + 20), (x1 - 1, bottom + 20)], fill=INK)
        text_w = draw.textlength(label, font=font)
        draw.text(((x0 + x1 - text_w) / 2, bottom + 24), label, fill=INK, font=font)
        # a few block-index ticks inside the group
        blocks = sorted({_block(s)[1] for s in sites[j0:j1 + 1]})
        every = max(1, math.ceil(len(blocks) * 22 / max(x1 - x0, 1)))
        for number in blocks[::every]:
            j = next(k for k in range(j0, j1 + 1) if _block(sites[k])[1] == number)
            x = left + j * slot + 1
            if x + draw.textlength(str(number), font=font) < x1 - 2:
                draw.text((x, bottom + 4), str(number), fill=INK, font=font)

    for j, value in enumerate(member.scales):
        x0 = left + j * slot + (slot - bar) / 2
        colour = PALETTE[kinds.index(_block(sites[j])[2]) % len(PALETTE)]
        y = y_of(value)
        draw.rectangle([x0, min(y, y_one), x0 + bar - 1, max(y, y_one)], fill=colour)
    draw.line([(left, y_one), (right, y_one)], fill=IDENTITY, width=2)
    draw.rectangle([left, top, right, bottom], outline=INK)

    # legend: the identity line, then the site kinds when there are several
    x = left
    draw.line([(x, 36), (x + 14, 36)], fill=IDENTITY, width=2)
    draw.text((x + 18, 29), "scale 1 (identity)", fill=INK, font=font)
    x += draw.textlength("scale 1 (identity)", font=font) + 30
    if len(kinds) > 1:
        for k in kinds:
            label = k or "whole block"
            draw.rectangle([x, 31, x + 10, 41], fill=PALETTE[kinds.index(k) % len(PALETTE)])
            draw.text((x + 13, 29), label, fill=INK, font=font)
            x += draw.textlength(label, font=font) + 24
    return np.asarray(image, dtype=np.float32) / 255.0
