"""Cosmos-Predict2 and Anima (``comfy.ldm.cosmos.predict2``; Anima in ``comfy.ldm.anima``, ComfyUI >= 0.9).

Each block gates three branches, self-attention, text cross-attention and MLP, with its own modulation Sequential
per branch (SiLU, Linear(s) → shift, scale, gate). With adaLN-LoRA (the released checkpoints) the shared
``t_embedder``'s LoRA term is added after the Linear, so the gate chunk of the Linear's output is not the whole gate:
the engine multiplies the branch outputs (``self_attn``, ``cross_attn``, ``mlp``), which is the whole gate scaled
where it meets its branch. Anima is Cosmos-Predict2's network behind an LLM adapter that makes its text context; the
adapter's blocks are not the DiT's and are never touched. They are separate families: a preset of one never applies
to the other.
"""

from .table import Family, block_list

read_counts, gates = block_list("blocks", {branch: branch for branch in ("self_attn", "cross_attn", "mlp")})


COSMOS_PREDICT2 = Family(
    name="cosmos_predict2",
    title="Cosmos-Predict2",
    classes=("comfy.ldm.cosmos.predict2.MiniTrainDIT",),
    read_counts=read_counts,
    gates=gates,
    clip_type="COSMOS",
)
ANIMA = Family(
    name="anima",
    title="Anima",
    classes=("comfy.ldm.anima.model.Anima",),
    read_counts=read_counts,
    gates=gates,
    ungated="the LLM adapter (llm_adapter) that makes the text context is not part of the DiT and is never scaled",
)
