"""Image reward registry for Calibri's search.

Every reward is an object with ``score(images, prompts) -> torch.Tensor``: ``images`` is a ComfyUI IMAGE batch
(float [B,H,W,3] in [0,1]), ``prompts`` a list of B strings, and the result float32 [B] on CPU, higher is better.
``build_rewards([{"name": "hpsv3", "weight": 1.0, ...options}, ...])`` returns a :class:`CombinedReward` whose score
is the weighted sum (Calibri's ``multi_score`` "avg", which is a sum, not a mean). See docs/rewards.md.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ._common import as_scores, check_batch

logger = logging.getLogger("calibri")

__all__ = ["Reward", "CombinedReward", "register_reward", "registered_rewards", "build_reward", "build_rewards",
           "check_rewards"]


class Reward:
    """Base class: subclasses implement :meth:`_score` on a checked batch; :meth:`score` validates in and out."""

    name = "reward"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        images = check_batch(images, prompts, self.name)
        return as_scores(self._score(images, list(prompts)), images.shape[0], self.name)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.score(images, prompts)

    @classmethod
    def check(cls, **options: Any) -> None:
        """Refuse options that building this reward would refuse, without loading weights: unknown option names,
        then :meth:`local_files` (where the weights are)."""
        try:
            bound = inspect.signature(cls.__init__).bind(None, **options)
        except TypeError as e:
            known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
            raise ValueError(f"Calibri: reward {cls.name!r}: {e}; its options are {', '.join(known)}.") from None
        cls.local_files(**{k: v for k, v in bound.arguments.items() if k != "self"})

    @classmethod
    def local_files(cls, **options: Any) -> Any:
        """The local weight files/folders these options name, checked to exist (raises the refusal otherwise)."""
        return None


_REGISTRY: dict[str, Callable[..., Reward]] = {}
# name -> check(**options): raises the reward's own refusal when its local files or settings are missing, without
# loading any weights, so that `--check` and the start of a run refuse what building the reward would refuse later.
_CHECKS: dict[str, Callable[..., Any]] = {}


def register_reward(name: str, check: Callable[..., Any] | None = None) \
        -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Register a factory ``f(**options) -> Reward`` under ``name``; ``check(**options)``, if given, validates the
    same options without loading anything (missing weights, an unset server URL)."""

    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise ValueError(f"Calibri: reward {name!r} is already registered.")
        _REGISTRY[name] = factory
        if check is not None:
            _CHECKS[name] = check
        return factory

    return deco


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def build_reward(name: str, **options: Any) -> Reward:
    """Build one reward by registry name, or ``python:module:callable`` for a user reward."""
    if not isinstance(name, str):
        raise TypeError(f"Calibri: reward name must be a string, got {type(name).__name__}.")
    if name.startswith("python:"):
        return PythonReward(name, **options)
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        names = ", ".join(registered_rewards())
        raise ValueError(f"Calibri: unknown reward {name!r}.{hint} Registered rewards: {names}"
                         f"; or use 'python:module:callable' for your own.")
    return _REGISTRY[name](**options)


def check_rewards(spec: Sequence[Mapping[str, Any]]) -> None:
    """Refuse, without loading weights, every reward of ``spec`` that could not be built: its local files are not
    configured or not there, its server URL is unset, its ``python:`` module or callable does not exist."""
    for entry in spec:
        options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        name = entry["name"]
        if name.startswith("python:"):
            _python_target(name)
        elif name in _CHECKS:
            _CHECKS[name](**options)


class CombinedReward(Reward):
    """Weighted sum of several rewards; :meth:`score_details` also returns each reward's raw scores."""

    name = "combined"

    def __init__(self, members: Sequence[tuple[str, float, Reward]]):
        if not members:
            raise ValueError("Calibri: build_rewards needs at least one reward, got an empty list.")
        self.members = list(members)

    def score_details(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        images = check_batch(images, prompts, self.name)
        details: dict[str, torch.Tensor] = {}
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        for key, weight, reward in self.members:
            scores = reward.score(images, prompts)
            details[key] = scores
            total = total + float(weight) * scores
        details["total"] = total
        return details

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_details(images, prompts)["total"]


def build_rewards(spec: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> CombinedReward:
    """Build a weighted-sum scorer from ``[{"name": ..., "weight": 1.0, ...options}]`` (a single dict is allowed)."""
    if isinstance(spec, Mapping):
        spec = [spec]
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise TypeError(f"Calibri: reward spec must be a list of dicts like [{{'name': 'hpsv3', 'weight': 1.0}}], "
                        f"got {type(spec).__name__}.")
    members = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(spec):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ValueError(f"Calibri: reward spec entry {i} must be a dict with a 'name' key, got {entry!r}.")
        options = dict(entry)
        name = options.pop("name")
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"Calibri: weight of reward {name!r} must be a number, got {weight!r}.")
        reward = build_reward(name, **options)
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}#{seen[name]}"
        members.append((key, float(weight), reward))
    return CombinedReward(members)


