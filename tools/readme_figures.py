"""Draw the README's figures from files in this repository (no model weights): ``python tools/readme_figures.py``.

docs/images/flux1-slg-calibration.png: the shipped FLUX.1 Skip-Layer-Guidance preset as CalibriPlot draws it, one
chart per ensemble member, stacked.
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


def main() -> None:
    preset = load_preset(REPO / "presets" / "flux1-dev-slg-defaults.safetensors")
    charts = plot_calibration(preset.calibration, height=300, min_width=900)
    image = np.concatenate(list(charts), axis=0)
    out = REPO / "docs" / "images" / "flux1-slg-calibration.png"
    Image.fromarray((image * 255).round().astype(np.uint8)).save(out, optimize=True)
    print(out)


if __name__ == "__main__":
    main()
