"""Per-family tables and the detection of a loaded ComfyUI diffusion model.

Each family is one small module that declares a ``FAMILY``: how to recognise ComfyUI's model class,
how to read its block counts, and, for every block, which gates exist and which module output the
engine multiplies. Adding a family means adding one module here and its tiny-model test.
Nothing here imports ComfyUI: models are recognised by their class path.
"""

from __future__ import annotations

from typing import Any

from ..sites import SiteLayout
from .table import Family, stream_gates

__all__ = ["Family", "FAMILIES", "detect", "get_family", "stream_gates", "supported_families"]


def _registry() -> dict[str, Family]:
    from . import chroma, flux, flux2, lumina, qwen_image, sd3, wan

    # Families that share a class have exclusive ``accepts`` tests (Flux.1 / Flux.2 / LongCat / Ovis,
    # Z-Image / Lumina2); the first match wins.
    families = [flux2.FAMILY, flux.FAMILY, flux.LONGCAT_IMAGE, flux.OVIS_IMAGE, chroma.FAMILY, sd3.FAMILY,
                qwen_image.FAMILY, lumina.Z_IMAGE, lumina.LUMINA2, wan.FAMILY]
    return {f.name: f for f in families}


FAMILIES: dict[str, Family] = _registry()


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Calibri: unknown model family {name!r}; supported: {supported_families()}.") from None


def supported_families() -> str:
    return ", ".join(f"{f.name} ({f.title})" for f in FAMILIES.values())


def _class_paths(obj: Any) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__}


def detect(diffusion_model: Any) -> tuple[Family, SiteLayout]:
    """Recognise a ComfyUI diffusion model (``model.model.diffusion_model``) and read its layout."""
    paths = _class_paths(diffusion_model)
    for family in FAMILIES.values():
        if paths.intersection(family.classes) and family.accepts(diffusion_model):
            reason = family.refuse(diffusion_model)
            if reason:
                raise ValueError(reason)
            return family, family.layout(family.read_counts(diffusion_model))
    raise ValueError(f"Calibri: the connected model ({type(diffusion_model).__module__}."
                     f"{type(diffusion_model).__qualname__}) is not a supported DiT. "
                     f"Supported families: {supported_families()}.")
