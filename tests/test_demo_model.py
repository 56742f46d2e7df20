"""The demo model's building blocks on the host: built with ComfyUI's ChromaRadiance classes, saved and loaded as one
safetensors file, encoded with CLIPTextEncode, sampled with ComfyUI's KSampler, decoded by the pixel-space VAE,
recognised by the engine as a Chroma model, and calibrated by it. Untrained (seeded) weights: these tests check the
path, not image quality."""

from __future__ import annotations

import json

import pytest
import torch

from calibri_core.demo import model as demo


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    base = demo.build_base_model()
    demo.init_weights(base.diffusion_model, seed=0)
    with torch.no_grad():  # the output layers start at zero; make the prediction depend on the blocks
        for name, p in base.diffusion_model.named_parameters():
            if name.startswith("nerf_final_layer"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    text = demo.TextEncoder()
    with torch.no_grad():
        text.words.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    path = tmp_path_factory.mktemp("demo") / "demo.safetensors"
    demo.save(str(path), base.diffusion_model, text, extra={"training": {"steps": 0}})
    return path


def _sample(model, clip, prompt: str, cfg: float = 1.0):
    return demo.sample_latents(model, clip, [prompt], steps=2, cfg=cfg)


def test_loads_as_comfyui_objects_and_samples(weights):
    import comfy.sd

    model, clip, vae = demo.load(str(weights))
    assert type(model.model).__name__ == "ChromaRadiance" and isinstance(clip, comfy.sd.CLIP)
    image = vae.decode(_sample(model, clip, "a big red circle on the left", cfg=3.0))
    assert tuple(image.shape[-3:]) == (demo.IMAGE_SIZE, demo.IMAGE_SIZE, 3)
    assert torch.isfinite(image).all() and 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_text_encoder_is_the_same_for_graphs_and_code(weights):
    import nodes

    _, clip, _ = demo.load(str(weights))
    _, te, _ = demo.read(str(weights))
    encoder = demo.TextEncoder()
    encoder.load_state_dict(te)
    prompt = "a small blue square above a big yellow cross"
    via_graph = nodes.CLIPTextEncode().encode(clip, prompt)[0][0][0]
    assert torch.equal(via_graph.cpu(), encoder.encode([prompt]).detach())
    empty = encoder.encode([""])
    assert torch.equal(empty[0], encoder.positions.detach() + encoder.words.weight[0].detach())


def test_unknown_word_and_other_spec_refused(weights, tmp_path):
    _, clip, _ = demo.load(str(weights))
    with pytest.raises(ValueError, match="'purple' is not one"):
        clip.tokenize("a purple circle on the left")
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"
    spec = demo.spec()
    spec["unet"]["depth"] = 3
    save_file(load_file(str(weights)), str(other), metadata={"calibri_demo": json.dumps(spec)})
    with pytest.raises(ValueError, match="another spec"):
        demo.read(str(other))


def test_engine_recognises_and_calibrates_it(weights):
    """The pack's own family table reads the demo model (Chroma, 2 double + 4 single blocks), and bypassing a block
    through the engine changes the sample."""
    from calibri_core.calibration import Calibration, Member
    from calibri_core.families import detect
    from calibri_core.host import apply_calibration

    model, clip, _ = demo.load(str(weights))
    family, layout = detect(model.model.diffusion_model)
    assert family.name == "chroma"
    sites = layout.site_names("block")
    assert len(sites) == demo.UNET["depth"] + demo.UNET["depth_single_blocks"]
    base = _sample(model, clip, "a big red circle on the left")
    scales = tuple(0.0 if s == sites[0] else 1.0 for s in sites)
    calibrated = apply_calibration(model, Calibration("chroma", "block", tuple(sites), (Member(scales),)))
    changed = _sample(calibrated, clip, "a big red circle on the left")
    identity = apply_calibration(model, Calibration("chroma", "block", tuple(sites), (Member((1.0,) * len(sites)),)))
    assert torch.equal(_sample(identity, clip, "a big red circle on the left"), base)
    assert (changed - base).abs().max() > 1e-4


def test_initial_weights_can_learn():
    """From :func:`init_weights` the prediction is zero, and after one step on the output projection the gradient
    reaches every parameter (a zeroed norm scale in the head once left only its bias trainable)."""
    import comfy.model_management

    comfy.model_management.in_training = True  # the torch RoPE (ComfyUI's fused one has no backward)
    try:
        base = demo.build_base_model()
        demo.init_weights(base.diffusion_model, seed=0)
        params = dict(base.diffusion_model.named_parameters())
        for p in params.values():
            p.requires_grad_(True)
        x = torch.randn(2, 3, demo.IMAGE_SIZE, demo.IMAGE_SIZE)
        sigma = torch.full((2,), 0.5)
        context = demo.TextEncoder().encode(["a big red circle on the left"] * 2).detach()

        def loss():
            with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
                out = base.apply_model(x, sigma, c_crossattn=context, guidance=torch.zeros(2))
            return ((out - x.flip(0)) ** 2).mean()

        first = loss()
        first.backward()
        assert torch.equal(base.apply_model(x, sigma, c_crossattn=context, guidance=torch.zeros(2)), x)  # v = 0
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p -= 0.1 * p.grad
                p.grad = None
        loss().backward()
        dead = [n for n, p in params.items() if p.grad is None or not p.grad.abs().max() > 0]
        assert not dead, dead
    finally:
        comfy.model_management.in_training = False


def test_shipped_model_draws_held_out_prompts():
    """The shipped weights (tools/demo_train.py --steps 3000 --batch 64 --seed 0) through ComfyUI's nodes draw the
    attributes of prompts whose (colour, shape) pairs they never saw. Measured with tools/demo_eval.py: demo_rules
    0.745 ± 0.038 on 64 held-out prompts at 8 steps, cfg 3 (0.668 ± 0.058 at cfg 1); the step-500 EMA checkpoint of
    that run still drew noise and scored 0.202 ± 0.124 on 16 training prompts. The floor 0.6 lies below the
    held-out interval, also widened to 32 prompts (about 0.745 ± 0.054)."""
    from pathlib import Path

    import numpy as np

    from calibri_core.demo import scenes
    from search.rewards import demo_rules

    shipped = Path(demo.__file__).with_name("calibri-demo.safetensors")
    model, clip, vae = demo.load(str(shipped))
    prompts = scenes.prompts("heldout", 32, 0)
    images = demo.sample(model, clip, vae, prompts, steps=8, cfg=3.0).float().cpu().numpy()
    score = float(np.mean(demo_rules.score(images, prompts)))
    print(f"shipped demo model, 32 held-out prompts, 8 steps, cfg 3: demo_rules {score:.3f}")
    assert score >= 0.6, score
