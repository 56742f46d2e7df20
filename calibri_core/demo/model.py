"""The demo model: a miniature pixel-space Chroma Radiance and its word-level text encoder, built with ComfyUI's
classes.

Why Chroma Radiance: it is a ComfyUI-native FLUX-style MM-DiT that the pack supports (family ``chroma``), with double
and single blocks (so block, layer and gate granularities all differ), and it denoises pixels, so ComfyUI's own
pixel-space VAE decodes it and no autoencoder has to be trained. ComfyUI's checkpoint detection pins the released
widths (a 5120-wide modulation approximator, 128-wide heads), so a miniature cannot be loaded by the host's loader
nodes: it is built here from :data:`UNET` with ``comfy.supported_models.ChromaRadiance`` and loaded with the
weights of one safetensors file.

The text encoder is deliberately small and the same object for graphs and the search: a word per token over the demo
grammar's vocabulary (:mod:`calibri_core.demo.scenes`), a learned embedding plus a learned position embedding, padded
to :data:`MAX_TOKENS`. The empty prompt (CFG's negative, caption dropout in training) is all padding.

Weights file: ``diffusion_model.*`` (the DiT, ComfyUI's key names) and ``text_encoder.*``; its metadata holds
``calibri_demo`` = the JSON of :func:`spec` so a file made for another spec is refused.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch import nn

from .scenes import VOCABULARY

PAD = "<pad>"
WORDS: tuple[str, ...] = (PAD,) + tuple(sorted(VOCABULARY))
MAX_TOKENS = 16  # the longest caption of the grammar has 13 words
TEXT_WIDTH = 64
IMAGE_SIZE = 32
FORMAT = "calibri-demo-1"

# ChromaRadiance kwargs (comfy.ldm.chroma_radiance.model.ChromaRadianceParams); in_dim 64 is fixed by Chroma's
# approximator input (16 timestep + 16 guidance + 32 modulation-index features), out_dim is the width.
UNET: dict[str, Any] = dict(
    image_model="chroma_radiance", in_channels=3, out_channels=3, context_in_dim=TEXT_WIDTH, hidden_size=128,
    mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=4, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True,
    in_dim=64, out_dim=128, hidden_dim=64, n_layers=2, patch_size=4, nerf_hidden_size=16,
    nerf_mlp_ratio=2, nerf_depth=2, nerf_max_freqs=8, nerf_tile_size=0, nerf_final_head_type="linear",
    nerf_embedder_dtype=torch.float32)
# Fields later ComfyUIs require and older ones reject, passed only where the host's params dataclass declares them.
_NEWER_FIELDS = {"txt_ids_dims": [], "vec_in_dim": None, "use_x0": False, "use_sequential_txt_ids": False}


def spec() -> dict:
    """What a weights file must have been trained for (stored in its metadata)."""
    unet = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in UNET.items()}
    return {"format": FORMAT, "unet": unet, "words": list(WORDS), "max_tokens": MAX_TOKENS,
            "text_width": TEXT_WIDTH, "image_size": IMAGE_SIZE}


def tokenize(text: str) -> list[int]:
    """Word ids of ``text``, padded to :data:`MAX_TOKENS`; a word outside the demo vocabulary is refused by name."""
    words = text.lower().replace(".", " ").split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(f"Calibri: the demo model knows only the words of its scenes; {unknown[0]!r} is not one. "
                         f"Write prompts such as 'a big red circle on the left' or 'a small blue square above a big "
                         f"yellow cross'; its words: {', '.join(WORDS[1:])}.")
    if len(words) > MAX_TOKENS:
        raise ValueError(f"Calibri: the demo model reads at most {MAX_TOKENS} words; the prompt has {len(words)}.")
    index = {w: i for i, w in enumerate(WORDS)}
    return [index[w] for w in words] + [0] * (MAX_TOKENS - len(words))


class TextEncoder(nn.Module):
    """Word embedding + position embedding: [B, MAX_TOKENS] ids → [B, MAX_TOKENS, TEXT_WIDTH]."""

    def __init__(self, device: Any = None, dtype: Any = None):
        super().__init__()
        self.words = nn.Embedding(len(WORDS), TEXT_WIDTH, device=device, dtype=dtype)
        self.positions = nn.Parameter(torch.zeros(MAX_TOKENS, TEXT_WIDTH, device=device, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.words(ids) + self.positions

    def encode(self, texts: list[str]) -> torch.Tensor:
        ids = torch.tensor([tokenize(t) for t in texts], device=self.positions.device)
        return self(ids)


class ComfyTokenizer:
    """ComfyUI's tokenizer interface (``CLIP.tokenize``) over :func:`tokenize`."""

    def __init__(self, embedding_directory: Any = None, tokenizer_data: Any = None):
        pass

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict:
        return {"demo": [[(i, 1.0) for i in tokenize(text)]]}

    def untokenize(self, token_weight_pair: list) -> list:
        return [(t, WORDS[t[0]]) for t in token_weight_pair]

    def state_dict(self) -> dict:
        return {}


