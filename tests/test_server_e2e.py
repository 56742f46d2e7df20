"""End to end in a real ComfyUI server: the Calibri nodes driven through the HTTP API (POST /prompt, /history,
/view), on a tiny random-weight SD3.5-Medium-shaped model loaded by ComfyUI's own UNETLoader, decoded by its own
VAELoader/VAEDecode (random TAESD3 weights) and saved by SaveImage. Conditioning comes from the test-only node pack
in tests/server_fixtures (there are no text-encoder weights). See tests/server_harness.py for the set-up; nothing
is written outside a temporary base directory.
"""

from __future__ import annotations

import io
import itertools
import json
import urllib.parse

import numpy as np
import pytest
import server_harness as h

pytestmark = pytest.mark.server

CALIBRI_NODES = {
    "CalibriLoadPreset": {"preset", "model"},
    "CalibriApply": {"model", "calibration", "strength", "start_percent", "end_percent"},
    "CalibriManual": {"model", "granularity", "text"},
    "CalibriCombine": {f"{p}_{k}" for p in ("calibration", "weight", "prompt") for k in range(1, 5)},
    "CalibriEnsembleGuider": {"model", "positive", "negative", "calibration", "start_percent", "end_percent",
                              "rescale", "low_vram"},
    "CalibriEnsemble": {"model", "calibration", "start_percent", "end_percent"},
    "CalibriSavePreset": {"calibration", "filename", "overwrite"},
    "CalibriPlot": {"calibration"},
    "CalibriSweep": {"model", "granularity", "scale", "sites"},
}
STEPS = 4
_prefix = itertools.count()


@pytest.fixture(scope="session")  # session: shared with test_workflows.py, booted once
def server():
    s = h.acquire()
    yield s
    h.release()


# ---------------------------------------------------------------- prompt building

