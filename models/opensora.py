"""OpenSora v1.2 STDiT3: a minimal reimplementation that loads `hpcai-tech/OpenSora-STDiT-v3` with the
official parameter names and reproduces the official numerics (hpcaitech/Open-Sora, branch opensora/v1.2:
opensora/models/stdit/stdit3.py and opensora/models/layers/blocks.py).

Shape legend (comments on tensor-changing lines):
    B  batch (cond and uncond stacked for CFG)      C  latent channels (4 in, 8 out)
    T, H, W  latent frames / height / width; after patchify the same letters name the patch grid
    S  spatial tokens per frame (H * W of the grid)   N  video tokens (T * S)
    L  text tokens (300)     Dc caption channels (4096)     D  hidden size     Nh heads     Dh head dim (72)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.attention import attention
from models.embeddings import TimestepEmbedder
from models.loading import load_file_state_dict, load_strict, require_files

HUB_REPO = "hpcai-tech/OpenSora-STDiT-v3"
LN_EPS = 1e-6

# ==================================================================================================
# Config
# ==================================================================================================

# Keys of the official config.json that do not change the inference graph or the state dict.
_IGNORED_CONFIG_KEYS = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "transformers_version",  # transformers bookkeeping
        "input_size",  # unused by STDiT3.forward: sizes are read from x
        "drop_path", "only_train_temporal", "freeze_y_embedder",  # training only
        "enable_flash_attn", "enable_layernorm_kernel", "enable_sequence_parallelism",  # kernel choices
        "skip_y_embedder",  # must be false (checked in from_dict): true feeds pre-embedded text
    }
)  # fmt: skip


@dataclass(frozen=True)
class STDiT3Config:
    """STDiT3 hyper-parameters, official field names and defaults (= STDiT3-XL/2)."""

    hidden_size: int = 1152
    depth: int = 28  # spatial blocks; as many temporal blocks, interleaved S0, T0, S1, T1, ...
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    caption_channels: int = 4096
    model_max_length: int = 300  # tokens of the learned null caption y_embedding
    qk_norm: bool = True
    pred_sigma: bool = True  # output 2 * in_channels (the sampler keeps the first in_channels)
    input_sq_size: int = 512  # pixel resolution at which the position-embedding scale is 1
    class_dropout_prob: float = 0.1  # training only; y_embedding exists either way

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads or self.head_dim % 2:
            raise ValueError(
                f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be an even int"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size must be divisible by 4 (2D sin-cos embedding), got {self.hidden_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.pred_sigma else self.in_channels

    @classmethod
    def from_dict(cls, d: dict) -> STDiT3Config:
        """From the official config.json dict; training/kernel keys are ignored, unknown keys are an error."""
        if d.get("model_type", "STDiT3") != "STDiT3":
            raise ValueError(f"model_type is {d['model_type']!r}, expected 'STDiT3' (OpenSora v1.2)")
        if d.get("skip_y_embedder", False):
            raise ValueError("skip_y_embedder=true (pre-embedded text) is not supported; set it to false")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - _IGNORED_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown STDiT3 config keys {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str) -> STDiT3Config:
        with open(path) as f:
            return cls.from_dict(json.load(f))


STDIT3_XL_2 = STDiT3Config()
STDIT3_3B_2 = STDiT3Config(hidden_size=1872, num_heads=26)
STDIT3_CONFIGS = {"STDiT3-XL/2": STDIT3_XL_2, "STDiT3-3B/2": STDIT3_3B_2}

# ==================================================================================================
# Embeddings
# ==================================================================================================


def position_embedding_2d(
    h: int, w: int, scale: float, base_size: int, dim: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Spatial sin-cos embedding [1, h*w, dim] (row-major tokens), upstream PositionEmbedding2D."""
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))  # [dim/4]
    # Upstream holds inv_freq in a buffer that model.to(bf16) rounds; the products are still taken in fp32.
    inv_freq = inv_freq.to(dtype).float().to(device)
    grid_h = torch.arange(h, device=device) / scale * (base_size / h)  # [h]
    grid_w = torch.arange(w, device=device) / scale * (base_size / w)  # [w]
    grid_h, grid_w = torch.meshgrid(grid_h, grid_w, indexing="ij")  # [h, w] each

    def sincos(g: Tensor) -> Tensor:
        angles = g.reshape(-1, 1) * inv_freq[None]  # [h*w, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # [h*w, dim/2]

    # The w coordinate fills the first half: upstream's meshgrid names are swapped ("here w goes first").
    return torch.cat([sincos(grid_w), sincos(grid_h)], dim=-1)[None].to(dtype)  # [1, h*w, dim]


