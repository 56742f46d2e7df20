"""Reward registry tests: tiny random-weight models built here, CPU only, network only to 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from search.rewards import build_reward, build_rewards, registered_rewards
from search.rewards import hpsv3 as H

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a red dog on a long wooden table", "x"]

QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]


def images(b: int = 3, h: int = 64, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


# --- HPSv3 ---------------------------------------------------------------------------------------------------------

def test_instruction_sha256_matches_official():
    text = H.INSTRUCTION.format(text_prompt="X") + H.PROMPT_WITH_SPECIAL_TOKEN
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == \
        "1fdb9f137fa5a5d9799299e83cfea7d8c37e3faece630e580244236e377a8961"
    assert len(H.INSTRUCTION) == 2523 and len(H.PROMPT_WITH_SPECIAL_TOKEN) == 67
    assert "being the best. \n" in H.INSTRUCTION and "**Text Alignment:**  \n" in H.INSTRUCTION


@pytest.mark.parametrize("hw,out", [((512, 512), (448, 448)), ((1024, 1024), (448, 448)), ((768, 512), (532, 364)),
                                    ((64, 48), (532, 392))])
def test_smart_resize_sizes(hw, out):
    assert H.smart_resize(*hw) == out
    h, w = out
    assert h % 28 == 0 and w % 28 == 0  # the ceil branch may overshoot 200704 px, as upstream does


def test_smart_resize_rejects_extreme_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        H.smart_resize(28, 28 * 201)


@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    """Tiny Qwen2-VL base folder (config, byte-level BPE tokenizer, preprocessor, chat template) and a checkpoint in
    the official 4.45 flat layout, saved from a random-weight Qwen2VLForConditionalGeneration."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    d = tmp_path_factory.mktemp("qwen2vl")
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tk.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  additional_special_tokens=QWEN_SPECIAL[1:])
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    tok.save_pretrained(d)
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIAL}
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok) + 1, max_position_embeddings=8192,
                         bos_token_id=None, eos_token_id=None, pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    cfg.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor"}))
    torch.manual_seed(0)
    ref = Qwen2VLForConditionalGeneration(cfg).eval()
    head = H.make_rm_head(32).eval()
    sd = {}
    for k, v in ref.state_dict().items():  # 5.x layout -> official 4.45 flat layout
        if k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        sd[k] = v.contiguous()
    sd.update({"rm_head." + k: v for k, v in head.state_dict().items()})
    ckpt = d / "HPSv3.safetensors"
    save_file(sd, str(ckpt))
    reward = H.HPSv3Reward(checkpoint=str(ckpt), base=str(d), device="cpu", dtype="float32")
    return {"dir": d, "ckpt": ckpt, "ref": ref, "head": head, "reward": reward, "ids": ids}


def test_hpsv3_tokenizer_reward_token_and_vocab(tiny_hpsv3):
    r = tiny_hpsv3["reward"]
    n_base = len(QWEN_SPECIAL) + 256
    assert r.reward_token_id == n_base == len(r.tokenizer) - 1  # appended after the added tokens, like id 151657
    assert r.tokenizer.padding_side == "right" and r.tokenizer.pad_token == "<|endoftext|>"
    assert r.model.backbone.get_input_embeddings().weight.shape[0] == len(r.tokenizer)


def test_hpsv3_prompt_template(tiny_hpsv3):
    text = tiny_hpsv3["reward"].build_texts(["a cat"])[0]
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>" + H.hpsv3_text("a cat") +
                    "<|im_end|>\n<|im_start|>assistant\n")


def test_hpsv3_rejects_special_tokens_in_prompt(tiny_hpsv3):
    with pytest.raises(ValueError, match="special token"):
        tiny_hpsv3["reward"].build_texts(["a <|Reward|> cat"])


