"""The one attention entry point of every model, with an explicit backend: flash-attn, SageAttention or SDPA.

Layout everywhere: q [B, Lq, H, D], k and v [B, Lk, H, D] -> out [B, Lq, H, D] (the flash-attn layout that the
official Wan and HunyuanVideo code uses). Masks are handled here and only here:
    k_lens  [B] int  number of valid keys of each sample; keys at positions >= k_lens[b] are ignored (varlen)
    mask    bool [B|1, H|1, Lq, Lk], True = may attend (a dense mask, e.g. HunyuanVideo's token refiner)

Backends (`backend=`, the models' `attn_backend`, the scripts' `--attention`):
    auto   flash-attn (3 if its `flash_attn_interface` is installed, else 2) for CUDA bf16/fp16 inputs, else
           SDPA: what the official code does (its attention() takes flash-attn whenever it is importable).
    sdpa   torch.nn.functional.scaled_dot_product_attention; on CUDA torch picks its flash, cuDNN or
           memory-efficient kernel; on the CPU its fused kernel. Exact softmax attention; the reference here.
    flash  flash-attn 3 or 2, refused (error) when not installed, off CUDA or in fp32.
    sage   SageAttention (INT8 Q·K^T with K smoothing, fp16/fp8 P·V): an *approximate* kernel, refused when
           not installed, off CUDA or in fp32.
A dense `mask` (HunyuanVideo's 256-token text refiner) runs on SDPA with every backend: neither flash-attn
nor SageAttention takes an arbitrary mask, and that attention is < 0.1% of the model's FLOPs.

Numerics against SDPA (from the kernels' papers and docs; measured in benchmarks/gpu_check.py where a GPU is
at hand): flash-attn 2/3 compute the exact softmax with fp32 accumulation in tiles, so they differ from SDPA
only by bf16 rounding order (~1e-3 relative in bf16, the same order as SDPA's own kernels among themselves);
FA3 in fp8 is not used here. SageAttention quantises Q and K to INT8 per block (P·V in fp16 or fp8): its
authors report cosine similarity > 0.999 and end-to-end video metrics close to full precision, but it is
not exact, so EasyCache's fidelity numbers must name the backend they were measured with.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from models.flags import BACKENDS  # the --attention choices (torch-free, for parsing)

_IMPORTED: dict[str, object] = {}  # memo of the optional kernel packages (None: not installed)


def _module(name: str):
    """An optional kernel package if importable (they only build on CUDA machines), else None. A plain dict
    memo rather than functools.cache: torch.compile traces through a cached function but reads a dict."""
    if name not in _IMPORTED:
        try:
            _IMPORTED[name] = importlib.import_module(name)
        except ImportError:
            _IMPORTED[name] = None
    return _IMPORTED[name]


def flash_attn_module():
    """flash-attn 3 (`flash_attn_interface`, the Hopper build) if installed, else flash-attn 2, else None."""
    return _module("flash_attn_interface") or _module("flash_attn")


def sage_attn_module():
    return _module("sageattention")


def check_backend(backend: str, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Refuse a backend that cannot run here (before any model is loaded): a ValueError naming the fix."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"--attention must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("auto", "sdpa"):
        return
    package = {
        "flash": "flash-attn (pip install flash-attn)",
        "sage": "sageattention (pip install sageattention)",
    }
    installed = flash_attn_module() if backend == "flash" else sage_attn_module()
    if installed is None:
        raise ValueError(f"--attention {backend} needs {package[backend]}, which is not installed here")
    if device.type != "cuda":
        raise ValueError(f"--attention {backend} runs on CUDA only, not on {device}; use sdpa or auto")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"--attention {backend} needs bf16 or fp16 weights, not {dtype}; use sdpa")


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel that `backend` runs on `device` in `dtype` ("auto" -> "flash" or "sdpa"), for reports."""
    if backend != "auto":
        return backend
    half = torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    return "flash" if half and flash_attn_module() is not None else "sdpa"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    k_lens: Tensor | None = None,
    mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Softmax attention, scale defaulting to D^-0.5. See the module docstring for shapes, masks, backends."""
    b, lq, h, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[2:] != (h, d):
        raise ValueError(
            f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k_lens is not None and mask is not None:
        raise ValueError("pass either k_lens or a dense mask, not both")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; one of {', '.join(BACKENDS)}")
    half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if mask is None and backend == "sage":
        _require(half and sage_attn_module() is not None, "sage", q)
        return _sage(sage_attn_module(), q, k, v, k_lens, scale)
    if mask is None and (backend == "flash" or (backend == "auto" and half)):  # no package lookup on CPU
        flash = flash_attn_module()
        if backend == "flash":
            _require(half and flash is not None, "flash", q)
        if flash is not None:
            return _flash(flash, q, k, v, k_lens, scale)
    if k_lens is not None:
        mask = torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None]  # [B, Lk]
        mask = mask[:, None, None, :]  # [B, 1, 1, Lk]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [B, H, Lq, D]
    return out.transpose(1, 2)  # [B, Lq, H, D]


def _require(ok: bool, backend: str, q: Tensor) -> None:
    if not ok:  # check_backend refuses these earlier in the scripts; this guards direct model use
        check_backend(backend, q.device, q.dtype)
        raise ValueError(f"attention backend {backend!r} cannot run on {q.device} {q.dtype}")


def _varlen_pack(q: Tensor, k: Tensor, v: Tensor, k_lens: Tensor):
    """Pack the valid keys of every sample (every query row is kept) for the varlen kernels."""
    b, lq = q.shape[:2]
    k_lens = k_lens.to(device=q.device, dtype=torch.int32)
    keep = torch.arange(k.shape[1], device=q.device)[None, :] < k_lens[:, None]  # [B, Lk]
    cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))  # [B + 1]
    cu_q = torch.arange(0, (b + 1) * lq, lq, device=q.device, dtype=torch.int32)  # [B + 1]
    return q.flatten(0, 1), k[keep], v[keep], cu_q, cu_k, lq, int(k_lens.max())


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # FA3 releases return (out, lse); FA2 returns out


def _flash(flash, q: Tensor, k: Tensor, v: Tensor, k_lens: Tensor | None, scale: float | None) -> Tensor:
    if k_lens is None:
        return _first(flash.flash_attn_func(q, k, v, softmax_scale=scale))
    qp, kp, vp, cu_q, cu_k, lq, lk = _varlen_pack(q, k, v, k_lens)
    out = _first(flash.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, lq, lk, softmax_scale=scale))
    return out.view(q.shape)  # [B, Lq, H, D]


def _sage(sage, q: Tensor, k: Tensor, v: Tensor, k_lens: Tensor | None, scale: float | None) -> Tensor:
    if k_lens is None:
        return sage.sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)
    qp, kp, vp, cu_q, cu_k, lq, lk = _varlen_pack(q, k, v, k_lens)
    out = sage.sageattn_varlen(qp, kp, vp, cu_q, cu_k, lq, lk, is_causal=False, sm_scale=scale)
    return out.view(q.shape)  # [B, Lq, H, D]
