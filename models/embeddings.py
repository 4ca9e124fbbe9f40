"""The timestep embedder of DiT (GLIDE's sinusoid -> MLP), shared by HunyuanVideo and OpenSora 1.2.

Both official models inherit it from facebookresearch/DiT unchanged (modules `mlp.0` / `mlp.2`, 256
frequencies, [cos | sin], max period 10^4, fp32 sinusoid). Wan2.1 has its own (float64, other keys): wan.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

FREQ_DIM = 256  # upstream frequency_embedding_size


def timestep_embedding(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """GLIDE sinusoid [cos | sin] of scalars t [B] -> [B, dim], in fp32 whatever the dtype of t."""
    half = dim // 2
    # Built on the CPU as upstream does (then moved), so the frequencies are bitwise the official ones.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]  # [B, dim/2]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoid -> Linear -> SiLU -> Linear (HunyuanVideo: time_in, guidance_in, the refiner's
    t_embedder; OpenSora: t_embedder and fps_embedder)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))  # [B, D]
