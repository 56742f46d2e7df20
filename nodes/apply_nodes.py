"""Apply a calibration to a MODEL, or sample an ensemble of calibrated members (paper §3.2-3.3)."""

from __future__ import annotations

from ..calibri_core.host import apply_calibration
from ..calibri_core.preset import Preset
from ..calibri_core.sampling import EnsembleGuider, apply_ensemble
from .common import CATEGORY, Calibri, active_range, check_range, fitted, io, range_inputs

RESCALE = ("off", "positive_norm")
STRENGTH = (-2.0, 5.0)
_CALIBRATION_TOOLTIP = "A CALIBRI value from CalibriLoadPreset, CalibriManual or CalibriCombine."


class CalibriApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibriApply",
            display_name="Calibri Apply",
            category=CATEGORY,
            description="Changes how the model draws by turning each of its transformer blocks up or down by the "
                        "amounts a calibration gives. In the paper's terms: scale the gates of the model's DiT blocks "
                        "by a one-member calibration and its output weight ω (Calibri, arXiv 2603.24800 §3.2). For "
                        "ensembles (several members) use CalibriEnsemble (KSampler) or CalibriEnsembleGuider "
                        "(SamplerCustomAdvanced).",
            inputs=[
                io.Model.Input("model", tooltip="A DiT model of a supported family (FLUX, SD3, Qwen-Image, ...)."),
                Calibri.Input("calibration", tooltip=_CALIBRATION_TOOLTIP + " Must have exactly one member."),
                io.Float.Input("strength", default=1.0, min=STRENGTH[0], max=STRENGTH[1], step=0.01,
                               tooltip="Each scale s and ω become 1 + strength·(s − 1): 0 = off, 1 = the "
                                       "calibration as saved, above 1 extrapolates, below 0 inverts."),
                *range_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="A calibrated copy of the model (the input model is unchanged); "
                                             "connect it to a KSampler or a guider.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent: float = 0.0, end_percent: float = 1.0, strength: float = 1.0) -> bool | str:
        # Taking strength here skips ComfyUI's min/max check, which NaN passes anyway (NaN < min is False).
        if not isinstance(strength, (int, float)) or not STRENGTH[0] <= strength <= STRENGTH[1]:
            return f"strength ({strength}) must be a number between {STRENGTH[0]} and {STRENGTH[1]}."
        return check_range(start_percent, end_percent)

    @classmethod
    def execute(cls, model, calibration: Preset, strength: float, start_percent: float,
                end_percent: float) -> io.NodeOutput:
        members = len(getattr(getattr(calibration, "calibration", None), "members", ()))
        if members > 1:  # before the fit check, so the message points at the ensemble nodes
            raise ValueError(f"Calibri: this calibration has {members} members (an ensemble); CalibriApply applies "
                             "exactly one. Use CalibriEnsemble (KSampler) or CalibriEnsembleGuider "
                             "(SamplerCustomAdvanced) for ensembles.")
        preset = fitted(model, calibration)
        return io.NodeOutput(apply_calibration(model, preset.calibration, strength=strength,
                                               active_range=active_range(start_percent, end_percent)))


class CalibriEnsemble(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibriEnsemble",
            display_name="Calibri Ensemble (KSampler)",
            category=CATEGORY,
            description="Lets the ordinary KSampler draw each step as a weighted blend of several tuned versions of "
                        "the model. In the paper's terms: run a calibration ensemble (arXiv 2603.24800 §3.3) inside "
                        "the plain KSampler. Members on the positive prompt replace the cond pass by Σ ω_i f_i(cond); "
                        "members on the negative prompt replace the uncond pass by Σ ω_i f_i(uncond) (a pass without "
                        "members runs uncalibrated). The KSampler then does uncond + cfg·(cond − uncond) as usual, so "
                        "with cfg 1 (FLUX) the result is F = Σ ω_i f_i over the positive members. For the paper's CFG "
                        "form F = Σ ω_i f_i(p_i) with free weights, use CalibriEnsembleGuider.",
            inputs=[
                io.Model.Input("model", tooltip="A DiT model of a supported family."),
                Calibri.Input("calibration", tooltip=_CALIBRATION_TOOLTIP + " Any number of members."),
                *range_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="A copy of the model that runs the ensemble's members in the "
                                             "KSampler's cond and uncond passes.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent: float = 0.0, end_percent: float = 1.0) -> bool | str:
        return check_range(start_percent, end_percent)

    @classmethod
    def execute(cls, model, calibration: Preset, start_percent: float, end_percent: float) -> io.NodeOutput:
        preset = fitted(model, calibration)
        return io.NodeOutput(apply_ensemble(model, preset.calibration, active_range(start_percent, end_percent)))


class CalibriEnsembleGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibriEnsembleGuider",
            display_name="Calibri Ensemble Guider",
            category=CATEGORY,
            description="Guides SamplerCustomAdvanced with a weighted blend of several tuned versions of the model, "
                        "each on its own prompt; the weights replace the CFG value. In the paper's terms: a GUIDER "
                        "for SamplerCustomAdvanced that samples the ensemble F = Σ ω_i f_{s_i}(x, t, p_i) exactly "
                        "(arXiv 2603.24800 §3.3): every member runs with its own scales on its own prompt and ω_i "
                        "weights its prediction. No cfg: the weights are the guidance (the paper's CFG start point is "
                        "ω = (cfg, 1 − cfg) on (positive, negative)).",
            inputs=[
                io.Model.Input("model", tooltip="A DiT model of a supported family."),
                io.Conditioning.Input("positive", tooltip="Conditioning seen by members whose prompt is positive."),
                io.Conditioning.Input("negative", tooltip="Conditioning seen by members whose prompt is negative."),
                Calibri.Input("calibration", tooltip=_CALIBRATION_TOOLTIP + " Any number of members."),
                *range_inputs(),
                io.Combo.Input("rescale", options=list(RESCALE), default="off",
                               tooltip="positive_norm: rescale F per token to the norm of the first positive "
                                       "member's prediction, as Qwen-Image's true CFG does (used by the paper "
                                       "for Qwen-Image)."),
                io.Boolean.Input("low_vram", default=False,
                                 tooltip="Run the members one after another instead of in one batch: less memory, "
                                         "same result, slower."),
            ],
            outputs=[io.Guider.Output(tooltip="A GUIDER that samples F = Σ ω_i f_i; connect it to "
                                              "SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent: float = 0.0, end_percent: float = 1.0, rescale: str = "off") -> bool | str:
        if rescale not in RESCALE:  # ComfyUI 0.3.75 does not check V3 combo values against their options
            return f"rescale {rescale!r} is not one of {list(RESCALE)}."
        return check_range(start_percent, end_percent)

    @classmethod
    def execute(cls, model, positive, negative, calibration: Preset, start_percent: float, end_percent: float,
                rescale: str = "off", low_vram: bool = False) -> io.NodeOutput:
        preset = fitted(model, calibration)
        guider = EnsembleGuider(model, preset.calibration, active_range(start_percent, end_percent),
                                rescale=rescale == "positive_norm", low_vram=low_vram)
        guider.set_conds(positive, negative)
        return io.NodeOutput(guider)
