"""HunyuanVideo's causal 3D VAE: a thin wrapper around diffusers' `AutoencoderKLHunyuanVideo`.

The official `AutoencoderKLCausal3D` has the same modules and key names as the diffusers class (the
converter's rename table is empty), so we load the diffusers-format folder vae/ of
hunyuanvideo-community/HunyuanVideo. Compression 4x8x8, 16 latent channels, latents scaled by 0.476986 (no
shift), frames 4n+1 -> n+1 latent frames.

Encode returns the posterior *mode* times 0.476986. The official text-to-video pipeline never encodes (it
only decodes), the official `forward` uses the mode unless asked to sample, and diffusers' image-to-video
pipelines take the mode ("argmax") too; the mode is also deterministic.

Tiling. The official inference always tiles (`--vae-tiling` defaults to True), in space and in time:
256-pixel tiles (32 latent) every 192 pixels, blended over 64 pixels, and 64-frame tiles (16 latent + 1
causal frame) every 48 frames, blended over 16 frames. diffusers 0.42 defaults differ (no spatial tiling,
16-frame temporal tiles always on), so `set_tiling` sets all six numbers from `VAETiling` (official names).

Memory of a 544x960, 129-frame decode (latent 16x33x68x120) in fp16. The decoder's peak grows with the
pixels x frames it decodes at once: measured on CPU with random full-size weights, ~7 KB per output
pixel-frame in fp32 (up to 7 full-resolution 256-channel tensors alive), so ~3.5 KB in fp16. Untiled
(129x544x960 = 67M pixel-frames) that is ~235 GB; temporal tiles alone (65 frames) ~120 GB; diffusers'
default 17-frame temporal tiles ~31 GB; the official tiles (65x256x256 = 4.3M pixel-frames) ~15 GB, plus the
0.5 GB of weights and the 0.4 GB stitched output: well inside a 24-40 GB budget. Decoding one video of a
batch at a time (`use_slicing`) keeps this independent of the batch size without changing any result.

Letters: B videos, F frames (4n+1), H, W pixels; T = (F-1)/4 + 1, h = H/8, w = W/8 latent sizes; C = 16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLHunyuanVideo
from torch import Tensor

HUB_REPO = "hunyuanvideo-community/HunyuanVideo"
SCALING_FACTOR = 0.476986  # official vae config scaling_factor; no shift factor
SPATIAL_RATIO, TEMPORAL_RATIO = 8, 4


@dataclass(frozen=True)
class VAETiling:
    """The official AutoencoderKLCausal3D tiling: config sample_size, sample_tsize; tile_overlap_factor."""

    sample_size: int = 256  # tile edge in pixels (32 latent); larger frames are tiled in both directions
    sample_tsize: int = 64  # frames per temporal tile (16 latent, plus one causal frame of context)
    tile_overlap_factor: float = 0.25

    def __post_init__(self):
        # With these multiples the official formulas and diffusers' give the same tiles and blend widths.
        for name, size, stride, ratio in (
            ("sample_size", self.sample_size, self.stride, SPATIAL_RATIO),
            ("sample_tsize", self.sample_tsize, self.tstride, TEMPORAL_RATIO),
        ):
            if size % ratio or stride % ratio or not 0 < stride <= size:
                raise ValueError(
                    f"{name} {size} and its stride {stride} must be positive multiples of {ratio}"
                )

    @property
    def stride(self) -> int:
        return int(self.sample_size * (1 - self.tile_overlap_factor))

    @property
    def tstride(self) -> int:
        return int(self.sample_tsize * (1 - self.tile_overlap_factor))


OFFICIAL_TILING = VAETiling()


def latent_shape(
    num_frames: int, height: int, width: int, *, spatial_multiple: int = 16
) -> tuple[int, int, int]:
    """(T, h, w) latent size of a video, or a ValueError saying what to change. The VAE itself needs H and W
    divisible by 8; the DiT's 2x2 patches need 16, the default here."""
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_RATIO:
        raise ValueError(f"num_frames must be 4n+1 (1, 5, ..., 129) for the causal VAE, got {num_frames}")
    if height % spatial_multiple or width % spatial_multiple or min(height, width) <= 0:
        raise ValueError(
            f"height and width must be positive multiples of {spatial_multiple}, got {height}x{width}"
        )
    return (num_frames - 1) // TEMPORAL_RATIO + 1, height // SPATIAL_RATIO, width // SPATIAL_RATIO


