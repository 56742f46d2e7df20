"""HPSv3 (MizzenAI/HPSv3, ICCV 2025) re-implemented on the current ``transformers`` Qwen2-VL classes.

Faithful to the official scorer (hpsv3 1.0.0 on transformers 4.45.2) in every point that
../shared/reference/rewards.md §1 lists: byte-exact instruction text, ``<|Reward|>`` special token and resized
vocabulary, checkpoint key remapping, sequential 1-D rotary positions with right padding, vendored ``smart_resize``
+ PIL bicubic, 4.45 patchify order, fp32 head on upcast hidden states, column 0 (mu) as the score.

No Qwen2-VL base weights are needed: ``HPSv3.safetensors`` is a complete state dict. Only the base model's
config.json, tokenizer files, preprocessor_config.json and chat template are read.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import Reward
from ._common import local_path, require_files, resolve_device, resolve_dtype, to_pil_list

logger = logging.getLogger("calibri")

CHECKPOINT_SOURCE = "https://huggingface.co/MizzenAI/HPSv3 (file HPSv3.safetensors)"
BASE_SOURCE = ("https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct (config.json, tokenizer.json, tokenizer_config.json, "
               "vocab.json, merges.txt, preprocessor_config.json, chat_template.json; no weights needed)")
CHECKPOINT_ENV = "CALIBRI_HPSV3_CHECKPOINT"
BASE_ENV = "CALIBRI_QWEN2VL_DIR"

REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
PIXELS = 256 * 28 * 28  # HPSv3 fixes min_pixels == max_pixels == 200704 (inference.py prepare_batch)
FACTOR = 28
MAX_RATIO = 200

# hpsv3/dataset/data_collator_qwen.py INSTRUCTION, byte-exact (MIT). One tuple item per line so the trailing
# spaces the model was trained on stay visible; SHA-256 of INSTRUCTION.format(text_prompt='X') +
# PROMPT_WITH_SPECIAL_TOKEN is pinned in tests/test_rewards.py.
_INSTRUCTION_LINES = (
    "",
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being "
    "the best. ",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.",
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. ",
    "",
    "**Text Alignment:**  ",
    "Assess how well the image matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.",
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.",
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, "
    "but critical attributes should be preserved.",
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.",
    "Textual prompt - {text_prompt}",
    "",
    "",
    "",
)
INSTRUCTION = "\n".join(_INSTRUCTION_LINES)
PROMPT_WITH_SPECIAL_TOKEN = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def hpsv3_text(prompt: str) -> str:
    """The user-turn text HPSv3 scores: ``INSTRUCTION.format(text_prompt=prompt) + prompt_with_special_token``."""
    return INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN


# --- image preprocessing ------------------------------------------------------------------------------------------

def _round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def _ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def _floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS) -> tuple[int, int]:
    """hpsv3/dataset/utils.py ``smart_resize`` (qwen-vl-utils), same float expressions so the floors agree."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"Calibri: HPSv3 needs an aspect ratio below {MAX_RATIO}, got "
                         f"{max(height, width) / min(height, width)} for a {width}x{height} image.")
    h_bar = max(factor, _round_by_factor(height, factor))
    w_bar = max(factor, _round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = _floor_by_factor(height / beta, factor)
        w_bar = _floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by_factor(height * beta, factor)
        w_bar = _ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def _processor_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers 4.45 ``Qwen2VLImageProcessor`` resize rule (runs after fetch_image; a no-op for HPSv3 sizes)."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class ImageConfig:
    """The Qwen2-VL image processor settings HPSv3 uses (read from preprocessor_config.json)."""

    def __init__(self, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                 image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
                 image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
                 min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, rescale_factor: float = 1 / 255):
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.image_mean = np.asarray(image_mean, dtype=np.float32)
        self.image_std = np.asarray(image_std, dtype=np.float32)
        self.min_pixels, self.max_pixels, self.rescale_factor = min_pixels, max_pixels, rescale_factor

    @classmethod
    def from_file(cls, path: Path) -> "ImageConfig":
        cfg = json.loads(path.read_text())
        size = cfg.get("size") or {}
        kw: dict[str, Any] = {k: cfg[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                                   "image_std", "rescale_factor") if k in cfg}
        kw["min_pixels"] = cfg.get("min_pixels", size.get("shortest_edge", 56 * 56))
        kw["max_pixels"] = cfg.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))
        return cls(**kw)


