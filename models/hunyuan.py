"""HunyuanVideo DiT (HYVideo-T/2-cfgdistill, 13B): official parameter names, numerics and strict loading.

Read next to the official hyvideo/modules/{models,token_refiner}.py: the module tree reproduces the official
state-dict keys (856 for the released model, listed in tests/data/hunyuan_keys.txt).

Shape legend: B batch, C latent channels, T/H/W latent frames/height/width, t/h/w the patch grid,
N = t·h·w image tokens, L text tokens, S = N + L joint tokens, D hidden_size, A heads_num, d head_dim,
M mlp hidden size, Dt text_states_dim (LLM), Dp text_states_dim_2 (CLIP pooled).

Numerics. The official run keeps the weights in bf16 and wraps the forward in torch.autocast(cuda, bf16).
There is no autocast here; the casts autocast makes are written out instead, so a bf16 model computes what
the official one does:
- every Linear/Conv sees its input in the weight dtype (the text features arrive in fp16 and are cast);
- LayerNorms run in fp32 and the modulated result is cast back before the next Linear;
- RMSNorm normalises in fp32 and scales in the weight dtype; RoPE rotates in fp32;
- the sinusoids and the RoPE table are built in fp32 on the CPU, where the official code builds them;
- the masked mean of the text features is taken in fp32.
Not attempted bit-exact: the attention kernel (models.attention: flash-attn varlen on CUDA when installed,
like the official, else SDPA), and the official's fp32 `final_layer.linear` (autocast runs it in bf16 anyway,
so storing it in bf16 gives the same result). In fp32 every cast is a no-op.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.attention import attention
from models.embeddings import TimestepEmbedder
from models.loading import download_command, load_file_state_dict, load_strict

if TYPE_CHECKING:
    from models.parallel import SequenceParallel

HUB_REPO = "tencent/HunyuanVideo"
CKPT_FILE = "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt"

# get_activation_layer() of the official code.
ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}
TOKEN_REFINER_DEPTH = 2  # hardcoded in the official HYVideoDiffusionTransformer (SingleTokenRefiner(depth=2))
TOKEN_REFINER_MLP_RATIO = 4.0  # SingleTokenRefiner's default; not tied to mlp_width_ratio


#################################################################################
#                                    Config                                     #
#################################################################################


@dataclass(frozen=True)
class HunyuanVideoConfig:
    """HYVideoDiffusionTransformer's arguments (official names), plus the `args` fields it reads."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16  # the official constructor defaults to 4; the release passes the VAE's 16
    out_channels: int = 16
    hidden_size: int = 3072
    heads_num: int = 24
    mlp_width_ratio: float = 4.0
    mlp_act_type: str = "gelu_tanh"
    mm_double_blocks_depth: int = 20
    mm_single_blocks_depth: int = 40
    rope_dim_list: tuple[int, int, int] = (16, 56, 56)  # head_dim split over (t, h, w)
    rope_theta: float = 256.0  # args.rope_theta
    qkv_bias: bool = True
    qk_norm: bool = True
    qk_norm_type: str = "rms"
    guidance_embed: bool = False  # True for the cfg-distilled release (guidance_in)
    text_projection: str = "single_refiner"
    use_attention_mask: bool = True  # mask padded text inside the token refiner
    text_states_dim: int = 4096  # args.text_states_dim: LLM hidden states
    text_states_dim_2: int = 768  # args.text_states_dim_2: CLIP-L pooled output

    def __post_init__(self):
        for name in (
            "patch_size",
            "rope_dim_list",
        ):  # accept lists (as in the official configs), store tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        sizes = (
            self.in_channels,
            self.out_channels,
            self.hidden_size,
            self.heads_num,
            self.text_states_dim,
            self.text_states_dim_2,
            *self.patch_size,
            *self.rope_dim_list,
        )
        depths = (self.mm_double_blocks_depth, self.mm_single_blocks_depth)
        if min(sizes) < 1 or min(depths) < 0 or self.mlp_width_ratio <= 0 or self.rope_theta <= 0:
            raise ValueError(f"HunyuanVideoConfig needs positive sizes and non-negative depths, got {self}")
        if len(self.patch_size) != 3 or len(self.rope_dim_list) != 3:
            raise ValueError("patch_size and rope_dim_list need 3 entries (t, h, w)")
        if self.hidden_size % self.heads_num:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by heads_num {self.heads_num}"
            )
        if sum(self.rope_dim_list) != self.head_dim or any(r % 2 for r in self.rope_dim_list):
            raise ValueError(
                f"rope_dim_list {self.rope_dim_list} must be even and sum to head_dim {self.head_dim} "
                "(hidden_size // heads_num)"
            )
        if self.mlp_act_type not in ACTIVATIONS:
            raise ValueError(f"mlp_act_type {self.mlp_act_type!r} is not one of {sorted(ACTIVATIONS)}")
        if self.qk_norm_type != "rms":
            raise ValueError(f"qk_norm_type {self.qk_norm_type!r}: only 'rms' (the released model) is built")
        if self.text_projection != "single_refiner":
            raise ValueError(
                f"text_projection {self.text_projection!r}: only 'single_refiner' (the release) is built"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_width_ratio)

    def diffusers_kwargs(self) -> dict:
        """The constructor arguments of diffusers' `HunyuanVideoTransformer3DModel` for the same architecture
        (the parity tests and the benchmark build their reference with them)."""
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_attention_heads=self.heads_num,
            attention_head_dim=self.head_dim,
            num_layers=self.mm_double_blocks_depth,
            num_single_layers=self.mm_single_blocks_depth,
            num_refiner_layers=TOKEN_REFINER_DEPTH,
            mlp_ratio=self.mlp_width_ratio,
            patch_size=self.patch_size[1],
            patch_size_t=self.patch_size[0],
            guidance_embeds=self.guidance_embed,
            text_embed_dim=self.text_states_dim,
            pooled_projection_dim=self.text_states_dim_2,
            rope_theta=self.rope_theta,
            rope_axes_dim=self.rope_dim_list,
        )


