"""The one attention entry point of every model: flash-attn on CUDA when installed, else torch SDPA.

Layout everywhere: q [B, Lq, H, D], k and v [B, Lk, H, D] -> out [B, Lq, H, D] (the flash-attn layout that the
official Wan and HunyuanVideo code uses). Masks are handled here and only here:
    k_lens  [B] int  number of valid keys of each sample; keys at positions >= k_lens[b] are ignored (varlen)
    mask    bool [B|1, H|1, Lq, Lk], True = may attend (a dense mask, e.g. HunyuanVideo's token refiner)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def flash_attn_module():
    """flash_attn if it is importable (an optional extra that only builds on CUDA machines), else None."""
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    k_lens: Tensor | None = None,
    mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention, scale defaulting to D^-0.5. See the module docstring for shapes and masks."""
    b, lq, h, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[2:] != (h, d):
        raise ValueError(
            f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k_lens is not None and mask is not None:
        raise ValueError("pass either k_lens or a dense mask, not both")
    flash = flash_attn_module()
    if flash is not None and q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        return _flash(flash, q, k, v, k_lens, scale)
    if k_lens is not None:
        mask = torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None]  # [B, Lk]
        mask = mask[:, None, None, :]  # [B, 1, 1, Lk]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [B, H, Lq, D]
    return out.transpose(1, 2)  # [B, Lq, H, D]


def _flash(flash, q: Tensor, k: Tensor, v: Tensor, k_lens: Tensor | None, scale: float | None) -> Tensor:
    if k_lens is None:
        return flash.flash_attn_func(q, k, v, softmax_scale=scale)
    # Varlen: pack the valid keys of every sample; every query row is kept.
    b, lq, h, d = q.shape
    k_lens = k_lens.to(device=q.device, dtype=torch.int32)
    keep = torch.arange(k.shape[1], device=q.device)[None, :] < k_lens[:, None]  # [B, Lk]
    cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))  # [B + 1]
    cu_q = torch.arange(0, (b + 1) * lq, lq, device=q.device, dtype=torch.int32)  # [B + 1]
    out = flash.flash_attn_varlen_func(
        q.reshape(b * lq, h, d), k[keep], v[keep], cu_q, cu_k, lq, int(k_lens.max()), softmax_scale=scale
    )  # [B * Lq, H, D]
    return out.view(b, lq, h, d)