def preprocess_images(pil_images: list, cfg: ImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """HPSv3's image path: fetch_image (smart_resize to 200704 px, PIL BICUBIC) then the 4.45 Qwen2-VL processor
    (its own resize, x/255 in float64 -> float32, CLIP normalise, tile to 2 frames, patchify).

    Returns ``pixel_values`` [sum(h*w), C*T*P*P] float32 and ``image_grid_thw`` [N,3] int64.
    """
    from PIL import Image

    factor = cfg.patch_size * cfg.merge_size
    patches, grids = [], []
    for img in pil_images:
        img = img.convert("RGB")
        h, w = smart_resize(img.height, img.width)
        img = img.resize((w, h), Image.BICUBIC)  # fetch_image
        ph, pw = _processor_smart_resize(h, w, factor, cfg.min_pixels, cfg.max_pixels)
        if (ph, pw) != (h, w):
            img = img.resize((pw, ph), Image.BICUBIC)
        arr = np.asarray(img)
        arr = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)  # 4.45 image_transforms.rescale
        arr = (arr - cfg.image_mean) / cfg.image_std
        arr = arr.transpose(2, 0, 1)[None]  # [T=1, C, H, W]
        t = cfg.temporal_patch_size
        arr = np.tile(arr, (t, 1, 1, 1))
        c = arr.shape[1]
        gh, gw, m, p = ph // cfg.patch_size, pw // cfg.patch_size, cfg.merge_size, cfg.patch_size
        x = arr.reshape(1, t, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (grid_t, gh/m, gw/m, m, m, C, T, p, p)
        patches.append(x.reshape(gh * gw, c * t * p * p))
        grids.append((1, gh, gw))
    return torch.from_numpy(np.concatenate(patches, 0)), torch.tensor(grids, dtype=torch.long)


# --- model --------------------------------------------------------------------------------------------------------

def make_rm_head(hidden_size: int, output_dim: int = 2) -> nn.Sequential:
    """Qwen2VLRewardModelBT ``rm_head`` for rm_head_type='ranknet', rm_head_kwargs=None."""
    return nn.Sequential(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, output_dim))


def remap_checkpoint_key(key: str) -> str | None:
    """4.45 flat key -> key of a bare 5.x ``Qwen2VLModel`` (``visual.*``, ``language_model.*``) or ``rm_head.*``.

    Mirrors transformers 5.x conversion_mapping for Qwen2VLForConditionalGeneration (``^visual`` -> ``model.visual``,
    ``^model(?!\\.(language_model|visual))`` -> ``model.language_model``) minus the wrapper's ``model.`` prefix.
    ``lm_head`` is unused for scoring and dropped (returns None). Already-converted 5.x keys are accepted too.
    """
    if key.startswith("lm_head."):
        return None
    if key.startswith("rm_head.") or key.startswith("visual.") or key.startswith("language_model."):
        return key
    if key.startswith("model.visual.") or key.startswith("model.language_model."):
        return key[len("model."):]
    if key.startswith("model."):
        return "language_model." + key[len("model."):]
    return key


