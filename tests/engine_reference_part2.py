"""Independent references of the issue-11 families (part 2), merged into engine_reference.REFERENCES.

Like engine_reference, none of them touches Calibri's mechanism: each changes the gate value itself, where the model
produces it (a hook on the module that returns the modulation chunks, or weight folding of a gate Linear), never the
branch output the engine multiplies.
"""

from __future__ import annotations

from typing import Callable

import torch

from calibri_core.sites import Gate


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _by_block(gates: list[Gate], scales: dict[int, float]) -> dict[str, dict[tuple[str, str], float]]:
    by_block: dict[str, dict[tuple[str, str], float]] = {}
    for index, s in scales.items():
        by_block.setdefault(gates[index].block, {})[(gates[index].stream, gates[index].branch)] = s
    return by_block


def _times(gate: torch.Tensor, s: float) -> torch.Tensor:
    return gate * s


def _tanh_times(gate: torch.Tensor, s: float) -> torch.Tensor:
    """The pre-tanh gate whose tanh is s·tanh(gate) (the tiny models keep |s·tanh(gate)| < 1)."""
    return torch.atanh(s * torch.tanh(gate))


def chunk_tuple_hooks(where: dict[tuple[str, str], tuple[str, int]], change: Callable = _times) -> Callable:
    """A reference for blocks whose modulation module returns the chunks as a tuple or list: for each gate,
    ``where[(stream, branch)]`` = (module inside the block, position of the gate in its result); a forward hook
    replaces that entry by ``change(entry, scale)`` (s·gate, or for tanh gates the gate whose tanh is s·tanh)."""

    def install(dm, gates: list[Gate], scales: dict[int, float]) -> None:
        for block, per_gate in _by_block(gates, scales).items():
            by_module: dict[str, dict[int, float]] = {}
            for key, s in per_gate.items():
                module, position = where[key]
                by_module.setdefault(module, {})[position] = s
            for module, positions in by_module.items():
                def hook(mod, args, out, positions=positions):
                    out = list(out)
                    for position, s in positions.items():
                        out[position] = change(out[position], s)
                    return tuple(out)

                _get(dm, f"{block}.{module}").register_forward_hook(hook)

    return install


