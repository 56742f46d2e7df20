"""Per-family tables and the detection of a loaded ComfyUI diffusion model.

Each family is one small module that declares a ``FAMILY``: how to recognise ComfyUI's model class,
how to read its block counts, and, for every block, which gates exist and which module output the
engine multiplies. Adding a family means adding one module here and its tiny-model test.
Nothing here imports ComfyUI: models are recognised by their class path.
"""

from __future__ import annotations

from typing import Any

from ..sites import SiteLayout
from .refused import REASONS
from .table import Family, KnownModel, stream_gates

__all__ = ["Family", "FAMILIES", "KnownModel", "detect", "get_family", "stream_gates", "supported_families"]


def _registry() -> dict[str, Family]:
    from . import chroma, flux, flux2, lumina, qwen_image, sd3, wan

    # Families that share a class have exclusive ``accepts`` tests (Flux.1 / Flux.2 / LongCat / Ovis,
    # Z-Image / Lumina2); the first match wins.
    families = [flux2.FAMILY, flux.FAMILY, flux.LONGCAT_IMAGE, flux.OVIS_IMAGE, chroma.FAMILY, sd3.FAMILY,
                qwen_image.FAMILY, lumina.Z_IMAGE, lumina.LUMINA2, wan.FAMILY]
    from . import cosmos, ernie, ideogram4, joyimage, krea2, lightricks, minimax, omnigen  # issue 11, part 2
    families += [krea2.FAMILY, lightricks.LTXV, lightricks.LTXAV, minimax.FAMILY, cosmos.COSMOS_PREDICT2, cosmos.ANIMA,
                 omnigen.OMNIGEN2, omnigen.BOOGU, ernie.FAMILY, joyimage.FAMILY, ideogram4.FAMILY]
    from . import auraflow, cogvideox, hidream, hunyuan_video, kandinsky5, lens, mage_flow, pixart, pixeldit  # part 1
    families += [mage_flow.FAMILY, hidream.FAMILY, kandinsky5.KANDINSKY5, kandinsky5.KANDINSKY5_IMAGE, lens.FAMILY,
                 hunyuan_video.HUNYUAN_VIDEO, hunyuan_video.HUNYUAN_VIDEO_15, hunyuan_video.HUNYUAN_IMAGE_21,
                 cogvideox.COGVIDEOX, cogvideox.COGVIDEOX_15, auraflow.FAMILY, pixart.PIXART_ALPHA, pixart.PIXART_SIGMA,
                 pixeldit.FAMILY]
    return {f.name: f for f in families}


FAMILIES: dict[str, Family] = _registry()


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Calibri: unknown model family {name!r}; supported: {supported_families()}.") from None


def supported_families() -> str:
    return ", ".join(f"{f.name} ({f.title})" for f in FAMILIES.values())


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def detect(diffusion_model: Any) -> tuple[Family, SiteLayout]:
    """Recognise a ComfyUI diffusion model (``model.model.diffusion_model``) and read its layout.

    A family covers exactly the classes its table lists. A subclass of one of them that is not listed is refused
    by name rather than taken for its base: a variant may route its blocks another way (Wan Animate 2 calls its
    attention through other methods) and leave a site without effect.
    """
    path = _class_path(type(diffusion_model))
    for family in FAMILIES.values():
        if path in family.classes and family.accepts(diffusion_model):
            return family, family.layout(family.read_counts(diffusion_model))
    ancestors = {_class_path(c) for c in type(diffusion_model).__mro__[1:]}
    bases = [f for f in FAMILIES.values() if ancestors.intersection(f.classes)]
    if bases:
        verified = sorted({c.rsplit(".", 1)[1] for f in bases for c in f.classes})
        raise ValueError(f"Calibri: the connected model ({path}) is a variant of "
                         f"{' / '.join(dict.fromkeys(f.title for f in bases))} that Calibri has not verified: its "
                         f"blocks may reach the residual some other way and leave a calibration without effect, so "
                         f"it is refused rather than calibrated wrongly. Verified classes: {', '.join(verified)}.")
    if path in REASONS:
        raise ValueError(f"Calibri: the connected model ({path}) cannot be calibrated: {REASONS[path]}. "
                         f"Supported families: {supported_families()}.")
    raise ValueError(f"Calibri: the connected model ({path}) is not a supported DiT. "
                     f"Supported families: {supported_families()}.")
