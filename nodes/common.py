"""What every Calibri node shares: the one import of ComfyUI's node API, the CALIBRI socket type and the
``calibri`` model folder.

A CALIBRI value is always a ``calibri_core.preset.Preset``: the calibration plus the block counts of the
model it fits and its provenance, so that it can be checked against a model and saved without loss.
"""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..calibri_core.host import ActiveRange, model_layout
from ..calibri_core.preset import Preset

__all__ = ["io", "ui", "Calibri", "CATEGORY", "FOLDER", "PRESETS_DIR", "register_folder", "fitted", "active_range",
           "range_inputs", "check_range"]

log = logging.getLogger("calibri")

CATEGORY = "Calibri"
FOLDER = "calibri"
EXTENSIONS = (".safetensors", ".json")
PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")

Calibri = io.Custom("CALIBRI")


def register_folder() -> None:
    """Make ``models/calibri`` and the pack's ``presets/`` the ``calibri`` folder.

    ``extra_model_paths.yaml`` is applied before custom nodes load, so an entry made there is extended,
    never replaced. ``.json`` is listed too, for the reference's ``cmaes_step_NNNN.json`` checkpoints
    (CalibriLoadPreset shows only those of the JSON files).
    """
    models = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, models)
        folder_paths.add_model_folder_path(FOLDER, PRESETS_DIR)
        folder_paths.folder_names_and_paths[FOLDER][1].update(EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([models, PRESETS_DIR], set(EXTENSIONS))


def fitted(model, calibration: Preset) -> Preset:
    """``calibration`` after checking it fits ``model`` (family and block counts); errors name both."""
    if not isinstance(calibration, Preset):
        raise ValueError(f"Calibri: expected a CALIBRI value (a Calibri preset) but got {type(calibration).__name__}.")
    _, layout = model_layout(model)
    calibration.check_against(layout)
    return calibration


def range_inputs() -> list:
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Where in the sampling schedule the calibration starts acting (0 = first step)."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Where it stops acting (1 = last step). Outside the range the model runs "
                               "uncalibrated."),
    ]


def check_range(start_percent: float, end_percent: float) -> bool | str:
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not 0.0 <= value <= 1.0:
            return f"{name} ({value}) must be between 0 and 1."
    if start_percent > end_percent:
        return f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})."
    return True


def active_range(start_percent: float, end_percent: float) -> ActiveRange:
    return ActiveRange(float(start_percent), float(end_percent))