class Mlp(nn.Module):
    """timm Mlp: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the hidden size; holds the learned null caption used for CFG."""

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        # The CFG null branch: y_embedding[None, None] with the *conditional* prompt's mask (STDiT3.forward).
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, y: Tensor) -> Tensor:
        return self.y_proj(y)


class PatchEmbed3D(nn.Module):
    """Zero-pads to patch multiples, then a strided Conv3d: [B, C, T, H, W] -> [B, T, S, D] (patch grid)."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        pt, ph, pw = self.patch_size
        t, h, w = x.shape[2:]
        x = F.pad(x, (0, -w % pw, 0, -h % ph, 0, -t % pt))  # [B, C, T', H', W'] multiples of the patch
        x = self.proj(x)  # [B, D, T, H, W] (patch grid)
        return rearrange(x, "B D T H W -> B T (H W) D")  # [B, T, S, D]


# ==================================================================================================
# Attention
# ==================================================================================================


class LlamaRMSNorm(nn.Module):
    """RMSNorm over the head dim, computed in fp32, scaled after casting back (upstream's order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """1D RoPE of the temporal attention (rotary_embedding_torch 0.5.3, theta 1e4, interleaved pairs)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        # A frozen nn.Parameter upstream; part of the checkpoint, so a persistent buffer here.
        self.register_buffer("freqs", 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)))

    def forward(self, x: Tensor) -> Tensor:
        """x [B', T, Nh, Dh] rotated along T with positions 0..T-1."""
        # Upstream takes positions and angles in the dtype of `freqs`, i.e. bf16 for a bf16 model.
        pos = torch.arange(x.shape[1], device=x.device, dtype=self.freqs.dtype)  # [T]
        angles = (pos[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)[:, None]  # [T, 1, Dh]
        pairs = rearrange(x, "... (d r) -> ... d r", r=2)  # [B', T, Nh, Dh/2, 2]
        rotated = rearrange(torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1), "... d r -> ... (d r)")
        return x * angles.cos() + rotated * angles.sin()  # [B', T, Nh, Dh]


class Attention(nn.Module):
    """Self-attention with per-head RMSNorm on q and k (before RoPE, as upstream's qk_norm_legacy=False)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, attn_backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.attn_backend = attn_backend  # models.attention backend: auto, sdpa, flash or sage
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = LlamaRMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = LlamaRMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: RotaryEmbedding | None = None) -> Tensor:
        qkv = self.qkv(x)  # [B, L, 3D], features ordered (q/k/v, Nh, Dh)
        q, k, v = rearrange(qkv, "B L (k Nh Dh) -> k B L Nh Dh", k=3, Nh=self.num_heads)  # [B, L, Nh, Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = attention(q, k, v, backend=self.attn_backend)  # [B, L, Nh, Dh]
        return self.proj(rearrange(x, "B L Nh Dh -> B L (Nh Dh)"))  # [B, L, D]


class MultiHeadCrossAttention(nn.Module):
    """Video tokens attend to their own sample's valid text tokens; no norm on either side."""

    def __init__(self, dim: int, num_heads: int, attn_backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.attn_backend = attn_backend
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, y_lens: Tensor | None) -> Tensor:
        q = rearrange(self.q_linear(x), "B N (Nh Dh) -> B N Nh Dh", Nh=self.num_heads)  # [B, N, Nh, Dh]
        kv = self.kv_linear(y)  # [B, L, 2D], features ordered (k/v, Nh, Dh)
        k, v = rearrange(kv, "B L (k Nh Dh) -> k B L Nh Dh", k=2, Nh=self.num_heads)  # [B, L, Nh, Dh]
        # k_lens = upstream's block-diagonal xformers mask over the packed valid tokens of every sample.
        x = attention(q, k, v, k_lens=y_lens, backend=self.attn_backend)  # [B, N, Nh, Dh]
        return self.proj(rearrange(x, "B N Nh Dh -> B N (Nh Dh)"))  # [B, N, D]


# ==================================================================================================
# Blocks
# ==================================================================================================


