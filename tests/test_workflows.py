"""The example workflows in example_workflows/ (ComfyUI UI format, listed under Templates).

Without a server: the JSON is a well-formed UI workflow, links and node sockets agree, every preset named exists in
presets/, every CalibriManual text parses against the layout of the model its loader names, presets fit those models,
and CalibriApply only ever gets one-member calibrations.

With the shared real ComfyUI server (mark ``server``; tests/server_harness.py): every node type exists in its
/object_info (ComfyUI core, comfy_extras and this pack), every widget value is valid for its input (combo options,
min/max, types; model-file combos accept any file name since users' files differ, but the CALIBRI preset combo must
name a shipped preset) and every link joins matching types.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import server_harness

from calibri_core.families import get_family
from calibri_core.manual import parse_manual
from calibri_core.preset import load_preset

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_DIR = REPO / "example_workflows"
PRESETS = REPO / "presets"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))

# Node types that exist only in the frontend (never in /object_info).
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# Combo inputs that name a user's model file: any plausible file name is accepted.
MODEL_FILE_INPUTS = {"unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name", "ckpt_name",
                     "lora_name", "control_net_name"}
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".gguf")
# The models/ folder each loader reads: the `directory` of the download entries ComfyUI's own templates put on
# loader nodes (`properties.models`), from which the Missing Models panel offers the download.
LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "DualCLIPLoader": "text_encoders", "CLIPLoader": "text_encoders",
                  "VAELoader": "vae", "CheckpointLoaderSimple": "checkpoints"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# The widgets of each loader, in order (those that name model files are in MODEL_FILE_INPUTS).
MODEL_FILE_INPUTS_ORDER = {"UNETLoader": ("unet_name", "weight_dtype"),
                           "DualCLIPLoader": ("clip_name1", "clip_name2", "type", "device"),
                           "CLIPLoader": ("clip_name", "type", "device"), "VAELoader": ("vae_name",),
                           "CheckpointLoaderSimple": ("ckpt_name",)}
# The model each loader file in the workflows stands for: family and block counts (FLUX.1-dev and SD3.5 Medium
# from the shipped presets, Qwen-Image's 60 transformer blocks).
MODEL_COUNTS = {
    "flux1-dev.safetensors": ("flux", {"double_blocks": 19, "single_blocks": 38}),
    "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors":
        ("sd3", load_preset(PRESETS / "sd35-medium-slg-cfg4.5-guider.safetensors").counts),
    "qwen_image_fp8_e4m3fn.safetensors": ("qwen_image", {"transformer_blocks": 60}),
}
REQUIRED = {"flux-preset", "sd35", "qwen-image", "sweep", "plot"}  # a workflow name contains each of these


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


class Workflow:
    def __init__(self, path: Path):
        self.path = path
        self.data = load(path)
        self.nodes = {n["id"]: n for n in self.data["nodes"]}
        self.links = {link[0]: link for link in self.data["links"]}

    def source(self, node: dict, name: str) -> tuple[dict, int] | None:
        """(source node, output slot) feeding input ``name`` of ``node``."""
        for inp in node.get("inputs", []):
            if inp["name"] == name and inp.get("link") is not None:
                link = self.links[inp["link"]]
                return self.nodes[link[1]], link[2]
        return None

    def model_file(self, node: dict) -> str | None:
        """The loader file name at the root of ``node``'s model input (through model patches)."""
        seen = 0
        while node is not None and seen < 50:
            seen += 1
            if node["type"] in ("UNETLoader", "CheckpointLoaderSimple"):
                return node["widgets_values"][0]
            src = self.source(node, "model")
            node = src[0] if src else None
        return None

    def members(self, node: dict) -> int:
        """How many ensemble members the CALIBRI output of ``node`` has."""
        if node["type"] == "CalibriLoadPreset":
            return len(load_preset(PRESETS / node["widgets_values"][0]).calibration.members)
        if node["type"] == "CalibriManual":
            return 1
        if node["type"] == "CalibriCombine":
            return sum(self.members(src[0]) for k in range(1, 5)
                       if (src := self.source(node, f"calibration_{k}")) is not None)
        raise AssertionError(f"{self.path.name}: unexpected CALIBRI source {node['type']}")


@pytest.fixture(scope="session")  # session: the server is shared with test_server_e2e.py, booted once
def workflow_server():
    server = server_harness.acquire()
    yield server
    server_harness.release()


@pytest.fixture
def object_info(workflow_server):
    return workflow_server.object_info