def _ernie_shared_temb_hooks(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    """ERNIE-Image: every layer receives the one shared ``temb`` list (shift, scale, gate) × 2; a pre-hook hands the
    layer a copy with its gates (entries 2 and 5) multiplied."""
    position = {"attn": 2, "mlp": 5}
    for block, per_gate in _by_block(gates, scales).items():
        def pre_hook(mod, args, kwargs, per_gate=per_gate):
            args = list(args)
            temb = list(kwargs["temb"] if "temb" in kwargs else args[2])
            for (_, branch), s in per_gate.items():
                temb[position[branch]] = temb[position[branch]] * s
            if "temb" in kwargs:
                return tuple(args), dict(kwargs, temb=temb)
            args[2] = temb
            return tuple(args), kwargs

        _get(dm, block).register_forward_pre_hook(pre_hook, with_kwargs=True)


def _ltxv_timestep_hooks(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    """LTX-Video: a block's gate k is ``scale_shift_table[k] + timestep[k]``; a pre-hook rewrites the block's timestep
    chunk to s·timestep[k] + (s − 1)·table[k] (Wan's identity), so that the sum is s·gate."""
    chunk = {"attn1": 2, "ff": 5, "attn2": 8}
    for block, per_gate in _by_block(gates, scales).items():
        def pre_hook(mod, args, kwargs, per_gate=per_gate):
            timestep = kwargs["timestep"].clone()
            table = mod.scale_shift_table
            view = timestep.view(timestep.shape[0], timestep.shape[1], table.shape[0], -1)
            for (_, branch), s in per_gate.items():
                k = chunk[branch]
                view[:, :, k] = s * view[:, :, k] + (s - 1) * table[k].to(view)
            return args, dict(kwargs, timestep=timestep)

        _get(dm, block).register_forward_pre_hook(pre_hook, with_kwargs=True)


def _ltxav_ada_value_hooks(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    """LTX-2: every gate is read through the block's ``get_ada_values(table, batch, timestep, indices)``; the
    instance's method is wrapped so that the gate value it returns (the gate row of the stream's table, or of the
    cross-modal table's gate part) comes back multiplied by its scale."""
    # (stream, branch) → (table attribute, row slice of that table the gate is read from, position in the result)
    where = {("video", "attn1"): ("scale_shift_table", slice(2, 3), 0),
             ("video", "attn2"): ("scale_shift_table", slice(6, 9), 2),
             ("video", "ff"): ("scale_shift_table", slice(5, 6), 0),
             ("video", "audio_to_video_attn"): ("scale_shift_table_a2v_ca_video", slice(4, None), 0),
             ("audio", "attn1"): ("audio_scale_shift_table", slice(2, 3), 0),
             ("audio", "attn2"): ("audio_scale_shift_table", slice(6, 9), 2),
             ("audio", "ff"): ("audio_scale_shift_table", slice(5, 6), 0),
             ("audio", "video_to_audio_attn"): ("scale_shift_table_a2v_ca_audio", slice(4, None), 0)}
    for block, per_gate in _by_block(gates, scales).items():
        module = _get(dm, block)

        def get_ada_values(table, batch_size, timestep, indices=slice(None, None), original=module.get_ada_values,
                           module=module, per_gate=per_gate):
            values = list(original(table, batch_size, timestep, indices))
            for key, s in per_gate.items():
                name, rows, position = where[key]
                param = getattr(module, name)
                cross_modal = rows.stop is None  # the gate part is passed as its own table, read whole
                if (cross_modal and table.data_ptr() == param[rows].data_ptr() and table.shape[0] == 1) or (
                        not cross_modal and table is param and indices == rows):
                    values[position] = values[position] * s
            return tuple(values)

        module.get_ada_values = get_ada_values


def _fold_gate_rows(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    """A gate that is a chunk of a per-block Linear's output: engine_reference's weight folding (imported here, not
    at the top: engine_reference imports this module at its end)."""
    from engine_reference import _fold_weights

    _fold_weights(dm, gates, scales)


def _cosmos_modulation_hooks(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    """Cosmos-Predict2 / Anima: a branch's gate is chunk 2 of its ``adaln_modulation_<branch>`` output plus, with
    adaLN-LoRA, chunk 2 of the block's ``adaln_lora_B_T_3D``. A pre-hook on the block keeps that LoRA term and a hook
    on the modulation rewrites its gate chunk to s·g + (s − 1)·lora, so that the sum is s·gate."""
    for block, per_gate in _by_block(gates, scales).items():
        module, lora = _get(dm, block), {}
        module.register_forward_pre_hook(
            lambda mod, args, kwargs, lora=lora: lora.update(term=kwargs.get("adaln_lora_B_T_3D")), with_kwargs=True)
        for (_, branch), s in per_gate.items():
            def hook(mod, args, out, s=s, lora=lora):
                shift, scale, gate = out.chunk(3, dim=-1)
                term = lora["term"]
                gate = s * gate + ((s - 1) * term.chunk(3, dim=-1)[2] if term is not None else 0.0)
                return torch.cat([shift, scale, gate], dim=-1)

            getattr(module, f"adaln_modulation_{branch}").register_forward_hook(hook)


def _ideogram4_tanh_hooks(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    """Ideogram 4: a hook on each block's ``adaln_modulation`` output (scale, gate, scale, gate) replaces a gate g by
    atanh(s·tanh(g)), so that the post-tanh gate is s·tanh(g)."""
    position = {"attn": 1, "mlp": 3}
    for block, per_gate in _by_block(gates, scales).items():
        def hook(mod, args, out, per_gate=per_gate):
            chunks = list(out.chunk(4, dim=-1))
            for (_, branch), s in per_gate.items():
                chunks[position[branch]] = _tanh_times(chunks[position[branch]], s)
            return torch.cat(chunks, dim=-1)

        _get(dm, f"{block}.adaln_modulation").register_forward_hook(hook)


REFERENCES_PART2 = {
    "ideogram4": _ideogram4_tanh_hooks,
    "cosmos_predict2": _cosmos_modulation_hooks, "anima": _cosmos_modulation_hooks,
    "minimax_h3": _fold_gate_rows,
    "ltxav": _ltxav_ada_value_hooks,
    "ltxv": _ltxv_timestep_hooks,
    "krea2": chunk_tuple_hooks({("", "attn"): ("mod", 2), ("", "mlp"): ("mod", 5)}),  # (pre-/post-) scale, shift, gate
    "joyimage": chunk_tuple_hooks({(stream, branch): (f"{stream}_mod", position) for stream in ("img", "txt")
                                   for branch, position in (("attn", 2), ("mlp", 5))}),
    "ernie_image": _ernie_shared_temb_hooks,
    # LuminaRMSNormZero returns (normed x, gate_msa, scale_mlp, gate_mlp); Boogu's double blocks read the image
    # self-attention's gate from img_norm3
    "omnigen2": chunk_tuple_hooks({("", "attn"): ("norm1", 1), ("", "mlp"): ("norm1", 3)}, _tanh_times),
    "boogu": chunk_tuple_hooks({("", "attn"): ("norm1", 1), ("", "mlp"): ("norm1", 3),
                                ("img", "attn"): ("img_norm1", 1), ("img", "self_attn"): ("img_norm3", 1),
                                ("img", "mlp"): ("img_norm1", 3), ("instruct", "attn"): ("instruct_norm1", 1),
                                ("instruct", "mlp"): ("instruct_norm1", 3)}, _tanh_times),
}