def test_hpsv3_preprocessing_matches_transformers_processor(tiny_hpsv3):
    """Our fetch_image + patchify equals transformers' Qwen2-VL PIL processor on the fetch_image output, and
    the tokens match Qwen2VLProcessor (image-pad expansion) on the same chat text."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor, Qwen2VLVideoProcessor

    r = tiny_hpsv3["reward"]
    imgs = images(2, 64, 48)
    from search.rewards._common import to_pil_list

    pils = to_pil_list(imgs)
    pv, grid = H.preprocess_images(pils, r.image_cfg)
    assert grid.tolist() == [[1, 38, 28]] * 2 and pv.shape == (2 * 38 * 28, 3 * 2 * 14 * 14)
    fetched = [p.resize((392, 532), Image.BICUBIC) for p in pils]  # smart_resize(64, 48) = (532, 392), PIL bicubic
    proc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    ref = proc(images=fetched, return_tensors="pt")
    assert ref["image_grid_thw"].tolist() == grid.tolist()
    torch.testing.assert_close(pv, ref["pixel_values"].float(), atol=1e-5, rtol=0)
    # A bilinear resize gives different pixels: PIL bicubic is what is being checked.
    bil = proc(images=[p.resize((392, 532), Image.BILINEAR) for p in pils], return_tensors="pt")["pixel_values"]
    assert not torch.allclose(pv, bil.float(), atol=1e-3)
    processor = Qwen2VLProcessor(image_processor=proc, tokenizer=r.tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=QWEN2VL_CHAT_TEMPLATE)
    texts = r.build_texts(PROMPTS[:2])
    want = processor(text=texts, images=fetched, padding=True, return_tensors="pt")
    got = r.encode(imgs, PROMPTS[:2])
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"],
                                                                            want["attention_mask"])


def test_hpsv3_right_padding(tiny_hpsv3):
    enc = tiny_hpsv3["reward"].encode(images(3), PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == 3  # prompts differ in length
    for row, n in zip(ids, lengths.tolist()):
        assert (row[n:] == tiny_hpsv3["ids"]["<|endoftext|>"]).all() and row[0] == tiny_hpsv3["ids"]["<|im_start|>"]
    assert ((ids == tiny_hpsv3["reward"].reward_token_id).sum(1) == 1).all()
    assert ((ids == tiny_hpsv3["ids"]["<|image_pad|>"]).sum(1) == 38 * 28 // 4).all()


def _official_forward(ref, head, enc, reward_token_id):
    """The official Qwen2VLRewardModelBT.forward structure, on the random reference model: embed, scatter image
    features, language model with position_ids=None (= arange(L) for all three sections), head on every position in
    fp32, gather at <|Reward|>, reshape [B, 2]."""
    m = ref.model
    emb = m.get_input_embeddings()(enc["input_ids"])
    feats = torch.cat(m.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output)
    mask = (enc["input_ids"] == ref.config.image_token_id).unsqueeze(-1).expand_as(emb)
    emb = emb.masked_scatter(mask, feats.to(emb.dtype))
    hidden = m.language_model(inputs_embeds=emb, attention_mask=enc["attention_mask"], use_cache=False)[0]
    logits = head(hidden.float())
    return logits[enc["input_ids"] == reward_token_id].view(enc["input_ids"].shape[0], -1)


def test_hpsv3_matches_official_forward_and_key_remap(tiny_hpsv3):
    r = tiny_hpsv3["reward"]
    imgs = images(2)
    enc = r.encode(imgs, PROMPTS[1:])
    with torch.inference_mode():
        want = _official_forward(tiny_hpsv3["ref"], tiny_hpsv3["head"], enc, r.reward_token_id)
    got = r.logits(imgs, PROMPTS[1:])
    assert got.shape == (2, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.score(imgs, PROMPTS[1:]), want[:, 0], atol=1e-5, rtol=1e-5)  # column 0 = mu


def test_hpsv3_sequential_positions_differ_from_mrope(tiny_hpsv3):
    """3-D M-RoPE image positions (what 5.x computes by default for multimodal input) give a different score."""
    r = tiny_hpsv3["reward"]
    imgs = images(1)
    enc = r.encode(imgs, PROMPTS[:1])
    m = tiny_hpsv3["ref"].model
    with torch.inference_mode():
        emb = m.get_input_embeddings()(enc["input_ids"])
        feats = torch.cat(m.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output)
        emb = emb.masked_scatter((enc["input_ids"] == m.config.image_token_id).unsqueeze(-1).expand_as(emb), feats)
        mm_types = (enc["input_ids"] == m.config.image_token_id).int()
        pos3d, _ = m.get_rope_index(enc["input_ids"], mm_types, image_grid_thw=enc["image_grid_thw"],
                                    attention_mask=enc["attention_mask"])
        h = m.language_model(inputs_embeds=emb, position_ids=pos3d, use_cache=False)[0]
        mrope = tiny_hpsv3["head"](h[enc["input_ids"] == r.reward_token_id])[:, 0]
    assert not torch.allclose(mrope, r.score(imgs, PROMPTS[:1]), atol=1e-6)


def test_hpsv3_batching_and_determinism(tiny_hpsv3):
    r = tiny_hpsv3["reward"]
    imgs = images(3)
    batch = r.score(imgs, PROMPTS)
    singles = torch.cat([r.score(imgs[i:i + 1], [PROMPTS[i]]) for i in range(3)])
    assert batch.shape == (3,) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    assert torch.equal(batch, r.score(imgs, PROMPTS))


def test_hpsv3_jpeg_round_trip_parity(tiny_hpsv3):
    """jpeg_quality = 95 (the search's default, the reference's remote client) scores the PIL JPEG (quality 95) of
    each image: equal to scoring the decoded JPEG images without a round trip; 0 = off = the old path."""
    import io

    import numpy as np
    from PIL import Image

    from search.config import reference_default

    quality = reference_default("rewards.hpsv3.jpeg_quality")
    assert quality == 95
    kw = {"checkpoint": str(tiny_hpsv3["ckpt"]), "base": str(tiny_hpsv3["dir"]), "device": "cpu", "dtype": "float32"}
    plain = tiny_hpsv3["reward"]
    jpeg = H.HPSv3Reward(**kw, jpeg_quality=quality)
    off = H.HPSv3Reward(**kw, jpeg_quality=0)
    imgs = images(3)
    decoded = []
    for arr in np.clip(np.round(imgs.numpy().astype(np.float64) * 255.0), 0, 255).astype(np.uint8):
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=95)
        decoded.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    decoded = torch.from_numpy(np.stack(decoded).astype(np.float32) / 255.0)
    with_jpeg = jpeg.score(imgs, PROMPTS)
    assert torch.equal(with_jpeg, plain.score(decoded, PROMPTS))
    assert not torch.allclose(with_jpeg, plain.score(imgs, PROMPTS), atol=1e-7)  # the round trip changes the input
    assert torch.equal(off.score(imgs, PROMPTS), plain.score(imgs, PROMPTS))
    with pytest.raises(ValueError, match="jpeg_quality must be an int 0..100"):
        H.HPSv3Reward(**kw, jpeg_quality=101)


def test_hpsv3_bf16_rounds_rotary_like_official(tiny_hpsv3):
    r = H.HPSv3Reward(checkpoint=str(tiny_hpsv3["ckpt"]), base=str(tiny_hpsv3["dir"]), device="cpu", dtype="bfloat16")
    rot = r.model.backbone.language_model.rotary_emb.inv_freq
    assert rot.dtype == torch.float32 and torch.equal(rot, rot.to(torch.bfloat16).float())
    assert all(p.dtype == torch.float32 for p in r.model.rm_head.parameters())
    assert r.model.backbone.visual.get_dtype() == torch.bfloat16
    s = r.score(images(2), PROMPTS[:2])
    assert s.shape == (2,) and torch.isfinite(s).all()


def test_hpsv3_missing_files_are_named(tiny_hpsv3, tmp_path, monkeypatch):
    monkeypatch.delenv(H.CHECKPOINT_ENV, raising=False)
    monkeypatch.delenv(H.BASE_ENV, raising=False)
    with pytest.raises(ValueError, match="CALIBRI_HPSV3_CHECKPOINT.*MizzenAI/HPSv3"):
        build_reward("hpsv3", base=str(tiny_hpsv3["dir"]))
    with pytest.raises(FileNotFoundError, match="HPSv3.safetensors"):
        build_reward("hpsv3", checkpoint=str(tmp_path / "HPSv3.safetensors"), base=str(tiny_hpsv3["dir"]))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json.*Qwen2-VL-7B-Instruct"):
        build_reward("hpsv3", checkpoint=str(tiny_hpsv3["ckpt"]), base=str(base))


def test_hpsv3_rejects_wrong_vocab(tiny_hpsv3, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_hpsv3["ckpt"]))
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:-1].contiguous()
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="embedding rows"):
        H.HPSv3Reward(checkpoint=str(tmp_path / "bad.safetensors"), base=str(tiny_hpsv3["dir"]), device="cpu",
                      dtype="float32")


def test_remap_keys():
    assert H.remap_checkpoint_key("visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert H.remap_checkpoint_key("model.layers.3.mlp.up_proj.weight") == "language_model.layers.3.mlp.up_proj.weight"
    assert H.remap_checkpoint_key("model.norm.weight") == "language_model.norm.weight"
    assert H.remap_checkpoint_key("model.visual.merger.ln_q.weight") == "visual.merger.ln_q.weight"
    assert H.remap_checkpoint_key("lm_head.weight") is None
    assert H.remap_checkpoint_key("rm_head.5.bias") == "rm_head.5.bias"


# --- registry, target, python: rewards ---------------------------------------------------------------------------

def test_registry_lists_rewards():
    assert {"hpsv3", "pickscore", "hpsv2", "clip", "imagereward", "remote", "target"} <= set(registered_rewards())


def test_unknown_reward_suggests_near_misses():
    with pytest.raises(ValueError, match=r"unknown reward 'hpsv'\. Did you mean 'hpsv3'.*Registered rewards: clip"):
        build_rewards([{"name": "hpsv"}])
    with pytest.raises(ValueError, match="'name' key"):
        build_rewards([{"weight": 1.0}])
    with pytest.raises(ValueError, match="at least one"):
        build_rewards([])


def test_target_reward():
    imgs = images(3)
    r = build_reward("target", images=imgs)
    s = r.score(imgs, PROMPTS)
    assert s.dtype == torch.float32 and torch.equal(s, torch.zeros(3))
    other = r.score(images(3, seed=1), PROMPTS)
    assert (other < 0).all()
    shared = build_reward("target", images=imgs[0])  # one target broadcast over the batch
    assert shared.score(imgs, PROMPTS)[0] == 0 and (shared.score(imgs, PROMPTS)[1:] < 0).all()
    with pytest.raises(ValueError, match="do not match"):
        r.score(images(3, 32, 32), PROMPTS)


def test_target_reward_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    imgs = images(2)
    save_file({"images": imgs}, str(tmp_path / "t.safetensors"))
    assert torch.equal(build_reward("target", path=str(tmp_path / "t.safetensors")).score(imgs, PROMPTS[:2]),
                       torch.zeros(2))
    save_file({"other": imgs}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="no key 'images'"):
        build_reward("target", path=str(tmp_path / "bad.safetensors"))


def test_batch_validation():
    r = build_reward("target", images=images(3))
    with pytest.raises(ValueError, match="one prompt per image"):
        r.score(images(3), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"\[B,H,W,3\]"):
        r.score(images(3).permute(0, 3, 1, 2), PROMPTS)


USER_MODULE = '''
import torch

def brightness(images, prompts, scale=1.0):
    return scale * images.mean(dim=(1, 2, 3))

def bad_shape(images, prompts):
    return [1.0]

def slow(images, prompts, delay=0.0):
    import time
    time.sleep(delay)
    return images.mean(dim=(1, 2, 3))

class Length:
    def __init__(self, offset=0.0):
        self.offset = offset

    def score(self, images, prompts):
        return [len(p) + self.offset for p in prompts]
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "calibri_user_reward.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_python_rewards(user_module):
    imgs = images(3)
    s = build_reward("python:calibri_user_reward:brightness", scale=2.0).score(imgs, PROMPTS)
    torch.testing.assert_close(s, 2.0 * imgs.mean(dim=(1, 2, 3)))
    s = build_reward("python:calibri_user_reward:Length", offset=1.0).score(imgs, PROMPTS)
    assert s.tolist() == [len(p) + 1.0 for p in PROMPTS]
    with pytest.raises(ValueError, match=r"returned shape \(1,\); expected \[3\]"):
        build_reward("python:calibri_user_reward:bad_shape").score(imgs, PROMPTS)
    with pytest.raises(ValueError, match="no attribute"):
        build_reward("python:calibri_user_reward:missing")
    with pytest.raises(ValueError, match="cannot import"):
        build_reward("python:no_such_module_calibri:f")
    with pytest.raises(ValueError, match="python:module:callable"):
        build_reward("python:only_module")


def test_weighted_combination(user_module):
    imgs, tgt = images(3), images(3, seed=1)
    combo = build_rewards([{"name": "target", "weight": 2.0, "images": tgt},
                           {"name": "python:calibri_user_reward:Length", "weight": -0.5},
                           {"name": "target", "weight": 1.0, "images": imgs}])
    d = combo.score_details(imgs, PROMPTS)
    assert set(d) == {"target", "python:calibri_user_reward:Length", "target#2", "total"}
    want = 2.0 * build_reward("target", images=tgt).score(imgs, PROMPTS) - 0.5 * torch.tensor(
        [float(len(p)) for p in PROMPTS])
    torch.testing.assert_close(d["total"], want)
    torch.testing.assert_close(combo.score(imgs, PROMPTS), want)
    with pytest.raises(TypeError, match="weight"):
        build_rewards([{"name": "target", "weight": "1", "images": imgs}])


# --- remote server -------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(user_module):
    procs = []

    def start(reward: str, options: dict | None = None) -> str:
        port = _free_port()
        env = dict(__import__("os").environ, PYTHONPATH=f"{ROOT}:{user_module}")
        p = subprocess.Popen([sys.executable, str(ROOT / "search" / "reward_server.py"), "--reward", reward,
                              "--options", json.dumps(options or {}), "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(p)
        line = p.stdout.readline()
        assert line.strip() == f"Calibri reward server listening on http://127.0.0.1:{port}", p.stderr.read()
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        assert p.wait(timeout=10) == 0  # SIGTERM shuts the server down cleanly


def test_remote_matches_in_process(server):
    url = server("python:calibri_user_reward:brightness", {"scale": 3.0})
    imgs = images(5)
    local = build_reward("python:calibri_user_reward:brightness", scale=3.0).score(imgs, PROMPTS + ["d", "e"])
    remote = build_reward("remote", url=url, batch_size=2, expect="python:calibri_user_reward:brightness")
    assert torch.equal(remote.score(imgs, PROMPTS + ["d", "e"]), local)  # npz floats are lossless
    png = build_reward("remote", url=url, image_format="png").score(imgs, PROMPTS + ["d", "e"])
    torch.testing.assert_close(png, local, atol=3 * 0.5 / 255, rtol=0)
    assert remote.health() == {"status": "ok", "reward": "python:calibri_user_reward:brightness"}


def test_remote_registry_reward_and_errors(server, tmp_path):
    from safetensors.torch import save_file

    tgt = images(2)
    save_file({"images": tgt}, str(tmp_path / "target.safetensors"))
    url = server("target", {"path": str(tmp_path / "target.safetensors")})
    assert torch.equal(build_reward("remote", url=url).score(tgt, PROMPTS[:2]), torch.zeros(2))
    with pytest.raises(RuntimeError, match="HTTP 500.*do not match"):  # 5xx: retried, then reported
        build_reward("remote", url=url, retries=1, backoff=0.01).score(images(2, 8, 8), PROMPTS[:2])
    with pytest.raises(RuntimeError, match="serves 'target', expected 'imagereward-package'"):
        build_reward("imagereward", url=url).score(tgt, PROMPTS[:2])


def test_remote_timeout_and_retry(server):
    url = server("python:calibri_user_reward:slow", {"delay": 0.8})
    r = build_reward("remote", url=url, timeout=0.2, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="failed after 2 attempts"):
        r.score(images(1), PROMPTS[:1])
    assert time.monotonic() - t0 < 5
    ok = build_reward("remote", url=url, timeout=10, retries=0)
    assert ok.score(images(1), PROMPTS[:1]).shape == (1,)


def test_remote_config_errors(monkeypatch):
    monkeypatch.delenv("CALIBRI_IMAGEREWARD_URL", raising=False)
    with pytest.raises(ValueError, match="reward_server.py --reward imagereward-package.*CALIBRI_IMAGEREWARD_URL"):
        build_reward("imagereward")
    with pytest.raises(ValueError, match="loopback"):
        build_reward("remote", url="http://10.0.0.1:18067")
    closed = build_reward("remote", url=f"http://127.0.0.1:{_free_port()}", retries=1, backoff=0.01, timeout=1)
    with pytest.raises(RuntimeError, match="failed after 2 attempts"):
        closed.score(images(1), PROMPTS[:1])


# --- CLIP family -----------------------------------------------------------------------------------------------------

def _word_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<|startoftext|>", "<|endoftext|>", "[UNK]", "a", "cat", "red", "dog", "on", "long", "wooden", "table",
             "x"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                      special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, eos_token_id=1,
                                      bos_token_id=0, pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(cfg).save_pretrained(d)
    _word_tokenizer(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}))
    return d


@pytest.mark.parametrize("name", ["pickscore", "clip"])
def test_hf_clip_rewards_plumbing(tiny_clip, name):
    opts = {"model": str(tiny_clip), "device": "cpu"}
    if name == "pickscore":
        opts["processor"] = str(tiny_clip)
    r = build_reward(name, **opts)
    imgs = images(3, 40, 56)
    s = r.score(imgs, PROMPTS)
    assert s.shape == (3,) and s.dtype == torch.float32
    assert torch.equal(s, r.score(imgs, PROMPTS))
    singles = torch.cat([r.score(imgs[i:i + 1], [PROMPTS[i]]) for i in range(3)])
    torch.testing.assert_close(s, singles, atol=1e-5, rtol=1e-5)
    # score = logit_scale.exp() * cos(image, text), checked against CLIPModel's own logits_per_image diagonal
    pix = r.pixels(imgs)
    assert pix.shape == (3, 3, 32, 32)
    tok = r.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.inference_mode():
        out = r.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix)
    torch.testing.assert_close(s, out.logits_per_image.diagonal(), atol=1e-5, rtol=1e-5)


def test_pickscore_missing_files_are_named(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.delenv("CALIBRI_PICKSCORE_DIR", raising=False)
    with pytest.raises(ValueError, match="CALIBRI_PICKSCORE_DIR.*yuvalkirstain/PickScore_v1"):
        build_reward("pickscore", processor=str(tiny_clip))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing model.safetensors or pytorch_model.bin.*PickScore_v1"):
        build_reward("pickscore", model=str(tmp_path), processor=str(tiny_clip))


@pytest.fixture(scope="module")
def tiny_hpsv2(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("hpsv2")
    cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 8,
                                          "head_width": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (d / "calibri-tiny-hps.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(d / "calibri-tiny-hps.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("calibri-tiny-hps", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, str(d / "HPS_v2.1_compressed.pt"))
    return d


def test_hpsv2_plumbing(tiny_hpsv2):
    from search.rewards.clip_rewards import resize_max_size_pad

    r = build_reward("hpsv2", checkpoint=str(tiny_hpsv2 / "HPS_v2.1_compressed.pt"), model_name="calibri-tiny-hps",
                     device="cpu")
    imgs = images(3, 40, 56)
    s = r.score(imgs, PROMPTS)
    assert s.shape == (3,) and s.dtype == torch.float32 and (s.abs() <= 1).all()  # cosine, no logit scale
    assert torch.equal(s, r.score(imgs, PROMPTS))
    singles = torch.cat([r.score(imgs[i:i + 1], [PROMPTS[i]]) for i in range(3)])
    torch.testing.assert_close(s, singles, atol=1e-5, rtol=1e-5)
    padded = resize_max_size_pad(torch.ones(3, 40, 56), 32)  # longest side -> 32, zero-pad the short side centred
    assert padded.shape == (3, 32, 32) and padded[:, :4].abs().sum() == 0 and padded[:, 5:27].min() > 0.9


def test_hpsv2_missing_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    monkeypatch.delenv("CALIBRI_HPSV2_CHECKPOINT", raising=False)
    with pytest.raises(FileNotFoundError, match="HPSv2 checkpoint not found.*xswu/HPSv2"):
        build_reward("hpsv2", checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"))
