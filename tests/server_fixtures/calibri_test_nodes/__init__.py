"""TEST SCAFFOLDING ONLY: a custom node pack that tests/test_server_e2e.py links into a temporary ComfyUI
base directory for one test session and removes afterwards. Never install it into a real ComfyUI.

There are no text-encoder weights in the tests, so ``CalibriTestConditioning`` stands in for CLIPTextEncode:
it makes deterministic random CONDITIONING of a given shape from a seed (cross-attention tokens, plus a pooled
vector and a FLUX guidance value when asked for).
"""

import torch


class CalibriTestConditioning:
    CATEGORY = "_calibri_test"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    DESCRIPTION = "Test scaffolding: seeded random CONDITIONING (no text encoder)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "tokens": ("INT", {"default": 5, "min": 1, "max": 512}),
            "width": ("INT", {"default": 48, "min": 1, "max": 8192}),
            "pooled": ("INT", {"default": 0, "min": 0, "max": 8192}),
            "guidance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.1}),
        }}

    def make(self, seed, tokens, width, pooled, guidance):
        generator = torch.Generator().manual_seed(int(seed))
        cross = torch.randn((1, tokens, width), generator=generator)
        options = {}
        if pooled:
            options["pooled_output"] = torch.randn((1, pooled), generator=generator)
        if guidance >= 0:
            options["guidance"] = float(guidance)
        return ([[cross, options]],)


NODE_CLASS_MAPPINGS = {"CalibriTestConditioning": CalibriTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"CalibriTestConditioning": "Calibri TEST conditioning (scaffolding)"}
