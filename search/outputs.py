"""What a run leaves in its run dir besides its state: presets, the JSONL log, PNG plots and image grids.

Plots are drawn with PIL only (matplotlib is not a dependency). Presets carry no wall times or absolute paths, so
a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Sequence

from calibri_core.calibration import Calibration
from calibri_core.files import write_bytes_atomic
from calibri_core.preset import Preset, save_preset, tool_version

LOG_FILE = "generations.jsonl"
BEST_PRESET = "calibri-best.safetensors"
MEAN_PRESET = "calibri-last-mean.safetensors"
FINAL_PRESETS = {"best-train": "calibri-best-train.safetensors",
                 "best-validation": "calibri-best-validation.safetensors"}  # output.final -> file name
LICENCE = ("Calibri search tool: GPL-3.0 (LICENSE of the Calibri pack); method: Calibri, arXiv 2603.24800 (reference "
           "implementation v-gen-ai/Calibri, MIT). The scales were searched on the model named here; its licence "
           "applies to their use with it.")


def write_log(run_dir: str, history: Sequence[dict]) -> None:
    """Rewrite the JSONL log from the state's history (used on resume, so no line is lost or doubled)."""
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode("utf-8")
    write_bytes_atomic(os.path.join(run_dir, LOG_FILE), data)


