"""Thumbnails for the example workflows: a drawing of the workflow's own graph (issue 12).

ComfyUI's Templates browser shows ``example_workflows/<name>.jpg`` as the card image of ``<name>.json``. These
images must never look like a model's output, so they are diagrams: every node as a box at its saved position
(Calibri's nodes highlighted), every link as a line coloured by its type, and the workflow's title. Regenerate
them after editing a workflow (``tests/test_templates.py`` fails while one is stale)::

    python -m calibri_core.workflow_diagram example_workflows

Drawn with Pillow's default font only. This module is pure: no torch, no ComfyUI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from .plot import _font

SIZE = (512, 384)           # the Templates card's 4:3 image
BACKGROUND = (32, 33, 38)
TITLE_INK = (235, 235, 235)
NODE_FILL = (62, 64, 72)
NODE_EDGE = (110, 112, 122)
CALIBRI_FILL = (38, 92, 160)
CALIBRI_EDGE = (120, 180, 250)
NOTE_FILL = (92, 84, 46)
NODE_INK = (240, 240, 240)
# Link colours close to the frontend's defaults, so the diagram reads like the canvas.
LINK_COLOURS = {"MODEL": (180, 160, 255), "CLIP": (255, 210, 60), "VAE": (255, 110, 110),
                "CONDITIONING": (255, 170, 80), "LATENT": (255, 150, 220), "IMAGE": (100, 180, 255),
                "CALIBRI": (120, 220, 160), "GUIDER": (100, 220, 220)}
OTHER_LINK = (170, 170, 170)
NOTE_TYPES = {"Note", "MarkdownNote"}
TITLE_HEIGHT = 30           # the frontend draws a node's title bar above its saved position
HEADER = 56                 # pixels above the graph for the workflow's title
# The card shows the image at about half size and its own caption is the file name, so the title is the one
# readable name a card has: drawn as large as fits.
TITLE_SIZES = (28, 24, 20, 17)


def _label(node: dict) -> str:
    if node["type"] in NOTE_TYPES:
        return "note"
    return node.get("title") or node["type"]


def render_workflow_diagram(workflow: dict, size: tuple[int, int] = SIZE) -> Image.Image:
    """Draw ``workflow`` (ComfyUI's UI JSON) as boxes and links on a dark card.

    Args:
        workflow: the workflow JSON (``nodes`` with ``pos``/``size``/``type``, ``links``, ``extra``).
        size: image size in pixels.

    Returns:
        an RGB image.
    """
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    title = (workflow.get("extra") or {}).get("calibri_title") or "Calibri workflow"
    title = title.replace("Calibri - ", "Calibri: ")
    title_font = next((_font(size) for size in TITLE_SIZES if draw.textlength(title, font=_font(size)) <= width - 28),
                      _font(TITLE_SIZES[-1]))
    draw.text((14, 8), title, fill=TITLE_INK, font=title_font)
    draw.text((14, HEADER - 15), "workflow diagram", fill=NODE_EDGE, font=_font(11))
    nodes = {node["id"]: node for node in workflow["nodes"]}
    x0 = min(n["pos"][0] for n in nodes.values())
    y0 = min(n["pos"][1] - TITLE_HEIGHT for n in nodes.values())
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    margin = 12
    scale = min((width - 2 * margin) / (x1 - x0), (height - HEADER - 2 * margin) / (y1 - y0))
    # centred in the space under the title
    pad_x = margin + ((width - 2 * margin) - (x1 - x0) * scale) / 2
    pad_y = HEADER + margin + ((height - HEADER - 2 * margin) - (y1 - y0) * scale) / 2

    def box(node: dict) -> tuple[float, float, float, float]:
        left = pad_x + (node["pos"][0] - x0) * scale
        top = pad_y + (node["pos"][1] - TITLE_HEIGHT - y0) * scale
        return left, top, left + node["size"][0] * scale, top + (node["size"][1] + TITLE_HEIGHT) * scale

    for link_id, origin, _o_slot, target, _t_slot, type_ in workflow["links"]:
        if origin not in nodes or target not in nodes:
            continue
        a, b = box(nodes[origin]), box(nodes[target])
        start, end = (a[2], a[1] + 0.35 * (a[3] - a[1])), (b[0], b[1] + 0.35 * (b[3] - b[1]))
        draw.line([start, end], fill=LINK_COLOURS.get(type_, OTHER_LINK), width=2)
    font = _font(max(8, min(13, int(22 * scale))))
    for node in nodes.values():
        left, top, right, bottom = box(node)
        calibri = node["type"].startswith("Calibri")
        fill = CALIBRI_FILL if calibri else NOTE_FILL if node["type"] in NOTE_TYPES else NODE_FILL
        draw.rounded_rectangle((left, top, right, bottom), radius=4, fill=fill,
                               outline=CALIBRI_EDGE if calibri else NODE_EDGE, width=2 if calibri else 1)
        label = _label(node)
        while label and draw.textlength(label, font=font) > right - left - 6:
            label = label[:-1]
        draw.text((left + 4, top + 3), label, fill=NODE_INK, font=font)
    return image


def write_thumbnails(folder: Path) -> list[Path]:
    """Write ``<name>.jpg`` beside every ``<name>.json`` workflow in ``folder``; returns the paths written."""
    written = []
    for path in sorted(Path(folder).glob("*.json")):
        workflow = json.loads(path.read_text(encoding="utf-8"))
        target = path.with_suffix(".jpg")
        render_workflow_diagram(workflow).save(target, quality=90)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibri_core.workflow_diagram", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a folder of ComfyUI UI-format workflow .json files")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    for path in write_thumbnails(args.folder):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
