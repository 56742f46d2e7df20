"""Calibri's ComfyUI nodes (V3). ``NODE_CLASSES`` is what the pack's entry point registers.

Imported only as part of the pack (``from . import nodes`` in the root ``__init__.py``), so everything
here uses relative imports: a top-level ``nodes`` is ComfyUI's own ``nodes.py``.
"""

from .apply_nodes import CalibriApply, CalibriEnsemble, CalibriEnsembleGuider
from .build_nodes import CalibriCombine, CalibriManual, CalibriPlot
from .common import register_folder
from .preset_nodes import CalibriLoadPreset, CalibriSavePreset
from .sweep_nodes import CalibriSweep

register_folder()

NODE_CLASSES = [
    CalibriLoadPreset,
    CalibriApply,
    CalibriManual,
    CalibriCombine,
    CalibriEnsembleGuider,
    CalibriEnsemble,
    CalibriSavePreset,
    CalibriPlot,
    CalibriSweep,
]
