"""Wan2.1 DiT (T2V and I2V) with the official parameter names and numerics, loading the official checkpoints.

Shape letters: B batch, C channels, F/H/W latent frames/height/width, f/h/w the patch grid (F/pt, H/ph, W/pw),
L video tokens (f*h*w), T text tokens (text_len), I CLIP image tokens (257), D hidden (dim), N heads,
Dh head dim (D/N), P = pt*ph*pw*out_dim values per token.

dtype islands (as the official run under bf16 autocast): the time embedding, the modulation arithmetic, the
gates, the residual stream, every LayerNorm/RMSNorm and the head compute in fp32 whatever the weight dtype;
RoPE is complex float64; the attention/FFN/text linears run in the dtype of their weights.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.attention import attention
from models.loading import (
    check_shapes,
    checkpoint_shapes,
    download_command,
    load_sharded_safetensors,
    load_strict,
    require_files,
    safetensors_files,
    stream_safetensors_slices,
)

if TYPE_CHECKING:
    from models.parallel import SequenceParallel

# Width of the open-clip ViT-H/14 features that img_emb projects (fixed in the official MLPProj).
CLIP_DIM = 1280
ROPE_MAX_POSITIONS = 1024  # the official RoPE table covers positions 0..1023 on each axis
WEIGHTS = "diffusion_pytorch_model"

# ---------------------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanConfig:
    """The official `WanModel` constructor arguments (upstream defaults; WAN_CONFIGS has the real models)."""

    model_type: str = "t2v"  # "t2v" or "i2v" (flf2v and vace are not implemented)
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw)
    text_len: int = 512  # context is zero-padded to this many tokens before text_embedding
    in_dim: int = 16  # latent channels in (i2v: 16 noise + 4 mask + 16 image latents = 36)
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256  # width of the sinusoidal timestep embedding
    text_dim: int = 4096  # umT5-XXL width
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    window_size: tuple[int, int] = (-1, -1)  # (-1, -1) = global attention, the only value upstream ships
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # Not an upstream argument: upstream hard-codes the open-clip ViT-H/14 width (MLPProj(1280, dim)). Named
    # as diffusers' `image_dim`; only the I2V demo model (a 64-wide CLIP tower) sets another value.
    image_dim: int = CLIP_DIM

    def __post_init__(self):
        # JSON gives lists; keep the frozen config hashable and comparable.
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "window_size", tuple(self.window_size))
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(
                f"model_type must be 't2v' or 'i2v', got {self.model_type!r} (flf2v/vace: not supported)"
            )
        if len(self.patch_size) != 3 or any(int(p) != p or p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}")
        sizes = (
            "text_len",
            "in_dim",
            "dim",
            "ffn_dim",
            "freq_dim",
            "text_dim",
            "out_dim",
            "num_heads",
            "num_layers",
            "image_dim",
        )
        for name in sizes:
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(
                f"head_dim=dim/num_heads must be even and >= 6 (3 RoPE axes), got {self.head_dim}"
            )
        if self.window_size != (-1, -1):
            raise ValueError(f"window_size must be (-1, -1) (global attention), got {self.window_size}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def diffusers_kwargs(self) -> dict:
        """The constructor arguments of diffusers' `WanTransformer3DModel` for the same architecture (the
        parity tests and the benchmark build their reference with them); i2v adds the CLIP image branch."""
        i2v = self.model_type == "i2v"
        return dict(
            patch_size=self.patch_size,
            num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim,
            in_channels=self.in_dim,
            out_channels=self.out_dim,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
            cross_attn_norm=self.cross_attn_norm,
            qk_norm="rms_norm_across_heads" if self.qk_norm else None,
            eps=self.eps,
            image_dim=self.image_dim if i2v else None,  # open-clip ViT-H/14 width (1280)
            added_kv_proj_dim=self.dim if i2v else None,
        )

    @classmethod
    def from_json(cls, path: str) -> WanConfig:
        """Read the official `config.json` (which omits patch_size, text_dim, qk_norm, cross_attn_norm and
        window_size: upstream always uses their defaults)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Wan config not found: {path}")
        with open(path) as f:
            raw = json.load(f)
        if raw.get("_class_name", "WanModel") != "WanModel":
            raise ValueError(
                f"{path} describes a {raw['_class_name']}, not the official WanModel; use an official repo "
                "(Wan-AI/Wan2.1-*), or convert -Diffusers weights with convert_diffusers_to_official"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - {"_class_name", "_diffusers_version"})
        if unknown:
            raise ValueError(f"{path} has keys that WanConfig does not know: {unknown}")
        return cls(**{k: v for k, v in raw.items() if k in known})


