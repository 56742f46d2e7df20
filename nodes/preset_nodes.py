"""Load and save Calibri presets (``.safetensors``, see docs/preset-format.md)."""

from __future__ import annotations

import datetime
import os
import re

import folder_paths

from ..calibri_core.files import check_name_length
from ..calibri_core.host import model_layout
from ..calibri_core.layouts import import_reference_for_layout
from ..calibri_core.preset import Preset, load_preset, save_preset, tool_version
from . import booleans
from .common import CATEGORY, FOLDER, Calibri, io

booleans.register()  # "overwrite": "false" through /prompt must not read as True (see nodes/booleans.py)

_SUFFIX = ".safetensors"
_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f]')
_REFERENCE = re.compile(r"(^|[/\\])cmaes_step_\d+\.json$")  # the reference's checkpoint names


def preset_choices() -> list[str]:
    """Presets and reference checkpoints in the calibri folders (other JSON files are not calibrations)."""
    return [name for name in folder_paths.get_filename_list(FOLDER)
            if name.endswith(_SUFFIX) or _REFERENCE.search(name)]


class CalibriLoadPreset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibriLoadPreset",
            display_name="Calibri Load Preset",
            category=CATEGORY,
            description="Loads a saved calibration, a tuned set of strengths for the model's blocks that changes how "
                        "it draws once applied. Load a Calibri calibration (arXiv 2603.24800) from "
                        "ComfyUI/models/calibri/ or the pack's presets/ folder. Connect it to CalibriApply (one "
                        "member) or the ensemble nodes. The authors' checkpoints (cmaes_step_NNNN.json) load directly "
                        "when the model is connected: their pipeline and granularity are read from the file and the "
                        "model.",
            inputs=[io.Combo.Input("preset", options=preset_choices(),
                                   tooltip="A .safetensors preset in models/calibri/ (or a folder named "
                                           "'calibri' in extra_model_paths.yaml) or the pack's presets/, or a "
                                           "reference checkpoint cmaes_step_NNNN.json placed there."),
                    io.Model.Input("model", optional=True,
                                   tooltip="Needed only for a cmaes_step_NNNN.json: the model it was searched "
                                           "for, whose layout says how to read the file's flat vector.")],
            outputs=[Calibri.Output(display_name="calibration",
                                   tooltip="A CALIBRI value: the scales plus the block counts of the model they "
                                           "fit; connect it to CalibriApply, the ensemble nodes, Save or Plot.")],
        )

    @classmethod
    def validate_inputs(cls, preset: str) -> bool | str:
        if preset not in preset_choices():
            folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
            return f"preset {preset!r} is not in any calibri folder ({folders}); put the .safetensors file there."
        return True

    @classmethod
    def fingerprint_inputs(cls, preset: str, model=None):
        path = folder_paths.get_full_path(FOLDER, preset)
        return (path, os.path.getmtime(path)) if path else preset  # an edited file is read again

    @classmethod
    def execute(cls, preset: str, model=None) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, preset)
        if path is None:
            raise ValueError(f"Calibri: preset {preset!r} was not found in any calibri folder "
                             f"({', '.join(folder_paths.get_folder_paths(FOLDER))}). Put the .safetensors file "
                             f"there and refresh, or save one with CalibriSavePreset.")
        if not path.endswith(_SUFFIX):
            if model is None:
                raise ValueError(f"Calibri: {preset!r} is a reference checkpoint; connect the model it was searched "
                                 f"for to CalibriLoadPreset's model input so its flat vector can be read, or "
                                 f"convert it with `python -m calibri_core.preset import {preset} --pipeline ... "
                                 f"--granularity ...`.")
            return io.NodeOutput(import_reference_for_layout(path, model_layout(model)[1]))
        return io.NodeOutput(load_preset(path))


def preset_filename(filename: str) -> str:
    """``filename`` as a bare ``<name>.safetensors``; raises ValueError for paths and odd characters."""
    name = filename.strip() if isinstance(filename, str) else ""
    if name.endswith(_SUFFIX):
        name = name[:-len(_SUFFIX)]
    if (not name or name.startswith(".") or "/" in name or "\\" in name or ".." in name or _BAD_CHARS.search(name)
            or not name.isprintable()):  # control characters, lone surrogates (no UTF-8 name on disk)
        raise ValueError(f"Calibri: {filename!r} is not a valid preset name. Give a plain file name such as "
                         f"'flux-dev-hpsv3' (no folders, '..', leading '.', control characters or any of <>:\"|?*); "
                         f"the file is written to models/calibri/<name>{_SUFFIX}.")
    return name + _SUFFIX


class CalibriSavePreset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibriSavePreset",
            display_name="Calibri Save Preset",
            category=CATEGORY,
            description="Saves a calibration to a file so it can be loaded again; it changes no image. Save a "
                        "calibration as models/calibri/<filename>.safetensors (the first calibri folder), so "
                        "CalibriLoadPreset lists it. Keeps the calibration's provenance and adds the tool version and "
                        "date. Never overwrites unless asked.",
            inputs=[
                Calibri.Input("calibration", tooltip="The calibration to save (from Manual, Combine or Load)."),
                io.String.Input("filename", default="calibri-preset",
                                tooltip="File name without folders; .safetensors is added."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing preset of that name. Off: an existing file is an "
                                         "error."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename: str = "calibri-preset") -> bool | str:
        try:
            # the file system's name limit is checked here, at submission, not first met when the file is written
            check_name_length(os.path.join(folder_paths.get_folder_paths(FOLDER)[0], preset_filename(filename)))
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, calibration: Preset, filename: str, overwrite: bool = False) -> io.NodeOutput:
        if not isinstance(overwrite, bool):
            raise ValueError(f"Calibri: overwrite must be true or false; got {overwrite!r:.40}. Nothing was saved.")
        folder = folder_paths.get_folder_paths(FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        saved = {"tool": "Calibri for ComfyUI (CalibriSavePreset)", "tool_version": tool_version(),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        provenance = dict(calibration.provenance, saved=saved)
        provenance.setdefault("tool_version", saved["tool_version"])
        path = save_preset(os.path.join(folder, preset_filename(filename)),
                           Preset(calibration.calibration, calibration.counts, provenance), overwrite=overwrite)
        return io.NodeOutput(ui={"text": [f"Calibri: saved {path}"]})
