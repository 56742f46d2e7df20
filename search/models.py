"""Model loading for the search: ComfyUI's own loaders, so the search calibrates exactly the model code the nodes patch.

Three pieces make an image pipeline: a diffusion MODEL (ComfyUI ModelPatcher), a text encoder (prompt → conditioning)
and a decoder (latent → IMAGE [B,H,W,3] in [0,1]). ``load_bundle`` reads them from local files through
``comfy.sd``; tests and benchmarks build a :class:`ModelBundle` directly from in-memory objects, or load only the
diffusion model with ``clip_type="hash"`` (``[model] options = { clip_type = "hash" }`` in a run config): prompts
are then encoded by :class:`HashTextEncoder` and latents decoded by :class:`LatentRGBDecoder` (no weights; for smoke
tests and benchmarks, never for a real calibration).

Call ``calibri_core.comfy_env.activate()`` before using anything here; ComfyUI is imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch

from calibri_core.files import write_bytes_atomic

log = logging.getLogger("calibri")


class TextEncoder(Protocol):
    """prompt → (cross-attention tensor [1, T, D], extras such as ``pooled_output`` [1, ...]).

    An extra may be None, as CLIPTextEncode's ``pooled_output`` is for a T5-only encoder (Chroma): ComfyUI passes
    the key to the model's ``extra_conds``, and some models (ComfyUI 0.3.75's Flux-based Chroma) read it.
    """

    identity: str  # changes whenever the encoder's outputs would (file hashes); part of the cache key

    def encode(self, prompt: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class ComfyTextEncoder:
    """A ComfyUI CLIP object used the way CLIPTextEncode uses it (tokenize → encode_from_tokens_scheduled)."""

    def __init__(self, clip: Any, identity: str):
        self.clip = clip
        self.identity = identity

    def encode(self, prompt: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens = self.clip.tokenize(prompt)
        cond, extras = self.clip.encode_from_tokens_scheduled(tokens, show_pbar=False)[0]
        tensors = {k: v for k, v in extras.items() if isinstance(v, torch.Tensor) or v is None}
        dropped = sorted(k for k, v in extras.items() if k not in tensors)
        if dropped:
            log.warning("Calibri: text encoder outputs %s are not tensors and are not cached.", dropped)
        return cond, tensors


class HashTextEncoder:
    """Test/demo text encoder with no weights: a prompt's embedding is Gaussian noise seeded by its SHA-256.

    Deterministic across processes, so cached encodings stay valid. ``work`` > 0 adds a few tanh(M·M) products of
    that size per call, for benchmarks that need encoding to cost something.
    """

    def __init__(self, tokens: int, width: int, pooled: int = 0, identity: str = "hash-encoder", work: int = 0):
        self.tokens, self.width, self.pooled, self.work = tokens, width, pooled, work
        self.identity = f"{identity}:{tokens}x{width}:{pooled}"
        self.calls = 0

    def encode(self, prompt: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.calls += 1
        seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, self.tokens, self.width, generator=generator)
        if self.work:  # stand-in for a real encoder's forward cost
            m = torch.randn(self.work, self.work, generator=generator) / self.work ** 0.5
            for _ in range(8):
                m = torch.tanh(m @ m)
        # CLIPTextEncode always gives a pooled_output, None where the encoder has none.
        extras = {"pooled_output": torch.randn(1, self.pooled, generator=generator) if self.pooled else None}
        return cond, extras


class LatentRGBDecoder:
    """Test/demo decoder with no weights: ComfyUI's latent preview projection (``latent_rgb_factors`` + bias).

    The same linear map ComfyUI's Latent2RGB previewer uses, applied to the model-space latent and mapped from
    [−1, 1] to [0, 1]; one pixel per latent pixel. Not a VAE: use it for tests and benchmarks only.
    """

    def __init__(self, latent_format: Any):
        factors = getattr(latent_format, "latent_rgb_factors", None)
        if factors is None:
            raise ValueError(f"Calibri: latent format {type(latent_format).__name__} has no latent_rgb_factors; "
                             "give a VAE file instead.")
        self.latent_format = latent_format
        self.factors = torch.tensor(factors, dtype=torch.float32)
        bias = getattr(latent_format, "latent_rgb_factors_bias", None)
        self.bias = torch.tensor(bias if bias is not None else [0.0, 0.0, 0.0], dtype=torch.float32)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.latent_format.process_in(latent.float().cpu())
        if x.ndim == 5:  # [B, C, T, H, W] video-style latents: frames become images
            x = x.movedim(2, 1).reshape(-1, x.shape[1], x.shape[3], x.shape[4])
        rgb = torch.einsum("bchw,cr->bhwr", x, self.factors) + self.bias
        return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


HASH_CLIP_TYPE = "hash"
"""``clip_type`` that loads no text encoder: prompts become seeded noise (:class:`HashTextEncoder`), and without a VAE
file latents are decoded by :class:`LatentRGBDecoder`. Smoke tests and benchmarks only: the images mean nothing."""
HASH_TOKENS = 8
"""Tokens per prompt of the hash encoder."""


def hash_encoder_for(patcher: Any) -> HashTextEncoder:
    """A :class:`HashTextEncoder` shaped for ``patcher``'s text input, read from ComfyUI's detected ``unet_config``:
    the cross-attention width (``context_in_dim``, ``joint_attention_dim``, ``cap_feat_dim``, ``text_dim`` or SD3's
    ``context_embedder_config``) and the pooled width (``vec_in_dim`` or ``adm_in_channels``; 0 when absent)."""
    unet = dict(getattr(patcher.model.model_config, "unet_config", {}) or {})
    width = next((unet[k] for k in ("context_in_dim", "joint_attention_dim", "cap_feat_dim", "text_dim")
                  if unet.get(k)), None)
    embedder = unet.get("context_embedder_config") or {}
    width = width or (embedder.get("params") or {}).get("in_features")
    if not width:
        raise ValueError(f"Calibri: clip_type 'hash' cannot tell the text width of this "
                         f"{type(patcher.model).__name__} (its unet_config has none of context_in_dim, "
                         f"joint_attention_dim, cap_feat_dim, text_dim, context_embedder_config); give text_encoders.")
    pooled = unet.get("vec_in_dim") or unet.get("adm_in_channels") or 0
    return HashTextEncoder(HASH_TOKENS, int(width), int(pooled))


class ComfyVAEDecoder:
    """A ComfyUI VAE used like the VAEDecode node (batched by ComfyUI's own memory estimate)."""

    def __init__(self, vae: Any):
        self.vae = vae

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latent)
        if images.ndim == 5:  # VAEDecode: [B, T, H, W, 3] → frames
            images = images.reshape(-1, *images.shape[-3:])
        return images


