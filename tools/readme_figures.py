"""Draw the README's figures from files in this repository (no model weights): ``python tools/readme_figures.py``.

docs/images/flux1-slg-calibration.png: the shipped FLUX.1 Skip-Layer-Guidance preset as CalibriPlot draws it, one
chart per ensemble member, stacked. With ``--demo-loss CSV``: docs/images/demo-loss.png, the demo model's training
loss (the CSV tools/demo_train.py writes), raw and as a moving average.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))  # after the script's own folder, never before a ComfyUI host

from calibri_core.plot import plot_calibration  # noqa: E402
from calibri_core.preset import load_preset  # noqa: E402


def demo_loss(csv_path: Path) -> Path:
    import csv

    from search.outputs import line_plot

    with open(csv_path, newline="") as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    steps, losses = [s for s, _ in rows], [v for _, v in rows]
    window = 8
    smooth = [float(np.mean(losses[max(0, i - window + 1):i + 1])) for i in range(len(losses))]
    out = REPO / "docs" / "images" / "demo-loss.png"
    line_plot(str(out), "demo model: flow-matching loss (velocity MSE), batch 64", {
        "loss (every 25th step)": (steps, losses), f"mean of {window} points": (steps, smooth)}, x_label="step")
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--demo-loss":
        print(demo_loss(Path(sys.argv[2])))
        return
    preset = load_preset(REPO / "presets" / "flux1-dev-slg-defaults.safetensors")
    charts = plot_calibration(preset.calibration, height=300, min_width=900)
    image = np.concatenate(list(charts), axis=0)
    out = REPO / "docs" / "images" / "flux1-slg-calibration.png"
    Image.fromarray((image * 255).round().astype(np.uint8)).save(out, optimize=True)
    print(out)


if __name__ == "__main__":
    main()