class HPSv3Net(nn.Module):
    """Qwen2-VL backbone (5.x ``Qwen2VLModel``) + fp32 ``rm_head``; forward returns the [B,2] (mu, log-sigma)."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import Qwen2VLModel

        self.backbone = Qwen2VLModel(config)
        self.rm_head = make_rm_head(config.text_config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_grid_thw: torch.Tensor, reward_token_id: int) -> torch.Tensor:
        cfg = self.backbone.config
        embeds = self.backbone.get_input_embeddings()(input_ids)
        image_embeds = self.backbone.get_image_features(pixel_values, image_grid_thw).pooler_output
        image_embeds = torch.cat(image_embeds, 0).to(embeds.device, embeds.dtype)
        image_mask = (input_ids == cfg.image_token_id).unsqueeze(-1).expand_as(embeds)
        if int(image_mask[..., 0].sum()) != image_embeds.shape[0]:
            raise RuntimeError(f"Calibri: HPSv3 batch has {int(image_mask[..., 0].sum())} image tokens but the vision "
                               f"tower produced {image_embeds.shape[0]} embeddings.")
        embeds = embeds.masked_scatter(image_mask, image_embeds)
        b, length = input_ids.shape
        # Official 4.45 forward passes position_ids=None, which becomes cache_position = arange(L) for all three M-RoPE
        # sections (no get_rope_index). Pass it explicitly so 5.x never computes 3-D image positions.
        position_ids = torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, b, -1)
        hidden = self.backbone.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                              position_ids=position_ids, use_cache=False).last_hidden_state
        mask = input_ids == reward_token_id
        if not bool((mask.sum(1) == 1).all()):
            raise RuntimeError(f"Calibri: each HPSv3 sample needs exactly one {REWARD_TOKEN}, "
                               f"got {mask.sum(1).tolist()}.")
        # Causal attention: the head at <|Reward|> only sees tokens before it, so gathering that row first and applying
        # the fp32 head to it equals the official head-on-every-position-then-gather.
        rows = hidden[mask].float()
        return self.rm_head(rows)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sd["model"] if isinstance(sd, dict) and "model" in sd else sd


def load_tokenizer(base: Path):
    """Qwen2-VL tokenizer with ``<|Reward|>`` added as in hpsv3 train.py; right padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base), padding_side="right")
    # 5.x maps additional_special_tokens to extra_special_tokens; the token is appended at id len(tokenizer).
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        raise ValueError(f"Calibri: tokenizer in {base} has no pad token; Qwen2-VL's is <|endoftext|>. Is this the "
                         f"Qwen2-VL-7B-Instruct folder?")
    if not getattr(tok, "chat_template", None):
        tmpl = base / "chat_template.json"
        tmpl_jinja = base / "chat_template.jinja"
        if tmpl.exists():
            tok.chat_template = json.loads(tmpl.read_text())["chat_template"]
        elif tmpl_jinja.exists():
            tok.chat_template = tmpl_jinja.read_text()
        else:
            raise FileNotFoundError(f"Calibri: no chat template in {base} (chat_template.json, chat_template.jinja or "
                                    f"tokenizer_config.json). Download it from {BASE_SOURCE}.")
    return tok