def _python_target(spec: str) -> Any:
    """The object ``python:module:callable`` names (imports the module), or the refusal naming what is missing."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError(f"Calibri: user reward must be written 'python:module:callable', got {spec!r}.")
    _, module_name, attr = parts
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"Calibri: cannot import module {module_name!r} for reward {spec!r}: {e}. "
                         f"Make sure it is on PYTHONPATH.") from e
    target: Any = module
    for piece in attr.split("."):
        if not hasattr(target, piece):
            raise ValueError(f"Calibri: module {module_name!r} has no attribute {attr!r} (reward {spec!r}).")
        target = getattr(target, piece)
    return target


class PythonReward(Reward):
    """``python:module:callable``. A class is instantiated with the options and its ``score`` (or ``__call__``) used;
    a function is called as ``f(images, prompts, **options)``. Either returns B numbers."""

    def __init__(self, spec: str, **options: Any):
        self.name = spec
        target = _python_target(spec)
        if isinstance(target, type):
            obj = target(**options)
            self._fn = getattr(obj, "score", obj)
            self._options: dict[str, Any] = {}
        elif callable(target):
            self._fn = target
            self._options = options
        else:
            raise TypeError(f"Calibri: {spec!r} is not callable (got {type(target).__name__}).")

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._fn(images, prompts, **self._options)


class TargetReward(Reward):
    """Negative mean squared distance to target images (identical images score 0). Used by tests and demos.

    Args:
        images: target batch [N,H,W,3] (tensor, or a list of [H,W,3] tensors); N is 1 (shared) or B (per index).
        path: alternatively a ``.safetensors`` file holding the key ``images``.
        prompts: optional, N prompts: image i is the target of prompt i, whatever order or subset of prompts a
            batch holds (as the search's prompt buckets do).
    """

    name = "target"

    def __init__(self, images: Any = None, path: str | os.PathLike | None = None,
                 prompts: list[str] | None = None):
        if (images is None) == (path is None):
            raise ValueError("Calibri: reward 'target' needs exactly one of the options 'images' or 'path'.")
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"Calibri: target images file not found: {path}.")
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if "images" not in tensors:
                raise ValueError(f"Calibri: {path} has no key 'images' (keys: {sorted(tensors)}).")
            images = tensors["images"]
        if isinstance(images, (list, tuple)):
            images = torch.stack([torch.as_tensor(i) for i in images])
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Calibri: target images must be [N,H,W,3], got {tuple(images.shape)}.")
        self.target = images
        self.index = None
        if prompts is not None:
            if len(prompts) != images.shape[0] or len(set(prompts)) != len(prompts):
                raise ValueError(f"Calibri: reward 'target' needs one distinct prompt per target image; got "
                                 f"{len(prompts)} prompts for {images.shape[0]} images.")
            self.index = {p: i for i, p in enumerate(prompts)}

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        t = self.target
        if self.index is not None:
            unknown = [p for p in prompts if p not in self.index]
            if unknown:
                raise ValueError(f"Calibri: reward 'target' has no target image for prompts {unknown[:3]}.")
            t = t[[self.index[p] for p in prompts]]
        if t.shape[1:] != images.shape[1:] or t.shape[0] not in (1, images.shape[0]):
            raise ValueError(f"Calibri: target images {tuple(t.shape)} do not match the batch {tuple(images.shape)}; "
                             f"expected [1 or {images.shape[0]}, {', '.join(map(str, images.shape[1:]))}].")
        return -((images - t) ** 2).mean(dim=(1, 2, 3))


def _build_and_drop(name: str) -> Callable[..., None]:
    """The check of a reward whose construction loads no weights (a server URL, a small target file): build one."""
    def check(**options: Any) -> None:
        try:
            _REGISTRY[name](**options)
        except TypeError as e:  # an option name the reward does not take
            raise ValueError(f"Calibri: reward {name!r}: {e}.") from None

    return check


def _class_check(module: str, cls: str) -> Callable[..., None]:
    def check(**options: Any) -> None:
        getattr(importlib.import_module(f".{module}", __name__), cls).check(**options)

    return check


register_reward("target", check=_build_and_drop("target"))(TargetReward)


@register_reward("remote", check=_build_and_drop("remote"))
def _build_remote(**options: Any) -> Reward:
    from .remote import RemoteReward

    return RemoteReward(**options)


@register_reward("imagereward", check=_build_and_drop("imagereward"))
def _build_imagereward(**options: Any) -> Reward:
    # image-reward 1.5 cannot import on transformers 5 (BLIP med.py needs removed modeling_utils helpers), so it only
    # runs out of process: reward_server.py --reward imagereward-package in an env with transformers 4.52.
    from .remote import RemoteReward

    options.setdefault("env_var", "CALIBRI_IMAGEREWARD_URL")
    options.setdefault("expect", "imagereward-package")
    options.setdefault("name", "imagereward")
    return RemoteReward(**options)


@register_reward("hpsv3", check=_class_check("hpsv3", "HPSv3Reward"))
def _build_hpsv3(**options: Any) -> Reward:
    from .hpsv3 import HPSv3Reward

    return HPSv3Reward(**options)


@register_reward("pickscore", check=_class_check("clip_rewards", "PickScoreReward"))
def _build_pickscore(**options: Any) -> Reward:
    from .clip_rewards import PickScoreReward

    return PickScoreReward(**options)


@register_reward("clip", check=_class_check("clip_rewards", "ClipScoreReward"))
def _build_clip(**options: Any) -> Reward:
    from .clip_rewards import ClipScoreReward

    return ClipScoreReward(**options)


@register_reward("hpsv2", check=_class_check("clip_rewards", "HPSv2Reward"))
def _build_hpsv2(**options: Any) -> Reward:
    from .clip_rewards import HPSv2Reward

    return HPSv2Reward(**options)


@register_reward("demo_rules", check=_class_check("demo_rules", "DemoRulesReward"))
def _build_demo_rules(**options: Any) -> Reward:
    from .demo_rules import DemoRulesReward

    return DemoRulesReward(**options)
