"""The sampling schedule of a search: the one a ComfyUI workflow of the family uses at the image size.

``sampling.schedule = "workflow"`` (the default) applies the family table's ``schedule`` (``calibri_core.families``)
by running that ComfyUI node itself — ``ModelSamplingFlux`` with the image size for FLUX.1 and Qwen-Image (the
reference's diffusers dynamic shift), ``ModelSamplingAuraFlow`` / ``ModelSamplingSD3`` with the template's shift,
``Flux2Scheduler`` for FLUX.2 — so the search samples on exactly the sigmas a user's graph with that node gets.
``"model"`` keeps the model's own ``model_sampling`` (a graph without a sampling node). The resolved schedule
(node, inputs, the resulting shift and sigmas) is recorded in every preset the search writes.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import torch

SCHEDULES = ("workflow", "model")


def _node_class(path: str) -> Any:
    module, name = path.rsplit(":", 1)
    return getattr(importlib.import_module(module), name)


def _returns_sigmas(node: Any) -> bool:
    """Whether a ComfyUI node class (old-style or V3) outputs SIGMAS alone, rather than a patched MODEL."""
    if hasattr(node, "RETURN_TYPES"):
        return tuple(node.RETURN_TYPES) == ("SIGMAS",)
    return [getattr(o, "io_type", None) for o in node.define_schema().outputs] == ["SIGMAS"]


def _run_node(node: Any, **inputs: Any) -> tuple:
    """Run a ComfyUI node class, old-style (FUNCTION) or V3 (``execute``); its outputs."""
    if hasattr(node, "FUNCTION"):
        return tuple(getattr(node(), node.FUNCTION)(**inputs))
    return tuple(node.execute(**inputs).result)


def _shift_of(model_sampling: Any) -> Optional[float]:
    shift = getattr(model_sampling, "shift", None)
    return None if shift is None else float(shift)


def _sampling_name(model_sampling: Any) -> str:
    """ComfyUI builds model_sampling as a local class over (sampling, prediction type): name the sampling base."""
    return type(model_sampling).__bases__[0].__name__


class SamplingSchedule:
    """The model to sample and the sigmas to sample it on, for one family, schedule mode and image size.

    Args:
        model: the ComfyUI ModelPatcher the search samples (not changed: a node that patches it returns a clone).
        family: its ``calibri_core.families.Family``.
        mode: ``"workflow"`` or ``"model"`` (see the module docstring).
        width, height: the image size, for resolution-dependent nodes.
    """

    def __init__(self, model: Any, family: Any, mode: str, width: int, height: int):
        if mode not in SCHEDULES:
            raise ValueError(f"Calibri: sampling.schedule must be one of {', '.join(SCHEDULES)}; got {mode!r}.")
        self.mode = mode
        self.spec = family.schedule if mode == "workflow" else None
        self.model = model
        self._sigmas_node: Any = None  # the node class, where the schedule's node gives the sigmas itself
        self.inputs: dict = {}
        if self.spec is not None:
            self.inputs = dict(self.spec.inputs, **({"width": int(width), "height": int(height)}
                                                    if self.spec.resolution else {}))
            node = _node_class(self.spec.node)
            if _returns_sigmas(node):
                self._sigmas_node = node
            else:
                self.model = _run_node(node, model=model, **self.inputs)[0]

    def sigmas(self, scheduler: str, steps: int) -> torch.Tensor:
        """The sigmas of ``steps`` steps: the sigmas node's, or ComfyUI's ``scheduler`` on the model's sampling."""
        if self._sigmas_node is not None:
            return _run_node(self._sigmas_node, steps=int(steps), **self.inputs)[0].float()
        import comfy.samplers

        return comfy.samplers.calculate_sigmas(self.model.get_model_object("model_sampling"), scheduler, int(steps))

    def record(self, scheduler: str, steps: int) -> dict:
        """What a preset's provenance stores: which schedule, set by which node with which inputs, and its sigmas."""
        sampling = self.model.get_model_object("model_sampling")
        return {"mode": self.mode,
               "node": self.spec.node_name if self.spec is not None else None,
               "inputs": dict(self.inputs),
               "source": self.spec.source if self.spec is not None else "the model's own model_sampling",
               "model_sampling": _sampling_name(sampling), "shift": _shift_of(sampling),
               "scheduler": scheduler if self._sigmas_node is None else self.spec.node_name,
               "sigmas": [round(float(s), 6) for s in self.sigmas(scheduler, steps)]}
