"""Writes ``example_workflows/*.json`` (ComfyUI UI-format workflows that ComfyUI lists under Templates).

Run ``python tests/server_fixtures/make_workflows.py`` after changing a graph here; tests/test_workflows.py
checks the written files against a real server's /object_info (node types, widget values, link types).
Widget values follow each node's widget inputs in order, plus "fixed"/"randomize" after a seed widget.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "example_workflows"

# Output sockets of every node type used here, in order (from /object_info), and the socket inputs in order.
OUTPUTS = {
    "UNETLoader": ["MODEL"], "DualCLIPLoader": ["CLIP"], "CLIPLoader": ["CLIP"], "VAELoader": ["VAE"],
    "CheckpointLoaderSimple": ["MODEL", "CLIP", "VAE"], "CLIPTextEncode": ["CONDITIONING"],
    "FluxGuidance": ["CONDITIONING"], "ConditioningZeroOut": ["CONDITIONING"], "EmptySD3LatentImage": ["LATENT"],
    "KSampler": ["LATENT"], "SamplerCustomAdvanced": ["LATENT", "LATENT"], "KSamplerSelect": ["SAMPLER"],
    "BasicScheduler": ["SIGMAS"], "RandomNoise": ["NOISE"], "VAEDecode": ["IMAGE"], "SaveImage": [],
    "PreviewImage": [], "ModelSamplingSD3": ["MODEL"], "ModelSamplingAuraFlow": ["MODEL"],
    "CalibriLoadPreset": ["CALIBRI"], "CalibriApply": ["MODEL"], "CalibriManual": ["CALIBRI"],
    "CalibriCombine": ["CALIBRI"], "CalibriEnsembleGuider": ["GUIDER"], "CalibriEnsemble": ["MODEL"],
    "CalibriSavePreset": [], "CalibriPlot": ["IMAGE"], "MarkdownNote": [],
}
OUTPUT_NAMES = {"SamplerCustomAdvanced": ["output", "denoised_output"], "CalibriLoadPreset": ["calibration"],
                "CalibriManual": ["calibration"], "CalibriCombine": ["calibration"]}
INPUTS = {
    "CLIPTextEncode": [("clip", "CLIP")], "FluxGuidance": [("conditioning", "CONDITIONING")],
    "ConditioningZeroOut": [("conditioning", "CONDITIONING")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")],
    "SamplerCustomAdvanced": [("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                              ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
    "BasicScheduler": [("model", "MODEL")], "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
    "SaveImage": [("images", "IMAGE")], "PreviewImage": [("images", "IMAGE")],
    "ModelSamplingSD3": [("model", "MODEL")], "ModelSamplingAuraFlow": [("model", "MODEL")],
    "CalibriApply": [("model", "MODEL"), ("calibration", "CALIBRI")],
    "CalibriManual": [("model", "MODEL")],
    "CalibriCombine": [(f"calibration_{k}", "CALIBRI") for k in range(1, 5)],
    "CalibriEnsembleGuider": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                              ("calibration", "CALIBRI")],
    "CalibriEnsemble": [("model", "MODEL"), ("calibration", "CALIBRI")],
    "CalibriSavePreset": [("calibration", "CALIBRI")], "CalibriPlot": [("calibration", "CALIBRI")],
}
SIZES = {"CLIPTextEncode": [400, 160], "CalibriManual": [400, 200], "MarkdownNote": [420, 220],
         "SaveImage": [320, 340], "PreviewImage": [320, 340], "KSampler": [320, 262]}


class Graph:
    def __init__(self, title: str):
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, pos: tuple[float, float], widgets: list | None = None, title: str | None = None,
             **inputs) -> dict:
        nid = len(self.nodes) + 1
        node = {
            "id": nid, "type": type_, "pos": [float(pos[0]), float(pos[1])], "size": SIZES.get(type_, [315, 106]),
            "flags": {}, "order": nid - 1, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in INPUTS.get(type_, [])],
            "outputs": [{"name": (OUTPUT_NAMES.get(type_) or OUTPUTS[type_])[i], "type": t, "links": []}
                        for i, t in enumerate(OUTPUTS[type_])],
            "properties": {"Node name for S&R": type_} if type_ != "MarkdownNote" else {},
            "widgets_values": list(widgets or []),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        for name, source in inputs.items():
            src, slot = source if isinstance(source, tuple) else (source, 0)
            self.link(src, slot, node, name)
        return node

    def link(self, src: dict, slot: int, dst: dict, name: str) -> None:
        lid = len(self.links) + 1
        index = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == name)
        type_ = src["outputs"][slot]["type"]
        self.links.append([lid, src["id"], slot, dst["id"], index, type_])
        src["outputs"][slot]["links"].append(lid)
        dst["inputs"][index]["link"] = lid

    def note(self, pos, text: str) -> dict:
        return self.node("MarkdownNote", pos, [text], title="Note")

    def to_json(self) -> dict:
        # Nodes run in dependency order; give the UI an order that respects the links.
        for n in self.nodes:
            for o in n["outputs"]:
                o["slot_index"] = n["outputs"].index(o)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "calibri/" + self.title)), "revision": 0,
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "calibri_title": self.title}, "version": 0.4,
        }


def flux_loaders(g: Graph, y: float = 0):
    unet = g.node("UNETLoader", (0, y), ["flux1-dev.safetensors", "default"])
    clip = g.node("DualCLIPLoader", (0, y + 140), ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"])
    vae = g.node("VAELoader", (0, y + 310), ["ae.safetensors"])
    return unet, clip, vae


def flux_preset() -> Graph:
    g = Graph("Calibri - FLUX.1-dev with a preset (KSampler)")
    unet, clip, vae = flux_loaders(g)
    preset = g.node("CalibriLoadPreset", (0, 460), ["flux1-dev-slg-defaults.safetensors"])
    model = g.node("CalibriEnsemble", (380, 0), [0.01, 0.15], model=unet, calibration=preset)
    pos = g.node("CLIPTextEncode", (380, 160), ["a red fox reading a newspaper in a sunlit cafe, detailed photo"],
                 clip=clip)
    guided = g.node("FluxGuidance", (820, 160), [3.5], conditioning=pos)
    neg = g.node("ConditioningZeroOut", (820, 300), conditioning=pos)
    latent = g.node("EmptySD3LatentImage", (380, 380), [1024, 1024, 1])
    sampled = g.node("KSampler", (1160, 0), [42, "fixed", 20, 1.0, "euler", "simple", 1.0],
                     model=model, positive=guided, negative=neg, latent_image=latent)
    image = g.node("VAEDecode", (1520, 0), samples=sampled, vae=vae)
    g.node("SaveImage", (1760, 0), ["calibri/flux-preset"], images=image)
    g.note((380, 560), "**Calibri with a preset on FLUX.1-dev.** `CalibriLoadPreset` reads a preset from "
           "`models/calibri/` or the pack's `presets/`. The shipped `flux1-dev-slg-defaults` is Skip Layer Guidance "
           "re-expressed as a two-member ensemble, so it goes through `CalibriEnsemble` (KSampler, cfg 1) with the "
           "SLG window 1 %-15 %. A searched one-member preset (or a `CalibriManual`) goes through `CalibriApply` "
           "instead: see the block-bypass sweep template.")
    return g


def flux_sweep() -> Graph:
    g = Graph("Calibri - FLUX.1-dev single-block bypass sweep")
    unet, clip, vae = flux_loaders(g)
    pos = g.node("CLIPTextEncode", (0, 460), ["a lighthouse on a cliff at dusk, oil painting"], clip=clip)
    guided = g.node("FluxGuidance", (0, 660), [3.5], conditioning=pos)
    neg = g.node("ConditioningZeroOut", (0, 780), conditioning=pos)
    latent = g.node("EmptySD3LatentImage", (0, 880), [1024, 1024, 1])
    variants = [("baseline", None), ("single_blocks.0", 0), ("single_blocks.10", 10), ("single_blocks.20", 20),
                ("single_blocks.37", 37)]
    for row, (name, index) in enumerate(variants):
        x, y = 460 + 0 * row, row * 300
        model = unet
        if index is not None:
            manual = g.node("CalibriManual", (x, y), ["block", f"# bypass one block (paper §3.1)\n"
                                                               f"single_blocks.{index} = 0\n"], model=unet)
            model = g.node("CalibriApply", (x + 440, y), [1.0, 0.0, 1.0], model=unet, calibration=manual)
        sampled = g.node("KSampler", (x + 800, y), [42, "fixed", 20, 1.0, "euler", "simple", 1.0],
                         model=model, positive=guided, negative=neg, latent_image=latent)
        image = g.node("VAEDecode", (x + 1160, y), samples=sampled, vae=vae)
        g.node("SaveImage", (x + 1400, y), [f"calibri/sweep-{name}"], images=image)
    g.note((0, 1000), "**Block-bypass sweep** (the paper's motivation experiment). Each row sets one single block's "
           "scale to 0 with `CalibriManual` and applies it with `CalibriApply`; every KSampler uses the same fixed "
           "seed, so the images differ only by the bypassed block. Copy a row to test more blocks, or use values "
           "such as 1.1 to scale instead of bypass.")
    return g


def sd35_guider() -> Graph:
    g = Graph("Calibri - SD3.5 Medium SLG ensemble guider")
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), ["sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"])
    shifted = g.node("ModelSamplingSD3", (0, 160), [3.0], model=(ckpt, 0))
    preset = g.node("CalibriLoadPreset", (0, 280), ["sd35-medium-slg-cfg4.5-guider.safetensors"])
    pos = g.node("CLIPTextEncode", (380, 0), ["a glass teapot with a tiny galaxy inside, studio lighting"],
                 clip=(ckpt, 1))
    neg = g.node("CLIPTextEncode", (380, 200), ["blurry, low quality"], clip=(ckpt, 1))
    guider = g.node("CalibriEnsembleGuider", (820, 0), [0.01, 0.2, "off", False], model=shifted, positive=pos,
                    negative=neg, calibration=preset)
    noise = g.node("RandomNoise", (820, 260), [42, "fixed"])
    sampler = g.node("KSamplerSelect", (820, 380), ["euler"])
    sigmas = g.node("BasicScheduler", (820, 480), ["sgm_uniform", 40, 1.0], model=shifted)
    latent = g.node("EmptySD3LatentImage", (820, 640), [1024, 1024, 1])
    sampled = g.node("SamplerCustomAdvanced", (1180, 0), noise=noise, guider=guider, sampler=sampler,
                     sigmas=sigmas, latent_image=latent)
    image = g.node("VAEDecode", (1520, 0), samples=(sampled, 0), vae=(ckpt, 2))
    g.node("SaveImage", (1760, 0), ["calibri/sd35-slg-guider"], images=image)
    g.note((0, 420), "**SD3.5 Medium with CalibriEnsembleGuider.** The shipped preset holds three members: identity "
           "on the positive prompt (ω = cfg + scale), blocks 7-9 skipped on the positive prompt (ω = −scale) and "
           "identity on the negative prompt (ω = 1 − cfg), i.e. CFG 4.5 with Skip Layer Guidance 2.8. The guider "
           "ignores cfg: the weights are the guidance. The window (1 %-20 %) is the SLG window; outside it the "
           "members merge into plain CFG.")
    return g


def qwen_image() -> Graph:
    g = Graph("Calibri - Qwen-Image ensemble guider (positive_norm)")
    unet = g.node("UNETLoader", (0, 0), ["qwen_image_fp8_e4m3fn.safetensors", "default"])
    clip = g.node("CLIPLoader", (0, 140), ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image", "default"])
    vae = g.node("VAELoader", (0, 310), ["qwen_image_vae.safetensors"])
    shifted = g.node("ModelSamplingAuraFlow", (0, 420), [3.1], model=unet)
    pos = g.node("CLIPTextEncode", (380, 0), ['a neon sign that reads "Calibri" above a rainy street'], clip=clip)
    neg = g.node("CLIPTextEncode", (380, 200), [""], clip=clip)
    cond_member = g.node("CalibriManual", (380, 420), ["block", "# the positive member: scale blocks by hand here\n"
                                                                "transformer_blocks.0-59 = 1.0\n"], model=shifted)
    uncond_member = g.node("CalibriManual", (380, 660), ["block", "# the negative member (identity)\n"],
                           model=shifted)
    combined = g.node("CalibriCombine", (820, 420), [4.0, "positive", -3.0, "negative", 1.0, "positive",
                                                     1.0, "positive"],
                      calibration_1=cond_member, calibration_2=uncond_member)
    guider = g.node("CalibriEnsembleGuider", (820, 0), [0.0, 1.0, "positive_norm", False], model=shifted,
                    positive=pos, negative=neg, calibration=combined)
    noise = g.node("RandomNoise", (1180, 260), [42, "fixed"])
    sampler = g.node("KSamplerSelect", (1180, 380), ["euler"])
    sigmas = g.node("BasicScheduler", (1180, 480), ["simple", 50, 1.0], model=shifted)
    latent = g.node("EmptySD3LatentImage", (1180, 640), [1328, 1328, 1])
    sampled = g.node("SamplerCustomAdvanced", (1540, 0), noise=noise, guider=guider, sampler=sampler,
                     sigmas=sigmas, latent_image=latent)
    image = g.node("VAEDecode", (1880, 0), samples=(sampled, 0), vae=vae)
    g.node("SaveImage", (2120, 0), ["calibri/qwen-image-ensemble"], images=image)
    g.note((820, 700), "**Qwen-Image ensemble.** Two `CalibriManual` members joined by `CalibriCombine`: "
           "ω = 4 on the positive prompt and ω = 1 − 4 = −3 on the negative prompt is Qwen-Image's true CFG 4. "
           "`rescale = positive_norm` rescales the ensemble per token to the norm of the positive member, as "
           "Qwen-Image's pipeline does. Edit the members' text to scale blocks (`transformer_blocks.N = 1.1`), or "
           "replace them with a searched preset.")
    return g


def plot() -> Graph:
    g = Graph("Calibri - plot a calibration")
    for row, name in enumerate(["flux1-dev-slg-defaults.safetensors", "sd35-medium-slg-cfg4.5-guider.safetensors"]):
        preset = g.node("CalibriLoadPreset", (0, row * 380), [name])
        chart = g.node("CalibriPlot", (380, row * 380), calibration=preset)
        g.node("PreviewImage", (700, row * 380), images=chart)
    g.note((0, 780), "**CalibriPlot** draws one chart per ensemble member: a bar per site from the identity line "
           "(scale 1), grouped by block, with the member's ω and prompt. Any CALIBRI output can be plotted: a preset, "
           "a `CalibriManual` or a `CalibriCombine`.")
    return g


WORKFLOWS = {
    "calibri-flux-preset-ksampler": flux_preset,
    "calibri-flux-block-bypass-sweep": flux_sweep,
    "calibri-sd35-medium-slg-ensemble-guider": sd35_guider,
    "calibri-qwen-image-ensemble-guider": qwen_image,
    "calibri-plot-calibration": plot,
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        (OUT / f"{name}.json").write_text(json.dumps(build().to_json(), indent=1, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
        print(f"wrote {OUT / name}.json")


if __name__ == "__main__":
    main()