WAN_T2V_1_3B = WanConfig(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN_T2V_14B = WanConfig(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN_I2V_14B = WanConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# The embedded demo model (train_wan_tiny.py, checkpoints/wan-tiny): 64×64×17 videos -> 16×5×16×16 latents
# -> 1×2×2 patches (the official patch size) -> 320 tokens; its text encoder is a 64-wide umT5 over 16 tokens.
WAN_TINY = WanConfig(text_len=16, dim=128, ffn_dim=384, text_dim=64, num_heads=2, num_layers=6)
# The I2V demo model (train_wan_tiny_i2v.py, checkpoints/wan-i2v-tiny): WAN_TINY with the I2V input (16 noise
# + 20 condition channels) and the CLIP branch over a 64-wide image tower (models.wan_clip.CLIP_TINY).
WAN_I2V_TINY = WanConfig(
    model_type="i2v",
    in_dim=36,
    image_dim=64,
    text_len=16,
    dim=128,
    ffn_dim=384,
    text_dim=64,
    num_heads=2,
    num_layers=6,
)

# The 480P and 720P I2V checkpoints share one DiT architecture (they differ only in weights).
WAN_CONFIGS = {
    "t2v-1.3B": WAN_T2V_1_3B,
    "t2v-14B": WAN_T2V_14B,
    "i2v-14B-480P": WAN_I2V_14B,
    "i2v-14B-720P": WAN_I2V_14B,
    "tiny": WAN_TINY,
    "i2v-tiny": WAN_I2V_TINY,
}
WAN_REPOS = {
    "t2v-1.3B": "Wan-AI/Wan2.1-T2V-1.3B",
    "t2v-14B": "Wan-AI/Wan2.1-T2V-14B",
    "i2v-14B-480P": "Wan-AI/Wan2.1-I2V-14B-480P",
    "i2v-14B-720P": "Wan-AI/Wan2.1-I2V-14B-720P",
}

# ---------------------------------------------------------------------------------------------------------
# Numerics helpers: sinusoid, RoPE, fp32 norms and linears
# ---------------------------------------------------------------------------------------------------------


def sinusoidal_embedding_1d(dim: int, t: Tensor) -> Tensor:
    """[B] timesteps -> [B, dim] float64 embedding, cos half first, frequencies 10000^(-j/(dim/2))."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half)  # [dim/2]
    angles = torch.outer(t, freqs)  # [B, dim/2]
    return torch.cat([angles.cos(), angles.sin()], dim=1)  # [B, dim]


def rope_freqs(grid: tuple[int, int, int], head_dim: int, device: torch.device | str) -> Tensor:
    """Complex128 rotations [L, 1, Dh/2] for the (f, h, w) grid, tokens in (f, h, w) order.

    The head dim is split into t/h/w parts of Dh-4*(Dh//6), 2*(Dh//6), 2*(Dh//6) real dims (44/42/42 for
    Dh=128), each with its own frequency denominator, as upstream. Computed per call from the grid (cheap)
    rather than stored, so that a model built on the meta device has no tensor to materialise.
    """
    if max(grid) > ROPE_MAX_POSITIONS:
        raise ValueError(
            f"patch grid {grid} exceeds the {ROPE_MAX_POSITIONS} RoPE positions per axis of Wan2.1"
        )
    d_hw = 2 * (head_dim // 6)
    axes = []
    for n, d in zip(grid, (head_dim - 2 * d_hw, d_hw, d_hw)):
        inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)  # [d/2]
        angles = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)  # [n, d/2]
        axes.append(torch.polar(torch.ones_like(angles), angles))  # [n, d/2] complex128
    f, h, w = grid
    table = torch.cat(
        [
            axes[0][:, None, None].expand(f, h, w, -1),
            axes[1][None, :, None].expand(f, h, w, -1),
            axes[2][None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    )  # [f, h, w, Dh/2]
    return table.reshape(f * h * w, 1, head_dim // 2)  # [L, 1, Dh/2]


def rope_apply(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) in float64, as upstream; returns fp32 [B, L, N, Dh]."""
    xc = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (-1, 2)))  # [B, L, N, Dh/2] complex128
    return torch.view_as_real(xc * freqs).flatten(-2).float()  # [B, L, N, Dh]


