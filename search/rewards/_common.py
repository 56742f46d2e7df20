"""Shared helpers for image rewards: input checks, score checks, image conversion, local-file lookup."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def check_batch(images: Any, prompts: Sequence[str], name: str) -> torch.Tensor:
    """Check a ComfyUI IMAGE batch ([B,H,W,3] float in [0,1]) against its prompt list; return it as float32 CPU."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"Calibri: reward {name!r} expected images as a torch.Tensor [B,H,W,3], "
                        f"got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Calibri: reward {name!r} expected images of shape [B,H,W,3] (ComfyUI IMAGE), "
                         f"got {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise TypeError(f"Calibri: reward {name!r} expected float images in [0,1], got dtype {images.dtype}.")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"Calibri: reward {name!r} needs one prompt per image: {images.shape[0]} images, {got}.")
    return images.detach().to("cpu", torch.float32)


def as_scores(values: Any, batch: int, name: str) -> torch.Tensor:
    """Turn a reward's output into float32 [B] on CPU, rejecting wrong shapes and non-finite values."""
    scores = torch.as_tensor(np.asarray(values.detach().float().cpu() if isinstance(values, torch.Tensor) else values,
                                        dtype=np.float32))
    scores = scores.reshape(-1) if scores.numel() == batch else scores
    if tuple(scores.shape) != (batch,):
        raise ValueError(f"Calibri: reward {name!r} returned shape {tuple(scores.shape)}; expected [{batch}].")
    if not torch.isfinite(scores).all():
        raise ValueError(f"Calibri: reward {name!r} returned non-finite scores {scores.tolist()}.")
    return scores.to(torch.float32)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,H,W,3] float [0,1] -> uint8 numpy, scaled by 255 and rounded (Calibri's ``to_pil_list``)."""
    return np.clip(np.round(images.numpy().astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def to_pil_list(images: torch.Tensor, jpeg_quality: int | None = None) -> list:
    """PIL RGB images from a float batch; optionally JPEG round-trip them as Calibri's HTTP client does (q95)."""
    import io

    from PIL import Image

    out = []
    for arr in to_uint8(images):
        img = Image.fromarray(arr, "RGB")
        if jpeg_quality is not None:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=int(jpeg_quality))
            buf.seek(0)
            img = Image.open(buf).convert("RGB")
        out.append(img)
    return out


def local_path(value: str | os.PathLike | None, env: str, what: str, source: str) -> Path:
    """Resolve a required local file/folder from an option or an environment variable, or say where to get it."""
    raw = value if value is not None else os.environ.get(env)
    if not raw:
        raise ValueError(f"Calibri: {what} is not configured. Pass its local path as an option or set {env}. "
                         f"Get it from {source}.")
    path = Path(raw).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Calibri: {what} not found at {path}. Get it from {source} and pass its local "
                                f"path (option or {env}).")
    return path


def require_files(folder: Path, names: Sequence[str | tuple[str, ...]], what: str, source: str) -> None:
    """Raise FileNotFoundError naming the first missing file; a tuple means 'any one of these'."""
    for name in names:
        options = (name,) if isinstance(name, str) else name
        if not any((folder / n).exists() for n in options):
            shown = " or ".join(options)
            raise FileNotFoundError(f"Calibri: {what} folder {folder} is missing {shown}. Download it from {source} "
                                    f"into that folder.")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        raise ValueError(f"Calibri: unknown dtype {dtype!r}; expected one of {sorted(table)}.")
    return table[dtype]
