"""One calibration per site: the paper's motivation experiment as data (the CalibriSweep node's engine).

arXiv 2603.24800 §3.1 bypasses (scale 0) or rescales one block at a time and compares the images. ``sweep``
returns the identity first, then one one-member calibration per chosen site in model order, each with that
site at ``scale`` and every other site at 1, with a label naming it. Applying entry k with the engine is the
same as applying a CalibriManual calibration that sets only that site. This module is pure: no torch, no ComfyUI.
"""

from __future__ import annotations

import math

from .calibration import Calibration, Member
from .manual import parse_manual
from .sites import GRANULARITIES, SiteLayout

IDENTITY_LABEL = "identity"


def selected_sites(layout: SiteLayout, granularity: str, selection: str = "") -> tuple[str, ...]:
    """The sites of ``layout`` at ``granularity`` that ``selection`` names, in model order.

    ``selection`` uses CalibriManual's names without values, one per line or comma-separated
    (``single_blocks.10-15``, ``double_blocks.3``; a block covers its finer sites); blank means every site.
    Unknown names, finer-than-granularity names and overlaps raise the manual parser's errors.
    """
    sites = layout.site_names(granularity)
    if not isinstance(selection, str):
        raise ValueError(f"Calibri: the sweep's sites list must be text; got {type(selection).__name__}.")
    lines = [line.split("#", 1)[0] for line in selection.splitlines()]
    items = [item.strip() for line in lines for item in line.split(",") if item.strip()]
    if not items:
        return sites
    bad = [item for item in items if "=" in item]
    if bad:
        raise ValueError(f"Calibri: the sweep's sites list names sites without values; got {bad[0]!r}. Write "
                         f"e.g. `single_blocks.10-15, double_blocks.3` (the sweep sets the scale itself).")
    # Each name becomes a CalibriManual line setting 0; the sites that end at 0 are exactly the named ones, and
    # the manual parser's checks (unknown names with near misses, overlaps) apply unchanged.
    marked = parse_manual("\n".join(f"{item} = 0" for item in items), layout, granularity)
    chosen = {site for site, scale in zip(marked.sites, marked.members[0].scales) if scale == 0.0}
    return tuple(site for site in sites if site in chosen)


def sweep(layout: SiteLayout, granularity: str, scale: float = 0.0,
          selection: str = "") -> list[tuple[str, Calibration]]:
    """``[(label, calibration)]``: the identity, then each selected site alone at ``scale``.

    Args:
        layout: the connected model's layout (``host.model_layout``).
        granularity: ``block``, ``layer`` or ``gate``: which sites are swept one at a time.
        scale: the value the swept site gets (0 = bypass its branch, paper §3.1); finite.
        selection: which sites to sweep (see ``selected_sites``); blank = all.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"Calibri: granularity {granularity!r} is not one of {GRANULARITIES}.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"Calibri: the sweep scale must be a finite number; got {scale!r}.")
    sites = layout.site_names(granularity)
    identity = Calibration.identity(layout, granularity)
    entries = [(IDENTITY_LABEL, identity)]
    for site in selected_sites(layout, granularity, selection):
        scales = tuple(float(scale) if s == site else 1.0 for s in sites)
        entries.append((f"{site} = {float(scale):g}", Calibration(layout.family, granularity, sites,
                                                                (Member(scales),))))
    return entries