class ComfyTextModel(nn.Module):
    """ComfyUI's text-encoder interface (``CLIP.cond_stage_model``) over :class:`TextEncoder`."""

    def __init__(self, device: Any = None, dtype: Any = None, model_options: Any = None, **kwargs: Any):
        super().__init__()
        self.text_encoder = TextEncoder(device=device, dtype=torch.float32)
        self.dtypes = {torch.float32}
        self.execution_device = None

    def reset_clip_options(self) -> None:
        self.execution_device = None

    def set_clip_options(self, options: dict) -> None:
        self.execution_device = options.get("execution_device", self.execution_device)

    def encode_token_weights(self, token_weight_pairs: dict):
        device = self.execution_device or self.text_encoder.positions.device
        ids = torch.tensor([[t[0] for t in row] for row in token_weight_pairs["demo"]], device=device)
        cond = self.text_encoder.to(device)(ids)
        return cond, None, {}

    def load_sd(self, sd: dict):
        return self.text_encoder.load_state_dict(sd, strict=True)


def _params_fields() -> set[str]:
    import comfy.ldm.chroma_radiance.model as radiance

    return {f.name for f in dataclasses.fields(radiance.ChromaRadianceParams)}


def unet_config() -> dict:
    fields = _params_fields()
    return dict(UNET, **{k: v for k, v in _NEWER_FIELDS.items() if k in fields})


def build_base_model(device: Any = "cpu") -> Any:
    """The ComfyUI BaseModel of :data:`UNET` with untrained weights (ComfyUI's comfy.ops leave them uninitialised:
    training starts from :func:`init_weights`)."""
    import comfy.supported_models

    config = comfy.supported_models.ChromaRadiance(unet_config())
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({}, device=torch.device(device))


def init_weights(model: nn.Module, seed: int) -> None:
    """Seeded initialisation: Linear/Conv weights N(0, 0.02), biases 0, norm scales 1, and the output layers 0 so
    the untrained model predicts zero velocity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1 or "norm" in name or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        for name, p in model.named_parameters():  # the projection, not its norm: a zero norm scale would block it
            if name.startswith(("nerf_final_layer", "final_layer")) and "norm" not in name:
                p.zero_()


def save(path: str, diffusion_model: nn.Module, text_encoder: nn.Module, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"diffusion_model.{k}": v.detach().contiguous().cpu() for k, v in diffusion_model.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.detach().contiguous().cpu() for k, v in text_encoder.state_dict().items()})
    metadata = {"calibri_demo": json.dumps(spec()), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    save_file(tensors, path, metadata=metadata)


def read(path: str) -> tuple[dict, dict, dict]:
    """(diffusion-model state dict, text-encoder state dict, metadata) of a demo weights file, refused unless it was
    made for this :func:`spec`. safetensors only: nothing is unpickled."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        stored = json.loads(metadata.get("calibri_demo", "null"))
        if stored != json.loads(json.dumps(spec())):
            raise ValueError(f"Calibri: {path} is not a demo model of this version of the pack (its 'calibri_demo' "
                             f"metadata is {'missing' if stored is None else 'another spec'}); use the file that "
                             f"ships with the pack, or retrain with tools/demo_train.py.")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dm = {k.removeprefix("diffusion_model."): v for k, v in tensors.items() if k.startswith("diffusion_model.")}
    te = {k.removeprefix("text_encoder."): v for k, v in tensors.items() if k.startswith("text_encoder.")}
    return dm, te, metadata


def load(path: str) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) of a demo weights file, as ComfyUI's loader nodes return them: the diffusion model in a
    ModelPatcher, the text encoder in a ``comfy.sd.CLIP``, and ComfyUI's pixel-space VAE."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models_base

    dm, te, _ = read(path)
    base = build_base_model(device=comfy.model_management.unet_offload_device())
    base.diffusion_model.load_state_dict(_host_names(dm, base.diffusion_model.state_dict().keys()), strict=True)
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(ComfyTokenizer, ComfyTextModel))
    clip.load_sd(te)
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    return model, clip, vae


def sample_latents(model: Any, clip: Any, prompts: list[str], *, steps: int, cfg: float, seed: int = 0,
                   sampler: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """The LATENT (pixels in [-1, 1], [len(prompts), 3, H, W]) a graph samples: CLIPTextEncode of each prompt
    (negative: the empty prompt), EmptyChromaRadianceLatentImage and ComfyUI's KSampler, one batch, row i
    conditioned on prompt i."""
    from comfy_extras.nodes_chroma_radiance import EmptyChromaRadianceLatentImage

    import nodes

    conds = [nodes.CLIPTextEncode().encode(clip, p)[0] for p in prompts]
    positive = [[torch.cat([c[0][0] for c in conds]), dict(conds[0][0][1])]]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = EmptyChromaRadianceLatentImage.execute(width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=len(prompts))[0]
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)[0]["samples"]


def sample(model: Any, clip: Any, vae: Any, prompts: list[str], **options: Any) -> torch.Tensor:
    """Images [len(prompts), H, W, 3] in [0, 1]: :func:`sample_latents` through VAEDecode."""
    return vae.decode(sample_latents(model, clip, prompts, **options)).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)


def _host_names(state: dict, expected: Any) -> dict:
    """ComfyUI renamed its RMSNorm parameter (``scale`` before 0.19, ``weight`` after): map the file's names onto
    the host's; everything else must match as it is."""
    expected = set(expected)
    out = {}
    for name, value in state.items():
        if name not in expected:
            for old, new in ((".scale", ".weight"), (".weight", ".scale")):
                if name.endswith(old) and name[: -len(old)] + new in expected:
                    name = name[: -len(old)] + new
                    break
        out[name] = value
    return out