@dataclass
class ModelBundle:
    """What the evaluator samples with.

    Args:
        model: ComfyUI ModelPatcher of a supported DiT family.
        encoder: factory returning a :class:`TextEncoder` (called again only if prompts are encoded after the
            encoder was freed), or an encoder object.
        decoder: object with ``decode(latent) -> [B,H,W,3]``; None → :class:`LatentRGBDecoder` (test/demo).
        name: model name for provenance.
        sha256: SHA-256 of the diffusion model (or checkpoint) file; None for in-memory models.
        files: local paths the bundle was loaded from (provenance).
    """

    model: Any
    encoder: Any
    decoder: Any = None
    name: str = "in-memory"
    sha256: Optional[str] = None
    files: dict = field(default_factory=dict)

    def make_encoder(self) -> TextEncoder:
        return self.encoder() if callable(self.encoder) and not hasattr(self.encoder, "encode") else self.encoder

    def make_decoder(self) -> Any:
        if self.decoder is None:
            return LatentRGBDecoder(self.model.get_model_object("latent_format"))
        return self.decoder


def _existing(path: Any, what: str) -> Path:
    if path is None:
        raise ValueError(f"Calibri: no {what} given; pass a local file path.")
    p = Path(os.path.expanduser(str(path)))
    if str(path).startswith(("http://", "https://", "hf://")):
        raise ValueError(f"Calibri: {what} must be a local file, got the URL {path}. Download it first.")
    if not p.is_file():
        raise FileNotFoundError(f"Calibri: {what} not found: {p}. Check the path (local files only).")
    return p


def file_sha256(path: Path, cache_dir: Optional[Path] = None) -> str:
    """SHA-256 of a file; remembered in ``cache_dir/sha256.json`` by (path, size, mtime) since models are large.

    The memo is replaced atomically through a temp file of its own (``write_bytes_atomic``), so processes sharing
    ``cache_dir`` never write the same temp file.
    """
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = cache_dir / "sha256.json" if cache_dir else None
    memo: dict = {}
    if memo_file and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    memo[key] = digest.hexdigest()
    if memo_file:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(memo_file, json.dumps(memo, indent=1).encode("utf-8"))
    return memo[key]


def shared_sha256(paths: Sequence[Path], cache_dir: Optional[Path] = None) -> list[str]:
    """:func:`file_sha256` of each path, computed on rank 0 only and shared with the other ranks under
    torch.distributed (``search.distributed.from_rank0``); in a single process, computed here."""
    from .distributed import from_rank0

    return from_rank0(lambda: [file_sha256(p, cache_dir) for p in paths])


