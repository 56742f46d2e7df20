"""Calibri for ComfyUI: calibrated gate scales for DiT blocks (arXiv 2603.24800).

ComfyUI loads this folder as a custom node pack and calls ``comfy_entrypoint``. The entry point exists only when
ComfyUI itself is importable, so importing the package anywhere else (tests, the search script) does nothing.
The node classes live in ``nodes/`` as ``NODE_CLASSES``. This file must never define ``NODE_CLASS_MAPPINGS``:
ComfyUI's loader would then take the V1 path and ignore ``comfy_entrypoint``.
"""

import importlib.util
import os

# Served to the editor for both the V1 and V3 loaders (ComfyUI reads it before it looks for comfy_entrypoint):
# web/ hides CalibriCombine's widgets of unconnected inputs.
WEB_DIRECTORY = "./web"


def _comfy_importable() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("comfy", "comfy_api"))
    except (ImportError, ValueError):
        return False


if __package__ and _comfy_importable():
    from comfy_api.latest import ComfyExtension, io

    if os.path.isfile(os.path.join(os.path.dirname(__file__), "nodes", "__init__.py")):
        # Imported here, not inside the entry point: ComfyUI reports an error raised at import time as
        # IMPORT FAILED, but only logs a warning for one raised inside comfy_entrypoint.
        from . import nodes as _nodes

        _NODE_CLASSES = list(getattr(_nodes, "NODE_CLASSES", []))
    else:
        _NODE_CLASSES = []

    class CalibriExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(_NODE_CLASSES)

    async def comfy_entrypoint() -> CalibriExtension:
        return CalibriExtension()