class HPSv3Reward(Reward):
    """In-process HPSv3 reward (mu, raw). See docs/rewards.md for the files it needs.

    Args:
        checkpoint: ``HPSv3.safetensors`` (or a ``.pth`` with a ``{"model": ...}`` wrapper);
            env CALIBRI_HPSV3_CHECKPOINT.
        base: folder with Qwen2-VL-7B-Instruct config/tokenizer/preprocessor/chat-template files;
            env CALIBRI_QWEN2VL_DIR.
        device: "auto" (cuda if available), "cuda", "cpu", ...
        dtype: backbone dtype; the official scorer runs bf16 (the head is always fp32).
        attn_implementation: "sdpa" (default) or "flash_attention_2" (what the official code picks when installed).
        batch_size: images per forward.
        jpeg_quality: if set and not 0, JPEG-encode every image (PIL, this quality) and score the decoded JPEG, as
            the reference's remote reward client does at 95 (the search's default, ``search.config.PROTOCOL``).
    """

    name = "hpsv3"

    def __init__(self, checkpoint: str | None = None, base: str | None = None, device: str | None = "auto",
                 dtype: str | torch.dtype = "bfloat16", attn_implementation: str = "sdpa", batch_size: int = 8,
                 jpeg_quality: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Calibri: hpsv3 batch_size must be a positive int, got {batch_size!r}.")
        ckpt, base_dir = self.local_files(checkpoint, base)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = batch_size
        if jpeg_quality is not None and (isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int)
                                         or not 0 <= jpeg_quality <= 100):
            raise ValueError(f"Calibri: hpsv3 jpeg_quality must be an int 0..100 (0 = off) or None; got "
                             f"{jpeg_quality!r}.")
        self.jpeg_quality = jpeg_quality or None
        self.tokenizer = load_tokenizer(base_dir)
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_cfg = ImageConfig.from_file(base_dir / "preprocessor_config.json")
        self.model = self._build_model(base_dir, ckpt, attn_implementation)
        # Prompts must not contain token strings the tokenizer would match as special tokens (breaks the 1-per-row
        # <|Reward|> gather and the image-token count).
        self._special_strings = sorted(set(self.tokenizer.get_added_vocab()) | set(self.tokenizer.all_special_tokens))

    @classmethod
    def local_files(cls, checkpoint: str | None = None, base: str | None = None, **_: Any) -> tuple[Path, Path]:
        """(HPSv3.safetensors, the Qwen2-VL base folder), from the options or their environment variables."""
        ckpt = local_path(checkpoint, CHECKPOINT_ENV, "HPSv3 checkpoint (HPSv3.safetensors)", CHECKPOINT_SOURCE)
        if ckpt.is_dir():
            ckpt = ckpt / "HPSv3.safetensors"
            if not ckpt.exists():
                raise FileNotFoundError(f"Calibri: HPSv3.safetensors not found in {ckpt.parent}. Get it from "
                                        f"{CHECKPOINT_SOURCE}.")
        base_dir = local_path(base, BASE_ENV, "Qwen2-VL-7B-Instruct base folder", BASE_SOURCE)
        require_files(base_dir, ["config.json", "preprocessor_config.json", "tokenizer_config.json",
                                 ("tokenizer.json", "vocab.json")], "Qwen2-VL-7B-Instruct", BASE_SOURCE)
        return ckpt, base_dir

    def _build_model(self, base: Path, ckpt: Path, attn_implementation: str) -> HPSv3Net:
        from transformers import AutoConfig

        state = _load_state_dict(ckpt)
        remapped: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            new = remap_checkpoint_key(key)
            if new is not None:
                remapped[new if new.startswith("rm_head.") else "backbone." + new] = value
        del state
        emb_key = "backbone.language_model.embed_tokens.weight"
        if emb_key not in remapped or "rm_head.5.weight" not in remapped:
            raise ValueError(f"Calibri: {ckpt} is not an HPSv3 checkpoint (no model.embed_tokens.weight / rm_head.*).")
        vocab = remapped[emb_key].shape[0]
        if vocab != len(self.tokenizer):
            raise ValueError(f"Calibri: {ckpt} has {vocab} embedding rows but the tokenizer in {base} has "
                             f"{len(self.tokenizer)} tokens after adding {REWARD_TOKEN}; use Qwen2-VL-7B-Instruct's "
                             f"tokenizer files ({BASE_SOURCE}).")
        config = AutoConfig.from_pretrained(str(base))
        config.text_config.vocab_size = vocab  # resize_token_embeddings(len(tokenizer)) in hpsv3 train.py
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
        config.vision_config._attn_implementation = attn_implementation
        with torch.device("meta"):
            net = HPSv3Net(config)
        expected = set(net.state_dict())
        missing, unexpected = sorted(expected - set(remapped)), sorted(set(remapped) - expected)
        if missing or unexpected:
            raise ValueError(f"Calibri: {ckpt} does not match Qwen2-VL + HPSv3 head built from {base}/config.json: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.")
        for key, value in remapped.items():
            want = torch.float32 if key.startswith("rm_head.") else self.dtype
            remapped[key] = value.to(self.device, want)
        net.load_state_dict(remapped, strict=True, assign=True)
        del remapped
        self._materialise_rotary(net)
        return net.eval()

    def _materialise_rotary(self, net: HPSv3Net) -> None:
        """Rebuild the non-persistent rotary ``inv_freq`` buffers left on meta by the meta-device build.

        The official scorer casts the whole model with ``model.to(torch.bfloat16)`` (train.py, yaml bf16: True),
        which also rounds these fp32 buffers to bf16; the forward upcasts them again. Reproduce that rounding.
        """
        for module in net.modules():
            if hasattr(module, "inv_freq") and hasattr(module, "config") and module.inv_freq.is_meta:
                fresh = type(module)(module.config)
                for name in ("inv_freq", "original_inv_freq"):
                    if hasattr(fresh, name):
                        buf = getattr(fresh, name)
                        if self.dtype != torch.float32:
                            buf = buf.to(self.dtype).float()
                        setattr(module, name, buf.to(self.device))
        leftover = [n for n, b in net.named_buffers() if b.is_meta]
        if leftover:
            raise RuntimeError(f"Calibri: HPSv3 buffers still on meta after loading: {leftover[:5]}.")

    def check_prompt(self, prompt: str) -> None:
        for tok in self._special_strings:
            if tok in prompt:
                raise ValueError(f"Calibri: HPSv3 prompt contains the special token string {tok!r}, which would break "
                                 f"the reward-token gather: {prompt[:80]!r}. Remove it from the prompt.")

    def build_texts(self, prompts: Sequence[str]) -> list[str]:
        """Chat-template strings (system turn + user image/text + generation prompt) as hpsv3 prepare_batch renders."""
        texts = []
        for prompt in prompts:
            self.check_prompt(prompt)
            conversation = [{"role": "user", "content": [
                {"type": "image", "min_pixels": PIXELS, "max_pixels": PIXELS},
                {"type": "text", "text": hpsv3_text(prompt)}]}]
            texts.append(self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
        return texts

    def encode(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids (right-padded), attention mask, pixel values and grids for one chunk."""
        pixel_values, grid = preprocess_images(to_pil_list(images, self.jpeg_quality), self.image_cfg)
        merge = self.image_cfg.merge_size ** 2
        ids = []
        for text, thw in zip(self.build_texts(prompts), grid.tolist()):
            if text.count(IMAGE_PAD) != 1:
                raise RuntimeError(f"Calibri: the chat template produced {text.count(IMAGE_PAD)} {IMAGE_PAD} tokens; "
                                   f"expected 1. Is the base folder Qwen2-VL-7B-Instruct?")
            n = thw[0] * thw[1] * thw[2] // merge  # processor expands <|image_pad|> to t*h*w/merge^2 copies
            ids.append(self.tokenizer(text.replace(IMAGE_PAD, IMAGE_PAD * n), add_special_tokens=True)["input_ids"])
        length = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, row in enumerate(ids):  # right padding: sequential positions stay arange(L) for every row
            input_ids[i, :len(row)] = torch.tensor(row)
            attention_mask[i, :len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "image_grid_thw": grid}

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[B,2] (mu, log-sigma) in fp32, batched by ``batch_size``."""
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = self.encode(images[start:start + self.batch_size], prompts[start:start + self.batch_size])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)  # official: cast to the vision tower dtype
            out.append(self.model(**batch, reward_token_id=self.reward_token_id).float().cpu())
        return torch.cat(out, 0)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.logits(images, prompts)[:, 0]  # column 0 is mu, the score (inference.py "we select miu")