def _dtype(value: Any) -> Optional[torch.dtype]:
    if value in (None, "auto", "default"):
        return None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32, "fp8": torch.float8_e4m3fn}
    if value not in table:
        raise ValueError(f"Calibri: unknown dtype {value!r}; expected one of {sorted(table)} or 'auto'.")
    return table[value]


def load_bundle(*, model: Any = None, checkpoint: Any = None, text_encoders: Sequence[Any] = (), vae: Any = None,
                clip_type: Optional[str] = None, dtype: Any = None, cache_dir: Optional[Path] = None) -> ModelBundle:
    """Load a diffusion model, text encoder(s) and VAE from local files with ComfyUI's loaders.

    Either ``checkpoint`` (all-in-one, ``load_checkpoint_guess_config``; separate ``text_encoders`` / ``vae``
    override its parts) or ``model`` (``load_diffusion_model``) plus ``text_encoders`` (``load_clip`` with the
    detected family's ``Family.clip_type``, or ``clip_type``) and ``vae``. ``clip_type="hash"``
    (:data:`HASH_CLIP_TYPE`) loads no text encoder and, without ``vae``, no VAE: smoke tests and benchmarks only.
    """
    import comfy.sd
    import comfy.utils

    from calibri_core.host import model_layout

    if (model is None) == (checkpoint is None):
        raise ValueError("Calibri: give exactly one of 'model' (a diffusion model file) or 'checkpoint' "
                         "(an all-in-one checkpoint).")
    te_paths = [_existing(p, "text encoder file") for p in text_encoders]
    hashed = (clip_type or "").lower() == HASH_CLIP_TYPE
    if hashed and te_paths:
        raise ValueError(f"Calibri: clip_type '{HASH_CLIP_TYPE}' encodes prompts without weights; drop the "
                         f"text_encoders files or choose another clip_type.")
    vae_path = _existing(vae, "VAE file") if vae is not None else None
    options = {"dtype": _dtype(dtype)} if _dtype(dtype) is not None else {}
    path = _existing(checkpoint, "checkpoint file") if checkpoint is not None else \
        _existing(model, "diffusion model file")
    sha, *te_digests = shared_sha256([path, *te_paths], cache_dir)  # multi-GB files: hashed once, by rank 0
    ckpt_clip = ckpt_vae = None
    if checkpoint is not None:
        patcher, ckpt_clip, ckpt_vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=vae_path is None and not hashed, output_clip=not te_paths and not hashed,
            model_options=options)
    else:
        patcher = comfy.sd.load_diffusion_model(str(path), model_options=options)
    family, _ = model_layout(patcher)
    files = {"model": str(path), "text_encoders": [str(p) for p in te_paths],
             "vae": str(vae_path) if vae_path else None}

    if hashed:
        encoder: Any = hash_encoder_for(patcher)
    elif te_paths:
        type_name = (clip_type or family.clip_type).upper()
        if not hasattr(comfy.sd.CLIPType, type_name):
            raise ValueError(f"Calibri: no text-encoder type known for family {family.name!r}; pass clip_type "
                             f"(one of {[t.name.lower() for t in comfy.sd.CLIPType]}).")
        identity = "+".join(te_digests) + f":{type_name}"

        def encoder() -> TextEncoder:
            clip = comfy.sd.load_clip(ckpt_paths=[str(p) for p in te_paths],
                                      clip_type=getattr(comfy.sd.CLIPType, type_name))
            return ComfyTextEncoder(clip, identity)
    elif ckpt_clip is not None:
        clip_obj = ckpt_clip

        def encoder() -> TextEncoder:
            return ComfyTextEncoder(clip_obj, f"{sha}:checkpoint-clip")
    else:
        raise ValueError(f"Calibri: {path.name} has no text encoder; pass text_encoders (local files).")

    if vae_path is not None:
        decoder: Any = ComfyVAEDecoder(comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path))))
    elif ckpt_vae is not None:
        decoder = ComfyVAEDecoder(ckpt_vae)
    elif hashed:
        decoder = None  # ModelBundle.make_decoder: LatentRGBDecoder
    else:
        raise ValueError(f"Calibri: no VAE for {path.name}; pass vae (a local file).")
    return ModelBundle(patcher, encoder, decoder, name=path.name, sha256=sha, files=files)


def free_encoder(encoder: Any) -> None:
    """Drop a text encoder's weights from the device and let ComfyUI release its memory."""
    import gc

    import comfy.model_management

    clip = getattr(encoder, "clip", None)
    if clip is not None:
        patcher = getattr(clip, "patcher", None)
        loaded = comfy.model_management.current_loaded_models
        for i in range(len(loaded) - 1, -1, -1):
            if loaded[i].model is patcher:
                loaded[i].model_unload()
                loaded.pop(i)
        encoder.clip = None
    gc.collect()
    comfy.model_management.soft_empty_cache()

