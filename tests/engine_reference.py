"""Independent references for gate scaling, built without Calibri's patching mechanism.

Each reference takes a plain ComfyUI BaseModel and ``{gate index: scale}`` (gate order of the family's
layout) and changes the model so that those gates are multiplied by their scales:
* families whose gate is a linear output of a per-block layer (Flux.1, SD3, Qwen-Image): the gate
  rows (weight and bias) of that layer are multiplied — a weight-folded model;
* Flux.2 and Chroma (shared modulation): a pre-hook scales ``.gate`` of the ModulationOut each block receives;
* Lumina2 / Z-Image (tanh gates): a hook on the adaLN output replaces g by atanh(s·tanh(g)), so the
  post-tanh gate is s·tanh(g);
* Wan: a pre-hook rewrites the block's ``e`` with comfyui.md's identity e' = s·e + (s−1)·modulation;
  blocks that are not called through ``forward`` (Wan Animate 2) scale the gate their ``_modulation`` returns.
"""

from __future__ import annotations

import torch
from tiny_models import build_model

from calibri_core.families import detect
from calibri_core.sites import Gate


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _fold_weights(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    with torch.no_grad():
        for index, s in scales.items():
            gate = gates[index]
            linear = _get(dm, gate.module)
            width = linear.weight.shape[0] // (gate.chunks * gate.groups)
            for group in range(gate.groups):  # the gate is chunk `chunk` of each of `groups` repeats
                rows = slice((group * gate.chunks + gate.chunk) * width, (group * gate.chunks + gate.chunk + 1) * width)
                linear.weight[rows] *= s
                if linear.bias is not None:
                    linear.bias[rows] *= s


def _scaled_mod(mod, s):
    return type(mod)(mod.shift, mod.scale, mod.gate * s)


def _flux_block_hooks(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    by_block: dict[str, dict[tuple[str, str], float]] = {}
    for index, s in scales.items():
        by_block.setdefault(gates[index].block, {})[(gates[index].stream, gates[index].branch)] = s

    for block, per_gate in by_block.items():
        def pre_hook(module, args, kwargs, per_gate=per_gate):
            vec = kwargs["vec"]
            if isinstance(vec, tuple):  # double block: ((img1, img2), (txt1, txt2))
                vec = tuple(tuple(_scaled_mod(m, per_gate.get((stream, branch), 1.0))
                                  for m, branch in zip(pair, ("attn", "mlp")))
                            for pair, stream in zip(vec, ("img", "txt")))
            else:
                vec = _scaled_mod(vec, per_gate.get(("", ""), 1.0))
            return args, dict(kwargs, vec=vec)

        _get(dm, block).register_forward_pre_hook(pre_hook, with_kwargs=True)


def _tanh_gate_hooks(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    by_block: dict[str, dict[str, float]] = {}
    for index, s in scales.items():
        by_block.setdefault(gates[index].block, {})[gates[index].branch] = s
    for block, per_branch in by_block.items():
        def hook(module, args, out, per_branch=per_branch):
            chunks = list(out.chunk(4, dim=1))  # scale_msa, gate_msa, scale_mlp, gate_mlp
            for branch, position in (("attn", 1), ("mlp", 3)):
                if branch in per_branch:
                    chunks[position] = torch.atanh(per_branch[branch] * torch.tanh(chunks[position]))
            return torch.cat(chunks, dim=1)

        _get(dm, block).adaLN_modulation.register_forward_hook(hook)


def _wan_hooks(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    by_block: dict[str, dict[str, float]] = {}
    for index, s in scales.items():
        by_block.setdefault(gates[index].block, {})[gates[index].branch] = s
    for block, per_branch in by_block.items():
        module = _get(dm, block)

        def pre_hook(mod, args, kwargs, per_branch=per_branch):
            e = kwargs["e"].clone()
            chunks = e if e.ndim == 3 else e.movedim(2, 1)  # [B, 6, D] or per-token [B, L, 6, D]
            for branch, k in (("attn", 2), ("mlp", 5)):
                if branch in per_branch:
                    s = per_branch[branch]
                    chunks[:, k] = s * chunks[:, k] + (s - 1) * mod.modulation[0, k]
            return args, dict(kwargs, e=e)

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)


REFERENCES = {
    "flux": _fold_weights, "sd3": _fold_weights, "qwen_image": _fold_weights,
    "longcat_image": _fold_weights, "ovis_image": _fold_weights,
    "flux2": _flux_block_hooks, "chroma": _flux_block_hooks,
    "lumina2": _tanh_gate_hooks, "z_image": _tanh_gate_hooks,
    "wan": _wan_hooks,
}


def _wan_gate_source(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    """Wan, every variant. Blocks that build their modulation in ``_modulation`` (Wan Animate 2, whose blocks run
    through forward_pose / forward_gen, so a forward pre-hook never fires) get that method wrapped on the
    instance so it returns s·gate (chunks 2 and 5, ``modulation`` included) to every branch that asks;
    all other blocks get ``_wan_hooks``'s pre-hook on ``e``."""
    hooked: dict[int, float] = {}
    by_block: dict[str, dict[str, float]] = {}
    for index, s in scales.items():
        gate = gates[index]
        if hasattr(_get(dm, gate.block), "_modulation"):
            by_block.setdefault(gate.block, {})[gate.branch] = s
        else:
            hooked[index] = s
    for block, per_branch in by_block.items():
        module = _get(dm, block)

        def _modulation(e, x, original=module._modulation, per_branch=per_branch):
            chunks = list(original(e, x))
            for branch, k in (("attn", 2), ("mlp", 5)):
                if branch in per_branch:
                    chunks[k] = chunks[k] * per_branch[branch]
            return tuple(chunks)

        module._modulation = _modulation
    _wan_hooks(dm, gates, hooked)


REFERENCES["wan"] = _wan_gate_source


def reference_patcher(family: str, scales: dict[int, float], seed: int = 0):
    """A fresh tiny model of ``family`` (same seed, same weights as ``build_patcher``) with the gates
    scaled independently. Built anew rather than deep-copied: a deep copy of a model that ComfyUI
    still holds patched would copy the patched forwards too."""
    import comfy.model_patcher

    model = build_model(family, seed)
    detected, layout = detect(model.diffusion_model)
    REFERENCES[detected.name](model.diffusion_model, list(layout.gates), scales)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)

from engine_reference_part2 import REFERENCES_PART2  # noqa: E402  (issue 11, part 2)

REFERENCES.update(REFERENCES_PART2)
from engine_reference_part1 import FOLDED_PART1, HOOKED_PART1  # noqa: E402  (issue 11, part 1)

REFERENCES.update({name: _fold_weights for name in FOLDED_PART1}, **HOOKED_PART1)
