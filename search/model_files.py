"""What the run config says about its model files, checked against the files before any weights load.

A config names its model's family (``model.family``), and the family picks the whole protocol: granularity, members,
cfg, guidance and schedule. The file decides what the model really is, so a config whose family disagrees with its
file would sample one family's protocol on another family's model and write a preset of the wrong family. Two checks
refuse that:

- :func:`check_model_files` (``--check`` and the start of a run): reads only the safetensors header (tensor names,
  shapes, dtypes), lets ComfyUI's own detection pick the model config from those shapes, builds the diffusion model
  on the ``meta`` device (no memory) and recognises its family with the engine's tables. It also refuses the file
  kinds ComfyUI's loaders cannot take as configured (a GGUF file, a checkpoint that holds only a diffusion model).
- :func:`check_family` (after the model loaded): the loaded model's family against the config's, whatever the check
  above could see.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from typing import Any

from calibri_core.families import get_family

from .config import ConfigError

logger = logging.getLogger("calibri")

# A safetensors header is JSON; a released DiT's is well under 10 MB. Anything larger is not read.
MAX_HEADER_BYTES = 100 * 2**20
CHECKPOINT_PREFIX = "model.diffusion_model."
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2"}


def read_header(path: str, where: str) -> dict[str, tuple[str, list[int]]]:
    """``{tensor name: (dtype, shape)}`` from a safetensors file's header; reads no tensor data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 2 <= size <= MAX_HEADER_BYTES:
                raise ValueError
            header = json.loads(f.read(size).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
        header.pop("__metadata__", None)
        return {name: (str(info["dtype"]), [int(d) for d in info["shape"]]) for name, info in header.items()}
    except OSError as e:
        raise ConfigError(f"Calibri: {where} file {path!r} cannot be read ({e.strerror or e}).") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ConfigError(f"Calibri: {where} file {path!r} is not a safetensors file (its header does not parse); "
                          f"the search loads diffusion models and checkpoints saved as .safetensors.") from None


def _meta_state_dict(header: dict[str, tuple[str, list[int]]]) -> dict[str, Any]:
    import torch

    return {name: torch.empty(shape, dtype=getattr(torch, _DTYPES.get(dtype, "float32")), device="meta")
            for name, (dtype, shape) in header.items()}


def detect_file_family(path: str, header: dict[str, tuple[str, list[int]]]) -> tuple[Any, str]:
    """The engine's family of the model in ``path`` (ComfyUI's detection on its header's shapes, the model built on
    the meta device), or ``(None, why)`` where it cannot be told without loading the weights. ComfyUI must be
    importable (the host activated)."""
    import comfy.model_detection
    import comfy.utils
    import torch

    from calibri_core.families import detect

    state = _meta_state_dict(header)
    # The steps of comfy.sd.load_diffusion_model_state_dict / load_checkpoint_guess_config up to building the model.
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state)
    inner = comfy.utils.state_dict_prefix_replace(state, {prefix: ""}, filter_keys=True)
    if inner:
        state = inner
    config = comfy.model_detection.model_config_from_unet(state, "")
    if config is None:
        converted = comfy.model_detection.convert_diffusers_mmdit(state, "")
        config = comfy.model_detection.model_config_from_unet(converted, "") if converted else None
        state = converted or state
    if config is None:
        raise ConfigError(f"Calibri: ComfyUI does not recognise {path!r} as a diffusion model (its tensor names and "
                          f"shapes match none of the model types ComfyUI knows), so its loader would refuse it too. "
                          f"Check that the file is the model's diffusion-model or checkpoint release.")
    try:
        with torch.device("meta"):
            model = config.get_model(state, "", device=torch.device("meta"))
        family, _ = detect(model.diffusion_model)
    except Exception as e:  # a model class that cannot be built without real weights: checked after loading
        return None, f"{type(e).__name__}: {e}"
    return family, ""


def check_model_files(config: Any) -> None:
    """Refuse, before any weights load, a model file that contradicts the config (see the module docstring)."""
    m = config.model
    for key in ("checkpoint", "diffusion_model", "vae"):
        if m[key] and m[key].lower().endswith(".gguf"):
            raise ConfigError(f"Calibri: model.{key} {m[key]!r} is a GGUF file; the search loads models with "
                              f"ComfyUI's own loaders, which read safetensors, not GGUF (the ComfyUI-GGUF pack's "
                              f"format). Use the model's .safetensors release.")
    for i, te in enumerate(m["text_encoders"]):
        if te.lower().endswith(".gguf"):
            raise ConfigError(f"Calibri: model.text_encoders[{i}] {te!r} is a GGUF file; ComfyUI's own text-encoder "
                              f"loader reads safetensors. Use the encoder's .safetensors release.")
    key = "checkpoint" if m["checkpoint"] else "diffusion_model"
    path = m[key]
    if not path or not path.lower().endswith(".safetensors"):
        return  # other torch formats are not read here: the family is checked once the model has loaded
    header = read_header(path, f"model.{key}")
    if key == "checkpoint":
        if not any(name.startswith(CHECKPOINT_PREFIX) for name in header):
            raise ConfigError(f"Calibri: model.checkpoint {path!r} holds a diffusion model alone (no tensor under "
                              f"{CHECKPOINT_PREFIX!r}, no text encoder or VAE): name it as model.diffusion_model, "
                              f"with model.text_encoders and model.vae.")
    family, why = detect_file_family(path, header)
    if family is None:
        logger.info("Calibri: the family of %s could not be read from its header (%s); it is checked once the "
                    "model has loaded.", os.path.basename(path), why)
        return
    check_family(config, family, path)


def check_family(config: Any, family: Any, path: str | None = None) -> None:
    """The config's ``model.family`` must be the model's: its protocol and presets are that family's."""
    stated = config.model["family"]
    if family.name == stated:
        return
    where = path or config.model["checkpoint"] or config.model["diffusion_model"] or "the model"
    raise ConfigError(f"Calibri: model.family is {stated!r} ({get_family(stated).title}), but {where!r} is a "
                      f"{family.title} model (family {family.name!r}). The family sets the search's protocol "
                      f"(granularity, members, cfg, guidance, schedule) and the preset's family, so a mismatch would "
                      f"search the wrong protocol silently: set model.family = \"{family.name}\" (or name the "
                      f"{get_family(stated).title} model file).")
