"""The demo data set (calibri_core.demo.scenes) and its rule-based scorer (reward 'demo_rules'): measured facts.

Pure numpy; no ComfyUI import. ``-s`` prints the measured means.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibri_core.demo import scenes as S
from search.rewards import build_reward, check_rewards, registered_rewards
from search.rewards import demo_rules as R

# The held-out pairs of split_seed 0, as the scenes docstring documents them.
HELD_OUT_0 = {("blue", "square"), ("cyan", "triangle"), ("green", "triangle"), ("magenta", "circle"),
              ("red", "circle"), ("yellow", "cross")}


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    h, w = images.shape[1:3]
    x = sum(k[i] * p[:, :, i:i + w] for i in range(2 * r + 1))
    return sum(k[i] * x[:, i:i + h] for i in range(2 * r + 1))


def _degrade(images: np.ndarray, sigma: float, noise: float, seed: int = 0) -> np.ndarray:
    """A generator's output is not crisp: blur it, add Gaussian noise."""
    rng = np.random.default_rng(seed)
    return np.clip(_blur(images, sigma) + noise * rng.standard_normal(images.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def scenes_300():
    """300 seeded scenes, half from each split: captions and clean renders."""
    caps = S.prompts("train", 150, seed=7) + S.prompts("heldout", 150, seed=7)
    return caps, np.stack([S.render(c, 1000 + i) for i, c in enumerate(caps)])


# --- data ----------------------------------------------------------------------------------------------------------

def test_same_seed_same_bytes():
    a, b = S.render("a big red circle on the left", 5), S.render("a big red circle on the left", 5)
    assert a.dtype == np.float32 and a.shape == (32, 32, 3) and 0 <= a.min() and a.max() <= 1
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != S.render("a big red circle on the left", 6).tobytes()
    assert S.render("a big red circle on the left", 5, size=24).shape == (24, 24, 3)
    assert S.prompts("train", 50, seed=3) == S.prompts("train", 50, seed=3) != S.prompts("train", 50, seed=4)
    (ia, ca), (ib, cb) = S.sample("heldout", 11), S.sample("heldout", 11)
    assert ca == cb and ia.tobytes() == ib.tobytes()
    images, caps = S.samples("train", 20, 4)
    assert images.shape == (4, 32, 32, 3) and caps == [S.sample("train", s)[1] for s in range(20, 24)]


def test_background_is_not_flat_and_stays_grey():
    img = S.render("a small blue cross at the top", 0)
    bottom = img[-6:, :]  # the object is at the top: these rows are background only
    assert bottom.std(axis=(0, 1)).min() > 0.01, "the background must carry texture"
    for seed in range(50):
        bg = S._background(np.random.default_rng(seed), 32)
        assert (np.clip(bg, 0, 1).max(-1) - np.clip(bg, 0, 1).min(-1)).max() <= 0.2


def test_split_is_by_colour_shape_pairs():
    assert S.held_out_pairs(0) == HELD_OUT_0
    held = S.held_out_pairs(0)
    train_singles, train_pairs = S.catalogue("train")
    held_singles, held_pairs = S.catalogue("heldout")
    assert (len(train_singles), len(train_pairs), len(held_singles), len(held_pairs)) == (144, 4320, 48, 3360)
    share = (len(held_singles) + len(held_pairs)) / 7872
    print(f"\nsplit_seed 0: train 4464, held-out 3408 captions ({share:.1%} held out)")
    assert abs(share - 0.433) < 0.001
    for scene in train_singles + train_pairs:
        assert not any((o.colour, o.shape) in held for o in scene.objects)
    for scene in held_singles + held_pairs:
        assert any((o.colour, o.shape) in held for o in scene.objects)
    # Compositional, not novel: every colour and every shape still appears in training.
    seen = {(o.colour, o.shape) for s in train_singles for o in s.objects}
    assert {c for c, _ in seen} == set(S.COLOURS) and {s for _, s in seen} == set(S.SHAPES)
    for split in S.SPLITS:
        caps = S.prompts(split, 200, seed=1)
        assert len(set(caps)) == 200 and all(S.split_of(c) == split for c in caps)
        assert all(S.split_of(S.sample(split, s)[1]) == split for s in range(50))
    for seed in range(1, 20):
        pairs = S.held_out_pairs(seed)
        assert sorted(c for c, _ in pairs) == sorted(S.COLOURS)
        assert {s for _, s in pairs} == set(S.SHAPES)
    with pytest.raises(ValueError, match="has 3408 distinct captions"):
        S.prompts("heldout", 3409, seed=0)


def test_caption_parse_round_trip():
    train, held = S.catalogue("train"), S.catalogue("heldout")
    for scene in [s for part in train + held for s in part]:
        assert S.parse(S.caption(scene)) == scene
    forms = ["a big red circle on the left", "a red circle on the left", "a small yellow square at the top",
             "a green triangle at the bottom", "a big cyan cross on the right",
             "a red circle to the left of a blue square", "a small red circle to the right of a big blue square",
             "a magenta cross above a small green circle", "a big yellow triangle below a cyan square"]
    for text in forms:
        assert S.caption(S.parse(text)) == text
    assert S.parse("A Big  Red Circle on the LEFT.") == S.parse("a big red circle on the left")
    scene = S.parse("a small red circle to the left of a blue square")
    assert scene.relation == "left of" and scene.objects[1].size is None and scene.objects[0].size == "small"


@pytest.mark.parametrize("text,match", [
    ("a big purple circle on the left", "unknown word 'purple'"),
    ("a red circle near a blue square", "unknown word 'near'"),
    ("a red circle", "expected a position"),
    ("a red on the left", "expected a shape"),
    ("a red circle above a blue square on the left", "expected the end"),
    ("a red circle above a red square", "different colours"),
])
def test_parse_refuses(text, match):
    with pytest.raises(ValueError, match=match):
        S.parse(text)


# --- scorer --------------------------------------------------------------------------------------------------------

def test_scorer_on_clean_and_degraded_renders(scenes_300):
    caps, images = scenes_300
    means = {}
    for name, imgs in [("clean", images), ("blur 0.7 + noise 0.03", _degrade(images, 0.7, 0.03)),
                       ("blur 1.0 + noise 0.05", _degrade(images, 1.0, 0.05))]:
        scores = R.score(imgs, caps)
        means[name] = (scores[:150].mean(), scores[150:].mean())
        assert scores.mean() >= 0.95, f"{name}: mean {scores.mean():.3f}"
    print("\n" + "; ".join(f"{k}: train {a:.3f}, held-out {b:.3f}" for k, (a, b) in means.items()))


def test_scorer_on_mismatched_pairs(scenes_300):
    caps, images = scenes_300
    # Image i with the caption of scene i+1 of the same split: distinct captions, so different attributes.
    shifted = [caps[(i + 1) % 150 + (150 if i >= 150 else 0)] for i in range(300)]
    matched, mismatched = R.score(images, caps).mean(), R.score(images, shifted).mean()
    print(f"\nmatched {matched:.3f}, mismatched {mismatched:.3f}")
    assert mismatched <= 0.55 and matched - mismatched >= 0.4


def test_each_attribute_can_fail():
    """Change one attribute of the caption: exactly that verdict turns false."""
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "left of": "right of",
                "right of": "left of", "above": "below", "below": "above"}
    for seed, text in enumerate(S.prompts("train", 40, seed=2)):
        scene = S.parse(text)
        img = S.render(scene, seed)
        objs = list(scene.objects)
        first = objs[0]
        other_colour = next(c for c in S.COLOURS if c not in {o.colour for o in objs})
        other_shape = next(s for s in S.SHAPES if s != first.shape)
        other_size = "small" if first.size == "big" else "big"
        changes = {
            "colour 1": S.Scene(tuple([S.Thing(other_colour, first.shape, first.size)] + objs[1:]),
                                scene.position, scene.relation),
            "shape 1": S.Scene(tuple([S.Thing(first.colour, other_shape, first.size)] + objs[1:]),
                               scene.position, scene.relation),
            "size 1": S.Scene(tuple([S.Thing(first.colour, first.shape, other_size)] + objs[1:]),
                              scene.position, scene.relation),
        }
        if scene.position:
            changes["position"] = S.Scene(scene.objects, position=opposite[scene.position])
        else:
            changes["relation"] = S.Scene(scene.objects, relation=opposite[scene.relation])
        for attribute, wrong in changes.items():
            result = R.explain(img, [S.caption(wrong)])[0]
            failed = [k for k, v in result["attributes"].items() if not v]
            assert failed == [attribute], (text, S.caption(wrong), failed)
            assert result["score"] == pytest.approx(1 - 1 / len(result["attributes"]))


def test_flat_grey_and_noise_score_low(scenes_300):
    caps = scenes_300[0][:100]
    grey = R.score(np.full((100, 32, 32, 3), 0.5, np.float32), caps)
    noise = R.score(np.random.default_rng(0).random((100, 32, 32, 3)).astype(np.float32), caps)
    print(f"\nflat grey {grey.mean():.3f}, uniform noise {noise.mean():.3f}")
    assert grey.max() == 0.0 and noise.mean() <= 0.1


def test_registered_reward():
    assert "demo_rules" in registered_rewards()
    caps = ["a big red circle on the left", "a small blue square above a big green cross"]
    images = torch.from_numpy(np.stack([S.render(c, 3) for c in caps]))
    scores = build_reward("demo_rules").score(images, caps)
    assert scores.dtype == torch.float32 and scores.shape == (2,) and scores.tolist() == [1.0, 1.0]
    breakdown = R.explain(images, caps)[1]["attributes"]
    assert set(breakdown) == {"count", "colour 1", "shape 1", "size 1", "colour 2", "shape 2", "size 2", "relation"}
    check_rewards([{"name": "demo_rules", "weight": 1.0}])
    with pytest.raises(ValueError, match="demo_rules"):
        check_rewards([{"name": "demo_rules", "threshold": 0.5}])
    with pytest.raises(ValueError, match="unknown word 'dog'"):
        build_reward("demo_rules").score(images, ["a red dog on the left", caps[1]])