class Fp32Linear(nn.Linear):
    """A Linear of the fp32 islands (time embedding, time projection, head): fp32 math whatever the dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.float(), self.weight.float(), self.bias.float())


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (upstream WanLayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class WanRMSNorm(nn.Module):
    """RMSNorm over the full hidden dim (all heads together, before the head split), as upstream."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        # Upstream rounds to the input dtype before the (fp32) weight multiplies: the result is fp32.
        return normed.type_as(x) * self.weight.float()


# ---------------------------------------------------------------------------------------------------------
# Attention, blocks, head, image projection
# ---------------------------------------------------------------------------------------------------------


class WanSelfAttention(nn.Module):
    """Self-attention over all video tokens with full-dim QK RMSNorm and 3D RoPE."""

    def __init__(
        self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, attn_backend: str = "auto"
    ):
        super().__init__()
        self.num_heads = num_heads
        self.attn_backend = attn_backend  # models.attention backend: auto, sdpa, flash or sage
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, freqs: Tensor, sp: SequenceParallel | None = None) -> Tensor:
        x = x.to(self.q.weight.dtype)  # [B, L, D] the linears run in the weight dtype (autocast upstream)
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # [B, L, N, Dh] fp32
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))  # [B, L, N, Dh] fp32
        v = self.v(x).unflatten(-1, (self.num_heads, -1))  # [B, L, N, Dh]
        q, k = rope_apply(q, freqs).to(v.dtype), rope_apply(k, freqs).to(v.dtype)  # [B, L, N, Dh]
        # Sequence parallel: L is this rank's tokens, and the keys of every rank take part (Ulysses/ring).
        out = attention(q, k, v, backend=self.attn_backend) if sp is None else sp.attention(q, k, v)
        return self.o(out.flatten(-2).to(self.o.weight.dtype))  # [B, L, D]


class WanCrossAttention(WanSelfAttention):
    """Cross-attention to the text tokens (no key mask: padded rows take part, as upstream) and, for i2v,
    a second attention to the CLIP image tokens with its own k/v, summed before the output projection.
    The same q/k/v/o and QK norms as self-attention (upstream subclasses it too), without RoPE."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_norm: bool = True,
        eps: float = 1e-6,
        image: bool = False,
        attn_backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qk_norm, eps, attn_backend)
        if image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor, context_img: Tensor | None) -> Tensor:
        dt, heads, backend = self.q.weight.dtype, (self.num_heads, -1), self.attn_backend
        q = self.norm_q(self.q(x.to(dt))).unflatten(-1, heads)  # [B, L, N, Dh]
        k = self.norm_k(self.k(context.to(dt))).unflatten(-1, heads)  # [B, T, N, Dh]
        v = self.v(context.to(dt)).unflatten(-1, heads)  # [B, T, N, Dh]
        out = attention(q.to(v.dtype), k.to(v.dtype), v, backend=backend).float()  # [B, L, N, Dh]
        if context_img is not None:
            k_img = self.norm_k_img(self.k_img(context_img.to(dt))).unflatten(-1, heads)  # [B, I, N, Dh]
            v_img = self.v_img(context_img.to(dt)).unflatten(-1, heads)  # [B, I, N, Dh]
            # Upstream returns each attention in fp32 and sums there before `o` rounds to the weight dtype.
            out = out + attention(q.to(v.dtype), k_img.to(v.dtype), v_img, backend=backend).float()
        return self.o(out.flatten(-2).to(self.o.weight.dtype))  # [B, L, D]


class WanAttentionBlock(nn.Module):
    """Self-attention, cross-attention and FFN; adaLN modulation from the shared time projection."""

    def __init__(self, config: WanConfig, attn_backend: str = "auto"):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, config.num_heads, config.qk_norm, eps, attn_backend)
        # Upstream naming: norm3 is the (affine) cross-attention pre-norm, norm2 the FFN pre-norm.
        self.norm3 = (
            WanLayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        )
        image = config.model_type == "i2v"
        self.cross_attn = WanCrossAttention(dim, config.num_heads, config.qk_norm, eps, image, attn_backend)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        # Learned table *added* to the shared time projection (not a per-block Linear); random like upstream.
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        freqs: Tensor,
        context: Tensor,
        context_img: Tensor | None,
        pab=None,
        sp: SequenceParallel | None = None,
    ) -> Tensor:
        """`pab`: optional attention broadcast (easycache.pab): `pab(kind, attn, *args)` runs or reuses it."""
        mod = self.modulation.float() + e0  # [B, 6, D] fp32
        # Order: shift, scale, gate of the self-attention, then shift, scale, gate of the FFN.
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)  # [B, 1, D] each
        h = self.norm1(x).float() * (1 + scale1) + shift1  # [B, L, D]
        y = self.self_attn(h, freqs, sp) if pab is None else pab("spatial", self.self_attn, h, freqs, sp)
        x = x + y * gate1  # [B, L, D] fp32 from here on (upstream: fp32 gate, fp32 residual)
        h = self.norm3(x)  # [B, L, D]
        y = (
            self.cross_attn(h, context, context_img)
            if pab is None
            else pab("cross", self.cross_attn, h, context, context_img)
        )
        x = x + y  # [B, L, D] no gate, no modulation
        h = (self.norm2(x).float() * (1 + scale2) + shift2).to(self.ffn[0].weight.dtype)  # [B, L, D]
        return x + self.ffn(h) * gate2  # [B, L, D]


class Head(nn.Module):
    """Final adaLN + Linear, all fp32; modulated by the time embedding `e` (not the 6-way projection e0)."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = Fp32Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation.float() + e.float()[:, None]).chunk(2, dim=1)  # [B, 1, D] each
        return self.head(self.norm(x.float()) * (1 + scale) + shift)  # [B, L, P]


