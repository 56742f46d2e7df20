"""ComfyUI diffusion models Calibri refuses by name, each with the reason (issue 11).

``detect`` reads this table before its generic "not a supported DiT" error, so that a model whose gates cannot be
scaled exactly, or which has none, is refused with what makes it so rather than with the list of families.
"""

MOCHI = ("Mochi (Genmo) adds each branch as x + tanh(gate) · RMSNorm(branch) with a functional RMSNorm inside "
         "residual_tanh_gated_rmsnorm: scaling the branch output is undone by that norm, and the only module output "
         "that carries the gate (mod_x / mod_y) is the pre-tanh value, so no module output can be multiplied to scale "
         "tanh(gate) exactly (s·tanh(g) is not tanh of any multiple of g, and for s > 1 it may leave tanh's range)")
_UNGATED = "its blocks add their branches to the residual without a gate, so there is nothing for Calibri to scale"

REASONS: dict[str, str] = {
    "comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint": MOCHI,
    "comfy.ldm.hidream_o1.model.HiDreamO1Transformer": (
        "HiDream-O1 is a Qwen-style language-model backbone whose layers are ungated; its timestep only adds a shift "
        "to the hidden states, so there is no gated residual branch for Calibri to scale"),
    "comfy.ldm.minimax_music.dit.MiniMaxMusic3DiT": f"MiniMax Music 3's DiT: {_UNGATED}",
    "comfy.ldm.hunyuan3dv2_1.hunyuandit.HunYuanDiTPlain": f"Hunyuan3D 2.1's DiT (HunyuanDiT blocks): {_UNGATED}",
    # issue 11, part 1
    "comfy.ldm.hydit.models.HunYuanDiT": (
        f"HunyuanDiT's blocks modulate only a shift (default_modulation) and {_UNGATED.removeprefix('its blocks ')}"),
    "comfy.ldm.seedvr.model.NaDiT": (
        "SeedVR2 gates its branches in place (AdaSingle: hid.mul_(emb chunk + a per-block gate)) with one time "
        "embedding shared by all blocks, on the tokens of all samples packed into one axis without a batch "
        "dimension, so there is no module output that holds one sample's gate; it is also a one-step video "
        "restorer on fixed text embeddings, which leaves a prompt-reward calibration nothing to steer"),
}
"""Class path (as ``detect`` names it) → why Calibri cannot calibrate it."""