def t2i_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class STDiT3Block(nn.Module):
    """One spatial (attention within a frame) or temporal (attention across frames at one position) block."""

    def __init__(self, config: STDiT3Config, temporal: bool, attn_backend: str = "auto"):
        super().__init__()
        d = config.hidden_size
        self.temporal = temporal
        self.attn = Attention(d, config.num_heads, config.qk_norm, attn_backend)
        self.cross_attn = MultiHeadCrossAttention(d, config.num_heads, attn_backend)
        self.mlp = Mlp(d, int(d * config.mlp_ratio), d)
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        t_mlp: Tensor,
        y_lens: Tensor | None,
        grid_t: int,
        grid_s: int,
        rope: RotaryEmbedding,
        pab=None,
    ) -> Tensor:
        """x [B, N, D], y [B, L, D], t_mlp [B, 6D], y_lens [B] -> [B, N, D]; only temporal blocks use rope.
        `pab`: optional attention broadcast (easycache.pab): `pab(kind, attn, *args)` runs or reuses it."""
        b, _, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mlp.reshape(b, 6, -1)
        ).chunk(6, dim=1)  # 6 x [B, 1, D]
        x_m = t2i_modulate(F.layer_norm(x, (d,), eps=LN_EPS), shift_msa, scale_msa)  # [B, N, D]
        kind = "temporal" if self.temporal else "spatial"
        attn = self._attention if pab is None else partial(pab, kind, self._attention)
        x = x + gate_msa * attn(x_m, grid_t, grid_s, rope)  # [B, N, D]
        # upstream: no norm and no gate before the cross-attention
        x = x + (
            self.cross_attn(x, y, y_lens) if pab is None else pab("cross", self.cross_attn, x, y, y_lens)
        )
        x_m = t2i_modulate(F.layer_norm(x, (d,), eps=LN_EPS), shift_mlp, scale_mlp)  # [B, N, D]
        return x + gate_mlp * self.mlp(x_m)  # [B, N, D]

    def modulated_input(self, x: Tensor, t_mlp: Tensor) -> Tensor:
        """x after the block's first adaLN (the input of its self-attention): TeaCache's probe [B, N, D]."""
        b, _, d = x.shape
        shift, scale = (self.scale_shift_table[None] + t_mlp.reshape(b, 6, -1))[:, :2].chunk(2, dim=1)
        return t2i_modulate(F.layer_norm(x, (d,), eps=LN_EPS), shift, scale)  # [B, N, D]

    def _attention(self, x_m: Tensor, grid_t: int, grid_s: int, rope: RotaryEmbedding) -> Tensor:
        """Self-attention within a frame (spatial) or across frames at one position (temporal)."""
        b = x_m.shape[0]
        if self.temporal:
            x_m = rearrange(x_m, "B (T S) D -> (B S) T D", T=grid_t, S=grid_s)  # [B*S, T, D]
            return rearrange(self.attn(x_m, rope), "(B S) T D -> B (T S) D", B=b, S=grid_s)  # [B, N, D]
        x_m = rearrange(x_m, "B (T S) D -> (B T) S D", T=grid_t, S=grid_s)  # [B*T, S, D]
        return rearrange(self.attn(x_m), "(B T) S D -> B (T S) D", B=b, T=grid_t)  # [B, N, D]