class MLPProj(nn.Module):
    """CLIP image features -> context tokens (i2v): LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Plain nn.LayerNorm upstream, so eps 1e-5; under autocast both norms output fp32.
        self.proj = nn.Sequential(
            WanLayerNorm(in_dim, 1e-5, elementwise_affine=True),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            WanLayerNorm(out_dim, 1e-5, elementwise_affine=True),
        )

    def forward(self, clip_fea: Tensor) -> Tensor:
        norm_in, fc1, act, fc2, norm_out = self.proj
        h = norm_in(clip_fea.float()).to(fc1.weight.dtype)  # [B, I, 1280]
        return norm_out(fc2(act(fc1(h))).float())  # [B, I, D] fp32


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


class WanModel(nn.Module):
    """Wan2.1 DiT; `state_dict()` keys are exactly those of the official checkpoints. `attn_backend` picks
    the attention kernel of every block (models.attention.BACKENDS); it holds no weights."""

    def __init__(self, config: WanConfig, attn_backend: str = "auto"):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(Fp32Linear(config.freq_dim, dim), nn.SiLU(), Fp32Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Fp32Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            [WanAttentionBlock(config, attn_backend) for _ in range(config.num_layers)]
        )
        self.head = Head(dim, config.out_dim, config.patch_size, config.eps)
        if config.model_type == "i2v":
            self.img_emb = MLPProj(config.image_dim, dim)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        clip_fea: Tensor | None = None,
        y: Tensor | None = None,
        cache=None,
        *,
        sp: SequenceParallel | None = None,
    ) -> Tensor:
        """x [B, C, F, H, W] noisy latents, t [B] timesteps in [0, 1000), context [B, L<=text_len, text_dim]
        (rows past each prompt's length zero), i2v: clip_fea [B, I, 1280], y [B, C_y, F, H, W].
        `cache`: optional hook of one call (easycache.hooks: TeaCache, MagCache, PAB); None = the plain DiT.
        sp: sequence parallelism (models.parallel): every rank passes the same full inputs, runs the blocks
        on 1/P of the tokens and gets the same full output. Returns the flow prediction [B, out_dim, F, H,
        W] in fp32."""
        self._check_inputs(x, t, context, clip_fea, y)
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y], dim=1)  # [B, in_dim, F, H, W]
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, D, f, h, w]
        f, h, w = x.shape[2:]
        # rearrange may return a strided view here; a channel-major residual stream slows every op after it.
        x = rearrange(x, "b d f h w -> b (f h w) d").contiguous()  # [B, L, D]
        freqs = rope_freqs((f, h, w), cfg.head_dim, x.device)  # [L, 1, Dh/2] complex128
        if sp is not None:
            x, freqs = shard_tokens(x, freqs, sp)  # [B, L'/P, D], [L'/P, 1, Dh/2]

        e = self.time_embedding(sinusoidal_embedding_1d(cfg.freq_dim, t).float())  # [B, D] fp32
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))  # [B, 6, D] fp32

        # Zero-pad to text_len *before* the MLP, as upstream: pads become text_embedding(0), which is not
        # zero, and every one of the text_len rows is attended (no key mask); masking them changes outputs.
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))  # [B, T, text_dim]
        context = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))  # [B, T, D]
        context_img = self.img_emb(clip_fea) if clip_fea is not None else None  # [B, I, D]

        # Cache seam: TeaCache/MagCache may skip the whole block stack (x + its cached residual); PAB gets a
        # broadcaster per block. Probes are what a decision may measure (official TeaCache: e, or e0).
        # Under sp the tokens x are this rank's part; the time embeddings are whole on every rank.
        if cache is not None and not cache.compute_blocks(x, {"e": e, "e0": e0}, split=("x",) if sp else ()):
            x = cache.reuse_blocks(x)  # [B, L, D]
        else:
            x_in = x
            for i, block in enumerate(self.blocks):
                pab = cache.attention(i) if cache is not None else None
                x = block(x, e0, freqs, context, context_img, pab, sp)  # [B, L, D] fp32
            if cache is not None:
                cache.store_blocks(x_in, x)
        x = self.head(x, e)  # [B, L, P] fp32
        if sp is not None:  # the head is per token: gather its (smaller) output, as upstream
            x = sp.gather(x, dim=1)[:, : f * h * w]  # [B, L, P], the padding dropped
        pt, ph, pw = cfg.patch_size
        # The head's output channels are ordered (pt, ph, pw, c), c innermost, as upstream.
        return rearrange(
            x, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw
        )  # [B, out_dim, F, H, W]

    def _check_inputs(self, x, t, context, clip_fea, y) -> None:
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        b = x.shape[0]
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(
                f"latent (F, H, W)={tuple(x.shape[2:])} must be divisible by patch_size {cfg.patch_size}"
            )
        if t.shape != (b,):
            raise ValueError(f"t must be [B]=[{b}] timesteps, got shape {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context must be [B={b}, L, text_dim={cfg.text_dim}], got {tuple(context.shape)}"
            )
        if context.shape[1] > cfg.text_len:
            raise ValueError(
                f"context has {context.shape[1]} tokens, more than text_len={cfg.text_len}; truncate the "
                f"prompt embedding to {cfg.text_len} tokens (the official tokenizer truncates there)"
            )
        if cfg.model_type == "t2v":
            if clip_fea is not None or y is not None:
                raise ValueError(
                    "a t2v model takes no clip_fea / y; use an i2v config for image conditioning"
                )
        elif clip_fea is None or y is None:
            raise ValueError("an i2v model needs both clip_fea [B, 257, 1280] and y [B, C_y, F, H, W]")
        else:
            if clip_fea.ndim != 3 or clip_fea.shape[0] != b or clip_fea.shape[2] != cfg.image_dim:
                raise ValueError(
                    f"clip_fea must be [B={b}, I, image_dim={cfg.image_dim}], got {tuple(clip_fea.shape)}"
                )
            if y.ndim != 5 or y.shape[0] != b or y.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"y must be [B, C_y, F, H, W] matching x {tuple(x.shape)}, got {tuple(y.shape)}"
                )
        channels = x.shape[1] + (0 if y is None else y.shape[1])
        if channels != cfg.in_dim:
            raise ValueError(f"x (+ y) has {channels} channels, the model expects in_dim={cfg.in_dim}")


def shard_tokens(x: Tensor, freqs: Tensor, sp: SequenceParallel) -> tuple[Tensor, Tensor]:
    """This rank's chunk of the token sequence and its RoPE rotations, as the official
    xdit_context_parallel: the sequence is zero-padded to a multiple of P (the padded tokens take part in
    attention there as well; the official sizes never need it) and the padded rotations are the identity."""
    length = sp.padded_length(x.shape[1])
    x = F.pad(x, (0, 0, 0, length - x.shape[1]))  # [B, L', D]
    identity = torch.ones(length - freqs.shape[0], *freqs.shape[1:], dtype=freqs.dtype, device=freqs.device)
    return sp.split(x, dim=1), sp.split(torch.cat([freqs, identity]), dim=0)  # [B, L'/P, D], [L'/P, 1, Dh/2]


def flops_per_call(config: WanConfig, grid: tuple[int, int, int], batch: int = 1) -> dict[str, float]:
    """Analytic FLOPs (2 per multiply-add) of one forward on a latent patch grid (f, h, w): the whole call,
    the block stack, and per block its self- ("spatial") and cross-attention; for caches' work ratios."""
    L, D, T = math.prod(grid), config.dim, config.text_len  # noqa: N806 (the shape letters)
    spatial = 8 * L * D * D + 4 * L * L * D  # q, k, v, o and the two attention matmuls
    cross = 4 * L * D * D + 4 * T * D * D + 4 * L * T * D  # q, o on video; k, v on text; attention
    if config.model_type == "i2v":  # the CLIP image tokens' own k, v and attention
        cross += 4 * 257 * D * D + 4 * L * 257 * D
    blocks = config.num_layers * (spatial + cross + 4 * L * D * config.ffn_dim)
    patch = math.prod(config.patch_size)
    embed = 2 * L * D * config.in_dim * patch + 2 * T * (config.text_dim * D + D * D)
    head = 2 * L * D * patch * config.out_dim
    cost = {"call": embed + blocks + head, "blocks": blocks, "spatial": spatial, "cross": cross}
    return {k: float(batch * v) for k, v in cost.items()}


# ---------------------------------------------------------------------------------------------------------
# dtype, loading and key conversion
# ---------------------------------------------------------------------------------------------------------


def fp32_island_keys(model: WanModel) -> set[str]:
    """State-dict keys that stay fp32 in a bf16/fp16 model: time embedding and projection, modulation
    tables, head and every norm (like diffusers' `_keep_in_fp32_modules`; upstream gets the same from fp32
    weights under autocast with fp32 islands). They are a small fraction of the parameters."""
    keep = set()
    for prefix, module in model.named_modules():
        island = isinstance(module, (Fp32Linear, WanLayerNorm, WanRMSNorm))
        for name, _ in module.named_parameters(recurse=False):
            if island or name == "modulation":
                keep.add(f"{prefix}.{name}" if prefix else name)
    return keep


def cast_wan(model: WanModel, dtype: torch.dtype) -> WanModel:
    """Cast a model to `dtype` in place, keeping the fp32 islands (see fp32_island_keys) in fp32."""
    keep = fp32_island_keys(model)
    state = {k: v.to(torch.float32 if k in keep else dtype) for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _require(ckpt_dir: str, files: list[str], repo_id: str | None) -> None:
    if repo_id is not None:
        require_files(ckpt_dir, files, repo_id=repo_id)
        return
    missing = [f for f in files if not os.path.isfile(os.path.join(ckpt_dir, f))]
    if missing:
        raise FileNotFoundError(
            f"{ckpt_dir} lacks {', '.join(missing)}; download a Wan2.1 DiT repo there, e.g. "
            f"{download_command(WAN_REPOS['t2v-1.3B'], ckpt_dir)} (repos: {', '.join(WAN_REPOS.values())})"
        )


def load_wan(
    ckpt_dir: str,
    *,
    config: WanConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repo_id: str | None = None,
    attn_backend: str = "auto",
    fsdp: bool = False,
) -> WanModel:
    """Load an official Wan2.1 DiT checkpoint directory strictly.

    Args:
        ckpt_dir: holds `config.json` and `diffusion_pytorch_model.safetensors` (1.3B), or the shards plus
            `diffusion_pytorch_model.safetensors.index.json` (14B), as on the Hub.
        config: use this instead of `ckpt_dir/config.json`.
        device, dtype: where the weights go; with bf16/fp16 the fp32 islands stay fp32.
        repo_id: Hub repo named in the error message when files are missing (e.g. WAN_REPOS["t2v-1.3B"]).
        attn_backend: the attention kernel (models.attention.BACKENDS).
        fsdp: shard the blocks over the default process group with FSDP2 (`--dit_fsdp`) *while* loading:
            each rank reads only its 1/N of every weight from the files and holds only that, on `device`
            (models.fsdp.load_sharded). Bitwise the shards of the unsharded load.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if config is None:
        _require(ckpt_dir, ["config.json"], repo_id)
        config = WanConfig.from_json(os.path.join(ckpt_dir, "config.json"))
    repo_id = repo_id or next((WAN_REPOS.get(name) for name, c in WAN_CONFIGS.items() if c == config), None)
    index = os.path.join(ckpt_dir, f"{WEIGHTS}.safetensors.index.json")
    if os.path.isfile(index):  # fail on a missing shard before reading any of them
        with open(index) as f:
            _require(ckpt_dir, sorted(set(json.load(f)["weight_map"].values())), repo_id)
    elif not os.path.isfile(os.path.join(ckpt_dir, f"{WEIGHTS}.safetensors")):
        _require(ckpt_dir, [f"{WEIGHTS}.safetensors (or its shards + .index.json)"], repo_id)

    with torch.device("meta"):
        model = WanModel(config, attn_backend)
    keep = fp32_island_keys(model)
    if fsdp:
        from models.fsdp import load_sharded

        # Keys and shapes from the headers first (no tensor read), then the final dtypes on the meta model:
        # FSDP2 groups each block's parameters by dtype when it shards.
        files, weight_map = safetensors_files(ckpt_dir, WEIGHTS)
        weights = files[0][0] if weight_map is None else index  # the one file, or the shards' index
        check_shapes(model, checkpoint_shapes(weights), source=ckpt_dir)
        cast_wan(model, dtype)
        tensors = stream_safetensors_slices(ckpt_dir, WEIGHTS)
        return load_sharded(model, model.blocks, tensors, device=device, source=ckpt_dir).eval()
    # Cast each tensor as it is read, into memory of its own (copy=True: a tensor left viewing the memory
    # map, e.g. an fp32 island, would keep its file pages mapped): the peak is the cast model plus one tensor
    # (benchmarks/loader_memory.py), not the whole fp32 state next to its cast copy.
    state = load_sharded_safetensors(
        ckpt_dir, WEIGHTS, cast=lambda k, t: t.to(torch.float32 if k in keep else dtype, copy=True)
    )
    load_strict(model, state, source=ckpt_dir)
    return model.to(device).eval()


# diffusers (WanTransformer3DModel) -> official names; first matching rule wins; no tensor is reshaped.
_DIFFUSERS_TO_OFFICIAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^patch_embedding\.", "patch_embedding."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.add_([kv])_proj\.", r"blocks.\1.cross_attn.\2_img."),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.", r"blocks.\1.cross_attn.norm_k_img."),
    # The LayerNorm names are swapped: diffusers norm2 (affine, cross-attn) is the official norm3.
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]


def convert_diffusers_to_official(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers `WanTransformer3DModel` state dict (the -Diffusers repos) to the official keys."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        if ".norm_added_q." in key:  # an unused parameter of some diffusers exports; diffusers ignores it too
            continue
        for pattern, repl in _DIFFUSERS_TO_OFFICIAL:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys with no official Wan2.1 name (not a WanTransformer3DModel?): {unknown[:10]}")
    return out


def convert_official_to_diffusers(state_dict: dict[str, Tensor], config: WanConfig) -> dict[str, Tensor]:
    """The inverse of `convert_diffusers_to_official`: official keys -> `WanTransformer3DModel` keys.

    The table is derived from the diffusers model of the same config (its keys, renamed one way), so the two
    directions cannot drift apart; every key must be matched, no tensor is reshaped.
    """
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        reference = WanTransformer3DModel(**config.diffusers_kwargs())
    to_diffusers = {}
    for key in reference.state_dict():
        (official,) = convert_diffusers_to_official({key: None})
        to_diffusers[official] = key
    unknown = sorted(set(state_dict) - set(to_diffusers))
    missing = sorted(set(to_diffusers) - set(state_dict))
    if unknown or missing:
        raise ValueError(
            f"not a Wan2.1 {config.model_type} DiT of this config: unknown keys {unknown[:10]}, "
            f"missing keys {missing[:10]}"
        )
    return {to_diffusers[k]: v for k, v in state_dict.items()}
