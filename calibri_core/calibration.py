"""A calibration is data: which gates of which model family get which scales.

``Calibration`` holds N ensemble members (paper §3.3). Member i has one scale per site,
an output weight ω_i and the prompt it sees, so the ensemble prediction is
F(x, t) = Σ_i ω_i · f_{s_i}(x, t, p_i) in the model's own output space.
This module is pure: no torch, no ComfyUI.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from .sites import GRANULARITIES, SiteLayout

PROMPTS = ("positive", "negative")

SCALE_LIMIT = 1e3
"""Every scale s lies in [−SCALE_LIMIT, SCALE_LIMIT], and so does s' = 1 + strength·(s − 1) after CalibriApply.

Why 10³: the engine multiplies gates in the model's own dtype, and float16 (the narrowest one ComfyUI runs DiTs in)
ends at 65504, so a scale of 10³ still leaves room for gate × branch values up to ~65 before an image turns into
inf/NaN, while 10³ is 500 times the search's bound [−1, 2] and far beyond any scale the paper reports (issue 10:
``site = 1e308`` was accepted and sampled a NaN image)."""
WEIGHT_LIMIT = 1e3
"""Every output weight ω lies in [−WEIGHT_LIMIT, WEIGHT_LIMIT]: 100 times the search's bound [−10, 10] (the CFG start
ω = (cfg, 1 − cfg) stays far inside for any usable cfg), for the same float16 reason as ``SCALE_LIMIT``."""


def check_scale(value: float, what: str, limit: float = SCALE_LIMIT) -> None:
    """Raise a ValueError naming ``what`` unless ``value`` is a finite number within ±``limit``."""
    if not math.isfinite(value):
        raise ValueError(f"Calibri: {what} is {value}; every scale and ω must be a finite number.")
    if abs(value) > limit:
        raise ValueError(f"Calibri: {what} is {value:g}, outside [-{limit:g}, {limit:g}], the range the engine "
                         f"represents in every model dtype (float16 ends at 65504). Use a value in that range.")


@dataclass(frozen=True)
class Member:
    """One ensemble member: a scale per site, an output weight ω and the prompt it sees."""

    scales: tuple[float, ...]
    weight: float = 1.0
    prompt: str = "positive"


@dataclass(frozen=True)
class Calibration:
    """Scales for the gate sites of one model family.

    Args:
        family: family id from ``calibri_core.families`` (``flux``, ``sd3``, ...).
        granularity: ``block``, ``layer`` or ``gate`` (paper §3.2).
        sites: ordered site names; every member has one scale per site, in this order.
        members: at least one ``Member``.
    """

    family: str
    granularity: str
    sites: tuple[str, ...]
    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "members", tuple(
            Member(tuple(float(s) for s in m.scales), float(m.weight), m.prompt) for m in self.members))
        if not isinstance(self.family, str) or not self.family:
            raise ValueError("Calibri: a calibration needs a model family name (e.g. 'flux').")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"Calibri: granularity {self.granularity!r} is not one of {GRANULARITIES}.")
        if not self.sites:
            raise ValueError("Calibri: a calibration needs at least one site.")
        if len(set(self.sites)) != len(self.sites):  # a set, not list.count per site: sites may come from any file
            seen: set[str] = set()
            duplicates = sorted({s for s in self.sites if s in seen or seen.add(s)})
            raise ValueError(f"Calibri: site names must be unique; repeated: {duplicates}.")
        if not self.members:
            raise ValueError("Calibri: a calibration needs at least one member (N = 0 was given). "
                             "Use one member for a plain calibration, two for a CFG ensemble.")
        for i, member in enumerate(self.members):
            if len(member.scales) != len(self.sites):
                raise ValueError(f"Calibri: member {i} has {len(member.scales)} scales but the calibration has "
                                 f"{len(self.sites)} sites; give exactly one scale per site.")
            bad = [self.sites[j] for j, s in enumerate(member.scales) if not math.isfinite(s)]
            if bad:
                raise ValueError(f"Calibri: member {i} has non-finite scales (NaN/inf) at {bad[:5]}"
                                 f"{' ...' if len(bad) > 5 else ''}; every scale must be a finite number.")
            if not math.isfinite(member.weight):
                raise ValueError(f"Calibri: member {i} has a non-finite output weight ω = {member.weight}.")
            for site, scale in zip(self.sites, member.scales):
                if abs(scale) > SCALE_LIMIT:
                    check_scale(scale, f"member {i}'s scale at {site}")
            check_scale(member.weight, f"member {i}'s output weight ω", WEIGHT_LIMIT)
            if member.prompt not in PROMPTS:
                raise ValueError(f"Calibri: member {i} prompt {member.prompt!r} must be one of {PROMPTS}.")

    @classmethod
    def identity(cls, layout: SiteLayout, granularity: str = "block", members: int = 1) -> "Calibration":
        """All scales 1 and ω = 1 for one member (a no-op calibration)."""
        sites = layout.site_names(granularity)
        return cls(layout.family, granularity, sites,
                   tuple(Member((1.0,) * len(sites)) for _ in range(members)))

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(m.weight for m in self.members)

    def scales_by_site(self, member: int = 0) -> dict[str, float]:
        return dict(zip(self.sites, self.members[member].scales))

    def check_against(self, layout: SiteLayout) -> None:
        """Raise a ValueError that names both sides if this calibration does not fit ``layout``."""
        if self.family != layout.family:
            raise ValueError(f"Calibri: this calibration was made for the {self.family} family; the connected model is "
                             f"{layout.describe()}. Load a calibration for {layout.family} or run the search for it.")
        expected = layout.site_names(self.granularity)
        if set(self.sites) == set(expected):
            return
        expected_set, given = set(expected), set(self.sites)
        unknown = [s for s in self.sites if s not in expected_set]
        missing = [s for s in expected if s not in given]
        lines = [f"Calibri: the calibration's {self.granularity} sites do not match the connected model "
                 f"{layout.describe()} ({len(self.sites)} sites given, {len(expected)} expected)."]
        for name in unknown[:5]:
            near = difflib.get_close_matches(name, expected, n=3)
            lines.append(f"  unknown site {name!r}" + (f"; did you mean {near}?" if near else ""))
        if missing:
            lines.append(f"  missing sites: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        lines.append("  A calibration made for a model with other block counts cannot be applied to this one.")
        raise ValueError("\n".join(lines))

    def check_strength(self, strength: float) -> None:
        """Raise a ValueError unless CalibriApply's s' = 1 + strength·(s − 1) and ω' keep every value in range.

        ``strength`` arrives through ComfyUI's API, whose min/max check lets NaN pass (issue 10).
        """
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
            raise ValueError(f"Calibri: strength must be a finite number; got {strength!r}.")
        for i, member in enumerate(self.members):
            for site, scale in zip(self.sites, member.scales):
                check_scale(1 + strength * (scale - 1), f"member {i}'s scale at {site} with strength {strength}")
            check_scale(1 + strength * (member.weight - 1), f"member {i}'s ω with strength {strength}", WEIGHT_LIMIT)

    def gate_scales(self, layout: SiteLayout) -> list[list[float]]:
        """The [N, gates] matrix the engine applies: each gate gets the scale of its site."""
        self.check_against(layout)
        column = {name: i for i, name in enumerate(self.sites)}
        site_of_gate = [column[g.name(self.granularity)] for g in layout.gates]
        return [[m.scales[j] for j in site_of_gate] for m in self.members]

    def convert(self, granularity: str, layout: SiteLayout) -> "Calibration":
        """The same calibration at another granularity.

        Going finer (block → layer → gate) copies each scale to the sites it covers. Going coarser is
        allowed only when every site being merged holds the same value.
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"Calibri: granularity {granularity!r} is not one of {GRANULARITIES}.")
        per_gate = self.gate_scales(layout)
        target_sites = layout.site_names(granularity)
        target_of_gate = layout.gate_to_site(granularity)
        members = []
        for i, (member, gates) in enumerate(zip(self.members, per_gate)):
            values: list[float | None] = [None] * len(target_sites)
            for gate, (site, value) in enumerate(zip(target_of_gate, gates)):
                if values[site] is not None and values[site] != value:
                    raise ValueError(
                        f"Calibri: cannot convert member {i} from {self.granularity} to {granularity}: site "
                        f"{target_sites[site]!r} would merge different scales ({values[site]} and {value}, e.g. at "
                        f"{layout.gates[gate].name(self.granularity)!r}). Only merges of equal values are defined.")
                values[site] = value
            members.append(Member(tuple(values), member.weight, member.prompt))  # type: ignore[arg-type]
        return Calibration(self.family, granularity, target_sites, tuple(members))
