"""CLIP-family rewards: PickScore and CLIP score (HF ``CLIPModel``), HPSv2/2.1 (``open_clip``), all in-process.

Preprocessing and score formulas follow ../shared/reference/rewards.md §3. Raw scores are returned; Calibri's
per-metric scaling (PickScore /26, CLIP /30) belongs in the reward weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import Reward
from ._common import local_path, require_files, resolve_device, to_pil_list, to_uint8

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns BaseModelOutputWithPooling from get_*_features; the projection sits in .pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _HFClip(Reward):
    """Shared HF CLIPModel scorer: ``logit_scale.exp() * cos(text, image)`` per (image, prompt) pair."""

    def __init__(self, model_dir: Path, tokenizer_dir: Path, device: str | None, batch_size: int):
        from transformers import AutoTokenizer, CLIPModel

        self.device = resolve_device(device)
        self.model = CLIPModel.from_pretrained(str(model_dir), dtype=torch.float32).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.batch_size = batch_size
        self.max_length = min(77, self.model.config.text_config.max_position_embeddings)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = []
        for s in range(0, images.shape[0], self.batch_size):
            pix = self.pixels(images[s:s + self.batch_size]).to(self.device)
            tok = self.tokenizer(prompts[s:s + self.batch_size], padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            img = _features(self.model.get_image_features(pixel_values=pix))
            txt = _features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                         attention_mask=tok["attention_mask"]))
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append((self.model.logit_scale.exp() * (img * txt).sum(-1)).float().cpu())
        return torch.cat(out)


class PickScoreReward(_HFClip):
    """PickScore v1 (raw, about 18-23).

    Args:
        model: folder of ``yuvalkirstain/PickScore_v1`` (config.json + weights); env CALIBRI_PICKSCORE_DIR.
        processor: folder of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (preprocessor_config.json + tokenizer files);
            env CALIBRI_PICKSCORE_PROCESSOR_DIR.
    """

    name = "pickscore"
    MODEL_SOURCE = "https://huggingface.co/yuvalkirstain/PickScore_v1"
    PROC_SOURCE = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K (processor and tokenizer files)"

    @classmethod
    def local_files(cls, model: str | None = None, processor: str | None = None, **_: Any) -> tuple[Path, Path]:
        model_dir = local_path(model, "CALIBRI_PICKSCORE_DIR", "PickScore model folder", cls.MODEL_SOURCE)
        proc_dir = local_path(processor, "CALIBRI_PICKSCORE_PROCESSOR_DIR", "PickScore processor folder",
                              cls.PROC_SOURCE)
        require_files(model_dir, ["config.json", ("model.safetensors", "pytorch_model.bin")], "PickScore_v1",
                      cls.MODEL_SOURCE)
        require_files(proc_dir, ["preprocessor_config.json", ("tokenizer.json", "vocab.json")],
                      "CLIP-ViT-H-14 processor", cls.PROC_SOURCE)
        return model_dir, proc_dir

    def __init__(self, model: str | None = None, processor: str | None = None, device: str | None = "auto",
                 batch_size: int = 8):
        model_dir, proc_dir = self.local_files(model, processor)
        super().__init__(model_dir, proc_dir, device, batch_size)
        from transformers import CLIPImageProcessorPil

        # PIL backend: resize shortest side bicubic, centre-crop, as transformers 4.x CLIPProcessor did.
        self.image_processor = CLIPImageProcessorPil.from_pretrained(str(proc_dir))

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_processor(images=to_pil_list(images), return_tensors="pt")["pixel_values"]


class ClipScoreReward(_HFClip):
    """CLIP score with ``openai/clip-vit-large-patch14`` (raw ``logits_per_image`` diagonal; Calibri divides by 30).

    Args:
        model: folder of ``openai/clip-vit-large-patch14`` (config, weights, tokenizer); env CALIBRI_CLIP_DIR.
    """

    name = "clip"
    SOURCE = "https://huggingface.co/openai/clip-vit-large-patch14"

    @classmethod
    def local_files(cls, model: str | None = None, **_: Any) -> Path:
        model_dir = local_path(model, "CALIBRI_CLIP_DIR", "CLIP model folder", cls.SOURCE)
        require_files(model_dir, ["config.json", ("model.safetensors", "pytorch_model.bin"),
                                  ("tokenizer.json", "vocab.json")], "clip-vit-large-patch14", cls.SOURCE)
        return model_dir

    def __init__(self, model: str | None = None, device: str | None = "auto", batch_size: int = 8):
        model_dir = self.local_files(model)
        super().__init__(model_dir, model_dir, device, batch_size)
        self.size = self.model.config.vision_config.image_size

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.v2.functional as F

        x = images.permute(0, 3, 1, 2)  # Calibri's tensor path: Resize(224) bilinear, CenterCrop(224), Normalize
        x = F.resize(x, self.size, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        x = F.center_crop(x, [self.size, self.size])
        return F.normalize(x, OPENAI_MEAN, OPENAI_STD)


def resize_max_size_pad(x: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """HPSv2 ``ResizeMaxSize`` on a [C,H,W] tensor: bicubic resize of the longest side to ``size``, zero-pad centred."""
    import torchvision.transforms.functional as F

    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    new = tuple(round(d * scale) for d in (h, w))
    x = F.resize(x, list(new), interpolation=F.InterpolationMode.BICUBIC, antialias=antialias)
    pad_h, pad_w = size - new[0], size - new[1]
    return F.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)


class HPSv2Reward(Reward):
    """HPSv2 / v2.1 through ``open_clip_torch`` (no ``hpsv2`` package): cosine of L2-normalised features (~0.2-0.35).

    Args:
        checkpoint: ``HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt`` (``{"state_dict": ...}``); env
            CALIBRI_HPSV2_CHECKPOINT.
        model_name: open_clip architecture, "ViT-H-14".
        antialias: antialias flag of the tensor bicubic resize (torchvision >= 0.17 default True).
    """

    name = "hpsv2"
    SOURCE = "https://huggingface.co/xswu/HPSv2 (HPS_v2.1_compressed.pt or HPS_v2_compressed.pt)"

    @classmethod
    def local_files(cls, checkpoint: str | None = None, **_: Any) -> Path:
        try:
            import open_clip  # noqa: F401
        except ImportError:
            raise ValueError("Calibri: reward 'hpsv2' needs open_clip_torch: pip install open_clip_torch.") from None
        return local_path(checkpoint, "CALIBRI_HPSV2_CHECKPOINT", "HPSv2 checkpoint", cls.SOURCE)

    def __init__(self, checkpoint: str | None = None, model_name: str = "ViT-H-14", device: str | None = "auto",
                 batch_size: int = 8, antialias: bool = True):
        ckpt = self.local_files(checkpoint)
        import open_clip
        self.device = resolve_device(device)
        self.batch_size, self.antialias = batch_size, antialias
        model = open_clip.create_model(model_name, pretrained=None, precision="fp32", device="cpu", output_dict=True)
        sd = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        model.load_state_dict(sd.get("state_dict", sd), strict=True)
        self.model = model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = self.model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else size

    @torch.inference_mode()
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
        std = torch.tensor(OPENAI_STD).view(3, 1, 1)
        out = []
        for s in range(0, images.shape[0], self.batch_size):
            # RGB uint8 (a PIL image in hpsv2) -> ToTensor -> ResizeMaxSize -> Normalize
            chunk = images[s:s + self.batch_size]
            u8 = torch.from_numpy(to_uint8(chunk))
            x = torch.stack([(resize_max_size_pad(im.permute(2, 0, 1).float() / 255.0, self.size, self.antialias)
                              - mean) / std for im in u8]).to(self.device)
            tok = self.tokenizer(prompts[s:s + self.batch_size]).to(self.device)
            # precision='amp' in hpsv2: fp32 weights under CUDA autocast
            with torch.autocast("cuda", enabled=self.device.type == "cuda"):
                res = self.model(x, tok)
            img, txt = res["image_features"].float(), res["text_features"].float()
            img = img / img.norm(dim=-1, keepdim=True)  # already normalised by open_clip; harmless re-normalisation
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append((img * txt).sum(-1).cpu())
        return torch.cat(out)
