"""Issue 11 (part 1): the ensemble tests of tests/test_ensemble.py on the new families' tiny models, and the facts
the part-1 family tables state about their models.

test_engine.py and test_no_inert_site.py already run on every spec in tiny_models.SPECS (the part-1 specs included);
test_ensemble.py fixes its family list, so its guider and KSampler ensemble tests are collected here again with this
module's ``setup`` fixture. Specs whose class a host lacks skip with the reason.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from site_checks import SIGMA, family_setup, gate_calibration, record_forward
from test_ensemble import (  # noqa: F401  (collected here with this module's setup)
    test_guider_batches_members_into_one_forward,
    test_guider_equals_weighted_sum_of_members,
    test_ksampler_ensemble_replaces_cond_and_uncond_passes,
)
from tiny_specs_part1 import SPECS_PART1

from calibri_core.host import apply_calibration, model_layout


@pytest.fixture(scope="module", params=sorted(SPECS_PART1))
def setup(request):
    return family_setup(request.param)



@pytest.mark.parametrize("spec_name", ["pixart_alpha", "pixart_sigma"])
def test_pixart_zero_gates_leave_only_ungated_cross_attention(spec_name):
    """A PixArt block whose two gates are 0 adds exactly its (ungated) cross-attention to its input."""
    patcher = tm.build_patcher(spec_name)
    dm = patcher.model.diffusion_model
    _, layout = model_layout(patcher)
    scales = [0.0 if g.block == "blocks.1" else 1.0 for g in layout.gates]
    seen = {}
    handles = [dm.blocks[1].register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out)),
               record_forward(dm.blocks[1].cross_attn, seen, "cross")]
    try:
        tm.predict(apply_calibration(patcher, gate_calibration(layout, scales)), tm.latent(spec_name), SIGMA,
                   tm.conditioning(spec_name))
    finally:
        for handle in handles:
            handle.remove()
    cross = seen["cross"][1]
    assert cross.abs().max() > 0, "cross-attention contributes"
    assert (seen["out"] - (seen["x"] + cross)).abs().max() <= 1e-5


@pytest.mark.parametrize("spec_name, family", [
    ("hunyuan_video", "hunyuan_video"), ("hunyuan_video15", "hunyuan_video15"), ("hunyuan_image21", "hunyuan_image21"),
    ("kandinsky5", "kandinsky5"), ("kandinsky5_image", "kandinsky5_image"), ("cogvideox", "cogvideox"),
    ("cogvideox15", "cogvideox15"), ("pixart_alpha", "pixart_alpha"), ("pixart_sigma", "pixart_sigma")])
def test_models_sharing_a_class_are_told_apart(spec_name, family):
    """One ComfyUI class, several released models: each is its own family, so a preset never crosses between them."""
    assert model_layout(tm.build_patcher(spec_name))[0].name == family


def test_hunyuan_video15_drops_the_last_double_blocks_text():
    """Without single-stream blocks the text leaving the last double block is never read: the table declares its two
    text gates discarded (test_no_inert_site.py checks that exactly the declared ones are inert)."""
    patcher = tm.build_patcher("hunyuan_video15")
    family, layout = model_layout(patcher)
    assert layout.counts["single_blocks"] == 0
    assert family.discarded(layout.counts) == ("double_blocks.1.txt.attn", "double_blocks.1.txt.mlp")
    x, positive = tm.latent("hunyuan_video15"), tm.conditioning("hunyuan_video15")
    base = tm.predict(patcher, x, SIGMA, positive)
    img_gate = [i for i, g in enumerate(layout.gates) if g.name("gate") == "double_blocks.1.img.attn"]
    scales = [1.6 if i in img_gate else 1.0 for i in range(len(layout.gates))]
    moved = tm.predict(apply_calibration(patcher, gate_calibration(layout, scales)), x, SIGMA, positive)
    assert not torch.equal(moved, base), "the image gate of the same block acts"


DIT_SKIPS = {  # spec → (block site, ComfyUI 'dit' replace key), as SkipLayerGuidanceDiT's layers use them
    "mage_flow": [("transformer_blocks.1", ("double_block", 1))],
    "lens": [("transformer_blocks.0", ("double_block", 0))],
    "hunyuan_video": [("double_blocks.1", ("double_block", 1)), ("single_blocks.0", ("single_block", 0))],
    "hunyuan_video15": [("double_blocks.0", ("double_block", 0))],
    "hunyuan_image21": [("double_blocks.0", ("double_block", 0)), ("single_blocks.1", ("single_block", 1))],
    "kandinsky5": [("visual_transformer_blocks.1", ("double_block", 1))],
    "kandinsky5_image": [("visual_transformer_blocks.0", ("double_block", 0))],
    "auraflow": [("double_layers.1", ("double_block", 1)), ("single_layers.0", ("single_block", 0))],
}


def _pass_through(args, extra):
    return {key: args[key] for key in ("img", "txt", "x") if key in args}


@pytest.mark.parametrize("spec_name", sorted(DIT_SKIPS))
def test_zero_gates_equal_comfyui_block_skip(spec_name):
    """A block with every gate at 0 is ComfyUI's own block skip (the SLG presets rely on it), and each table's
    ``dit_blocks`` names the container ComfyUI's replace keys index."""
    from calibri_core.families import get_family

    patcher = tm.build_patcher(spec_name)
    family, layout = model_layout(patcher)
    x, positive = tm.latent(spec_name), tm.conditioning(spec_name)
    for block, (kind, index) in DIT_SKIPS[spec_name]:
        assert block == f"{get_family(family.name).dit_blocks[kind]}.{index}"
        skipped = patcher.clone()
        skipped.set_model_patch_replace(_pass_through, "dit", kind, index)
        expected = tm.predict(skipped, x, SIGMA, positive)
        zero = gate_calibration(layout, [0.0 if g.block == block else 1.0 for g in layout.gates])
        ours = tm.predict(apply_calibration(patcher, zero), x, SIGMA, positive)
        assert (expected - tm.predict(patcher, x, SIGMA, positive)).abs().max() > 1e-4, f"skipping {block} acts"
        assert (ours - expected).abs().max() <= 1e-5, block


