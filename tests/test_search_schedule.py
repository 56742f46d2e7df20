"""The search's sampling schedule (issue 9 item 2): the one a ComfyUI workflow of the family uses at the image size.

FLUX.1 and Qwen-Image are checked against diffusers' own schedulers (the reference samples with them): the shift mu
its pipeline computes for the image size, and the sigmas of 15 steps. The other families are checked against a
ComfyUI graph with their template's sampling node, built here from ComfyUI's node classes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_search_evaluator import _conditioning, make
from tiny_models import build_patcher

from calibri_core.families import get_family
from search.config import validate
from search.outputs import provenance
from search.schedule import SamplingSchedule

STEPS = 15
# ComfyUI tabulates its flow schedules on a 1000-step grid; the simple scheduler picks from it, so its t differs from
# diffusers' linspace by less than 1/1000 and its sigmas by less than this.
GRID = 2e-3
DIFFUSERS = {  # family -> (pipeline module, scheduler config of the released model)
    "flux": ("flux.pipeline_flux", dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                        max_shift=1.15)),
    "qwen_image": ("qwenimage.pipeline_qwenimage", dict(base_image_seq_len=256, max_image_seq_len=8192,
                                                        base_shift=0.5, max_shift=0.9)),
}


def _diffusers(family: str, width: int, height: int) -> tuple[float, np.ndarray]:
    import importlib

    from diffusers import FlowMatchEulerDiscreteScheduler

    module, config = DIFFUSERS[family]
    calculate_shift = importlib.import_module(f"diffusers.pipelines.{module}").calculate_shift
    tokens = (height // 16) * (width // 16)  # the pipelines' packed latent: VAE /8, 2×2 patches
    mu = calculate_shift(tokens, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                         config["max_shift"])
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", **config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    return mu, scheduler.sigmas.numpy()


@pytest.mark.parametrize("family", sorted(DIFFUSERS))
@pytest.mark.parametrize("size", [(512, 512), (1024, 1024), (1024, 576)])
def test_reference_families_sample_on_the_diffusers_dynamic_shift(family, size):
    width, height = size
    schedule = SamplingSchedule(build_patcher(family), get_family(family), "workflow", width, height)
    mu, expected = _diffusers(family, width, height)
    assert schedule.model.get_model_object("model_sampling").shift == pytest.approx(mu, abs=1e-9)
    sigmas = schedule.sigmas("simple", STEPS).numpy()
    assert sigmas.shape == expected.shape
    assert np.abs(sigmas - expected).max() < GRID
    record = schedule.record("simple", STEPS)
    assert record["node"] == "ModelSamplingFlux" and record["inputs"]["width"] == width
    assert record["shift"] == pytest.approx(mu, abs=1e-9)


def test_the_models_own_schedule_differs_at_512():
    """The reason for the option: ComfyUI's fixed FLUX shift (1.15) is not the reference's at 512² (0.63)."""
    model = SamplingSchedule(build_patcher("flux"), get_family("flux"), "model", 512, 512)
    workflow = SamplingSchedule(build_patcher("flux"), get_family("flux"), "workflow", 512, 512)
    assert model.record("simple", STEPS)["shift"] == pytest.approx(1.15)
    assert workflow.record("simple", STEPS)["shift"] == pytest.approx(0.63, abs=1e-9)
    assert (model.sigmas("simple", STEPS) - workflow.sigmas("simple", STEPS)).abs().max() > 0.05


def _graph_model(family: str, width: int, height: int):
    """The MODEL of a ComfyUI workflow: the loader's model through the family template's sampling node."""
    import comfy_extras.nodes_model_advanced as advanced

    patcher = build_patcher(family)
    if family == "flux":
        return advanced.ModelSamplingFlux().patch(patcher, 1.15, 0.5, width, height)[0]
    if family in ("chroma", "lumina2"):  # image_chroma_text_to_image.json: 1; image_netayume_lumina_t2i.json: 4
        return advanced.ModelSamplingAuraFlow().patch_aura(patcher, {"chroma": 1.0, "lumina2": 4.0}[family])[0]
    if family == "wan":  # text_to_video_wan.json
        return advanced.ModelSamplingSD3().patch(patcher, 8.0)[0]
    return patcher


@pytest.mark.parametrize("family", ["flux", "chroma", "lumina2", "wan", "sd3"])
def test_search_images_equal_a_comfyui_graph_with_the_templates_node(family):
    """Identity images of the search equal KSampler on the template's MODEL at the template's cfg."""
    import comfy.sample

    expected_cfg = {"flux": 1.0, "chroma": 3.5, "lumina2": 4.0, "wan": 6.0, "sd3": 7.0}[family]
    one_frame = {"latent_shape": (16, 1, 8, 8)} if family == "wan" else {}  # the search scores one image a sample
    ev = make(family, width=512, height=512, **one_frame)
    assert ev.cfg == expected_cfg
    prompts = ["two cats", "a lighthouse at night"]
    noise = ev.noise_for(prompts, 5)
    positive = _conditioning(ev, prompts)
    negative = _conditioning(ev, [ev.negative_prompt] * len(prompts))
    graph = _graph_model(family, 512, 512)
    latents = comfy.sample.sample(graph, noise, ev.steps, expected_cfg, "euler", "simple", positive, negative,
                                  torch.zeros_like(noise), seed=5, disable_pbar=True)
    got = ev.images(ev.identity(), prompts, seed=5)
    expected = ev._decode(latents)
    assert (got - expected).abs().max() <= 1e-5


def test_flux2_samples_on_flux2scheduler():
    from comfy_extras.nodes_flux import Flux2Scheduler

    schedule = SamplingSchedule(build_patcher("flux2"), get_family("flux2"), "workflow", 1024, 768)
    expected = Flux2Scheduler.execute(steps=STEPS, width=1024, height=768).result[0]
    assert torch.equal(schedule.sigmas("simple", STEPS), expected.float())
    assert schedule.record("simple", STEPS)["scheduler"] == "Flux2Scheduler"


def test_preset_provenance_names_the_schedule(tmp_path):
    ev = make("qwen_image", width=512, height=512)
    config = validate({"model": {"family": "qwen_image"}, "output": {"run_dir": str(tmp_path)}}, str(tmp_path),
                      check_files=False)
    assert config.sampling["schedule"] == "workflow"
    record = provenance(config, ev.model_info, "test", {})
    schedule = record["schedule"]
    assert schedule["mode"] == "workflow" and schedule["node"] == "ModelSamplingFlux"
    assert schedule["inputs"] == {"base_shift": 0.5, "max_shift": pytest.approx(0.5 + 0.4 * 3840 / 7936),
                                  "width": 512, "height": 512}
    assert len(schedule["sigmas"]) == ev.steps + 1
    assert "schedule" not in record["model"]


def test_a_video_latent_of_several_frames_is_refused():
    with pytest.raises(ValueError, match="one image per sample"):
        make("wan", latent_shape=(16, 2, 8, 8))
