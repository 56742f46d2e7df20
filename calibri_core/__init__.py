"""Calibri calibration engine: sites, per-family tables, calibrations and the host that applies them."""

from .calibration import PROMPTS, Calibration, Member
from .sites import GRANULARITIES, Gate, SiteLayout

__all__ = ["Calibration", "Member", "Gate", "SiteLayout", "GRANULARITIES", "PROMPTS"]
