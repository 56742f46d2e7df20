"""Build calibrations by hand (CalibriManual), join them into ensembles (CalibriCombine) and draw them."""

from __future__ import annotations

import torch

from ..calibri_core.host import model_layout
from ..calibri_core.manual import parse_manual, parse_statements
from ..calibri_core.plot import plot_calibration
from ..calibri_core.preset import Preset, combine_presets
from ..calibri_core.sites import GRANULARITIES
from .common import CATEGORY, Calibri, io, ui

COMBINE_INPUTS = 4

_MANUAL_EXAMPLE = """# site = value; unnamed sites keep scale 1
# single_blocks.10 = 0          bypass one block
# single_blocks.20-25 = 1.1     an inclusive range
# double_blocks.3-5.attn = 1.2  (layer or gate granularity)
# weight = 1.0                  output weight ω
"""


class CalibriManual(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibriManual",
            display_name="Calibri Manual",
            category=CATEGORY,
            description="Lets you write by hand which parts of the model to turn up, down or off (and by how much) "
                        "before it draws. Type a calibration for the connected model: `site = value` lines, block "
                        "ranges such as `single_blocks.10-15 = 0`, `#` comments and `weight = 1.3` for ω. Every site "
                        "not named keeps scale 1. Reproduces the paper's motivation experiment (arXiv 2603.24800 "
                        "§3.1: bypass (0) or scale one block) and hand tuning.",
            inputs=[
                io.Model.Input("model", tooltip="The model the calibration is for; names are checked against it."),
                io.Combo.Input("granularity", options=list(GRANULARITIES), default="block",
                               tooltip="block: one scale per block (double_blocks.7); layer: per block and branch "
                                       "(double_blocks.7.attn); gate: per stream too (double_blocks.7.img.attn)."),
                io.String.Input("text", multiline=True, default=_MANUAL_EXAMPLE,
                                tooltip="One `site = value` per line; ranges like single_blocks.10-15; a block "
                                        "name covers its finer sites; `weight = x` sets ω; `#` starts a comment."),
            ],
            outputs=[Calibri.Output(display_name="calibration",
                                   tooltip="A CALIBRI value: the scales plus the block counts of the model they "
                                           "fit; connect it to CalibriApply, the ensemble nodes, Save or Plot.")],
        )

    @classmethod
    def validate_inputs(cls, text: str = "") -> bool | str:
        try:
            parse_statements(text)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, granularity: str, text: str) -> io.NodeOutput:
        _, layout = model_layout(model)
        calibration = parse_manual(text, layout, granularity)
        return io.NodeOutput(Preset(calibration, layout.counts, {"source": "CalibriManual", "manual": text}))


class CalibriCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = []
        for k in range(1, COMBINE_INPUTS + 1):
            inputs += [
                Calibri.Input(f"calibration_{k}", optional=True,
                              tooltip=f"Member {k} of the ensemble (optional). An input that is already an "
                                      f"ensemble adds all its members, keeping their prompts."),
                io.Float.Input(f"weight_{k}", default=1.0, min=-20.0, max=20.0, step=0.01,
                               tooltip=f"Only used when calibration_{k} is connected (the editor hides it "
                                       f"otherwise). Multiplies the output weight ω of input {k}'s member(s). The "
                                       f"paper's CFG start point is ω = cfg on positive and 1 − cfg on negative."),
                io.Combo.Input(f"prompt_{k}", options=["positive", "negative"], default="positive",
                               tooltip=f"Only used when calibration_{k} is connected (the editor hides it "
                                       f"otherwise). Which conditioning input {k}'s member sees (ignored for an "
                                       f"input that is already an ensemble: its members keep their own prompts)."),
            ]
        return io.Schema(
            node_id="CalibriCombine",
            display_name="Calibri Combine",
            category=CATEGORY,
            description="Joins up to four calibrations so that the model draws with a weighted blend of all of them, "
                        "for example one on the positive and one on the negative prompt, as CFG does. In the paper's "
                        "terms: join calibrations into an ensemble F = Σ ω_i f_{s_i}(x, t, p_i) (arXiv 2603.24800 "
                        "§3.3) for CalibriEnsemble or CalibriEnsembleGuider. Each member's ω is its own ω times the "
                        "input's weight. All inputs must be for the same model and granularity.",
            inputs=inputs,
            outputs=[Calibri.Output(display_name="calibration",
                                   tooltip="A CALIBRI value: the scales plus the block counts of the model they "
                                           "fit; connect it to CalibriApply, the ensemble nodes, Save or Plot.")],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        parts = [(kwargs[f"calibration_{k}"], float(kwargs.get(f"weight_{k}", 1.0)),
                  kwargs.get(f"prompt_{k}", "positive"))
                 for k in range(1, COMBINE_INPUTS + 1) if kwargs.get(f"calibration_{k}") is not None]
        return io.NodeOutput(combine_presets(parts))


class CalibriPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibriPlot",
            display_name="Calibri Plot",
            category=CATEGORY,
            description="Draws a calibration as bar charts of how strongly it turns each part of the model up or "
                        "down; it changes no image. One chart per member (a batch of N images) with a bar per site "
                        "from the identity line (scale 1), grouped by block, and the member's ω and prompt. The "
                        "charts show in the node itself; the IMAGE output carries them on (e.g. to SaveImage).",
            inputs=[Calibri.Input("calibration", tooltip="The calibration to draw.")],
            outputs=[io.Image.Output(display_name="charts",
                                     tooltip="One chart per ensemble member, as an IMAGE batch.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, calibration: Preset) -> io.NodeOutput:
        charts = torch.from_numpy(plot_calibration(calibration.calibration))
        return io.NodeOutput(charts, ui=ui.PreviewImage(charts, cls=cls))
