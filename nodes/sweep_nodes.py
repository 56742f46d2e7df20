"""The paper's motivation experiment in one node: a list of MODELs, each with one site bypassed or scaled."""

from __future__ import annotations

from ..calibri_core.host import apply_calibration, model_layout
from ..calibri_core.sites import GRANULARITIES
from ..calibri_core.sweep import sweep
from .common import CATEGORY, io


class CalibriSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibriSweep",
            display_name="Calibri Sweep (one site at a time)",
            category=CATEGORY,
            description="Draws the same image once unchanged and once per model block with that block switched off "
                        "(or turned down), so you can see what each block does. The paper's motivation experiment "
                        "(arXiv 2603.24800 §3.1): a list of MODELs, first the model unchanged, then one per block (or "
                        "layer/gate site) with only that site's gate scaled by `scale` (0 = bypassed). Connect it to "
                        "one KSampler: ComfyUI runs the sampler once per list entry, and the labels name each image.",
            inputs=[
                io.Model.Input("model", tooltip="A DiT model of a supported family (FLUX, SD3, Qwen-Image, ...)."),
                io.Combo.Input("granularity", options=list(GRANULARITIES), default="block",
                               tooltip="block: one entry per block (double_blocks.7); layer: per block and branch "
                                       "(double_blocks.7.attn); gate: per stream too (double_blocks.7.img.attn)."),
                io.Float.Input("scale", default=0.0, min=-2.0, max=5.0, step=0.01,
                               tooltip="The scale the swept site gets; every other site keeps 1. 0 bypasses the "
                                       "site's branch (the paper's block removal), 1.2 amplifies it."),
                io.String.Input("sites", multiline=True, default="",
                                tooltip="Which sites to sweep, in CalibriManual's names without values, one per "
                                        "line or comma-separated (single_blocks.10-15, double_blocks.3). Blank: "
                                        "every site of the model at this granularity."),
            ],
            outputs=[
                io.Model.Output(display_name="models", is_output_list=True,
                                tooltip="A list: the unchanged model, then one model per swept site. A KSampler "
                                        "fed this list samples once per entry."),
                io.String.Output(display_name="labels", is_output_list=True,
                                 tooltip="One label per model, in the same order: 'identity', then "
                                         "'<site> = <scale>' (e.g. for SaveImage's filename_prefix)."),
            ],
        )

    @classmethod
    def execute(cls, model, granularity: str, scale: float, sites: str = "") -> io.NodeOutput:
        _, layout = model_layout(model)
        entries = sweep(layout, granularity, scale, sites)
        return io.NodeOutput([apply_calibration(model, calibration) for _, calibration in entries],
                             [label for label, _ in entries])
