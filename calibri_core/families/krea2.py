"""Krea 2 (``comfy.ldm.krea2``, ComfyUI >= 0.20; not in 0.3.75).

Single-stream blocks over the packed [text | image | reference] tokens. Each block's ``mod`` adds its own offset to
one shared timestep projection (``tproj``) and returns the six chunks as a tuple, so there is no per-block gate
Linear to slice: the engine multiplies the attention (``attn``, after its own sigmoid head gate) and ``mlp`` outputs,
which is the adaLN gate (chunks 2 and 5) scaled where it meets its branch. With ``index_timestep_zero`` the
reference tokens take the gates of the t = 0 copy; the branch output spans both ranges, so both take the scale.
The text-fusion blocks (``txtfusion``) add their branches ungated and are never touched.
"""

from .table import Family, KnownModel, block_list

read_counts, gates = block_list("blocks", {"attn": "attn", "mlp": "mlp"})


FAMILY = Family(
    name="krea2",
    title="Krea 2",
    classes=("comfy.ldm.krea2.model.SingleStreamDiT",),
    read_counts=read_counts,
    gates=gates,
    ungated="the text-fusion blocks (txtfusion) add their branches without a gate and are never scaled",
    clip_type="KREA2",
    # SingleStreamDiT's default depth (layers=28); comfy/model_detection.py counts blocks.N of the checkpoint
    models={"krea-2": KnownModel("Krea 2", {"blocks": 28})},
)
