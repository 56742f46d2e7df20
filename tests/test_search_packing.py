"""Packing texts of different lengths (issue 9 item 5).

Qwen-Image, Lumina2 and Z-Image encode prompts at their own length (min_length 1), so a bucket of prompts plus the
negative prompt has many text lengths. Where the family's model masks padded text (``Family.text_padding``) and the
host passes ``attention_mask`` to it, the search pads every text of a pack to one length and masks the padding: one
forward per step, with the images of unpadded forwards to fp32 rounding. Elsewhere it keeps one forward per length.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from tiny_models import SPECS, build_patcher

from calibri_core.calibration import Calibration, Member
from search.evaluator import Evaluator
from search.models import ModelBundle
from search.rewards import build_rewards

PROMPTS = ["a cat", "a red cube on a blue sphere", "two dogs playing in the snow at dusk", "night",
           "a lighthouse on a cliff", "a bowl of fruit on a wooden table in the morning light"]


class WordLengthEncoder:
    """A weight-free encoder whose output has one token per word (at least one), like min_length = 1 encoders."""

    def __init__(self, width: int):
        self.width = width
        self.identity = f"words:{width}"

    def encode(self, prompt: str):
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        tokens = max(1, len(prompt.split()))
        return torch.randn(1, tokens, self.width, generator=torch.Generator().manual_seed(seed)), {}


def evaluator(family: str) -> Evaluator:
    spec = SPECS[family]
    reward = build_rewards([{"name": "target", "images": torch.full((1, 8, 8, 3), 0.5)}])
    return Evaluator(ModelBundle(build_patcher(family), WordLengthEncoder(spec.context[1])), reward, steps=3,
                     latent_shape=spec.latent, cfg=4.0)


def _candidates(ev):
    ident = ev.identity()
    n = len(ident.sites)
    other = Calibration(ident.family, ident.granularity, ident.sites,
                        (Member(tuple(1.0 + 0.1 * ((i % 5) - 2) for i in range(n)), 3.0, "positive"),
                         Member(tuple(1.0 - 0.05 * ((i % 3) - 1) for i in range(n)), -2.0, "negative")))
    return [ident, other]


def _forwards_and_images(ev, candidates, rows):
    ev.batch_size, ev.stats = rows, {}
    images = ev.images_many(candidates, PROMPTS, seed=3)
    return ev.stats["forwards_per_step"], images


def test_qwen_pack_is_one_forward_where_the_host_masks_padding():
    ev = evaluator("qwen_image")
    candidates = _candidates(ev)
    lengths = {max(1, len(p.split())) for p in PROMPTS + [ev.negative_prompt]}
    rows = len(candidates) * len(PROMPTS) * 2
    packed_forwards, packed = _forwards_and_images(ev, candidates, rows)
    _, alone = _forwards_and_images(ev, candidates, 1)  # one (candidate, prompt) pair per pack
    padding = ev.pad_text
    ev.pad_text = False
    grouped_forwards, grouped = _forwards_and_images(ev, candidates, rows)
    print(f"\nforwards per step for {rows} rows of {len(lengths)} text lengths: grouped {grouped_forwards}, "
          f"with text padding {packed_forwards} (padding on this host: {padding})")
    assert grouped_forwards == len(lengths)
    from calibri_core.comfy_env import find_host

    version = tuple(int(v) for v in find_host().version.split(".")[:3])
    if version <= (0, 3, 75) or version >= (0, 33, 0):  # the hosts read: 0.3.75 drops attention_mask, 0.33 passes it
        assert padding == (version >= (0, 33, 0))
    assert packed_forwards == (1 if padding else len(lengths))
    for a, b, c in zip(packed, alone, grouped):
        assert (a - b).abs().max() <= 1e-5
        assert (c - b).abs().max() <= 1e-5
    assert not torch.equal(packed[0], packed[1])


@pytest.mark.parametrize("family", ["lumina2", "z_image"])
def test_families_without_a_mask_path_keep_one_forward_per_length(family):
    """ComfyUI's NextDiT ignores the caption mask (``cap_mask = None``) and places image tokens after the caption,
    so padding would change the result: Lumina2 and Z-Image keep grouping."""
    ev = evaluator(family)
    assert not ev.family_info.text_padding and not ev.pad_text
    texts = PROMPTS + ([ev.negative_prompt] if ev.family_info.cfg is not None else [])
    forwards, _ = _forwards_and_images(ev, [ev.identity()], 64)
    assert forwards == len({max(1, len(t.split())) for t in texts})


def test_texts_of_one_length_are_not_padded():
    ev = evaluator("qwen_image")
    ev.prepare(["a cat", "two dogs", "night"])
    cond, options = ev._conditioning(["a cat", "two dogs"])
    assert "attention_mask" not in options and cond.shape[1] == 2
    cond, options = ev._conditioning(["a cat", "night"])
    assert options["attention_mask"].tolist() == [[1, 1], [1, 0]] and cond.shape[1] == 2
    assert torch.equal(cond[1, 1], torch.zeros_like(cond[1, 1]))
