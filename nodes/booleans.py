"""BOOLEAN inputs of Calibri nodes take only JSON ``true`` / ``false`` through ComfyUI's API.

ComfyUI validates a prompt by converting each BOOLEAN widget value with ``bool()`` before any node code sees it
(``execution.validate_inputs``), so ``"overwrite": "false"`` in a POST /prompt arrives as True and replaces a
preset (issue 10). The raw value exists only in the prompt's JSON, so an ``on_prompt`` handler looks at it first:
a Calibri BOOLEAN input that holds anything but a JSON boolean (or a link) is swapped for a ``_NotABoolean``, a
``str`` whose ``bool()`` raises, and ComfyUI's own conversion then refuses the prompt with our message (HTTP 400).
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("calibri")


class _NotABoolean(str):
    """The JSON text of a value given for a BOOLEAN input; ``bool()`` of it raises a ValueError that explains."""

    input_name = ""

    def __bool__(self) -> bool:
        raise ValueError(f"Calibri: {self.input_name!r} must be JSON true or false; got {str(self)}. A string such as "
                         f"\"false\" would read as true; send a real boolean.")


def _boolean_inputs(node_class) -> list[str]:
    try:
        declared = node_class.INPUT_TYPES()
    except Exception:  # a node that cannot describe itself is ComfyUI's to report
        return []
    return [name for section in ("required", "optional") for name, spec in declared.get(section, {}).items()
            if isinstance(spec, (list, tuple)) and spec and spec[0] == "BOOLEAN"]


def refuse_non_booleans(json_data: dict) -> dict:
    """The ``on_prompt`` handler: mark every non-boolean value of a Calibri BOOLEAN input (see the module doc)."""
    import nodes as comfy_nodes  # ComfyUI's nodes.py: the host is first on sys.path

    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    for node in prompt.values():
        if not isinstance(node, dict) or not str(node.get("class_type", "")).startswith("Calibri"):
            continue
        node_class = comfy_nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        inputs = node.get("inputs")
        if node_class is None or not isinstance(inputs, dict):
            continue
        for name in _boolean_inputs(node_class):
            value = inputs.get(name)
            raw = value["__value__"] if isinstance(value, dict) and "__value__" in value else value
            if name not in inputs or isinstance(raw, (bool, list)):  # a real boolean, or a link to another node
                continue
            marked = _NotABoolean(json.dumps(raw)[:200])
            marked.input_name = name
            inputs[name] = marked
    return json_data


def register() -> None:
    """Install the handler on the running server (none exists when the pack is imported outside a server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None or refuse_non_booleans in getattr(server, "on_prompt_handlers", ()):
        return
    server.add_on_prompt_handler(refuse_non_booleans)
    log.debug("Calibri: BOOLEAN inputs take only JSON booleans through /prompt")
