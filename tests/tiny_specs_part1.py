"""Tiny specs of the issue-11 families (part 1), merged into tiny_models.SPECS before its FAMILIES.

Imported by tiny_models once TinySpec exists there (import tiny_models, never this module first). Specs whose model
class a host lacks (Mage-Flow, Lens, Kandinsky 5, CogVideoX are not in ComfyUI 0.3.75) skip there with the reason.
Each model's kwargs are the names its ComfyUI class takes (comfy/model_detection.py builds the same dicts from a
checkpoint), shrunk to hidden size 64-96 and 2 blocks of each kind.
"""

from __future__ import annotations

from tiny_models import TinySpec

_HUNYUAN_PARAMS = "comfy.ldm.hunyuan_video.model.HunyuanVideoParams"
_HUNYUAN = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, context_in_dim=32, hidden_size=64,
                mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=256,
                patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
                use_cond_type_embedding=False, vision_in_dim=None)
_HUNYUAN_NEWER = {"meanflow_sum": False}  # HunyuanVideoParams field since ComfyUI 0.3.76
_KANDINSKY = dict(image_model="kandinsky5", in_visual_dim=16, out_visual_dim=16, in_text_dim=32, in_text_dim2=24,
                  time_dim=32, model_dim=64, ff_dim=128, patch_size=(1, 2, 2), num_text_blocks=2, num_visual_blocks=2,
                  axes_dims=(4, 6, 6))
_COGVIDEOX = dict(image_model="cogvideox", num_attention_heads=4, attention_head_dim=16, in_channels=16,
                  out_channels=16, time_embed_dim=32, text_embed_dim=32, num_layers=2, patch_size=2,
                  sample_width=8, sample_height=8, sample_frames=5, use_rotary_positional_embeddings=True,
                  use_learned_positional_embeddings=False)
_PIXART = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=4, caption_channels=32,
               model_max_length=5)

# weight_scale 0.1 (twice the default) where, at 0.05, the gates come out so small that a LoRA-sized weight change or a
# text gate moves the output by less than the tests' 1e-4 (AuraFlow's text gates by 1e-7, fp32 rounding); the test
# thresholds stay as they are.
SPECS_PART1 = {
    "mage_flow": TinySpec("MageFlow", dict(image_model="mage_flow", in_channels=32, out_channels=32, num_layers=2,
                                           attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                           axes_dims_rope=(4, 6, 6)),
                          (32, 4, 4), (5, 32)),
    # the context is 2 text-encoder layers of 16 features flattened per token, as Lens's selected layers arrive
    "lens": TinySpec("Lens", dict(image_model="lens", patch_size=2, in_channels=32, out_channels=8, num_layers=2,
                                  attention_head_dim=16, num_attention_heads=4, enc_hidden_dim=16,
                                  axes_dims_rope=(4, 6, 6), selected_layer_index=(0, 1)),
                     (32, 4, 4), (5, 32), weight_scale=0.1),
    # conditioning_llama3: 3 Llama layers of 4 tokens; llama_layers picks one per block (2 double + 2 single)
    "hidream": TinySpec("HiDream", dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, num_single_layers=2, attention_head_dim=16,
                                        num_attention_heads=4, caption_channels=[32, 32], text_emb_dim=24,
                                        num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(8, 4, 4),
                                        max_resolution=(16, 16), llama_layers=[0, 1, 2, 2]),
                        (16, 8, 8), (5, 32), pooled=24, extra_conditioning={"conditioning_llama3": (3, 4, 32)},
                        weight_scale=0.1),
    "hunyuan_video": TinySpec("HunyuanVideo", dict(_HUNYUAN, vec_in_dim=24), (16, 2, 8, 8), (5, 32), pooled=24,
                              params=_HUNYUAN_PARAMS, newer_fields=_HUNYUAN_NEWER, weight_scale=0.1),
    # 1.5 layout: vision projection, cond-type embedding, no single-stream blocks, image + mask channels concatenated
    "hunyuan_video15": TinySpec("HunyuanVideo15", dict(_HUNYUAN, in_channels=33, vec_in_dim=None, vision_in_dim=24,
                                                       use_cond_type_embedding=True, depth_single_blocks=0,
                                                       guidance_embed=False),
                                (16, 2, 8, 8), (5, 32), params=_HUNYUAN_PARAMS, newer_fields=_HUNYUAN_NEWER,
                                weight_scale=0.1),
    "hunyuan_image21": TinySpec("HunyuanImage21", dict(_HUNYUAN, vec_in_dim=None, patch_size=[1, 1], axes_dim=[8, 8]),
                                (16, 4, 4), (5, 32), params=_HUNYUAN_PARAMS, newer_fields=_HUNYUAN_NEWER,
                                weight_scale=0.1),
    # video: 16 latent + 16 image + 1 mask channels per 1x2x2 patch = 132; image: 16 x 4 = 64
    "kandinsky5": TinySpec("Kandinsky5", dict(_KANDINSKY, visual_embed_dim=132), (16, 2, 8, 8), (5, 32), pooled=24),
    "kandinsky5_image": TinySpec("Kandinsky5Image", dict(_KANDINSKY, visual_embed_dim=64), (16, 8, 8), (5, 32),
                                 pooled=24),
    "cogvideox": TinySpec("CogVideoX_T2V", _COGVIDEOX, (16, 2, 8, 8), (5, 32), weight_scale=0.1),
    "cogvideox15": TinySpec("CogVideoX_T2V", dict(_COGVIDEOX, patch_size_t=2), (16, 2, 8, 8), (5, 32),
                            weight_scale=0.1),
    "auraflow": TinySpec("AuraFlow", dict(in_channels=4, out_channels=4, patch_size=2, dim=64, n_layers=4,
                                          n_double_layers=2, n_heads=4, global_conddim=64, cond_seq_dim=32,
                                          max_seq=64),
                         (4, 8, 8), (5, 32), weight_scale=0.1),
    # PixArt's position embedding divides by round((H + W) / 2 / 64): the latent needs (H + W) / 2 >= 33 pixels
    "pixart_alpha": TinySpec("PixArtAlpha", dict(_PIXART, image_model="pixart_alpha", micro_condition=True),
                             (4, 40, 40), (5, 32)),
    # PixelDiT in pixel space: 4x4-pixel patches (16 pixels modulated one by one in the pixel blocks), 16 patches;
    # 3 patch blocks so that the middle gate test_engine scales is not the last block's discarded text gate
    "pixeldit": TinySpec("PixelDiTT2I", dict(image_model="pixeldit_t2i", in_channels=3, num_groups=4, hidden_size=64,
                                             pixel_hidden_size=8, pixel_attn_hidden_size=32, pixel_num_groups=4,
                                             patch_depth=3, pixel_depth=2, patch_size=4, txt_embed_dim=32,
                                             txt_max_length=8),
                         (3, 16, 16), (5, 32), weight_scale=0.1),
    "pixart_sigma": TinySpec("PixArtSigma", dict(_PIXART, image_model="pixart_sigma", micro_condition=False),
                             (4, 40, 40), (5, 32)),
}
