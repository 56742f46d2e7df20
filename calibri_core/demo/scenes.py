"""A procedural text-to-image set: coloured shapes on textured backgrounds, with captions from a small grammar.

Everything is made in code (numpy only) and is a pure function of its seeds: the same seed gives the same bytes.

Vocabulary
    colours  red, yellow, green, cyan, blue, magenta (hues 0, 60, ..., 300 degrees: 60 degrees apart, so a hue read
             back from a blurred, noisy image still lands in the right class)
    shapes   circle, square, triangle (apex up), cross (a plus sign)
    sizes    small, big (bounding-box side 0.25 and 0.40 of the image side, each jittered by up to 6 %)
    position (one object)   on the left, on the right, at the top, at the bottom
    relation (two objects)  to the left of, to the right of, above, below

Grammar (lower case; a trailing full stop and extra spaces are accepted by :func:`parse`)
    object   := "a" [size] colour shape
    caption  := object position | object relation object
    e.g. "a big red circle on the left", "a small red circle to the left of a big blue square".
    Generated captions always carry sizes; without one the size is free (drawn at random) and not scored.
    Two objects always have different colours, so a scorer can tell them apart by colour even where they touch.

Images
    float32 [H, W, 3] in [0, 1], 32 x 32 by default (``size``). The background is a gradient between two
    low-saturation colours (HSV saturation <= 0.2, value 0.3-0.85, so chroma <= 0.17) in a random direction, with a
    smooth grey texture and a fine grain: not flat, so image quality is something a model can get wrong, yet every
    object (saturation >= 0.85, value 0.78-0.92, chroma >= 0.66) stands apart from it by chroma alone. Objects are
    anti-aliased (4 x 4 supersampling), lightly shaded, at least 2 px apart, and never cross the border.

Split (compositional generalisation, the T2I-CompBench++ idea)
    :func:`held_out_pairs` picks, as a fixed function of ``split_seed`` (default :data:`SPLIT_SEED` = 0), six of the
    24 (colour, shape) pairs: each colour once, with a shape from a seeded shuffle of the shapes, so two shapes are
    held out twice and two once. Every colour and every shape still appears in training, only not in these
    combinations. A caption is *held-out* exactly when one of its objects uses a held-out pair, and *train*
    otherwise. For ``split_seed`` 0 the held-out pairs are: red circle, yellow cross, green triangle, cyan
    triangle, blue square, magenta circle.

Measured (split_seed 0, generated captions, i.e. with sizes)
    distinct captions: 7872 = 192 one-object + 7680 two-object; train 4464 (144 + 4320), held-out 3408 (48 + 3360):
    43.3 % of all captions, 25 % of one-object and 43.75 % of two-object ones.
    Rendering a 32 x 32 scene takes about 1 ms on one CPU core. The rule-based scorer (reward ``demo_rules``)
    reads 300 seeded renders back with mean score 1.000, and 1.000 after a 0.7 px blur and noise 0.03; captions
    of other scenes score 0.366 on them (see ``search/rewards/demo_rules.py``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["COLOURS", "SHAPES", "SIZES", "POSITIONS", "RELATIONS", "SPLITS", "SPLIT_SEED", "VOCABULARY", "Thing",
           "Scene", "caption", "parse", "held_out_pairs", "split_of", "catalogue", "prompts", "render", "sample",
           "samples"]

# Hue in degrees; 60 degrees apart so that classification by nearest hue has +-30 degrees of room.
COLOURS: dict[str, float] = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0,
                             "magenta": 300.0}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Bounding-box side as a fraction of the image side. Two big objects must fit side by side with a gap on 32 px.
SIZES: dict[str, float] = {"small": 0.25, "big": 0.40}
SIZE_JITTER = 0.06
POSITIONS: dict[str, str] = {"left": "on the left", "right": "on the right", "top": "at the top",
                             "bottom": "at the bottom"}
RELATIONS: dict[str, str] = {"left of": "to the left of", "right of": "to the right of", "above": "above",
                             "below": "below"}
SPLITS: tuple[str, ...] = ("train", "heldout")
SPLIT_SEED = 0

# Where each position / relation puts things: (axis, sign), axis 0 = x (columns), 1 = y (rows, downwards).
_POSITION_DIRECTION = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}
_RELATION_DIRECTION = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}

# Distinct tags keep the random streams of the split, the prompt draws and the renders independent of each other.
_TAG_SPLIT, _TAG_PROMPTS, _TAG_RENDER, _TAG_SAMPLE = 101, 102, 103, 104

_SUPERSAMPLE = 4
_MIN_SIZE = 8


@dataclass(frozen=True)
class Thing:
    """One object of a caption; ``size`` None means the caption does not say (drawn at random, not scored)."""

    colour: str
    shape: str
    size: str | None = None

    def __post_init__(self) -> None:
        _check_word(self.colour, COLOURS, "colour")
        _check_word(self.shape, SHAPES, "shape")
        if self.size is not None:
            _check_word(self.size, SIZES, "size")


@dataclass(frozen=True)
class Scene:
    """One or two objects: one with a ``position``, two with a ``relation`` (objects[0] relation objects[1])."""

    objects: tuple[Thing, ...]
    position: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not all(isinstance(o, Thing) for o in self.objects):
            raise TypeError("Calibri demo: Scene.objects must be Thing instances.")
        if len(self.objects) == 1:
            if self.relation is not None or self.position is None:
                raise ValueError("Calibri demo: a one-object scene needs a position and no relation.")
            _check_word(self.position, POSITIONS, "position")
        elif len(self.objects) == 2:
            if self.position is not None or self.relation is None:
                raise ValueError("Calibri demo: a two-object scene needs a relation and no position.")
            _check_word(self.relation, RELATIONS, "relation")
            if self.objects[0].colour == self.objects[1].colour:
                raise ValueError(f"Calibri demo: the two objects of a scene must have different colours, both are "
                                 f"{self.objects[0].colour!r}; pick another colour for one of them.")
        else:
            raise ValueError(f"Calibri demo: a scene has 1 or 2 objects, got {len(self.objects)}.")


def _check_word(word: str, allowed: Sequence[str], what: str) -> None:
    if word not in allowed:
        raise ValueError(f"Calibri demo: unknown {what} {word!r}; use one of {', '.join(allowed)}.")


# --- grammar -------------------------------------------------------------------------------------------------------

def _object_phrase(thing: Thing) -> str:
    words = ["a"] + ([thing.size] if thing.size else []) + [thing.colour, thing.shape]
    return " ".join(words)


def caption(scene: Scene) -> str:
    """The caption of a scene; :func:`parse` is its inverse."""
    if len(scene.objects) == 1:
        return f"{_object_phrase(scene.objects[0])} {POSITIONS[scene.position]}"
    a, b = scene.objects
    return f"{_object_phrase(a)} {RELATIONS[scene.relation]} {_object_phrase(b)}"


_PHRASE_WORDS = {w for p in list(POSITIONS.values()) + list(RELATIONS.values()) for w in p.split()}
VOCABULARY: frozenset[str] = frozenset({"a"} | set(COLOURS) | set(SHAPES) | set(SIZES) | _PHRASE_WORDS)


def parse(text: str) -> Scene:
    """The scene a caption asks for (its required attributes). Refuses text outside the grammar with a ValueError
    that names the first unknown word, or says where the words stop following the grammar."""
    if not isinstance(text, str):
        raise TypeError(f"Calibri demo: a caption must be a string, got {type(text).__name__}.")
    words = re.sub(r"\.\s*$", "", text.strip().lower()).split()
    for w in words:
        if w not in VOCABULARY:
            raise ValueError(f"Calibri demo: unknown word {w!r} in caption {text!r}; the demo vocabulary is "
                             f"{', '.join(sorted(VOCABULARY))}.")

    def fail(at: int, expected: str) -> ValueError:
        got = repr(words[at]) if at < len(words) else "the end"
        return ValueError(f"Calibri demo: caption {text!r} does not follow the demo grammar: expected {expected} at "
                          f"word {at + 1}, got {got}. Write 'a [size] colour shape position' or "
                          f"'a [size] colour shape relation a [size] colour shape'.")

    def obj(i: int) -> tuple[Thing, int]:
        if i >= len(words) or words[i] != "a":
            raise fail(i, "'a'")
        i += 1
        size = None
        if i < len(words) and words[i] in SIZES:
            size, i = words[i], i + 1
        if i >= len(words) or words[i] not in COLOURS:
            raise fail(i, "a colour")
        colour, i = words[i], i + 1
        if i >= len(words) or words[i] not in SHAPES:
            raise fail(i, "a shape")
        return Thing(colour, words[i], size), i + 1

    first, i = obj(0)
    rest = words[i:]
    for key, phrase in POSITIONS.items():
        if rest == phrase.split():
            return Scene((first,), position=key)
    for key, phrase in RELATIONS.items():
        n = len(phrase.split())
        if rest[:n] == phrase.split():
            second, j = obj(i + n)
            if j != len(words):
                raise fail(j, "the end of the caption")
            return Scene((first, second), relation=key)
    raise fail(i, "a position (" + ", ".join(POSITIONS.values()) + ") or a relation ("
               + ", ".join(RELATIONS.values()) + ")")


# --- split ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def held_out_pairs(split_seed: int = SPLIT_SEED) -> frozenset[tuple[str, str]]:
    """The (colour, shape) pairs never drawn in training: one per colour, shapes from a seeded shuffle."""
    rng = np.random.default_rng(np.random.SeedSequence([_seed(split_seed, "split_seed"), _TAG_SPLIT]))
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    shapes = [str(s) for s in rng.permutation(list(SHAPES))]
    return frozenset((c, shapes[i % len(shapes)]) for i, c in enumerate(colours))


def split_of(scene: Scene | str, split_seed: int = SPLIT_SEED) -> str:
    """'heldout' when any object of the scene (or caption) uses a held-out (colour, shape) pair, else 'train'."""
    if isinstance(scene, str):
        scene = parse(scene)
    held = held_out_pairs(split_seed)
    return "heldout" if any((o.colour, o.shape) in held for o in scene.objects) else "train"


@functools.lru_cache(maxsize=16)
def catalogue(split: str, split_seed: int = SPLIT_SEED) -> tuple[tuple[Scene, ...], tuple[Scene, ...]]:
    """Every scene of a split that :func:`prompts` can draw (sizes always given): (one-object, two-object)."""
    _check_word(split, SPLITS, "split")
    things = [Thing(c, s, z) for z in SIZES for c in COLOURS for s in SHAPES]
    singles = [Scene((t,), position=p) for t in things for p in POSITIONS]
    pairs = [Scene((a, b), relation=r) for a in things for b in things if a.colour != b.colour for r in RELATIONS]
    keep = lambda scenes: tuple(s for s in scenes if split_of(s, split_seed) == split)  # noqa: E731
    return keep(singles), keep(pairs)


def prompts(split: str, count: int, seed: int, split_seed: int = SPLIT_SEED) -> list[str]:
    """``count`` distinct captions of a split, a pure function of the seeds. Each is one-object or two-object with
    probability 1/2 (the other kind once one runs out), uniform within its kind."""
    singles, pairs = catalogue(split, split_seed)
    count = _seed(count, "count")
    if count > len(singles) + len(pairs):
        raise ValueError(f"Calibri demo: split {split!r} has {len(singles) + len(pairs)} distinct captions; asked for "
                         f"{count}. Ask for fewer, or repeat captions with sample().")
    rng = np.random.default_rng(np.random.SeedSequence([_seed(seed, "seed"), _TAG_PROMPTS]))
    order = [list(rng.permutation(len(singles))), list(rng.permutation(len(pairs)))]
    kinds = rng.random(count) < 0.5
    out = []
    for single in kinds:
        k = 0 if single else 1
        if not order[k]:
            k = 1 - k
        out.append(caption((singles, pairs)[k][order[k].pop(0)]))
    return out


def sample(split: str, seed: int, size: int = 32, split_seed: int = SPLIT_SEED) -> tuple[np.ndarray, str]:
    """One (image, caption) pair of a split: a draw with replacement, for streaming training data."""
    singles, pairs = catalogue(split, split_seed)
    rng = np.random.default_rng(np.random.SeedSequence([_seed(seed, "seed"), _TAG_SAMPLE]))
    pool = singles if rng.random() < 0.5 else pairs
    scene = pool[int(rng.integers(len(pool)))]
    return render(scene, seed, size), caption(scene)


def samples(split: str, start: int, count: int, size: int = 32,
            split_seed: int = SPLIT_SEED) -> tuple[np.ndarray, list[str]]:
    """``sample(split, s)`` for s in start .. start+count-1: images stacked [count, H, W, 3] and their captions."""
    pairs = [sample(split, s, size, split_seed) for s in range(_seed(start, "start"), start + _seed(count, "count"))]
    return np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, size, size, 3), np.float32), \
        [p[1] for p in pairs]


# --- rendering -----------------------------------------------------------------------------------------------------

def _seed(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"Calibri demo: {what} must be a non-negative integer, got {value!r}.")
    return int(value)


def _hsv_to_rgb(h_deg: float, s: float, v: float) -> np.ndarray:
    c = v * s
    hp = (h_deg % 360.0) / 60.0
    x = c * (1 - abs(hp % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(hp) % 6]
    return np.array(rgb, np.float64) + (v - c)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small grid to size x size (corner-aligned)."""
    g = grid.shape[0]
    t = np.linspace(0.0, g - 1.0, size)
    i0 = np.minimum(np.floor(t).astype(int), g - 2)
    f = t - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    hue0 = rng.uniform(0, 360)
    c0 = _hsv_to_rgb(hue0, rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.85))
    c1 = _hsv_to_rgb(hue0 + rng.uniform(-120, 120), rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.85))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    t = np.clip(((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size + 0.5, 0, 1)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    # Grey texture only: adding the same offset to all channels leaves the chroma the scorer segments by unchanged.
    texture = 0.05 * _upsample(rng.standard_normal((5, 5)), size) + 0.02 * _upsample(rng.standard_normal((9, 9)), size)
    grain = 0.012 * rng.standard_normal((size, size))
    return img + (texture + grain)[..., None]


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside-test in the object's own box coordinates, x and y in [-1, 1]."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return (ax <= 1.0) & (ay <= 1.0)
    if shape == "triangle":
        return (ay <= 1.0) & (ax <= (y + 1.0) / 2.0)
    if shape == "cross":
        return ((ax <= 1 / 3) & (ay <= 1.0)) | ((ay <= 1 / 3) & (ax <= 1.0))
    raise ValueError(f"Calibri demo: unknown shape {shape!r}; use one of {', '.join(SHAPES)}.")


def _coverage(shape: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    u = (np.arange(size * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    x = (u[None, :] - cx) / (side / 2)
    y = (u[:, None] - cy) / (side / 2)
    inside = _shape_mask(shape, x, y).astype(np.float64)
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def _layout(scene: Scene, rng: np.random.Generator, size: int) -> list[tuple[Thing, float, float, float]]:
    """(thing, centre x, centre y, box side) in pixels, image centre at size / 2."""
    margin, half = 1.0, size / 2.0
    sides = []
    for o in scene.objects:
        name = o.size if o.size is not None else str(rng.choice(list(SIZES)))
        sides.append(SIZES[name] * size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
    jitter = 0.08 * size

    def cross_axis(side: float) -> float:
        room = max(0.0, half - side / 2 - margin)
        return half + rng.uniform(-min(jitter, room), min(jitter, room))

    if len(scene.objects) == 1:
        side = sides[0]
        axis, sign = _POSITION_DIRECTION[scene.position]
        offset = min(rng.uniform(0.18, 0.28) * size, half - side / 2 - margin)
        main = half + sign * offset
        other = cross_axis(side)
        cx, cy = (main, other) if axis == 0 else (other, main)
        return [(scene.objects[0], cx, cy, side)]

    axis, sign = _RELATION_DIRECTION[scene.relation]
    a, b = sides
    gap = max(2.0, 0.06 * size)
    low_sep, high_sep = (a + b) / 2 + gap, size - (a + b) / 2 - 2 * margin
    if high_sep < low_sep:
        raise ValueError(f"Calibri demo: two objects of sides {a:.1f} and {b:.1f} px do not fit side by side in "
                         f"{size} px; use an image size of at least 24.")
    sep = rng.uniform(low_sep, high_sep)
    # The first object sits on the `sign` side of the second, so its centre is `sign * sep` away from it.
    first_low = margin + a / 2 if sign < 0 else margin + b / 2 + sep
    first_high = size - margin - b / 2 - sep if sign < 0 else size - margin - a / 2
    first = rng.uniform(first_low, max(first_low, first_high))
    second = first - sign * sep
    out = []
    for thing, main, side in ((scene.objects[0], first, a), (scene.objects[1], second, b)):
        other = cross_axis(side)
        cx, cy = (main, other) if axis == 0 else (other, main)
        out.append((thing, cx, cy, side))
    return out


def render(scene: Scene | str, seed: int, size: int = 32) -> np.ndarray:
    """The image of a scene (or of a caption, parsed): float32 [size, size, 3] in [0, 1], a pure function of the
    scene, the seed and the size."""
    if isinstance(scene, str):
        scene = parse(scene)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ValueError(f"Calibri demo: image size must be an integer >= {_MIN_SIZE}, got {size!r}.")
    size = int(size)
    rng = np.random.default_rng(np.random.SeedSequence([_seed(seed, "seed"), _TAG_RENDER]))
    img = _background(rng, size)
    for thing, cx, cy, side in _layout(scene, rng, size):
        hue = COLOURS[thing.colour] + rng.uniform(-8, 8)
        colour = _hsv_to_rgb(hue, rng.uniform(0.85, 1.0), rng.uniform(0.78, 0.92))
        # A light shading across the object: value changes, hue does not, so the colour class stays readable.
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
        ramp = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / (side / 2)
        shaded = colour * (1 + 0.08 * np.clip(ramp, -1, 1))[..., None]
        alpha = _coverage(thing.shape, cx, cy, side, size)[..., None]
        img = img * (1 - alpha) + shaded * alpha
    return np.clip(img, 0.0, 1.0).astype(np.float32)