# Official HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]: the tencent/HunyuanVideo weights (540p and 720p).
HUNYUAN_CONFIGS = {"t2v-720p": HunyuanVideoConfig(guidance_embed=True)}


def guidance_input(embedded_guidance_scale: float, batch: int, device=None, dtype=torch.bfloat16) -> Tensor:
    """The official guidance input [B]: the scale as a `dtype` tensor times 1000 (bf16: 6.0 -> 6016.0)."""
    scale = torch.full((batch,), embedded_guidance_scale, dtype=torch.float32, device=device)
    return scale.to(dtype) * 1000.0  # [B]; the bf16 rounding is the official behaviour, kept on purpose


#################################################################################
#                     Embeddings, norms, RoPE (dtype islands)                   #
#################################################################################


def rope_cos_sin(grid: tuple[int, int, int], rope_dim_list, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [N, d] for a (t, h, w) patch grid, fp32 on the CPU as the official get_nd_rotary_pos_embed:
    axis i uses rope_dim_list[i] channels, each frequency repeated for an interleaved (x0, x1) pair."""
    axes = [torch.arange(n, dtype=torch.float32) for n in grid]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1)  # [3, N], t-major like the tokens
    cos, sin = [], []
    for p, dim in zip(pos, rope_dim_list):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))  # [dim/2]
        angles = torch.outer(p, freqs)  # [N, dim/2]
        cos.append(angles.cos().repeat_interleave(2, dim=1))  # [N, dim]
        sin.append(angles.sin().repeat_interleave(2, dim=1))  # [N, dim]
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)  # [N, d] each


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (x0·cos - x1·sin, x1·cos + x0·sin), in fp32, cast back."""
    xf = x.float()  # [B, N, A, d]
    rotated = torch.stack([-xf[..., 1::2], xf[..., 0::2]], dim=-1).flatten(3)  # [B, N, A, d]
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)  # [B, N, A, d]


def modulated_norm(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """LayerNorm (no affine, eps 1e-6) in fp32 as under the official autocast, then x·(1 + scale) + shift.
    `1 + scale` stays in the weight dtype as officially; the result is cast back for the next Linear."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)  # [B, S, D] fp32
    return (normed * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)  # [B, S, D]


def affine_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """An affine LayerNorm (token refiner) in fp32, cast back (autocast's layer_norm policy)."""
    w, b = norm.weight.float(), norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """Per-head RMSNorm (official norm_layers.RMSNorm): normalise in fp32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class MLPEmbedder(nn.Module):
    """vector_in: CLIP pooled features -> D."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size)
        self.out_layer = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))  # [B, D]


class TextProjection(nn.Module):
    """txt_in.c_embedder: pooled LLM features -> D."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))  # [B, D]


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [B, S, M] -> [B, S, D]


class ModulateDiT(nn.Module):
    """Linear(SiLU(vec)) -> `factor` chunks of D (shift, scale, gate, ...)."""

    def __init__(self, hidden_size: int, factor: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, factor * hidden_size)

    def forward(self, vec: Tensor) -> Tensor:
        return self.linear(F.silu(vec))  # [B, factor·D]


class PatchEmbed(nn.Module):
    """img_in: Conv3d with kernel = stride = patch_size."""

    def __init__(self, config: HunyuanVideoConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "B D t h w -> B (t h w) D")  # [B, N, D]


def qk_norm(config: HunyuanVideoConfig) -> nn.Module:
    return RMSNorm(config.head_dim) if config.qk_norm else nn.Identity()


#################################################################################
#                                 Token refiner                                 #
#################################################################################


def refiner_mask(text_mask: Tensor) -> Tensor:
    """[B, L] -> [B, 1, L, L]: token i may attend j iff both are valid; column 0 is forced True so that
    padded rows (which attend nothing else) get a finite softmax, as officially."""
    m = text_mask.bool()
    mask = m[:, None, :, None] & m[:, None, None, :]  # [B, 1, L, L]
    mask[..., 0] = True
    return mask


class IndividualTokenRefinerBlock(nn.Module):
    """Self-attention + SiLU MLP over the text tokens, gated (no shift/scale) by the refiner's condition c."""

    def __init__(self, hidden_size: int, heads_num: int, attn_backend: str = "auto"):
        super().__init__()
        self.heads_num, self.attn_backend = heads_num, attn_backend
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = MLP(hidden_size, int(hidden_size * TOKEN_REFINER_MLP_RATIO), "silu")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # 2 x [B, 1, D]
        qkv = self.self_attn_qkv(affine_norm(self.norm1, x))  # [B, L, 3D]
        q, k, v = rearrange(qkv, "B L (K A d) -> K B L A d", K=3, A=self.heads_num)  # 3 x [B, L, A, d]
        attn = attention(q, k, v, mask=mask, backend=self.attn_backend).flatten(2)  # [B, L, D]
        x = x + self.self_attn_proj(attn) * gate_msa  # [B, L, D]
        return x + self.mlp(affine_norm(self.norm2, x)) * gate_mlp  # [B, L, D]


