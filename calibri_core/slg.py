"""Skip Layer Guidance re-expressed as a Calibri ensemble (calibri-reference.md, "Ensemble").

ComfyUI's SkipLayerGuidanceDiT computes, inside its window, cfg_result + scale·(f(pos) − f_skip(pos)),
where f_skip runs with the listed blocks replaced by the identity. A block whose gates are all 0
contributes nothing, so f_skip is a calibration at block granularity with those blocks at 0, and SLG
is an ensemble:
* guider form (CalibriEnsembleGuider, F = Σ ω_i f_i): (identity, cfg + scale, positive),
  (skip, −scale, positive), (identity, 1 − cfg, negative);
* KSampler form (CalibriEnsemble, the KSampler applies cfg itself): the cond pass becomes
  (1 + scale/cfg)·f(pos) − (scale/cfg)·f_skip(pos); the uncond pass is left alone.
Outside the window the skip member runs uncalibrated and merges with the identity member, which is
plain CFG, exactly as SLG does. Both forms bake the CFG scale into ω, so a preset is made for one cfg.

Run ``python -m calibri_core.slg`` to (re)write the shipped presets in ``presets/``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from .calibration import Calibration, Member
from .families import get_family
from .sites import SiteLayout

FORMS = ("guider", "ksampler")


def skip_layer_calibration(layout: SiteLayout, *, double_layers: tuple[int, ...] = (),
                           single_layers: tuple[int, ...] = (), scale: float, cfg: float,
                           form: str = "guider") -> Calibration:
    """The ensemble equal to SkipLayerGuidanceDiT(double_layers, single_layers, scale) at this cfg."""
    if form not in FORMS:
        raise ValueError(f"Calibri: SLG form {form!r} is not one of {FORMS}.")
    family = get_family(layout.family)
    if family.not_a_block_skip and (double_layers or single_layers):
        raise ValueError(f"Calibri: Skip Layer Guidance cannot be expressed as a {layout.family} calibration: "
                         f"{family.not_a_block_skip}, while SkipLayerGuidanceDiT replaces the whole block. Use "
                         f"ComfyUI's SkipLayerGuidanceDiT node for these models.")
    containers = family.dit_blocks
    skipped = set()
    for kind, layers in (("double_block", double_layers), ("single_block", single_layers)):
        if layers and kind not in containers:
            raise ValueError(f"Calibri: {layout.family} models ignore ComfyUI's {kind} replacement, so SLG "
                             f"{kind} layers {list(layers)} do nothing there.")
        skipped |= {f"{containers[kind]}.{i}" for i in layers}
    sites = layout.site_names("block")
    missing = sorted(skipped - set(sites))
    if missing:
        raise ValueError(f"Calibri: SLG layers {missing} do not exist in {layout.describe()}.")
    identity = (1.0,) * len(sites)
    skip = tuple(0.0 if site in skipped else 1.0 for site in sites)
    if form == "guider":
        members = (Member(identity, cfg + scale, "positive"), Member(skip, -scale, "positive"))
        if cfg != 1.0:  # at cfg 1 the negative prompt has weight 0: no member, so both forms coincide
            members += (Member(identity, 1.0 - cfg, "negative"),)
    else:
        members = (Member(identity, 1.0 + scale / cfg, "positive"), Member(skip, -scale / cfg, "positive"))
    return Calibration(layout.family, "block", sites, members)


@dataclass(frozen=True)
class ShippedSLG:
    """One shipped preset: an SLG setting with its source, for one model, cfg and form."""

    filename: str
    model: str
    family: str
    counts: dict
    double_layers: tuple[int, ...]
    single_layers: tuple[int, ...]
    scale: float
    start_percent: float
    end_percent: float
    cfg: float
    form: str
    source: str

    def calibration(self) -> Calibration:
        layout = get_family(self.family).layout(self.counts)
        return skip_layer_calibration(layout, double_layers=self.double_layers, single_layers=self.single_layers,
                                      scale=self.scale, cfg=self.cfg, form=self.form)

    def provenance(self) -> dict:
        return {
            "kind": "skip-layer-guidance re-expressed as a Calibri ensemble (not a searched preset)",
            "model": self.model, "source": self.source, "licence": "GPL-3.0 (this pack)",
            "skip_layer_guidance": {"double_layers": list(self.double_layers),
                                    "single_layers": list(self.single_layers), "scale": self.scale,
                                    "start_percent": self.start_percent, "end_percent": self.end_percent},
            "cfg": self.cfg, "form": self.form,
            "use_with": ("CalibriEnsembleGuider" if self.form == "guider" else "CalibriEnsemble + KSampler")
            + f" at start_percent {self.start_percent}, end_percent {self.end_percent}, cfg {self.cfg}",
        }


SD35_MEDIUM = get_family("sd3").models["sd3.5-medium"].counts
FLUX1_DEV = get_family("flux").models["flux1-dev"].counts

SHIPPED = (
    ShippedSLG("sd35-medium-slg-cfg4.5-guider.safetensors", "Stable Diffusion 3.5 Medium", "sd3", SD35_MEDIUM,
               (7, 8, 9), (), 2.8, 0.01, 0.20, 4.5, "guider",
               "Stability AI's recommended SLG for SD3.5 Medium: layers 7, 8, 9, scale 2.8, 1 %-20 % of sampling; "
               "cfg 4.5 as in the model card's example"),
    ShippedSLG("sd35-medium-slg-cfg4.5-ksampler.safetensors", "Stable Diffusion 3.5 Medium", "sd3", SD35_MEDIUM,
               (7, 8, 9), (), 2.8, 0.01, 0.20, 4.5, "ksampler",
               "Stability AI's recommended SLG for SD3.5 Medium: layers 7, 8, 9, scale 2.8, 1 %-20 % of sampling; "
               "cfg 4.5 as in the model card's example"),
    ShippedSLG("flux1-dev-slg-defaults.safetensors", "FLUX.1-dev", "flux", FLUX1_DEV,
               (7, 8, 9), (7, 8, 9), 3.0, 0.01, 0.15, 1.0, "guider",
               "ComfyUI SkipLayerGuidanceDiT defaults (double and single layers 7, 8, 9, scale 3.0, 1 %-15 %); "
               "Flux runs at cfg 1, where the guider and KSampler forms coincide"),
)


def write_shipped(folder: str, overwrite: bool = False) -> list[str]:
    from .preset import Preset, save_preset

    written = []
    for shipped in SHIPPED:
        path = os.path.join(folder, shipped.filename)
        save_preset(path, Preset(shipped.calibration(), shipped.counts, shipped.provenance()), overwrite=overwrite)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibri_core.slg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=os.path.join(os.path.dirname(os.path.dirname(__file__)), "presets"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    for path in write_shipped(args.folder, args.overwrite):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