def _each_gate_matches_reference(spec_name: str, x, positive, watch: str) -> tuple:
    """Every gate alone at 1.6 moves the prediction and equals the weight-folded reference's; returns the output shape
    of the module ``watch`` (a path in the diffusion model) as the model ran."""
    from engine_reference import reference_patcher
    from site_checks import one_gate

    patcher = tm.build_patcher(spec_name)
    _, layout = model_layout(patcher)
    base = tm.predict(patcher, x, SIGMA, positive)
    seen = {}
    handle = patcher.model.diffusion_model.get_submodule(watch).register_forward_hook(
        lambda m, a, out: seen.update(shape=tuple(out.shape)))
    try:
        for index, gate in enumerate(layout.gates):
            ours = tm.predict(apply_calibration(patcher, one_gate(layout, index, 1.6)), x, SIGMA, positive)
            expected = tm.predict(reference_patcher(spec_name, {index: 1.6}), x, SIGMA, positive)
            assert not torch.equal(ours, base), gate.name("gate")
            assert (ours - expected).abs().max() <= 1e-5, gate.name("gate")
    finally:
        handle.remove()
    return seen["shape"]


def test_hunyuan_video_guiding_frame_gates_match_reference():
    """HunyuanVideo I2V's guiding frame gives every modulation Linear a second row per sample ([B, 2, 6D]: first
    frame, the rest): each gate scales both, exactly as the weight-folded reference does."""
    positive = tm.conditioning("hunyuan_video")
    positive[0][1]["guiding_frame_index"] = 0
    shape = _each_gate_matches_reference("hunyuan_video", tm.latent("hunyuan_video"), positive,
                                         "double_blocks.0.img_mod.lin")
    assert len(shape) == 3 and shape[1] == 2, "the guiding frame's two modulation rows were used"