class SingleTokenRefiner(nn.Module):
    """txt_in: project the LLM states to D and refine them, conditioned on t and their masked mean."""

    def __init__(self, config: HunyuanVideoConfig, attn_backend: str = "auto"):
        super().__init__()
        d_txt, dim = config.text_states_dim, config.hidden_size
        self.input_embedder = nn.Linear(d_txt, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.c_embedder = TextProjection(d_txt, dim)
        # A dict only to reproduce the official key prefix txt_in.individual_token_refiner.blocks.{r}.
        heads = config.heads_num
        blocks = [IndividualTokenRefinerBlock(dim, heads, attn_backend) for _ in range(TOKEN_REFINER_DEPTH)]
        self.individual_token_refiner = nn.ModuleDict({"blocks": nn.ModuleList(blocks)})

    def forward(self, x: Tensor, t: Tensor, mask: Tensor | None) -> Tensor:
        dtype = self.input_embedder.weight.dtype
        if mask is None:
            pooled = x.mean(dim=1)  # [B, Dt]
        else:  # masked mean in fp32 (the official multiplies by mask.float(), which promotes)
            m = mask.float()[..., None]  # [B, L, 1]
            pooled = (x * m).sum(dim=1) / m.sum(dim=1)  # [B, Dt]
        c = self.t_embedder(t) + self.c_embedder(pooled.to(dtype))  # [B, D]
        x = self.input_embedder(x.to(dtype))  # [B, L, D]
        attn_mask = None if mask is None else refiner_mask(mask)  # [B, 1, L, L]
        for block in self.individual_token_refiner["blocks"]:
            x = block(x, c, attn_mask)  # [B, L, D]
        return x


#################################################################################
#                            Double and single blocks                           #
#################################################################################


def stream_qkv(
    x: Tensor, shift: Tensor, scale: Tensor, qkv: nn.Linear, q_norm: nn.Module, k_norm: nn.Module, heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Modulated LayerNorm -> fused qkv (rows (K, A, d)) -> per-head q/k norms."""
    q, k, v = rearrange(qkv(modulated_norm(x, shift, scale)), "B S (K A d) -> K B S A d", K=3, A=heads)
    return q_norm(q), k_norm(k), v  # 3 x [B, S, A, d]


class MMDoubleStreamBlock(nn.Module):
    """Image and text streams with separate weights, joined only in attention (image tokens first)."""

    def __init__(self, config: HunyuanVideoConfig, attn_backend: str = "auto"):
        super().__init__()
        dim, bias = config.hidden_size, config.qkv_bias
        self.heads_num, self.attn_backend = config.heads_num, attn_backend
        self.img_mod = ModulateDiT(dim, 6)
        self.img_attn_qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.img_attn_q_norm, self.img_attn_k_norm = qk_norm(config), qk_norm(config)
        self.img_attn_proj = nn.Linear(dim, dim, bias=bias)
        self.img_mlp = MLP(dim, config.mlp_hidden_dim, config.mlp_act_type)
        self.txt_mod = ModulateDiT(dim, 6)
        self.txt_attn_qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.txt_attn_q_norm, self.txt_attn_k_norm = qk_norm(config), qk_norm(config)
        self.txt_attn_proj = nn.Linear(dim, dim, bias=bias)
        self.txt_mlp = MLP(dim, config.mlp_hidden_dim, config.mlp_act_type)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        rope: tuple[Tensor, Tensor],
        k_lens: Tensor,
        pab=None,
        sp: SequenceParallel | None = None,
    ):
        """`pab`: optional attention broadcast (easycache.pab): `pab(kind, attn, *args)` runs or reuses it.
        `sp`: sequence parallelism (this rank's image tokens; the text on every rank)."""
        # (shift1, scale1, gate1, shift2, scale2, gate2), each [B, D]
        im = self.img_mod(vec).chunk(6, dim=-1)
        tm = self.txt_mod(vec).chunk(6, dim=-1)
        args = (img, txt, im, tm, rope, k_lens, sp)
        attn = self._attention(*args) if pab is None else pab("spatial", self._attention, *args)  # [B, S, D]
        img_attn, txt_attn = attn.split([img.shape[1], txt.shape[1]], dim=1)  # [B, N, D], [B, L, D]
        img = img + self.img_attn_proj(img_attn) * im[2][:, None]  # [B, N, D]
        img = img + self.img_mlp(modulated_norm(img, im[3], im[4])) * im[5][:, None]
        txt = txt + self.txt_attn_proj(txt_attn) * tm[2][:, None]  # [B, L, D]
        txt = txt + self.txt_mlp(modulated_norm(txt, tm[3], tm[4])) * tm[5][:, None]
        return img, txt

    def _attention(
        self, img: Tensor, txt: Tensor, im: tuple, tm: tuple, rope: tuple, k_lens: Tensor, sp=None
    ) -> Tensor:
        """Joint attention of both streams (projections, norms, RoPE, attention) -> [B, S, D]."""
        heads = self.heads_num
        img_q, img_k, img_v = stream_qkv(
            img, im[0], im[1], self.img_attn_qkv, self.img_attn_q_norm, self.img_attn_k_norm, heads
        )  # 3 x [B, N, A, d]
        img_q, img_k = apply_rope(img_q, *rope), apply_rope(img_k, *rope)  # positions on image tokens only
        txt_q, txt_k, txt_v = stream_qkv(
            txt, tm[0], tm[1], self.txt_attn_qkv, self.txt_attn_q_norm, self.txt_attn_k_norm, heads
        )  # 3 x [B, L, A, d]
        if sp is not None:  # this rank's image tokens; the text on every rank, joined "rear" as xDiT's
            return torch.cat(sp.joint_attention(img_q, img_k, img_v, txt_q, txt_k, txt_v), 1).flatten(2)
        q, k, v = (torch.cat(pair, dim=1) for pair in ((img_q, txt_q), (img_k, txt_k), (img_v, txt_v)))
        return attention(q, k, v, k_lens=k_lens, backend=self.attn_backend).flatten(2)  # [B, S, D]


class MMSingleStreamBlock(nn.Module):
    """One stream over [image; text]: attention and MLP run in parallel from one fused linear1."""

    def __init__(self, config: HunyuanVideoConfig, attn_backend: str = "auto"):
        super().__init__()
        dim, mlp = config.hidden_size, config.mlp_hidden_dim
        self.heads_num, self.mlp_hidden_dim, self.attn_backend = config.heads_num, mlp, attn_backend
        self.linear1 = nn.Linear(dim, 3 * dim + mlp)  # rows [q; k; v; mlp_in] (always with bias, officially)
        self.linear2 = nn.Linear(dim + mlp, dim)  # columns [attn; mlp_act]
        self.q_norm, self.k_norm = qk_norm(config), qk_norm(config)
        self.mlp_act = ACTIVATIONS[config.mlp_act_type]()
        self.modulation = ModulateDiT(dim, 3)

    def forward(
        self,
        x: Tensor,
        vec: Tensor,
        n_img: int,
        rope: tuple[Tensor, Tensor],
        k_lens: Tensor,
        pab=None,
        sp: SequenceParallel | None = None,
    ):
        """`pab`: optional attention broadcast of the attention after the fused linear1 (which the MLP needs
        anyway, so a broadcast saves norms, RoPE and the attention itself)."""
        shift, scale, gate = self.modulation(vec).chunk(3, dim=-1)  # 3 x [B, D]
        fused = self.linear1(modulated_norm(x, shift, scale))  # [B, S, 3D + M]
        qkv, mlp = fused.split([fused.shape[-1] - self.mlp_hidden_dim, self.mlp_hidden_dim], dim=-1)
        args = (qkv, n_img, rope, k_lens, sp)
        attn = self._attention(*args) if pab is None else pab("spatial", self._attention, *args)  # [B, S, D]
        return x + self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1)) * gate[:, None]  # [B, S, D]

    def _attention(
        self, qkv: Tensor, n_img: int, rope: tuple[Tensor, Tensor], k_lens: Tensor, sp=None
    ) -> Tensor:
        q, k, v = rearrange(qkv, "B S (K A d) -> K B S A d", K=3, A=self.heads_num)  # 3 x [B, S, A, d]
        q, k = self.q_norm(q), self.k_norm(k)
        q = torch.cat([apply_rope(q[:, :n_img], *rope), q[:, n_img:]], dim=1)  # RoPE on image tokens only
        k = torch.cat([apply_rope(k[:, :n_img], *rope), k[:, n_img:]], dim=1)
        if sp is not None:  # this rank's image tokens, then the text (the same on every rank)
            img_qkv, txt_qkv = (t[:, :n_img] for t in (q, k, v)), (t[:, n_img:] for t in (q, k, v))
            return torch.cat(sp.joint_attention(*img_qkv, *txt_qkv), dim=1).flatten(2)  # [B, S, D]
        return attention(q, k, v, k_lens=k_lens, backend=self.attn_backend).flatten(2)  # [B, S, D]


class FinalLayer(nn.Module):
    """Modulated LayerNorm and the per-token linear back to patch pixels."""

    def __init__(self, config: HunyuanVideoConfig):
        super().__init__()
        dim = config.hidden_size
        self.linear = nn.Linear(dim, math.prod(config.patch_size) * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        # Shift first, then scale (diffusers' norm_out stores them the other way round).
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)  # 2 x [B, D]
        return self.linear(modulated_norm(x, shift, scale))  # [B, N, pt·ph·pw·C]


#################################################################################
#                                   The model                                   #
#################################################################################


class HunyuanVideoModel(nn.Module):
    """HYVideoDiffusionTransformer: token refiner, double-stream then single-stream blocks, final layer.
    `attn_backend` picks the attention kernel of every block (models.attention.BACKENDS); no weights."""

    def __init__(self, config: HunyuanVideoConfig, attn_backend: str = "auto"):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.img_in = PatchEmbed(config)
        self.txt_in = SingleTokenRefiner(config, attn_backend)
        self.time_in = TimestepEmbedder(dim)
        self.vector_in = MLPEmbedder(config.text_states_dim_2, dim)
        self.guidance_in = TimestepEmbedder(dim) if config.guidance_embed else None
        self.double_blocks = nn.ModuleList(
            MMDoubleStreamBlock(config, attn_backend) for _ in range(config.mm_double_blocks_depth)
        )
        self.single_blocks = nn.ModuleList(
            MMSingleStreamBlock(config, attn_backend) for _ in range(config.mm_single_blocks_depth)
        )
        self.final_layer = FinalLayer(config)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text_states: Tensor,
        text_mask: Tensor,
        text_states_2: Tensor,
        guidance: Tensor | None = None,
        cache=None,
        *,
        sp: SequenceParallel | None = None,
    ) -> Tensor:
        """x [B, C, T, H, W] latents, t [B] float timesteps (σ·1000), text_states [B, L, Dt] LLM features,
        text_mask [B, L] (valid tokens first), text_states_2 [B, Dp] CLIP pooled, guidance [B] (see
        guidance_input) for the distilled model -> velocity [B, C_out, T, H, W] in the weight dtype.
        `cache`: optional hook of one call (easycache.hooks: TeaCache, MagCache, PAB); None: the plain DiT.
        sp: sequence parallelism (models.parallel): every rank passes the same full inputs, embeds 1/P of
        the latent's rows (or columns), attends with the text joined on every rank, and gets the same full
        output."""
        text_mask = text_mask.to(x.device)  # tokenizer masks often stay on the CPU
        text_lens = self._check_inputs(x, t, text_states, text_mask, text_states_2, guidance)  # [B]
        cfg, dtype = self.config, self.img_in.proj.weight.dtype
        grid = tuple(s // p for s, p in zip(x.shape[2:], cfg.patch_size))  # (t, h, w)
        rope = tuple(r.to(x.device) for r in rope_cos_sin(grid, cfg.rope_dim_list, cfg.rope_theta))  # [N, d]
        vec = self.time_in(t) + self.vector_in(text_states_2.to(dtype))  # [B, D]
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(guidance)  # [B, D]
        if sp is not None:
            x, rope, split_dim = shard_latent(x, rope, grid, sp)  # [B, C, T, H/P, W] (or W/P), [N/P, d]
            grid = tuple(s // p for s, p in zip(x.shape[2:], cfg.patch_size))  # this rank's (t, h, w)
            sp = sp.with_text_lens(text_lens)
        img = self.img_in(x.to(dtype))  # [B, N, D]
        txt = self.txt_in(text_states, t, text_mask if cfg.use_attention_mask else None)  # [B, L, D]
        n_img = img.shape[1]
        # Joint attention keys per sample: all image tokens, then the valid text; padded text is never a key.
        k_lens = n_img + text_lens  # [B]
        # Cache seam: TeaCache/MagCache may skip both block stacks (image tokens + their cached residual, as
        # the official TeaCache); PAB gets a broadcaster per block (single block i is layer depth_double + i).
        # Under sp the image tokens, and so the token-wise probe, are this rank's part (statistics reduced).
        split = ("x", "modulated") if sp is not None else ()
        if cache is not None and not cache.compute_blocks(img, {"modulated": self._probe(img, vec)}, split):
            img = cache.reuse_blocks(img)  # [B, N, D]
        else:
            img_in, pab = img, cache.attention if cache is not None else lambda i: None
            for i, block in enumerate(self.double_blocks):
                img, txt = block(img, txt, vec, rope, k_lens, pab(i), sp)  # [B, N, D], [B, L, D]
            x_joint = torch.cat([img, txt], dim=1)  # [B, S, D]
            for i, block in enumerate(self.single_blocks, start=len(self.double_blocks)):
                x_joint = block(x_joint, vec, n_img, rope, k_lens, pab(i), sp)  # [B, S, D]
            img = x_joint[:, :n_img]  # [B, N, D]
            if cache is not None:
                cache.store_blocks(img_in, img)
        out = self.final_layer(img, vec)  # [B, N, pt·ph·pw·C]
        pt, ph, pw = cfg.patch_size
        # The final linear's outputs are ordered (C, pt, ph, pw), as the official unpatchify reads them.
        unpatchify = "B (t h w) (C pt ph pw) -> B C (t pt) (h ph) (w pw)"
        out = rearrange(out, unpatchify, t=grid[0], h=grid[1], pt=pt, ph=ph, pw=pw)  # [B, C, T, H, W]
        return out if sp is None else sp.gather(out, dim=split_dim)  # [B, C, T, H, W], same on every rank

    def _probe(self, img: Tensor, vec: Tensor) -> Tensor:
        """Block 0's modulated, normalised image tokens [B, N, D]: TeaCache's probe (official Hunyuan)."""
        shift, scale = self.double_blocks[0].img_mod(vec).chunk(6, dim=-1)[:2]  # [B, D] each
        return modulated_norm(img, shift, scale)  # [B, N, D]

    def _check_inputs(self, x, t, text_states, text_mask, text_states_2, guidance) -> Tensor:
        """Shapes first (no sync), then one host sync for the mask; returns the valid text length [B]."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, T, H, W] latents, got {tuple(x.shape)}")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(
                f"latent T, H, W {tuple(x.shape[2:])} must be multiples of patch_size {cfg.patch_size}"
            )
        b, length = x.shape[0], text_states.shape[1] if text_states.ndim == 3 else -1
        expected = {
            "t": (t, (b,)),
            "text_states": (text_states, (b, length, cfg.text_states_dim)),
            "text_mask": (text_mask, (b, length)),
            "text_states_2": (text_states_2, (b, cfg.text_states_dim_2)),
        }
        if cfg.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "this model is guidance-distilled: pass guidance (e.g. guidance_input(6.0, B))"
                )
            expected["guidance"] = (guidance, (b,))
        elif guidance is not None:
            raise ValueError("guidance_embed is False for this config: pass guidance=None")
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        mask = text_mask.bool()
        lens = mask.sum(dim=1)  # [B]
        prefix = torch.arange(length, device=mask.device)[None] < lens[:, None]  # [B, L]
        binary = (text_mask == 0) | (text_mask == 1)
        if not bool((mask == prefix).all() & binary.all() & (lens > 0).all()):
            raise ValueError(
                "text_mask rows must be 0/1 with 1..L valid tokens first (right padding, as tokenizers pad)"
            )
        return lens


def shard_latent(
    x: Tensor, rope: tuple[Tensor, Tensor], grid: tuple[int, int, int], sp: SequenceParallel
) -> tuple[Tensor, tuple[Tensor, Tensor], int]:
    """This rank's rows of the latent (else columns) and their RoPE, as the official parallel forward
    (hyvideo/inference.py): it splits along H when the patch rows divide by P, else along W, else refuses."""
    t, h, w = grid
    if h % sp.world_size == 0:
        split_dim = -2
    elif w % sp.world_size == 0:
        split_dim = -1
    else:
        raise ValueError(
            f"the {h}x{w} patch grid splits over {sp.world_size} ranks neither by rows nor by columns; "
            "pick a video size whose height/16 or width/16 divides by ulysses x ring degree"
        )
    rope = tuple(
        sp.split(r.reshape(t, h, w, -1), dim=split_dim - 1).reshape(-1, r.shape[-1]) for r in rope
    )  # [N/P, d] each, in the local tokens' (t, h, w) order
    return sp.split(x, dim=split_dim), rope, split_dim


#################################################################################
#                         Loading and key conversion                            #
#################################################################################


def flops_per_call(config: HunyuanVideoConfig, grid: tuple[int, int, int], text_len: int, batch: int = 1):
    """Analytic FLOPs (2 per multiply-add) of one forward on a patch grid (t, h, w) with `text_len` text
    tokens (the token refiner and the embedders not counted): the call, the block stacks, and per layer the
    part PAB broadcasts ("spatial": double blocks: projections + joint attention; single: attention)."""
    N, L, D, M = math.prod(grid), text_len, config.hidden_size, config.mlp_hidden_dim  # noqa: N806
    S = N + L  # noqa: N806
    attn_double = 6 * S * D * D + 4 * S * S * D  # q, k, v of both streams and the joint attention
    double = attn_double + 2 * S * D * D + 4 * S * D * M  # + output projections and the two MLPs
    attn_single = 4 * S * S * D
    single = attn_single + 2 * S * D * (3 * D + M) + 2 * S * (D + M) * D  # + linear1, linear2
    nd, ns = config.mm_double_blocks_depth, config.mm_single_blocks_depth
    blocks = nd * double + ns * single
    patch = math.prod(config.patch_size)
    embed_head = 2 * N * D * config.in_channels * patch + 2 * N * D * patch * config.out_channels
    cost = {"call": blocks + embed_head, "blocks": blocks, "spatial": [attn_double] * nd + [attn_single] * ns}
    return {k: [batch * x for x in v] if isinstance(v, list) else float(batch * v) for k, v in cost.items()}


def load_hunyuan(
    path: str,
    *,
    config: HunyuanVideoConfig = HUNYUAN_CONFIGS["t2v-720p"],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attn_backend: str = "auto",
) -> HunyuanVideoModel:
    """Load the official DiT checkpoint strictly.

    Args:
        path: the official `mp_rank_00_model_states.pt` (in tencent/HunyuanVideo under
            hunyuan-video-t2v-720p/transformers/): a pickle of {"module": state_dict}; a bare state dict with
            the official keys is accepted too, as the official loader does.
        config: the architecture; HUNYUAN_CONFIGS["t2v-720p"] for the release.
        device, dtype: where the weights end up (the release is bf16; the model is built on meta and the
            memory-mapped tensors are assigned, so 25.6 GB are never held twice).
        attn_backend: the attention kernel (models.attention.BACKENDS).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"HunyuanVideo DiT checkpoint not found: {path} (expected the file {CKPT_FILE} of the Hub repo "
            f"{HUB_REPO}; fetch it with: {download_command(HUB_REPO, '<dir>', files=[CKPT_FILE])})"
        )
    state_dict = _official_state_dict(load_file_state_dict(path), path)
    with torch.device("meta"):
        model = HunyuanVideoModel(config, attn_backend)
    load_strict(model, state_dict, source=path)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _official_state_dict(checkpoint, path: str) -> dict[str, Tensor]:
    """The weights under "module" (DeepSpeed layout), or a bare state dict; anything else is an error."""
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{path} holds a {type(checkpoint).__name__}, not a dict with the weights under 'module'"
        )
    if "module" in checkpoint:
        checkpoint = checkpoint["module"]
    elif any(not isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(
            f"{path} has no 'module' entry and is not a bare state dict; its keys: {list(checkpoint)[:10]}"
        )
    fp8 = [k for k, v in checkpoint.items() if isinstance(v, Tensor) and v.dtype.itemsize == 1]
    if fp8:
        raise ValueError(
            f"{path} stores 8-bit weights ({fp8[0]}, ...): the fp8 release needs its scale map; "
            f"use the bf16 {CKPT_FILE}"
        )
    return checkpoint


# diffusers HunyuanVideoTransformer3DModel name -> official name, first match wins. A third entry (i, n) marks
# part i of n pieces that the official checkpoint stores fused along dim 0 (in that order).
_BLOCK = r"^transformer_blocks\.(\d+)\."
_SINGLE = r"^single_transformer_blocks\.(\d+)\."
_REFINER = r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\."
_REF_OUT = r"txt_in.individual_token_refiner.blocks.\1."
_DIFFUSERS_TO_OFFICIAL = [
    (r"^x_embedder\.proj\.", "img_in.proj."),
    (r"^time_text_embed\.timestep_embedder\.linear_1\.", "time_in.mlp.0."),
    (r"^time_text_embed\.timestep_embedder\.linear_2\.", "time_in.mlp.2."),
    (r"^time_text_embed\.guidance_embedder\.linear_1\.", "guidance_in.mlp.0."),
    (r"^time_text_embed\.guidance_embedder\.linear_2\.", "guidance_in.mlp.2."),
    (r"^time_text_embed\.text_embedder\.linear_1\.", "vector_in.in_layer."),
    (r"^time_text_embed\.text_embedder\.linear_2\.", "vector_in.out_layer."),
    (r"^context_embedder\.proj_in\.", "txt_in.input_embedder."),
    (r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_1\.", "txt_in.t_embedder.mlp.0."),
    (r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_2\.", "txt_in.t_embedder.mlp.2."),
    (r"^context_embedder\.time_text_embed\.text_embedder\.linear_([12])\.", r"txt_in.c_embedder.linear_\1."),
    (_REFINER + r"norm([12])\.", _REF_OUT + r"norm\2."),
    (_REFINER + r"attn\.to_q\.", _REF_OUT + "self_attn_qkv.", (0, 3)),
    (_REFINER + r"attn\.to_k\.", _REF_OUT + "self_attn_qkv.", (1, 3)),
    (_REFINER + r"attn\.to_v\.", _REF_OUT + "self_attn_qkv.", (2, 3)),
    (_REFINER + r"attn\.to_out\.0\.", _REF_OUT + "self_attn_proj."),
    (_REFINER + r"ff\.net\.0\.proj\.", _REF_OUT + "mlp.fc1."),
    (_REFINER + r"ff\.net\.2\.", _REF_OUT + "mlp.fc2."),
    (_REFINER + r"norm_out\.linear\.", _REF_OUT + "adaLN_modulation.1."),
    (_BLOCK + r"norm1\.linear\.", r"double_blocks.\1.img_mod.linear."),
    (_BLOCK + r"norm1_context\.linear\.", r"double_blocks.\1.txt_mod.linear."),
    (_BLOCK + r"attn\.to_q\.", r"double_blocks.\1.img_attn_qkv.", (0, 3)),
    (_BLOCK + r"attn\.to_k\.", r"double_blocks.\1.img_attn_qkv.", (1, 3)),
    (_BLOCK + r"attn\.to_v\.", r"double_blocks.\1.img_attn_qkv.", (2, 3)),
    (_BLOCK + r"attn\.add_q_proj\.", r"double_blocks.\1.txt_attn_qkv.", (0, 3)),
    (_BLOCK + r"attn\.add_k_proj\.", r"double_blocks.\1.txt_attn_qkv.", (1, 3)),
    (_BLOCK + r"attn\.add_v_proj\.", r"double_blocks.\1.txt_attn_qkv.", (2, 3)),
    (_BLOCK + r"attn\.norm_([qk])\.", r"double_blocks.\1.img_attn_\2_norm."),
    (_BLOCK + r"attn\.norm_added_([qk])\.", r"double_blocks.\1.txt_attn_\2_norm."),
    (_BLOCK + r"attn\.to_out\.0\.", r"double_blocks.\1.img_attn_proj."),
    (_BLOCK + r"attn\.to_add_out\.", r"double_blocks.\1.txt_attn_proj."),
    (_BLOCK + r"ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.fc1."),
    (_BLOCK + r"ff\.net\.2\.", r"double_blocks.\1.img_mlp.fc2."),
    (_BLOCK + r"ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.fc1."),
    (_BLOCK + r"ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.fc2."),
    (_SINGLE + r"attn\.to_q\.", r"single_blocks.\1.linear1.", (0, 4)),
    (_SINGLE + r"attn\.to_k\.", r"single_blocks.\1.linear1.", (1, 4)),
    (_SINGLE + r"attn\.to_v\.", r"single_blocks.\1.linear1.", (2, 4)),
    (_SINGLE + r"proj_mlp\.", r"single_blocks.\1.linear1.", (3, 4)),
    (_SINGLE + r"proj_out\.", r"single_blocks.\1.linear2."),
    (_SINGLE + r"attn\.norm_([qk])\.", r"single_blocks.\1.\2_norm."),
    (_SINGLE + r"norm\.linear\.", r"single_blocks.\1.modulation.linear."),
    (r"^proj_out\.", "final_layer.linear."),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),  # halves swapped below
]


def convert_diffusers_to_official(
    state_dict: dict[str, Tensor], config: HunyuanVideoConfig
) -> dict[str, Tensor]:
    """diffusers HunyuanVideoTransformer3DModel weights -> official names (inverse of diffusers'
    convert_hunyuan_video_transformer_to_diffusers): q/k/v (and the single blocks' mlp_in) are concatenated
    into the fused official tensors, and the final modulation's [scale; shift] becomes [shift; scale].
    Every key must be converted and the result must match `config`'s shapes; otherwise ValueError."""
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[int, Tensor]] = {}
    counts: dict[str, int] = {}
    unknown = []
    for key, value in state_dict.items():
        for rule in _DIFFUSERS_TO_OFFICIAL:
            new_key, hits = re.subn(rule[0], rule[1], key, count=1)
            if hits:
                break
        else:
            unknown.append(key)
            continue
        if len(rule) == 3:
            (index, counts[new_key]) = rule[2]
            parts.setdefault(new_key, {})[index] = value
        elif new_key.startswith("final_layer.adaLN_modulation.1."):
            scale, shift = value.chunk(2, dim=0)
            out[new_key] = torch.cat([shift, scale], dim=0)
        else:
            out[new_key] = value
    if unknown:
        raise ValueError(f"{len(unknown)} diffusers keys have no official name: {unknown[:10]}")
    incomplete = [k for k, p in parts.items() if len(p) != counts[k]]
    if incomplete:
        raise ValueError(f"fused official tensors with missing diffusers parts: {incomplete[:10]}")
    out.update({k: torch.cat([p[i] for i in range(counts[k])], dim=0) for k, p in parts.items()})
    _check_against_config(out, config)
    return out


def _check_against_config(state_dict: dict[str, Tensor], config: HunyuanVideoConfig) -> None:
    with torch.device("meta"):
        expected = HunyuanVideoModel(config).state_dict()
    wrong = [k for k in expected if k not in state_dict or state_dict[k].shape != expected[k].shape]
    extra = [k for k in state_dict if k not in expected]
    if wrong or extra:
        raise ValueError(
            f"converted weights do not fit {config}: missing/mis-shaped {wrong[:10]}, unexpected {extra[:10]}"
        )
