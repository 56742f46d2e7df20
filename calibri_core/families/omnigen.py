"""OmniGen2 (``comfy.ldm.omnigen``) and Boogu-Image (``comfy.ldm.boogu``, ComfyUI >= 0.30; an OmniGen2 derivative).

Gated blocks add ``x + tanh(gate) · RMSNorm(branch)`` as Lumina2 does; the gates come out of each block's
``LuminaRMSNormZero`` (``norm1``: scale, gate, scale, gate), and scaling them there would scale the gate before the
tanh. The engine multiplies the RMSNorm'd branch (``norm2`` / ``ffn_norm2``), i.e. the post-tanh gate where it meets
its branch. Sites: the ``noise_refiner``, ``ref_image_refiner`` (runs only when reference images are given) and main
blocks (OmniGen2 ``layers``; Boogu ``single_stream_layers``). The ``context_refiner`` blocks are ungated
(``modulation=False``) and are never touched.

Boogu's ``double_stream_layers`` run a joint [instruction ; image] attention, an image-only self-attention and one
MLP per stream, each added through its own tanh gate and RMSNorm: streams ``img`` / ``instruct``, branches ``attn``
(joint), ``self_attn`` (image only) and ``mlp``.
"""

from ..sites import Gate
from .table import Family, KnownModel, stream_gates

BRANCHES = {"attn": ("norm2", 0, 1), "mlp": ("ffn_norm2", 0, 1)}  # the RMSNorm'd branch outputs
DOUBLE_STREAM = {"img": {"attn": "img_attn_norm", "self_attn": "img_self_attn_norm", "mlp": "img_ffn_norm2"},
                 "instruct": {"attn": "instruct_attn_norm", "mlp": "instruct_ffn_norm2"}}
_UNGATED = "context_refiner blocks have no gates (modulation=False) and are left untouched"


def _gated(counts: dict, containers: tuple[str, ...]) -> list[Gate]:
    return [g for container in containers for i in range(counts[container])
            for g in stream_gates(f"{container}.{i}", {"": ""}, BRANCHES)]


def read_omnigen2(dm) -> dict:
    return {name: len(getattr(dm, name)) for name in ("noise_refiner", "ref_image_refiner", "layers")}


def omnigen2_gates(counts: dict) -> list[Gate]:
    return _gated(counts, ("noise_refiner", "ref_image_refiner", "layers"))


def read_boogu(dm) -> dict:
    return {name: len(getattr(dm, name))
            for name in ("noise_refiner", "ref_image_refiner", "double_stream_layers", "single_stream_layers")}


def boogu_gates(counts: dict) -> list[Gate]:
    double = [Gate(f"double_stream_layers.{i}", stream, branch, f"double_stream_layers.{i}.{module}")
              for i in range(counts["double_stream_layers"]) for stream, branches in DOUBLE_STREAM.items()
              for branch, module in branches.items()]
    return _gated(counts, ("noise_refiner", "ref_image_refiner")) + double + _gated(counts, ("single_stream_layers",))


OMNIGEN2 = Family(
    name="omnigen2",
    title="OmniGen2",
    classes=("comfy.ldm.omnigen.omnigen2.OmniGen2Transformer2DModel",),
    read_counts=read_omnigen2,
    gates=omnigen2_gates,
    ungated=_UNGATED,
    clip_type="OMNIGEN2",
    # comfy/model_detection.py sets num_layers 32 and num_refiner_layers 2 for every OmniGen2 checkpoint
    models={"omnigen2": KnownModel("OmniGen2", {"noise_refiner": 2, "ref_image_refiner": 2, "layers": 32})},
)
BOOGU = Family(
    name="boogu",
    title="Boogu-Image",
    classes=("comfy.ldm.boogu.model.BooguTransformer2DModel",),
    read_counts=read_boogu,
    gates=boogu_gates,
    ungated=_UNGATED,
    clip_type="BOOGU",
)
