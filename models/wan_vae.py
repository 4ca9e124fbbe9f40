"""Wan-VAE: the official causal 3D VAE of Wan2.1 (`Wan2.1_VAE.pth`), run by diffusers' `AutoencoderKLWan`.

The official file keeps the original module names (`encoder.downsamples.3.residual.2.weight`); diffusers
has the same layers under other names (`encoder.down_blocks.3.conv1.weight`) and no tensor changes, so
loading is one key rename (`convert_official_wan_vae`) plus a strict load. The official wrapper's work,
per-channel latent normalisation and clamping, is done here in `WanVAE`.

Shapes: B batch, F video frames (4n+1), H/W video height/width, Z latent channels (z_dim),
T latent frames ((F-1)/4+1), h/w latent height/width (H/8, W/8).
"""

from __future__ import annotations

import dataclasses
import os
import re

import torch
from diffusers import AutoencoderKLWan
from torch import Tensor

from models.loading import load_file_state_dict, load_strict

WAN_VAE_FILE = "Wan2.1_VAE.pth"

# Decode memory, the reason for this limit. The decoder runs one latent frame at a time and keeps the last 2
# input frames of every causal conv (feature cache), so its peak does not grow with the frame count, only with
# the pixel count. Measured on CPU, fp32, full-size weights, peak RSS above the 0.5 GB of weights: 120x208
# +0.63 GiB (9 frames) / +0.72 GiB (21 frames), 240x416 +2.19 GiB (9 frames), i.e. ~0.1 + 2.1e-5 GiB per
# pixel. Extrapolated: ~8.5 GiB at 480x832 (+0.8 GB for the 81-frame output during the last concat) and
# ~19 GiB at 720x1280 (a GPU adds conv workspaces on top). So 480p fits 24 GB untiled, which is exactly the
# official computation; 720p does not fit next to anything else, so above 480x832 pixels decode tiles by
# default: 256x256-pixel tiles (~1.5 GiB each, one at a time), ~1.7x the compute, small seam differences.
UNTILED_MAX_PIXELS = 480 * 832

# Per-channel statistics of the official latents (wan/modules/vae.py `WanVAE.mean/std`; the same numbers are
# diffusers' `latents_mean/latents_std` defaults).
WAN_VAE_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
WAN_VAE_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """`AutoencoderKLWan` arguments, diffusers names (official `dim` = `base_dim`); defaults: `_video_vae`."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # sic: the official spelling
    latents_mean: tuple[float, ...] = WAN_VAE_MEAN
    latents_std: tuple[float, ...] = WAN_VAE_STD

    def __post_init__(self):
        # Each level after the first halves H and W; the flags say which of those also halve time.
        if len(self.dim_mult) < 2 or len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                "WanVAEConfig needs >= 2 dim_mult levels and one temperal_downsample flag per downsampling "
                f"(len(dim_mult) - 1), got dim_mult={self.dim_mult}, "
                f"temperal_downsample={self.temperal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={self.z_dim} entries each")

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)  # official: 8

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)  # official: 4

    def diffusers_kwargs(self) -> dict:
        # attn_scales stays [] (official): diffusers' decoder has no attention outside the middle block.
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
        strides = {"scale_factor_spatial": self.spatial_stride, "scale_factor_temporal": self.temporal_stride}
        return {**kw, "attn_scales": [], **strides}


WAN_VAE_CONFIG = WanVAEConfig()
# The embedded demo model's VAE (train_wan_tiny.py): 16 base channels, one residual block per level and one
# level fewer (strides 4×4×4 instead of 4×8×8: a VAE this small, trained on a CPU, cannot also learn the
# 8× spatial compression); its latent statistics were measured on the training videos after training.
WAN_VAE_TINY = WanVAEConfig(
    base_dim=16,
    dim_mult=(1, 2, 2),
    num_res_blocks=1,
    temperal_downsample=(True, True),
    # Measured by train_wan_tiny.py --stage latents --shapes large-inset (posterior means of 512 videos of the
    # shipped DiT's last fine-tuning data, squares of half side 1.2 r kept 5 px off the edges, per channel).
    latents_mean=(
        -0.1157, -0.496, 0.0571, -0.2068, -0.0246, 0.0779, 0.0535, -0.0925,
        -0.2423, -0.1225, 0.2213, -0.0658, 0.0999, -0.0715, 0.1592, 0.1278,
    ),
    latents_std=(
        0.554, 0.8593, 0.369, 0.2748, 0.3702, 0.2659, 0.3515, 0.769,
        0.448, 0.2635, 0.329, 0.4813, 0.169, 0.3205, 0.3537, 0.1466,
    ),
)  # fmt: skip

#####  official <-> diffusers key names  #####

# Where a block sits: official key prefix <-> diffusers key prefix (plain prefixes, so they work both ways).
# The decoder's up-blocks are regrouped separately (see `convert_official_wan_vae`).
_BLOCKS = [
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    ("encoder.downsamples.", "encoder.down_blocks."),
]
for _side in ("encoder", "decoder"):
    _BLOCKS += [
        (f"{_side}.conv1.", f"{_side}.conv_in."),
        (f"{_side}.head.0.", f"{_side}.norm_out."),  # head.1 is SiLU
        (f"{_side}.head.2.", f"{_side}.conv_out."),
        (f"{_side}.middle.0.", f"{_side}.mid_block.resnets.0."),
        (f"{_side}.middle.1.", f"{_side}.mid_block.attentions.0."),
        (f"{_side}.middle.2.", f"{_side}.mid_block.resnets.1."),
    ]
# Inside a residual block: official `residual` Sequential index (1, 4, 5 are SiLU/Dropout) -> diffusers name.
_RESIDUAL = [("residual.0", "norm1"), ("residual.2", "conv1"), ("residual.3", "norm2"),
             ("residual.6", "conv2"), ("shortcut", "conv_shortcut")]  # fmt: skip


def _swap_prefix(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _check_all_mapped(unmapped: list[str], target: str) -> None:
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} keys have no {target} Wan-VAE name (not a Wan2.1 VAE?): {unmapped[:10]}"
        )


def convert_official_wan_vae(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official `Wan2.1_VAE.pth` keys -> `AutoencoderKLWan` keys. Tensors pass through unchanged (same layers,
    same shapes); `WanVAE.from_checkpoint` then checks every key and shape against the model
    (`load_strict`)."""
    # The official decoder is one flat Sequential: per level num_res_blocks+1 ResidualBlocks, then a Resample
    # (none after the last level); diffusers groups each level as up_blocks.{level}.resnets.{j}/.upsamplers.0.
    resamples = [
        int(m[1]) for k in state_dict if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))
    ]
    if not resamples:
        raise ValueError("no decoder.upsamples.*.resample keys: not an official Wan2.1 VAE state dict")
    per_level = min(resamples) + 1

    out, unmapped = {}, []
    for key, value in state_dict.items():
        new = _swap_prefix(key, _BLOCKS)
        if new is None and (m := re.match(r"decoder\.upsamples\.(\d+)\.", key)):
            level, j = divmod(int(m[1]), per_level)
            block = f"resnets.{j}." if j < per_level - 1 else "upsamplers.0."
            new = f"decoder.up_blocks.{level}.{block}" + key[m.end() :]
        if new is None:
            unmapped.append(key)
            continue
        for official, diffusers in _RESIDUAL:
            new = new.replace(f".{official}.", f".{diffusers}.")
        out[new] = value
    _check_all_mapped(unmapped, "diffusers")
    return out