def test_required_workflows_present():
    names = [p.stem for p in WORKFLOWS]
    missing = [key for key in REQUIRED if not any(key in n for n in names)]
    assert not missing, f"example_workflows/ lacks workflows for {missing}: {names}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_loaders_say_where_their_models_come_from(path):
    """Every model file a loader names has a download entry (name, Hugging Face URL, models/ folder) on that node,
    as in ComfyUI's own templates; without one the Missing Models panel offers no download."""
    wf = Workflow(path)
    for node in wf.nodes.values():
        if node["type"].endswith("Loader"):
            assert node["type"] in MODEL_FILE_INPUTS_ORDER, f"{node['type']}: add its widgets and folder here"
        widgets = zip(MODEL_FILE_INPUTS_ORDER.get(node["type"], ()), node.get("widgets_values") or [])
        files = [value for name, value in widgets if name in MODEL_FILE_INPUTS]
        entries = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
        assert sorted(entries) == sorted(files), f"{path.name} node {node['id']} ({node['type']}): {entries}"
        for name, entry in entries.items():
            assert entry["directory"] == LOADER_FOLDERS[node["type"]], entry
            assert entry["url"].startswith("https://huggingface.co/") and "/resolve/main/" in entry["url"], entry
            assert entry["url"].endswith("/" + name), entry


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_structure(path):
    wf = Workflow(path)
    data = wf.data
    assert data["version"] == 0.4 and isinstance(data["nodes"], list) and isinstance(data["links"], list)
    assert data["last_node_id"] >= max(wf.nodes) and data["last_link_id"] >= max(wf.links, default=0)
    assert len(wf.nodes) == len(data["nodes"]), "duplicate node ids"
    for link_id, origin, o_slot, target, t_slot, type_ in data["links"]:
        src, dst = wf.nodes[origin], wf.nodes[target]
        assert link_id in src["outputs"][o_slot]["links"], f"link {link_id} missing from node {origin}'s outputs"
        assert dst["inputs"][t_slot]["link"] == link_id, f"link {link_id} missing from node {target}'s inputs"
        assert src["outputs"][o_slot]["type"] == type_ == dst["inputs"][t_slot]["type"], f"link {link_id}"
    for node in data["nodes"]:
        for inp in node.get("inputs", []):
            assert inp["link"] is None or inp["link"] in wf.links, f"node {node['id']} input {inp['name']}"
        for out in node.get("outputs", []):
            for link_id in out["links"] or []:
                assert wf.links[link_id][1] == node["id"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_calibri_semantics(path):
    """Presets exist and fit the loaders' models, manual texts parse for them, CalibriApply gets one member."""
    wf = Workflow(path)
    shipped = {p.name for p in PRESETS.glob("*.safetensors")}
    for node in wf.nodes.values():
        kind = node["type"]
        if kind == "CalibriLoadPreset":
            assert node["widgets_values"][0] in shipped, f"{path.name}: {node['widgets_values'][0]} is not shipped"
        if kind == "CalibriManual":
            family, counts = MODEL_COUNTS[wf.model_file(node)]
            layout = get_family(family).layout(counts)
            granularity, text = node["widgets_values"]
            parse_manual(text, layout, granularity)  # raises with the line on any error
        if kind in ("CalibriApply", "CalibriEnsemble", "CalibriEnsembleGuider"):
            src = wf.source(node, "calibration")
            assert src is not None, f"{path.name}: {kind} {node['id']} has no calibration"
            model = wf.model_file(node)
            family, counts = MODEL_COUNTS[model]
            if src[0]["type"] == "CalibriLoadPreset":
                preset = load_preset(PRESETS / src[0]["widgets_values"][0])
                preset.check_against(get_family(family).layout(counts))
            if kind == "CalibriApply":
                assert wf.members(src[0]) == 1, f"{path.name}: CalibriApply {node['id']} gets an ensemble"
            if kind == "CalibriEnsembleGuider":
                for name in ("positive", "negative"):
                    assert wf.source(node, name) is not None


def widget_inputs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of the node's widget inputs in the order the frontend creates the widgets."""
    out = []
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            type_ = spec[0]
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(type_, list):
                options = dict(options, options=type_)
                type_ = "COMBO"
            if type_ in WIDGET_TYPES:
                out.append((name, type_, options))
    return out


def check_widget(where: str, name: str, type_: str, options: dict, value) -> list[str]:
    errors = []
    if type_ == "COMBO":
        choices = options.get("options", [])
        if name in MODEL_FILE_INPUTS:
            if not (isinstance(value, str) and value.endswith(MODEL_SUFFIXES)):
                errors.append(f"{where}: {name}={value!r} is not a model file name")
        elif value not in choices:
            errors.append(f"{where}: {name}={value!r} is not one of {choices}")
    elif type_ in ("INT", "FLOAT"):
        ok_type = isinstance(value, int) if type_ == "INT" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            errors.append(f"{where}: {name}={value!r} is not a finite {type_}")
        else:
            if "min" in options and value < options["min"]:
                errors.append(f"{where}: {name}={value} < min {options['min']}")
            if "max" in options and value > options["max"]:
                errors.append(f"{where}: {name}={value} > max {options['max']}")
    elif type_ == "BOOLEAN":
        if not isinstance(value, bool):
            errors.append(f"{where}: {name}={value!r} is not a boolean")
    elif type_ == "STRING" and not isinstance(value, str):
        errors.append(f"{where}: {name}={value!r} is not a string")
    return errors


@pytest.mark.server
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_against_object_info(path, object_info):
    wf = Workflow(path)
    errors = []
    for node in wf.nodes.values():
        kind = node["type"]
        where = f"{path.name} node {node['id']} ({kind})"
        if kind in FRONTEND_ONLY:
            continue
        info = object_info.get(kind)
        if info is None:
            errors.append(f"{where}: node type not in /object_info")
            continue
        # Widget values, in widget order (a seed widget is followed by its control_after_generate value).
        values = list(node.get("widgets_values") or [])
        expected = 0
        for name, type_, options in widget_inputs(info):
            if not values:
                errors.append(f"{where}: no value for widget {name}")
                break
            errors += check_widget(where, name, type_, options, values.pop(0))
            expected += 1
            if options.get("control_after_generate"):
                control = values.pop(0) if values else None
                if control not in CONTROL_VALUES:
                    errors.append(f"{where}: {name}'s control_after_generate {control!r}")
        if values:
            errors.append(f"{where}: {len(values)} widget values too many: {values}")
        if kind == "CalibriLoadPreset":
            choice = node["widgets_values"][0]
            if not (PRESETS / choice).is_file():
                errors.append(f"{where}: preset {choice!r} is not shipped in presets/")
        # Socket inputs: every one exists on the node with the same type; every required one is connected.
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for inp in node.get("inputs", []):
            spec = inputs.get(inp["name"])
            if spec is None:
                errors.append(f"{where}: input {inp['name']} does not exist")
                continue
            declared = "COMBO" if isinstance(spec[0], list) else spec[0]
            if inp["type"] != declared and "*" not in (inp["type"], declared):
                errors.append(f"{where}: input {inp['name']} declared {inp['type']}, server says {declared}")
        sockets = {i["name"]: i for i in node.get("inputs", [])}
        for name, spec in info["input"].get("required", {}).items():
            type_ = "COMBO" if isinstance(spec[0], list) else spec[0]
            if type_ not in WIDGET_TYPES and sockets.get(name, {}).get("link") is None:
                errors.append(f"{where}: required input {name} ({type_}) is not connected")
        for slot, out in enumerate(node.get("outputs", [])):
            if slot >= len(info["output"]) or out["type"] != info["output"][slot]:
                errors.append(f"{where}: output {slot} {out['type']} vs server {info['output']}")
    # Links: output type of the source slot == input type of the target slot on the server's definitions.
    for link_id, origin, o_slot, target, t_slot, type_ in wf.data["links"]:
        src, dst = wf.nodes[origin], wf.nodes[target]
        if {src["type"], dst["type"]} & FRONTEND_ONLY or not {src["type"], dst["type"]} <= object_info.keys():
            continue  # unknown types are reported above
        out_type = object_info[src["type"]]["output"][o_slot]
        name = dst["inputs"][t_slot]["name"]
        dst_info = object_info[dst["type"]]["input"]
        spec = {**dst_info.get("required", {}), **dst_info.get("optional", {})}.get(name)
        in_type = None if spec is None else ("COMBO" if isinstance(spec[0], list) else spec[0])
        if in_type is None or (out_type != in_type and "*" not in (out_type, in_type)):
            errors.append(f"{path.name} link {link_id}: {src['type']}[{o_slot}] {out_type} -> "
                          f"{dst['type']}.{name} {in_type}")
    assert not errors, "\n".join(errors)


@pytest.mark.server
def test_server_lists_the_templates(workflow_server):
    """ComfyUI's custom node manager serves these files under Templates (GET /workflow_templates)."""
    templates = workflow_server.get("/workflow_templates")
    assert sorted(templates.get("calibri", [])) == sorted(p.stem for p in WORKFLOWS), templates
    for path in WORKFLOWS:
        served = json.loads(workflow_server.get_bytes(f"/api/workflow_templates/calibri/{path.name}"))
        assert served == load(path)


def to_api(wf: Workflow, object_info: dict) -> dict:
    """The API-format prompt the frontend would queue for this UI workflow (frontend-only nodes dropped)."""
    prompt = {}
    for node in wf.nodes.values():
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, _type, options in widget_inputs(object_info[node["type"]]):
            inputs[name] = values.pop(0)
            if options.get("control_after_generate"):
                values.pop(0)
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = wf.links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.server
def test_plot_workflow_runs_in_the_server(workflow_server):
    """The plot template needs no model files: queue it as the frontend would; each CalibriPlot shows one chart
    per member."""
    path = WORKFLOW_DIR / "calibri-plot-calibration.json"
    wf = Workflow(path)
    entry = workflow_server.run(to_api(wf, workflow_server.object_info))
    assert entry["status"]["status_str"] == "success", entry["status"]
    shown = {node_id: len(out.get("images", [])) for node_id, out in entry["outputs"].items()}
    # CalibriPlot is an output node that shows its own charts (issue 12), one per member
    expected = {str(n["id"]): wf.members(wf.source(n, "calibration")[0])
                for n in wf.nodes.values() if n["type"] == "CalibriPlot"}
    assert shown == expected and all(expected.values()), (shown, expected)