class T2IFinalLayer(nn.Module):
    """PixArt final layer: modulated LayerNorm (by t, not t_block(t)) then a linear map to patch pixels."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # 2 x [B, 1, D]
        x = t2i_modulate(F.layer_norm(x, x.shape[-1:], eps=LN_EPS), shift, scale)  # [B, N, D]
        return self.linear(x)  # [B, N, pt*ph*pw*C]


# ==================================================================================================
# Model
# ==================================================================================================


class STDiT3(nn.Module):
    """OpenSora v1.2 spatial-temporal DiT; state_dict() keys are exactly the official ones (973 for XL/2).

    Upstream's `x_mask` (per-frame timestep-0 modulation for image/video conditioning) is not implemented:
    text-to-video passes an all-True x_mask, which is the same as none. `attn_backend` picks the attention
    kernel of every block (models.attention.BACKENDS); it holds no weights.
    """

    def __init__(self, config: STDiT3Config, attn_backend: str = "auto"):
        super().__init__()
        c, d = config, config.hidden_size
        self.config = config
        self.rope = RotaryEmbedding(c.head_dim)
        self.x_embedder = PatchEmbed3D(c.patch_size, c.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.fps_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.y_embedder = CaptionEmbedder(c.caption_channels, d, c.model_max_length)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(c, False, attn_backend) for _ in range(c.depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(c, True, attn_backend) for _ in range(c.depth))
        self.final_layer = T2IFinalLayer(d, math.prod(c.patch_size), c.out_channels)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None,
        fps: Tensor,
        height: Tensor,
        width: Tensor,
        cache=None,
    ) -> Tensor:
        """Prediction [B, 2C, T, H, W] fp32 for latents x [B, C, T, H, W]; the first C channels are the
        velocity x0 - noise (rectified flow), the rest the unused sigma.

        Args:
            timestep: [B] in (0, 1000].
            y: [B, 1, L, Dc] T5 features; the CFG null branch passes `y_embedder.y_embedding[None, None]`.
            mask: [B or B/2, L] right-padded mask of valid tokens, or None (all valid). With CFG the
                conditional mask is passed once and repeated: the null caption is cut to the prompt's length.
            fps, height, width: [B or B/2]; height/width are pixel sizes, only their first entry is used.
            cache: optional hook of one call (easycache.hooks: TeaCache, MagCache, PAB); None = the plain DiT.
        """
        dtype = self.x_embedder.proj.weight.dtype
        b, _, t_in, h_in, w_in = x.shape
        y_lens = self._check_inputs(x, timestep, y, mask, fps, height, width)
        # Upstream casts x, timestep and y to the weight dtype, and its sampler builds fps in that dtype too:
        # with bf16 weights a timestep of 985.96 becomes 984.
        x, timestep, y, fps = x.to(dtype), timestep.to(dtype), y.to(dtype), fps.to(dtype)
        pt, ph, pw = self.config.patch_size
        grid_t, grid_h, grid_w = -(-t_in // pt), -(-h_in // ph), -(-w_in // pw)  # odd sizes are padded

        t = self.t_embedder(timestep) + self.fps_embedder(fps).repeat(b // fps.shape[0], 1)  # [B, D]
        t_mlp = self.t_block(t)  # [B, 6D]
        y = self.y_embedder(y).squeeze(1)  # [B, L, D]
        x = self.x_embedder(x) + self.pos_embed(grid_h, grid_w, height, width, x.device)  # [B, T, S, D]
        x = rearrange(x, "B T S D -> B (T S) D")  # [B, N, D]
        # Cache seam: TeaCache/MagCache may skip the whole block stack (x + its cached residual); PAB gets a
        # broadcaster per block (spatial block i is layer 2i, temporal block i layer 2i+1).
        probes = {"modulated": self.spatial_blocks[0].modulated_input(x, t_mlp)} if cache is not None else {}
        if cache is not None and not cache.compute_blocks(x, probes):
            x = cache.reuse_blocks(x)  # [B, N, D]
        else:
            x_in = x
            for i, (spatial, temporal) in enumerate(zip(self.spatial_blocks, self.temporal_blocks)):
                pab_s, pab_t = (cache.attention(2 * i), cache.attention(2 * i + 1)) if cache else (None, None)
                x = spatial(x, y, t_mlp, y_lens, grid_t, grid_h * grid_w, self.rope, pab_s)  # [B, N, D]
                x = temporal(x, y, t_mlp, y_lens, grid_t, grid_h * grid_w, self.rope, pab_t)  # [B, N, D]
            if cache is not None:
                cache.store_blocks(x_in, x)
        x = self.final_layer(x, t)  # [B, N, pt*ph*pw*C]
        x = rearrange(
            x, "B (T H W) (pt ph pw C) -> B C (T pt) (H ph) (W pw)", T=grid_t, H=grid_h, pt=pt, ph=ph, pw=pw
        )  # [B, C, T', H', W'] padded sizes
        return x[:, :, :t_in, :h_in, :w_in].float()  # [B, C, T, H, W], fp32 like upstream

    def pos_embed(
        self, grid_h: int, grid_w: int, height: Tensor, width: Tensor, device: torch.device
    ) -> Tensor:
        """[1, S, D] spatial embedding, scaled by the pixel resolution over input_sq_size (512)."""
        dtype = self.x_embedder.proj.weight.dtype
        # Upstream's sampler builds height/width in the model dtype: with bf16 a width of 854 becomes 856.
        scale = (height.to(dtype)[0].item() * width.to(dtype)[0].item()) ** 0.5 / self.config.input_sq_size
        base_size = round((grid_h * grid_w) ** 0.5)
        return position_embedding_2d(grid_h, grid_w, scale, base_size, self.config.hidden_size, dtype, device)

    def _check_inputs(self, x, timestep, y, mask, fps, height, width) -> Tensor | None:
        """Shape checks before any work; returns the per-sample text lengths [B] (None without a mask)."""
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be [B, {c.in_channels}, T, H, W], got {tuple(x.shape)}")
        b = x.shape[0]
        if timestep.shape != (b,):
            raise ValueError(f"timestep must be [B={b}], got {tuple(timestep.shape)}")
        if y.ndim != 4 or y.shape[:2] != (b, 1) or y.shape[3] != c.caption_channels:
            raise ValueError(f"y must be [B={b}, 1, L, {c.caption_channels}], got {tuple(y.shape)}")
        for name, v in (("fps", fps), ("height", height), ("width", width)):
            if v.ndim != 1 or v.shape[0] == 0 or b % v.shape[0]:
                raise ValueError(
                    f"{name} must be a 1-D tensor of B={b} or a divisor of B entries, got {tuple(v.shape)}"
                )
        if mask is None:
            return None
        return text_lengths(mask, b, y.shape[2])


def flops_per_call(config: STDiT3Config, grid: tuple[int, int, int], batch: int = 1) -> dict:
    """Analytic FLOPs (2 per multiply-add) of one forward on a patch grid (t, h, w) with the full caption
    length: the whole call, the block stack, and per block its spatial/temporal self- and cross-attention;
    for caches' work ratios. Layers alternate spatial (2i) and temporal (2i+1) as in the cache seam."""
    T, S, D = grid[0], grid[1] * grid[2], config.hidden_size  # noqa: N806 (the shape letters)
    N, L = T * S, config.model_max_length  # noqa: N806
    spatial = 8 * N * D * D + 4 * T * S * S * D  # q, k, v, proj; attention within each frame
    temporal = 8 * N * D * D + 4 * S * T * T * D  # attention across frames at each position
    cross = 4 * N * D * D + 4 * L * D * D + 4 * N * L * D
    mlp = 4 * N * D * int(D * config.mlp_ratio)
    blocks = config.depth * (spatial + temporal + 2 * (cross + mlp))
    patch = math.prod(config.patch_size)
    embed = 2 * N * D * config.in_channels * patch + 2 * L * (config.caption_channels * D + D * D)
    head = 2 * N * D * patch * config.out_channels
    cost = {"call": embed + blocks + head, "blocks": blocks, "spatial": spatial, "temporal": temporal,
            "cross": cross}  # fmt: skip
    return {k: float(batch * v) for k, v in cost.items()}