def convert_diffusers_wan_vae_to_official(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`AutoencoderKLWan` keys -> official `Wan2.1_VAE.pth` keys (inverse of `convert_official_wan_vae`)."""
    resnets = [
        int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))
    ]
    if not resnets:
        raise ValueError("no decoder.up_blocks.0.resnets.* keys: not an AutoencoderKLWan state dict")
    per_level = max(resnets) + 2  # num_res_blocks + 1 resnets, then the upsampler
    inverse = [(new, old) for old, new in _BLOCKS]

    out, unmapped = {}, []
    for key, value in state_dict.items():
        new = key
        for official, diffusers in _RESIDUAL:  # only inside residual blocks: conv_in/conv_out must stay
            new = re.sub(rf"((?:resnets|down_blocks)\.\d+)\.{diffusers}\.", rf"\1.{official}.", new)
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.", new):
            j = per_level - 1 if m[2] is None else int(m[2])
            new = f"decoder.upsamples.{int(m[1]) * per_level + j}." + new[m.end() :]
        else:
            new = _swap_prefix(new, inverse)
        if new is None:
            unmapped.append(key)
            continue
        out[new] = value
    _check_all_mapped(unmapped, "official")
    return out


#####  the wrapper: official normalisation and input rules  #####


class WanVAE:
    """Video [B,3,F,H,W] in [-1,1] <-> normalised latents [B,Z,T,h,w], as the official `WanVAE` wrapper."""

    def __init__(
        self,
        config: WanVAEConfig = WAN_VAE_CONFIG,
        *,
        tile_sample_size: int = 256,
        tile_sample_stride: int = 192,
    ):
        self.config = config
        self.model = AutoencoderKLWan(**config.diffusers_kwargs()).eval().requires_grad_(False)
        # Used only by decode(tiled=True): tiles of tile_sample_size² pixels every tile_sample_stride pixels,
        # blended linearly over the overlap. diffusers' tiling switch (use_tiling) stays off, so encode and
        # untiled decode always run the official, untiled computation.
        self.model.tile_sample_min_height = self.model.tile_sample_min_width = tile_sample_size
        self.model.tile_sample_stride_height = self.model.tile_sample_stride_width = tile_sample_stride

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        config: WanVAEConfig = WAN_VAE_CONFIG,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> WanVAE:
        """Load the official `Wan2.1_VAE.pth`.

        Args:
            path: the `.pth` file (the official state dict, read with `torch.load(weights_only=True)`).
            config: the architecture; the default is the official one.
            device, dtype: where to run. The official code runs the VAE in fp32 (its default).
        """
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory; pass the VAE file itself, e.g. {path}/{WAN_VAE_FILE}")
        state_dict = load_file_state_dict(path)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
        with torch.device("meta"):  # no random init of 127M parameters that are overwritten at once
            vae = cls(config)
        # Cast before loading: diffusers' ModelMixin.to(dtype=...) logs a spurious fp32-modules warning.
        state_dict = {k: v.to(dtype) for k, v in convert_official_wan_vae(state_dict).items()}
        load_strict(vae.model, state_dict, source=path)
        vae.model.to(device)
        return vae

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(Z, T, h, w) of a video `frames` x `height` x `width`; ValueError if the VAE cannot take it."""
        self._check_video_size(frames, height, width)
        s = self.config.spatial_stride
        return self.config.z_dim, (frames - 1) // self.config.temporal_stride + 1, height // s, width // s

    def _check_video_size(self, frames: int, height: int, width: int) -> None:
        # The encoder takes frame 1 alone, then chunks of 4 (causal): other frame counts lose their tail.
        if frames < 1 or (frames - 1) % self.config.temporal_stride:
            n = max(frames - 1, 0) // self.config.temporal_stride
            raise ValueError(
                f"the Wan-VAE needs 4n+1 frames, got {frames}; use {4 * n + 1} or {4 * n + 5} frames"
            )
        if (
            height % self.config.spatial_stride
            or width % self.config.spatial_stride
            or height <= 0
            or width <= 0
        ):
            raise ValueError(
                f"the Wan-VAE needs height and width divisible by {self.config.spatial_stride}, "
                f"got {height}x{width}"
            )

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.config.latents_mean, device=like.device, dtype=torch.float32)
        std = torch.tensor(self.config.latents_std, device=like.device, dtype=torch.float32)
        return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: Tensor, *, check_range: bool = True) -> Tensor:
        """video [B,3,F,H,W] in [-1,1] -> z [B,Z,T,h,w] = (posterior mean - mean) / std, per channel.

        check_range=False lets values a little outside [-1, 1] through, as the official I2V encodes its
        bicubic-resized first frame (models.wan_i2v); the check guards against uint8 frames passed as is."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode takes a video [B,3,F,H,W], got shape {tuple(video.shape)}")
        self._check_video_size(*video.shape[2:])
        if check_range and (video.min() < -1.001 or video.max() > 1.001):
            raise ValueError("encode takes pixel values in [-1, 1] (x / 127.5 - 1 for uint8 frames)")
        p = next(self.model.parameters())
        posterior = self.model.encode(video.to(p.device, p.dtype)).latent_dist
        mu = posterior.mode().float()  # [B,Z,T,h,w]; the official code uses the mean, it never samples
        mean, std = self._stats(mu)
        return (mu - mean) / std  # [B,Z,T,h,w]

    def tiles_by_default(self, h: int, w: int) -> bool:
        """Whether decode(tiled=None) tiles a latent of h x w: only above 480x832 pixels (see decode)."""
        return h * w * self.config.spatial_stride**2 > UNTILED_MAX_PIXELS

    @torch.no_grad()
    def decode(self, z: Tensor, *, tiled: bool | None = None) -> Tensor:
        """z [B,Z,T,h,w] (normalised) -> video [B,3,4(T-1)+1,8h,8w] in [-1,1], fp32.

        tiled: decode overlapping 256x256-pixel tiles and blend them (diffusers' spatial tiling). None
        (default) tiles only above 480x832 pixels, so 480p decodes exactly as the official code does.
        """
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(
                f"decode takes latents [B,{self.config.z_dim},T,h,w], got shape {tuple(z.shape)}"
            )
        if torch.isnan(z).any():
            raise ValueError("decode got NaN latents (the sampler diverged upstream)")
        if tiled is None:
            tiled = self.tiles_by_default(*z.shape[-2:])
        mean, std = self._stats(z)
        p = next(self.model.parameters())
        # un-normalise in fp32 as the official wrapper (it divides by 1/std: equal up to rounding)
        z = (z.float() * std + mean).to(p.device, p.dtype)  # [B,Z,T,h,w]
        if tiled:
            (video,) = self.model.tiled_decode(z, return_dict=False)  # [B,3,F,H,W]
        else:
            video = self.model.decode(z).sample  # [B,3,F,H,W]
        return video.float().clamp_(-1.0, 1.0)  # official: decode, then clamp in the wrapper