class HunyuanVAE:
    """encode(video in [-1, 1]) -> scaled latents; decode(scaled latents) -> video in [-1, 1]."""

    def __init__(self, vae: AutoencoderKLHunyuanVideo, *, tiling: VAETiling | None = OFFICIAL_TILING):
        if vae.config.scaling_factor != SCALING_FACTOR:
            raise ValueError(
                f"VAE config scaling_factor is {vae.config.scaling_factor}, expected {SCALING_FACTOR}"
            )
        self.vae = vae
        self.set_tiling(tiling)

    @classmethod
    def from_pretrained(
        cls,
        vae_dir: str,
        *,
        device: str | torch.device,
        dtype: torch.dtype = torch.float16,
        tiling: VAETiling | None = OFFICIAL_TILING,
    ) -> HunyuanVAE:
        """Load the diffusers-format vae/ folder (config.json, diffusion_pytorch_model.safetensors); the
        official VAE runs in fp16."""
        missing = [
            f
            for f in ("config.json", "diffusion_pytorch_model.safetensors")
            if not os.path.isfile(os.path.join(vae_dir, f))
        ]
        if missing:
            raise FileNotFoundError(
                f"{vae_dir} lacks {', '.join(missing)} (folder vae/ of the Hub repo {HUB_REPO}); fetch with: "
                f"hf download {HUB_REPO} --include 'vae/*' --local-dir DIR, then pass DIR/vae"
            )
        vae = AutoencoderKLHunyuanVideo.from_pretrained(vae_dir, torch_dtype=dtype)
        return cls(vae.requires_grad_(False).eval().to(device), tiling=tiling)

    def set_tiling(self, tiling: VAETiling | None) -> None:
        """Official tiling (see the module docstring), or None for one pass over the whole video."""
        vae = self.vae
        vae.use_slicing = True  # one video of the batch at a time
        # diffusers' temporal tiling flags, on by default there; the official code tiles in time if asked.
        vae.use_framewise_encoding = vae.use_framewise_decoding = tiling is not None
        if tiling is None:
            vae.disable_tiling()
            return
        vae.enable_tiling(
            tile_sample_min_height=tiling.sample_size,
            tile_sample_min_width=tiling.sample_size,
            tile_sample_min_num_frames=tiling.sample_tsize,
            tile_sample_stride_height=tiling.stride,
            tile_sample_stride_width=tiling.stride,
            tile_sample_stride_num_frames=tiling.tstride,
        )

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> posterior mode x 0.476986, [B, C, T, h, w] float32."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video.shape)}")
        latent_shape(*video.shape[2:], spatial_multiple=SPATIAL_RATIO)
        if video.min() < -1.001 or video.max() > 1.001:
            raise ValueError("video values must be in [-1, 1] (map 8-bit frames with x / 127.5 - 1)")
        video = video.to(self.vae.device, self.vae.dtype)  # [B, 3, F, H, W]
        z = self.vae.encode(video).latent_dist.mode()  # [B, C, T, h, w]
        return z.float() * SCALING_FACTOR  # [B, C, T, h, w]

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """z [B, C, T, h, w] scaled latents -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1], float32."""
        channels = self.vae.config.latent_channels
        if z.ndim != 5 or z.shape[1] != channels:
            raise ValueError(f"latents must be [B, {channels}, T, h, w], got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError("latents contain NaN or inf: the sampling diverged, there is nothing to decode")
        z = (z / SCALING_FACTOR).to(self.vae.device, self.vae.dtype)  # [B, C, T, h, w]
        video = self.vae.decode(z).sample  # [B, 3, F, H, W]
        # The official pipeline maps to [0, 1] with (x / 2 + 0.5).clamp(0, 1): the same clamp in [-1, 1].
        return video.float().clamp(-1, 1)  # [B, 3, F, H, W]