def text_lengths(mask: Tensor, batch: int, length: int) -> Tensor:
    """Valid-token counts [B] of a prefix mask [B or B/2, L] (CFG passes the conditional mask once)."""
    if mask.ndim != 2 or mask.shape[1] != length or mask.shape[0] == 0 or batch % mask.shape[0]:
        raise ValueError(f"mask must be [B={batch} or a divisor of it, L={length}], got {tuple(mask.shape)}")
    mask = mask.bool().repeat(batch // mask.shape[0], 1)  # [B, L], tiled as upstream's mask.repeat
    lens = mask.sum(1)  # [B]
    prefix = torch.arange(length, device=mask.device)[None] < lens[:, None]  # [B, L]
    # One host sync: upstream packs the nonzero tokens wherever they are; k_lens needs them to come first.
    if bool(((mask != prefix).any(1) | (lens == 0)).any()):
        raise ValueError("each mask row must be ones then zeros (right-padded T5 tokens) with at least one 1")
    return lens


# ==================================================================================================
# Loading
# ==================================================================================================


def load_stdit3(
    ckpt_dir: str, *, device: str | torch.device, dtype: torch.dtype, attn_backend: str = "auto"
) -> STDiT3:
    """STDiT3 from an official checkpoint directory (`config.json` + `model.safetensors`, fp32 on the Hub).

    Args:
        ckpt_dir: local copy of hpcai-tech/OpenSora-STDiT-v3.
        device, dtype: every tensor goes there, `rope.freqs` and `y_embedding` included (upstream's
            `model.to(device, dtype)`; bf16 is the official inference dtype).
        attn_backend: the attention kernel (models.attention.BACKENDS).
    """
    require_files(ckpt_dir, ["config.json", "model.safetensors"], repo_id=HUB_REPO)
    config = STDiT3Config.from_json(os.path.join(ckpt_dir, "config.json"))
    path = os.path.join(ckpt_dir, "model.safetensors")
    state_dict = load_file_state_dict(path)
    for k, v in state_dict.items():  # one tensor at a time: the fp32 copy is freed as we go
        state_dict[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    with torch.device("meta"):
        model = STDiT3(config, attn_backend)
    return load_strict(model, state_dict, source=path).eval()