def append_log(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, LOG_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_preset(path: str, calibration: Calibration, counts: dict, provenance: dict) -> str:
    return save_preset(path, Preset(calibration, dict(counts), provenance), overwrite=True)


def provenance(config, model_info: dict, selection: str, statistics: dict) -> dict:
    """The preset's provenance: model, rewards, sampling, search settings and statistics, tool and licence."""
    m, s, smp = config.model, config.search, config.sampling
    model = {"name": m["name"], "family": m["family"],
             "files": {k: os.path.basename(v) for k, v in (("checkpoint", m["checkpoint"]),
                                                           ("diffusion_model", m["diffusion_model"]),
                                                           ("vae", m["vae"])) if v}}
    if m["text_encoders"]:
        model["files"]["text_encoders"] = [os.path.basename(t) for t in m["text_encoders"]]
    model_info = dict(model_info)
    schedule = model_info.pop("schedule", None)  # the evaluator's resolved sampling schedule (search.schedule)
    for k, v in model_info.items():  # e.g. sha256; local paths are reduced to file names
        if k in model or v is None:
            continue
        if isinstance(v, str) and os.path.isabs(v):
            v = os.path.basename(v)
        elif isinstance(v, list) and all(isinstance(t, str) for t in v):
            v = [os.path.basename(t) if os.path.isabs(t) else t for t in v]
        model[k] = v
    hashes = config.to_dict()["prompt_hashes"]
    return {
        "source": "calibri-search",
        "tool": "search",
        "tool_version": tool_version(),
        "licence": LICENCE,
        "selection": selection,
        "model": model,
        "rewards": config.rewards,
        "steps": smp["steps"], "cfg": smp["cfg"], "guidance": smp["guidance"],
        "sampler": smp["sampler"], "scheduler": smp["scheduler"], "schedule": schedule,
        "resolution": [smp["width"], smp["height"]],
        "negative_prompt": smp["negative_prompt"],
        "search": {
            "optimizer": "CMA-ES (pycma)",
            "granularity": s["granularity"], "seed": s["seed"], "sigma0": s["sigma0"],
            "scale_bounds": s["scale_bounds"], "weight_bounds": s["weight_bounds"],
            "bucket_size": s["bucket_size"], "val_every": s["val_every"], "val_seed": s["val_seed"],
            "vector_order": "member 1 scales (sites in model order), ..., member N scales, then ω_1..ω_N",
            "x0": "identity scales, ω from the config (injected in generation 1)",
            "train_prompts": {"count": len(config.train_prompts), "sha256": hashes["train"]},
            "validation_prompts": {"count": len(config.val_prompts), "sha256": hashes["validation"]},
        },
        "statistics": statistics,
    }


# Plots (PIL).
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def line_plot(path: str, title: str, series: dict[str, tuple[list[float], list[float]]], log_y: bool = False,
              x_label: str = "generation") -> None:
    """A small line chart (one colour per series) as PNG; non-finite points are skipped."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 720, 400, 70, 20, 30, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")

    def tr(v: float) -> float:
        return math.log10(v) if log_y else v

    pts = [(x, tr(y)) for xs, ys in series.values() for x, y in zip(xs, ys)
           if math.isfinite(y) and (y > 0 or not log_y)]
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        x1 = x1 if x1 > x0 else x0 + 1
        if y1 <= y0:
            y0, y1 = y0 - 0.5, y1 + 0.5

        def px(x: float, y: float) -> tuple[float, float]:
            return (left + (x - x0) / (x1 - x0) * (w - left - right),
                    h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

        for label, y in (("max", y1), ("min", y0)):
            d.text((4, px(x0, y)[1] - 6), _fmt(10 ** y if log_y else y), fill="black")
        d.text((left, h - bottom + 6), _fmt(x0), fill="black")
        d.text((w - right - 40, h - bottom + 6), _fmt(x1), fill="black")
        d.text((w // 2 - 30, h - bottom + 20), x_label, fill="black")
        for k, (name, (xs, ys)) in enumerate(series.items()):
            colour = _COLOURS[k % len(_COLOURS)]
            line = [px(x, tr(y)) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log_y)]
            if len(line) > 1:
                d.line(line, fill=colour, width=2)
            for p in line if len(line) < 60 else []:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
            d.text((left + 10 + 130 * k, top + 6), name, fill=colour)
    _save_png(img, path)


def heatmap(path: str, calibration: Calibration, bounds: tuple[float, float]) -> None:
    """Scales per site (columns, model order) and member (rows): blue < 1 < red, white = 1 (identity)."""
    from PIL import Image, ImageDraw

    sites = calibration.sites
    cell = max(4, min(24, 960 // max(1, len(sites))))
    rows = len(calibration.members)
    left, top = 90, 30
    w, h = left + cell * len(sites) + 10, top + 28 * rows + 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 8), f"{calibration.family} {calibration.granularity} scales (blue<1<red; range "
                   f"{bounds[0]}..{bounds[1]})", fill="black")
    lo, hi = bounds
    for r, member in enumerate(calibration.members):
        d.text((4, top + 28 * r + 8), f"m{r + 1} {member.prompt[:3]} ω={member.weight:.3g}", fill="black")
        for c, s in enumerate(member.scales):
            if s >= 1:
                t = min(1.0, (s - 1) / max(hi - 1, 1e-9))
                colour = (255, int(255 * (1 - t)), int(255 * (1 - t)))
            else:
                t = min(1.0, (1 - s) / max(1 - lo, 1e-9))
                colour = (int(255 * (1 - t)), int(255 * (1 - t)), 255)
            d.rectangle([left + c * cell, top + 28 * r, left + (c + 1) * cell - 1, top + 28 * r + 24], fill=colour)
    d.text((left, top + 28 * rows + 6), f"{sites[0]} ... {sites[-1]} ({len(sites)} sites)", fill="black")
    _save_png(img, path)


GRID_MIN_CELL = 256  # px on an image's short side in a grid; smoke runs decode 8×8 latents into 8×8 images


def label_font(cell: int):
    """The grid's label font: PIL's own (no font file needed), sized to the cells where PIL can scale it."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(16, min(48, cell // 16)))
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        return ImageFont.load_default()


def image_grid(path: str, rows: dict[str, "object"], min_cell: int = GRID_MIN_CELL) -> None:
    """Rows of images ([B,H,W,3] float tensors in [0, 1]), each under its label (e.g. baseline / best).

    Images whose short side is under ``min_cell`` px are scaled up by a whole factor with nearest neighbour, so
    every source pixel becomes a sharp square and nothing is smoothed in that the model did not draw. The label
    strips are as tall as the text and the grid at least as wide as the longest label, so no label is clipped.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    arrays = {k: (np.clip(np.asarray(v.detach().cpu().float() if hasattr(v, "detach") else v), 0, 1) * 255)
              .round().astype("uint8") for k, v in rows.items()}
    b, hh, ww = next(iter(arrays.values())).shape[:3]
    factor = max(1, math.ceil(min_cell / max(1, min(hh, ww))))
    ch, cw = hh * factor, ww * factor
    font = label_font(min(ch, cw))
    pad = 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((pad, pad), name, font=font) for name in arrays]
    label = max(box[3] for box in boxes) + pad
    width = max(cw * max(a.shape[0] for a in arrays.values()), max(box[2] for box in boxes) + pad)
    img = Image.new("RGB", (width, (ch + label) * len(arrays)), "white")
    d = ImageDraw.Draw(img)
    for r, (name, arr) in enumerate(arrays.items()):
        top = r * (ch + label)
        d.text((pad, top + pad), name, fill="black", font=font)
        for c in range(arr.shape[0]):
            tile = Image.fromarray(arr[c])
            if factor > 1:
                tile = tile.resize((cw, ch), Image.Resampling.NEAREST)
            img.paste(tile, (c * cw, top + label))
    _save_png(img, path)


def _save_png(img, path: str) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