class Prompt:
    """An API-format prompt around the tiny SD3 model: loader, two seeded conditionings, latent, VAE."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}
        self.model = self.add("UNETLoader", unet_name=h.UNET_NAME, weight_dtype="default")
        tokens, width = h.SD3_CONTEXT
        self.positive = self.add("CalibriTestConditioning", seed=11, tokens=tokens, width=width,
                                 pooled=h.SD3_POOLED, guidance=-1.0)
        self.negative = self.add("CalibriTestConditioning", seed=12, tokens=tokens, width=width,
                                 pooled=h.SD3_POOLED, guidance=-1.0)
        self.latent = self.add("EmptySD3LatentImage", width=h.IMAGE_SIZE, height=h.IMAGE_SIZE, batch_size=1)
        self.vae = self.add("VAELoader", vae_name=h.VAE_NAME)

    def add(self, class_type: str, **inputs) -> list:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]

    def manual(self, text: str, granularity: str = "block") -> list:
        return self.add("CalibriManual", model=self.model, granularity=granularity, text=text)

    def ksampler(self, model: list, cfg: float = 2.0) -> list:
        return self.add("KSampler", model=model, seed=7, steps=STEPS, cfg=cfg, sampler_name="euler",
                        scheduler="simple", positive=self.positive, negative=self.negative,
                        latent_image=self.latent, denoise=1.0)

    def custom(self, guider: list) -> list:
        noise = self.add("RandomNoise", noise_seed=7)
        sampler = self.add("KSamplerSelect", sampler_name="euler")
        sigmas = self.add("BasicScheduler", model=self.model, scheduler="simple", steps=STEPS, denoise=1.0)
        return self.add("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                        latent_image=self.latent)

    def save(self, latent_or_image: list, decode: bool = True) -> "Prompt":
        image = self.add("VAEDecode", samples=latent_or_image, vae=self.vae) if decode else latent_or_image
        self.add("SaveImage", images=image, filename_prefix=f"calibri_e2e_{next(_prefix)}")
        return self


def images(server: h.ComfyServer, entry: dict) -> list[np.ndarray]:
    """The saved images of a finished prompt, read back through GET /view."""
    from PIL import Image

    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    out = []
    for node_output in entry["outputs"].values():
        for record in node_output.get("images", []):
            query = urllib.parse.urlencode({k: record[k] for k in ("filename", "subfolder", "type")})
            out.append(np.asarray(Image.open(io.BytesIO(server.get_bytes(f"/view?{query}"))).convert("RGB")))
    assert out, f"no images in {entry['outputs']}"
    return out


def image(server, prompt: Prompt) -> np.ndarray:
    return images(server, server.run(prompt.nodes))[0].astype(np.int16)


def execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert errors, entry["status"]["messages"]
    return errors[0]


@pytest.fixture(scope="module")
def baseline(server) -> np.ndarray:
    p = Prompt()
    return image(server, p.save(p.ksampler(p.model)))


def assert_serving(server, baseline):
    """After a refused or failed prompt the server still runs the next good one, with the same result."""
    p = Prompt()
    assert np.array_equal(image(server, p.save(p.ksampler(p.model))), baseline)


# ---------------------------------------------------------------- the nodes are there

def test_object_info_lists_every_calibri_node(server):
    info = server.object_info
    for node_id, inputs in CALIBRI_NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        declared = {**info[node_id]["input"].get("required", {}), **info[node_id]["input"].get("optional", {})}
        assert set(declared) == inputs, (node_id, sorted(declared))
        assert info[node_id]["category"] == "Calibri"
    shipped = info["CalibriLoadPreset"]["input"]["required"]["preset"][1]["options"]
    assert {"flux1-dev-slg-defaults.safetensors", "sd35-medium-slg-cfg4.5-guider.safetensors"} <= set(shipped)
    assert h.UNET_NAME in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert h.VAE_NAME in info["VAELoader"]["input"]["required"]["vae_name"][0]


# ---------------------------------------------------------------- calibrations change the image

def test_baseline_is_a_real_image(baseline):
    assert baseline.shape == (h.IMAGE_SIZE, h.IMAGE_SIZE, 3)
    assert baseline.std() > 5, "the decoded image is flat; the tiny VAE or model is broken"


def test_manual_apply_changes_the_image_and_strength_zero_does_not(server, baseline):
    p = Prompt()
    manual = p.manual("joint_blocks.1 = 0   # bypass one block\n")
    p.save(p.ksampler(p.add("CalibriApply", model=p.model, calibration=manual, strength=1.0,
                            start_percent=0.0, end_percent=1.0)))
    bypassed = image(server, p)
    assert np.abs(bypassed - baseline).max() > 10, "bypassing a block did not change the image"

    p = Prompt()
    manual = p.manual("joint_blocks.1 = 0\n")
    p.save(p.ksampler(p.add("CalibriApply", model=p.model, calibration=manual, strength=0.0,
                            start_percent=0.0, end_percent=1.0)))
    assert np.abs(image(server, p) - baseline).max() <= 1, "strength 0 must be the uncalibrated model"


def test_saved_preset_round_trip_through_load_preset(server, baseline):
    text = "joint_blocks.2 = 1.5\njoint_blocks.0 = 0.8\nweight = 1.05\n"
    p = Prompt()
    p.add("CalibriSavePreset", calibration=p.manual(text), filename="calibri-e2e-tiny", overwrite=True)
    entry = server.run(p.nodes)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert (server.models / "calibri" / "calibri-e2e-tiny.safetensors").is_file()
    listed = server.get("/object_info/CalibriLoadPreset")["CalibriLoadPreset"]["input"]["required"]["preset"]
    assert "calibri-e2e-tiny.safetensors" in listed[1]["options"]

    p = Prompt()
    p.save(p.ksampler(p.add("CalibriApply", model=p.model, calibration=p.manual(text), strength=1.0,
                            start_percent=0.0, end_percent=1.0)))
    from_manual = image(server, p)
    p = Prompt()
    preset = p.add("CalibriLoadPreset", preset="calibri-e2e-tiny.safetensors")
    p.save(p.ksampler(p.add("CalibriApply", model=p.model, calibration=preset, strength=1.0,
                            start_percent=0.0, end_percent=1.0)))
    from_preset = image(server, p)
    assert np.array_equal(from_manual, from_preset)
    assert np.abs(from_preset - baseline).max() > 10


def _cfg_ensemble(p: Prompt, positive_text: str = "", cfg: float = 2.0) -> list:
    return p.add("CalibriCombine", calibration_1=p.manual(positive_text), weight_1=cfg, prompt_1="positive",
                 calibration_2=p.manual(""), weight_2=1.0 - cfg, prompt_2="negative",
                 weight_3=1.0, prompt_3="positive", weight_4=1.0, prompt_4="positive")


def test_ensemble_guider_equals_cfg_and_calibrated_members_differ(server):
    p = Prompt()
    p.save(p.custom(p.add("CFGGuider", model=p.model, positive=p.positive, negative=p.negative, cfg=2.0)))
    cfg = image(server, p)

    def guided(text: str, rescale: str = "off") -> np.ndarray:
        q = Prompt()
        guider = q.add("CalibriEnsembleGuider", model=q.model, positive=q.positive, negative=q.negative,
                       calibration=_cfg_ensemble(q, text), start_percent=0.0, end_percent=1.0, rescale=rescale,
                       low_vram=False)
        return image(server, q.save(q.custom(guider)))

    identity = guided("")
    assert np.abs(identity - cfg).max() <= 1, "ω = (cfg, 1 − cfg) with identity members must be plain CFG"
    calibrated = guided("joint_blocks.2 = 0\n")
    assert np.abs(calibrated - cfg).max() > 10
    rescaled = guided("joint_blocks.2 = 0\n", rescale="positive_norm")
    assert np.abs(rescaled - calibrated).max() > 0


def test_ensemble_in_the_ksampler(server, baseline):
    p = Prompt()
    members = p.add("CalibriCombine", calibration_1=p.manual("joint_blocks.1 = 1.3\n"), weight_1=1.5,
                    prompt_1="positive", calibration_2=p.manual("joint_blocks.1 = 0\n"), weight_2=-0.5,
                    prompt_2="positive", weight_3=1.0, prompt_3="positive", weight_4=1.0, prompt_4="positive")
    p.save(p.ksampler(p.add("CalibriEnsemble", model=p.model, calibration=members, start_percent=0.0,
                            end_percent=1.0)))
    assert np.abs(image(server, p) - baseline).max() > 10


def test_plot_saves_one_chart_per_member(server):
    p = Prompt()
    preset = p.add("CalibriLoadPreset", preset="sd35-medium-slg-cfg4.5-guider.safetensors")
    plot = p.add("CalibriPlot", calibration=preset)
    p.save(plot, decode=False)
    entry = server.run(p.nodes)
    charts = images(server, entry)  # the SaveImage's and CalibriPlot's own preview (an output node)
    assert len(charts) == 6 and all(c.ndim == 3 and c.std() > 1 for c in charts)
    assert len(entry["outputs"][plot[0]]["images"]) == 3 and entry["outputs"][plot[0]]["images"][0]["type"] == "temp"


# ---------------------------------------------------------------- bad inputs: clear errors, server keeps serving

def test_wrong_family_and_wrong_size_presets_are_node_errors(server, baseline):
    for preset, expect in (("flux1-dev-slg-defaults.safetensors", "flux"),
                           ("sd35-medium-slg-cfg4.5-guider.safetensors", "joint_blocks")):
        p = Prompt()
        loaded = p.add("CalibriLoadPreset", preset=preset)
        p.save(p.ksampler(p.add("CalibriEnsemble", model=p.model, calibration=loaded, start_percent=0.0,
                                end_percent=1.0)))
        error = execution_error(server.run(p.nodes))
        assert error["node_type"] == "CalibriEnsemble"
        message = error["exception_message"]
        assert "made for" in message and expect in message, message
    assert_serving(server, baseline)


@pytest.mark.parametrize("text, expect", [
    ("joint_blocks.1 == 0.5\n", "line 1"),          # malformed: refused by validate_inputs at POST /prompt
    ("joint_blocks.1 = nan\n", "nan"),              # not finite
    ("joint_blocks.1 = inf\n", "inf"),
    ("joint_blocks.99 = 0\n", "joint_blocks"),      # a block the model lacks (parsed against the model)
    ("single_blocks.3 = 0\n", "single_blocks"),     # a FLUX site on an SD3 model
])
def test_bad_manual_text_is_a_clear_error(server, baseline, text, expect):
    p = Prompt()
    p.save(p.ksampler(p.add("CalibriApply", model=p.model, calibration=p.manual(text), strength=1.0,
                            start_percent=0.0, end_percent=1.0)))
    status, body = server.post_prompt(p.nodes)
    if status == 200:
        error = execution_error(server.wait(body["prompt_id"]))
        assert error["node_type"] == "CalibriManual"
        message = error["exception_message"]
    else:
        assert status == 400, body
        node_errors = body["node_errors"]
        assert [n["class_type"] for n in node_errors.values()] == ["CalibriManual"], node_errors
        message = json.dumps(node_errors)
    assert expect.lower() in message.lower(), message
    assert_serving(server, baseline)


def test_preset_not_in_the_list_is_refused(server, baseline):
    """ComfyUI 0.3.75 checks combo values against their options only for V1 list inputs, not for V3 ``COMBO``
    inputs, so a name outside the list is either refused at POST /prompt (if the node validates it) or fails in
    CalibriLoadPreset with a message naming the file and the folders searched."""
    message = _error_text(server, _apply_preset("no-such-preset.safetensors"))
    assert "no-such-preset.safetensors" in message and "calibri" in message.lower(), message
    assert_serving(server, baseline)


def _apply_preset(name: str) -> Prompt:
    p = Prompt()
    loaded = p.add("CalibriLoadPreset", preset=name)
    p.save(p.ksampler(p.add("CalibriApply", model=p.model, calibration=loaded, strength=1.0, start_percent=0.0,
                            end_percent=1.0)))
    return p


def _error_text(server, prompt: Prompt) -> str:
    """The refusal at POST /prompt, or the node error from /history; asserts it is one or the other."""
    status, body = server.post_prompt(prompt.nodes)
    if status != 200:
        assert status == 400, body
        return json.dumps(body)
    error = execution_error(server.wait(body["prompt_id"]))
    assert error["node_type"] == "CalibriLoadPreset", error
    return error["exception_message"]


def test_preset_deleted_after_listing(server, baseline):
    folder = server.models / "calibri"
    source = folder / "calibri-e2e-tiny.safetensors"
    if not source.is_file():  # written by the round-trip test; make it here when run alone
        p = Prompt()
        p.add("CalibriSavePreset", calibration=p.manual("joint_blocks.2 = 1.5\n"), filename="calibri-e2e-tiny",
              overwrite=True)
        assert server.run(p.nodes)["status"]["status_str"] == "success"
    gone = folder / "calibri-e2e-gone.safetensors"
    gone.write_bytes(source.read_bytes())
    listed = server.get("/object_info/CalibriLoadPreset")["CalibriLoadPreset"]["input"]["required"]["preset"]
    assert gone.name in listed[1]["options"]
    gone.unlink()
    message = _error_text(server, _apply_preset(gone.name))
    assert gone.name in message, message
    assert_serving(server, baseline)


@pytest.mark.parametrize("content", [b"this is not a safetensors file" * 10, b"\xff" * 8 + b"{}",
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"x": {"dtype": "F32"}}  '],
                         ids=["text", "bad-header-length", "truncated-tensor"])
def test_corrupt_preset_file_is_a_node_error(server, baseline, content):
    corrupt = server.models / "calibri" / "calibri-e2e-corrupt.safetensors"
    corrupt.write_bytes(content)
    try:
        message = _error_text(server, _apply_preset(corrupt.name))
        assert "calibri" in message.lower() and corrupt.name in message, message
    finally:
        corrupt.unlink()
    assert_serving(server, baseline)


def _bad_apply(p: Prompt, **overrides) -> None:
    args = dict(model=p.model, calibration=p.manual("joint_blocks.1 = 0\n"), strength=1.0, start_percent=0.0,
                end_percent=1.0)
    p.save(p.ksampler(p.add("CalibriApply", **dict(args, **overrides))))


def _bad_guider(p: Prompt, **overrides) -> None:
    args = dict(model=p.model, positive=p.positive, negative=p.negative, calibration=_cfg_ensemble(p),
                start_percent=0.0, end_percent=1.0, rescale="off", low_vram=False)
    p.save(p.custom(p.add("CalibriEnsembleGuider", **dict(args, **overrides))))


def _bad_combine(p: Prompt, **overrides) -> None:
    args = dict(calibration_1=p.manual(""), weight_1=1.0, prompt_1="positive", weight_2=1.0, prompt_2="positive",
                weight_3=1.0, prompt_3="positive", weight_4=1.0, prompt_4="positive")
    members = p.add("CalibriCombine", **dict(args, **overrides))
    p.save(p.ksampler(p.add("CalibriEnsemble", model=p.model, calibration=members, start_percent=0.0,
                            end_percent=1.0)))


def _bad_manual(p: Prompt, **overrides) -> None:
    p.save(p.ksampler(p.add("CalibriApply", model=p.model, calibration=p.manual("", **overrides), strength=1.0,
                            start_percent=0.0, end_percent=1.0)))


@pytest.mark.parametrize("build, overrides, expect", [
    # ComfyUI skips its own min/max check for inputs the node's validate_inputs takes (start/end_percent here).
    (_bad_apply, dict(start_percent=-0.5, end_percent=1.5), "start_percent"),
    (_bad_apply, dict(start_percent=0.0, end_percent=7.0), "end_percent"),
    (_bad_apply, dict(start_percent=0.8, end_percent=0.2), "start_percent"),
    (_bad_apply, dict(strength=9.0), "strength"),
    # V3 combos are not checked against their options by ComfyUI 0.3.75, so the node has to.
    (_bad_guider, dict(rescale="sideways"), "sideways"),
    (_bad_combine, dict(prompt_1="sideways"), "sideways"),
    (_bad_combine, dict(weight_1=99.0), "weight_1"),
    (_bad_manual, dict(granularity="cell"), "cell"),
], ids=["percent-below-0", "percent-above-1", "start-after-end", "strength-max", "rescale-combo", "prompt-combo",
        "weight-max", "granularity-combo"])
def test_bad_widget_values_are_refused_or_node_errors(server, baseline, build, overrides, expect):
    p = Prompt()
    build(p, **overrides)
    status, body = server.post_prompt(p.nodes)
    if status == 200:
        error = execution_error(server.wait(body["prompt_id"]))
        assert error["node_type"].startswith("Calibri"), error
        message = error["exception_message"]
    else:
        assert status == 400 and body["node_errors"], body
        assert all(n["class_type"].startswith("Calibri") for n in body["node_errors"].values()), body
        message = json.dumps(body["node_errors"])
    assert expect in message, message
    assert_serving(server, baseline)


# ---------------------------------------------------------------- CalibriSweep through the real executor

def test_sweep_list_runs_one_ksampler_per_entry(server, baseline):
    """ComfyUI maps the KSampler over CalibriSweep's MODEL list: the identity entry is the baseline, each other
    entry is the image of CalibriApply with that one block at the scale, and SaveImage names files by label."""
    p = Prompt()
    sweep = p.add("CalibriSweep", model=p.model, granularity="block", scale=0.0, sites="joint_blocks.1-2")
    image_node = p.add("VAEDecode", samples=p.ksampler(sweep), vae=p.vae)
    p.add("SaveImage", images=image_node, filename_prefix=[sweep[0], 1])
    entry = server.run(p.nodes)
    saved = images(server, entry)
    names = [r["filename"] for out in entry["outputs"].values() for r in out.get("images", [])]
    assert len(saved) == 3 and [n.split("_")[0] for n in names] == ["identity", "joint", "joint"], names
    assert np.array_equal(saved[0].astype(np.int16), baseline)
    for k, block in enumerate((1, 2), start=1):
        q = Prompt()
        single = q.add("CalibriApply", model=q.model, calibration=q.manual(f"joint_blocks.{block} = 0"), strength=1.0,
                       start_percent=0.0, end_percent=1.0)
        expected = image(server, q.save(q.ksampler(single)))
        assert np.array_equal(saved[k].astype(np.int16), expected), block
        assert not np.array_equal(expected, baseline)
