"""Tiny specs of the issue-11 families (part 2), merged into tiny_models.SPECS before its FAMILIES.

Imported by tiny_models once TinySpec exists there; each spec's model class is on ComfyUI 0.33.0 (specs whose class a
host lacks skip there with the reason, like every spec).
"""

from __future__ import annotations

from tiny_models import TinySpec

LTXV_CLASS = "comfy.ldm.lightricks.model.LTXVModel"
_LTXV_TINY = dict(image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=16,
                  num_attention_heads=4, caption_channels=32, num_layers=2)

_COSMOS_TINY = dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16,
                    out_channels=16, patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=64,
                    num_blocks=2, num_heads=4, crossattn_emb_channels=32, pos_emb_cls="rope3d",
                    pos_emb_learnable=True, use_adaln_lora=True, adaln_lora_dim=16)
_OMNIGEN2_TINY = dict(patch_size=2, in_channels=16, hidden_size=64, num_layers=2, num_refiner_layers=1,
                      num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 6, 6),
                      axes_lens=(300, 512, 512))
_IDEOGRAM4_TINY = dict(image_model="ideogram4", in_channels=128, num_layers=2, num_attention_heads=4,
                       attention_head_dim=16, intermediate_size=128, adaln_dim=32, llm_features_dim=32,
                       rope_theta=10000, mrope_section=[2, 3, 3], norm_eps=1e-5)

SPECS_PART2 = {
    # adaLN-LoRA on, as comfy/model_detection.py sets for every released checkpoint
    "cosmos_predict2": TinySpec("CosmosT2IPredict2", _COSMOS_TINY, (16, 1, 8, 8), (5, 32)),
    "anima": TinySpec("Anima", dict(_COSMOS_TINY, image_model="anima"), (16, 1, 8, 8), (5, 32)),
    # one reference image, so that the ref_image_refiner's gated blocks run too
    "omnigen2": TinySpec("Omnigen2", dict(_OMNIGEN2_TINY, image_model="omnigen2", text_feat_dim=32), (16, 8, 8),
                         (5, 32), text_mask=True, reference_latents=1),
    "boogu": TinySpec("Boogu", dict(_OMNIGEN2_TINY, image_model="boogu", num_layers=2, num_double_stream_layers=1,
                                    instruction_feat_dim=32), (16, 8, 8), (5, 32), text_mask=True,
                      reference_latents=1),
    "ernie_image": TinySpec("ErnieImage", dict(image_model="ernie", hidden_size=128, num_attention_heads=8,
                                               num_layers=2, ffn_hidden_size=512, in_channels=128, out_channels=128,
                                               patch_size=1, text_in_dim=32, rope_axes_dim=(4, 6, 6)),
                            (128, 4, 4), (5, 32)),
    # ComfyUI's Ideogram4 config pins the full-size widths (unet_extra_config): repinned to tiny ones
    "ideogram4": TinySpec("Ideogram4", _IDEOGRAM4_TINY, (128, 4, 4), (5, 32),
                          repin=tuple(sorted(set(_IDEOGRAM4_TINY) - {"image_model", "in_channels", "num_layers"}))),
    # head width 128: JoyImage's config fixes rope_dim_list = [16, 56, 56]
    "joyimage": TinySpec("JoyImage", dict(image_model="joyimage", hidden_size=256, num_attention_heads=2, text_dim=32,
                                          num_layers=2, in_channels=16, patch_size=[1, 2, 2]),
                         (16, 1, 8, 8), (5, 32)),
    "ltxv": TinySpec("LTXV", _LTXV_TINY, (128, 2, 4, 4), (5, 32), text_mask=True),
    # LTX-2.3's gated text cross-attention (ComfyUI >= 0.4: cross_attention_adaln from the checkpoint's config)
    "ltxv_adaln": TinySpec("LTXV", dict(_LTXV_TINY, cross_attention_adaln=True), (128, 2, 4, 4), (5, 32),
                           text_mask=True, family="ltxv", needs=(LTXV_CLASS, "cross_attention_adaln")),
    # txtdim 16 x txtlayers 2: the context is the 2-layer Qwen3-VL stack flattened per token, as Krea2's TE gives it
    "krea2": TinySpec("Krea2", dict(image_model="krea2", features=64, tdim=32, txtdim=16, heads=4, kvheads=2,
                                    multiplier=2, layers=2, patch=2, channels=16, theta=1000, txtlayers=2, txtheads=2,
                                    txtkvheads=2),
                      (16, 1, 8, 8), (5, 32)),
}


# Audio-video models take a NestedTensor latent (video, audio), which test_engine's helpers do not build: these specs
# join tiny_models.SPECS after its FAMILIES and are tested by tests/test_audio_video.py. ``latent`` is the video
# stream; AUDIO_LATENTS gives each spec's audio stream (without batch).
_LTXAV_TINY = dict(image_model="ltxav", in_channels=128, audio_in_channels=128, cross_attention_dim=64,
                   audio_cross_attention_dim=32, attention_head_dim=16, audio_attention_head_dim=8,
                   num_attention_heads=4, audio_num_attention_heads=4, caption_channels=32, num_layers=2,
                   connector_attention_head_dim=8, connector_num_attention_heads=4, connector_num_layers=1)
# the context is LTX-2's processed text (video half | audio half, caption_channels each), as its connectors give it
AV_SPECS_PART2 = {
    "ltxav": TinySpec("LTXAV", _LTXAV_TINY, (128, 2, 4, 4), (5, 64), text_mask=True),
    "ltxav_adaln": TinySpec("LTXAV", dict(_LTXAV_TINY, cross_attention_adaln=True), (128, 2, 4, 4), (5, 64),
                            text_mask=True, family="ltxav"),
    # rope_inv_freq_len 2: a 12-wide rotary part of the 16-wide heads (3 axes x 2 frequencies x 2)
    # (hidden 128, time embedding 256: wide enough that every live gate moves the output well above fp32 rounding)
    "minimax_h3": TinySpec("MiniMaxH3", dict(image_model="minimax_h3", hidden_size=128, num_layers=2,
                                             token_refiner_num_layers=1, num_attention_heads=8, attention_head_dim=16,
                                             ffn_hidden_size=256, text_dim=32, timestep_input_dim=32,
                                             time_embed_hidden_size=256, time_embed_dim=256, rope_inv_freq_len=2),
                           (24, 2, 8, 8), (5, 32)),
}
AUDIO_LATENTS = {  # LTX-2: (audio channels, latent frames, frequency bins); MiniMax H3: (channels, stereo, frames)
    "ltxav": (8, 6, 16), "ltxav_adaln": (8, 6, 16), "minimax_h3": (32, 2, 6)}
