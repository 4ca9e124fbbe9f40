"""Analytic FLOPs of one DiT forward (2 per multiply-add), for model-FLOP utilisation (MFU).

Every matrix product of the forward is counted: linears, the patch-embedding convolution, and attention
(Q·K^T and P·V, 4·Lq·Lk·D per sample). Norms, RoPE, activations and other elementwise work are left out, as
MFU conventionally does. Attention is counted over every key the kernel sees: HunyuanVideo's padded text
keys are masked but still in the sequence (< 1.5% of the keys at the official 256 text tokens).
tests/test_gpu_check.py checks both counts against torch.utils.flop_counter on the real modules.
"""

from __future__ import annotations

import math

from models.embeddings import FREQ_DIM
from models.hunyuan import TOKEN_REFINER_DEPTH, TOKEN_REFINER_MLP_RATIO, HunyuanVideoConfig
from models.opensora import STDiT3Config
from models.wan import CLIP_DIM, WanConfig

CLIP_TOKENS = 257  # Wan i2v: open-clip ViT-H/14 tokens


def _tokens(latent: tuple[int, int, int], patch: tuple[int, int, int]) -> int:
    return math.prod(s // p for s, p in zip(latent, patch))


def wan_forward_flops(cfg: WanConfig, latent: tuple[int, int, int], batch: int = 1) -> dict[str, int]:
    """FLOPs of WanModel.forward for a latent (F, H, W) by part; the context is always text_len tokens."""
    d, t, n = cfg.dim, cfg.text_len, _tokens(latent, cfg.patch_size)
    img = CLIP_TOKENS if cfg.model_type == "i2v" else 0
    patch = math.prod(cfg.patch_size)
    per_block = {
        "self-attn projections": 2 * n * d * d * 4,  # q, k, v, o
        "self-attn scores+values": 4 * n * n * d,
        "cross-attn projections": 2 * n * d * d * 2
        + 2 * (t + img) * d * d * 2,  # q, o; k, v (+ k_img, v_img)
        "cross-attn scores+values": 4 * n * (t + img) * d,
        "ffn": 2 * n * d * cfg.ffn_dim * 2,
    }
    flops = {k: v * cfg.num_layers for k, v in per_block.items()}
    flops["embeddings+head"] = 2 * (
        n * cfg.in_dim * patch * d  # patch embedding
        + t * (cfg.text_dim * d + d * d)  # text embedding
        + cfg.freq_dim * d + d * d + d * 6 * d  # time embedding and projection
        + img * (CLIP_DIM * CLIP_DIM + CLIP_DIM * d)  # i2v image projection
        + n * d * patch * cfg.out_dim  # head
    )  # fmt: skip
    return {k: v * batch for k, v in flops.items()}


def hunyuan_forward_flops(
    cfg: HunyuanVideoConfig, latent: tuple[int, int, int], text_len: int, batch: int = 1
) -> dict[str, int]:
    """FLOPs of HunyuanVideoModel.forward for a latent (T, H, W) and `text_len` (padded) text tokens."""
    d, m, n, lt = cfg.hidden_size, cfg.mlp_hidden_dim, _tokens(latent, cfg.patch_size), text_len
    s = n + lt
    mr = int(d * TOKEN_REFINER_MLP_RATIO)
    refiner_block = (
        2 * d * 2 * d + 2 * lt * d * 3 * d + 2 * lt * d * d + 4 * lt * lt * d + 2 * 2 * lt * d * mr
    )
    timestep = 2 * (FREQ_DIM * d + d * d)  # TimestepEmbedder
    flops = {
        "text refiner": 2 * lt * cfg.text_states_dim * d
        + timestep
        + 2 * (cfg.text_states_dim * d + d * d)
        + TOKEN_REFINER_DEPTH * refiner_block,
        "embeddings+head": 2 * n * cfg.in_channels * math.prod(cfg.patch_size) * d  # img_in
        + timestep * (2 if cfg.guidance_embed else 1)  # time_in, guidance_in
        + 2 * (cfg.text_states_dim_2 * d + d * d)  # vector_in
        + 2 * d * 2 * d
        + 2 * n * d * math.prod(cfg.patch_size) * cfg.out_channels,  # final layer
        "double blocks": cfg.mm_double_blocks_depth
        * (
            2 * 2 * d * 6 * d  # img_mod, txt_mod
            + 2 * s * d * 3 * d  # qkv of both streams
            + 4 * s * s * d  # joint attention
            + 2 * s * d * d  # output projections
            + 2 * 2 * s * d * m  # MLPs
        ),
        "single blocks": cfg.mm_single_blocks_depth
        * (2 * d * 3 * d + 2 * s * d * (3 * d + m) + 4 * s * s * d + 2 * s * (d + m) * d),
    }
    return {k: v * batch for k, v in flops.items()}


def opensora_forward_flops(
    cfg: STDiT3Config, latent: tuple[int, int, int], batch: int = 2, cond_entries: int = 1
) -> dict[str, int]:
    """FLOPs of STDiT3.forward for a latent (T, H, W) (odd sizes padded to the patch, as the model does) with
    the full model_max_length text tokens, `batch` samples ([cond; uncond]: 2) and `cond_entries` fps values
    (the sample script passes one for the pair; the DiT embeds it once and repeats it)."""
    d, lt, dm = cfg.hidden_size, cfg.model_max_length, int(cfg.hidden_size * cfg.mlp_ratio)
    t, h, w = (-(-s // p) for s, p in zip(latent, cfg.patch_size))
    s, patch = h * w, math.prod(cfg.patch_size)
    n = t * s
    per_block = (  # either kind: self-attention projections, cross-attention, MLP
        2 * n * d * 3 * d + 2 * n * d * d  # qkv, proj
        + 2 * n * d * d + 2 * lt * d * 2 * d + 2 * n * d * d + 4 * n * lt * d  # q, kv, proj, attention
        + 2 * 2 * n * d * dm  # fc1, fc2
    )  # fmt: skip
    timestep = 2 * (FREQ_DIM * d + d * d)  # TimestepEmbedder
    flops = {
        "spatial blocks": cfg.depth * (per_block + 4 * t * s * s * d) * batch,  # attention within a frame
        "temporal blocks": cfg.depth * (per_block + 4 * s * t * t * d) * batch,  # across frames
        "embeddings+head": batch
        * (
            timestep + 2 * d * 6 * d  # t_embedder, t_block
            + 2 * lt * (cfg.caption_channels * d + d * d)  # y_embedder
            + 2 * n * cfg.in_channels * patch * d  # x_embedder
            + 2 * n * d * patch * cfg.out_channels  # final layer
        )
        + cond_entries * timestep,  # fps_embedder
    }  # fmt: skip
    return flops