def test_hidream_e1_edit_gates_match_reference():
    """HiDream-E1 is the same class given the source image, concatenated to the latent along its width: the gates
    are the same chunks and each still equals the reference."""
    positive = tm.conditioning("hidream")
    positive[0][1]["concat_latent_image"] = tm.latent("hidream", seed=7)
    x = tm.latent("hidream")
    tokens = _each_gate_matches_reference("hidream", x, positive, "x_embedder")[1]
    assert tokens == 2 * (x.shape[-2] // 2) * (x.shape[-1] // 2), "the source image's tokens joined the latent's"


def test_hunyuan_video_guiding_frame_rows_carry_their_calibrations():
    from site_checks import assert_rows_carry_their_calibrations

    patcher = tm.build_patcher("hunyuan_video")
    _, layout = model_layout(patcher)
    positive = tm.conditioning("hunyuan_video")
    positive[0][1]["guiding_frame_index"] = 0
    x = tm.latent("hunyuan_video", batch=2)
    try:
        tm.predict(patcher, x, SIGMA, positive)
    except RuntimeError as e:  # 0.3.75's apply_mod broadcasts a [B, D] row against [B, L, D] tokens
        pytest.skip(f"this ComfyUI's HunyuanVideo fails on a batch of 2 with a guiding frame, uncalibrated: {e}")
    rows = torch.tensor([[0.4 + 0.1 * (i % 12) for i in range(len(layout.gates))],
                         [1.5 - 0.1 * (i % 9) for i in range(len(layout.gates))]])
    assert_rows_carry_their_calibrations(patcher, rows, x, positive)


TEMPLATES = {  # family → the ComfyUI workflow template its sampling defaults come from
    "hidream": "hidream_i1_full.json", "hunyuan_video": "hunyuan_video_text_to_video.json",
    "hunyuan_video15": "video_hunyuan_video_1.5_720p_t2v.json", "kandinsky5": "video_kandinsky5_t2v.json",
    "kandinsky5_image": "image_kandinsky5_t2i.json", "mage_flow": "image_mage_flow_t2i_int8.json",
    "lens": "image_lens_t2i.json", "pixeldit": "image_pixeldit_t2i.json",
}
_CFG_WIDGET = {"KSampler": 3, "SamplerCustom": 3, "CFGGuider": 0}  # where each node keeps its cfg


def _template_settings(name: str) -> dict[str, set]:
    import json
    from importlib import resources

    try:
        files = resources.files("comfyui_workflow_templates_json") / "templates"
    except ModuleNotFoundError:
        pytest.skip("this host has no comfyui_workflow_templates_json package (ComfyUI's templates)")
    graph = json.loads((files / name).read_text(encoding="utf-8"))
    nodes = graph.get("nodes", []) + [n for sub in graph.get("definitions", {}).get("subgraphs", [])
                                      for n in sub.get("nodes", [])]
    found: dict[str, set] = {"cfg": set(), "guidance": set(), "ModelSamplingSD3": set()}
    for node in nodes:
        kind, values = node.get("type"), node.get("widgets_values") or []
        if kind in _CFG_WIDGET:
            found["cfg"].add(float(values[_CFG_WIDGET[kind]]))
        elif kind == "FluxGuidance":
            found["guidance"].add(float(values[0]))
        elif kind == "ModelSamplingSD3":
            found["ModelSamplingSD3"].add(round(float(values[0]), 6))
    return found


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_sampling_defaults_are_the_templates(family):
    """The cfg / guidance / shift a search samples with by default are those of the family's ComfyUI template."""
    from calibri_core.families import get_family

    table = get_family(family)
    found = _template_settings(TEMPLATES[family])
    assert table.cfg in found["cfg"] if table.cfg is not None else found["cfg"] <= {1.0}
    assert table.guidance in found["guidance"] if table.guidance is not None else not found["guidance"]
    if table.schedule is not None:
        assert table.schedule.source == TEMPLATES[family]
        assert table.schedule.inputs["shift"] in found[table.schedule.node_name]
    else:
        assert not found["ModelSamplingSD3"], "the template sets a shift the table does not"
