"""OpenSora 1.2 VAE (official `OpenSoraVAE_V1_2`, a `VideoAutoencoderPipeline`): the SDXL image VAE run
frame by frame (diffusers `AutoencoderKL`), then a causal 3D-conv temporal VAE (`VAE_Temporal_SD`) that
compresses time 4x.

    encode: video [B,3,F,H,W] in [-1,1] -> spatial VAE per frame, x0.18215 -> [B,4,F,h,w]
            -> temporal VAE on 17-frame chunks (5 latent frames each) -> [B,4,T,h,w] -> (z - shift) / scale
    decode: the reverse; `num_frames` says how many frames the front padding of the last chunk hides.

Parameter names equal the official checkpoint's (`hpcai-tech/OpenSora-VAE-v1.2` `model.safetensors`:
`scale`, `shift`, `spatial_vae.module.*`, `temporal_vae.*`), so it loads strictly with no renaming.

Shape legend: B batch, C channels, F video frames, T latent frames, H/W pixel height/width, h/w latent
height/width (H/8, W/8 for SDXL), N frames of one spatial micro-batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from einops import rearrange
from torch import Tensor, nn

from models.loading import load_file_state_dict, load_strict, require_files

REPO_ID = "hpcai-tech/OpenSora-VAE-v1.2"
CKPT_FILE = "model.safetensors"

# PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers, subfolder vae: the SDXL VAE as diffusers AutoencoderKL
# kwargs, kept here so nothing is fetched from a hub. The structural fields are pinned by the checkpoint's key
# list (tests/data/opensora_vae_keys.txt). The last three are SDXL's values and change no output here: the
# official pipeline scales latents by 0.18215 itself, `sample_size` only sizes tiles (tiling stays off), and
# `force_upcast` is read by diffusers pipelines only.
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
SPATIAL_LATENT_SCALE = 0.18215  # hard-coded by the official VideoAutoencoderKL (the SD 1.x value, not SDXL's)


@dataclass(frozen=True)
class TemporalVAEConfig:
    """Official `VAE_Temporal` arguments; the defaults are `VAE_Temporal_SD`."""

    in_out_channels: int = 4  # the spatial VAE's latent channels
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # one entry per level but the last
    num_groups: int = 32  # GroupNorm groups
    activation_fn: str = "swish"  # "swish" (SiLU) or "relu"

    def __post_init__(self):
        if self.activation_fn not in ("swish", "relu"):
            raise ValueError(f"activation_fn must be 'swish' or 'relu', got {self.activation_fn!r}")
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError("temporal_downsample needs one entry per channel multiplier but the last")

    @property
    def time_downsample_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


VAE_TEMPORAL_SD = TemporalVAEConfig()


@dataclass(frozen=True)
class OpenSoraVAEConfig:
    """Official `VideoAutoencoderPipelineConfig` fields of OpenSoraVAE_V1_2 (vae_2d: AutoencoderKL kwargs)."""

    vae_2d: dict[str, Any] = field(default_factory=lambda: dict(SDXL_VAE_CONFIG))
    vae_temporal: TemporalVAEConfig = VAE_TEMPORAL_SD
    micro_batch_size: int = 4  # frames per spatial VAE call (memory only: frames are independent)
    micro_frame_size: int = 17  # frames per temporal VAE chunk; chunks are encoded independently
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)

    def __post_init__(self):
        if self.micro_batch_size < 1 or self.micro_frame_size < 1:
            raise ValueError("micro_batch_size and micro_frame_size must be >= 1")
        if self.vae_2d.get("latent_channels", 4) != self.vae_temporal.in_out_channels:
            raise ValueError(
                "the spatial VAE's latent_channels must equal the temporal VAE's in_out_channels"
            )


OPENSORA_VAE_V1_2 = OpenSoraVAEConfig()


def sample_gaussian(mean: Tensor, logvar: Tensor, generator: torch.Generator | None) -> Tensor:
    """mean + exp(logvar / 2) * eps. Like the official temporal posterior, eps is drawn on the CPU (or the
    generator's device) in fp32 and then moved, so a seeded run matches the official one on any device."""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn(
        mean.shape, generator=generator, device="cpu" if generator is None else generator.device
    )
    return mean + std * eps.to(mean)


#################################################################################
#                         Temporal VAE (causal 3D convs)                        #
#################################################################################


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the front only (frame t sees frames <= t) and space symmetrically."""

    def __init__(
        self, chan_in: int, chan_out: int, kernel_size: int, *, t_stride: int = 1, bias: bool = True
    ):
        super().__init__()
        # Official: time_pad = (k - 1) + (1 - stride), so a stride-2 conv keeps ceil(T / 2) frames.
        self.padding = (kernel_size // 2,) * 4 + (kernel_size - t_stride, 0)  # (w, w, h, h, t_front, t_back)
        self.conv = nn.Conv3d(chan_in, chan_out, kernel_size, stride=(t_stride, 1, 1), bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding))  # [B, C, T, h, w] -> [B, C', T / t_stride, h, w]


class ResBlock(nn.Module):
    """GroupNorm-act-conv twice plus a (1x1x1 conv when channels change) shortcut; convs without bias."""

    def __init__(self, in_channels: int, filters: int, num_groups: int, act: type[nn.Module]):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, filters, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, filters)
        self.conv2 = CausalConv3d(filters, filters, 3, bias=False)
        self.conv3 = CausalConv3d(in_channels, filters, 1, bias=False) if in_channels != filters else None
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))  # [B, C', T, h, w]
        h = self.conv2(self.act(self.norm2(h)))  # [B, C', T, h, w]
        return h + (x if self.conv3 is None else self.conv3(x))


def _activation(cfg: TemporalVAEConfig) -> type[nn.Module]:
    return nn.SiLU if cfg.activation_fn == "swish" else nn.ReLU


def _res_level(in_channels: int, filters: int, cfg: TemporalVAEConfig) -> nn.ModuleList:
    """num_res_blocks ResBlocks; only the first changes the channel count."""
    act = _activation(cfg)
    chans = [in_channels] + [filters] * (cfg.num_res_blocks - 1)
    return nn.ModuleList([ResBlock(c, filters, cfg.num_groups, act) for c in chans])


class TemporalEncoder(nn.Module):
    """conv_in; per level ResBlocks, then a stride-2 causal conv where downsampled; ResBlocks; head."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.conv_in = CausalConv3d(cfg.in_out_channels, cfg.filters, 3, bias=False)
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(), nn.ModuleList()
        prev = cfg.filters
        for i, mult in enumerate(cfg.channel_multipliers):
            self.block_res_blocks.append(_res_level(prev, cfg.filters * mult, cfg))
            prev = cfg.filters * mult
            if i < len(cfg.temporal_downsample):
                down = cfg.temporal_downsample[i]
                self.conv_blocks.append(CausalConv3d(prev, prev, 3, t_stride=2) if down else nn.Identity())
        self.res_blocks = _res_level(prev, prev, cfg)
        self.norm1 = nn.GroupNorm(cfg.num_groups, prev)
        self.act = _activation(cfg)()
        self.conv2 = CausalConv3d(prev, 2 * cfg.latent_embed_dim, 1)  # mean and logvar

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # [B, C, F, h, w]
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)  # [B, C_i, F_i, h, w]
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)  # [B, C_i, F_i / 2 where downsampled, h, w]
        for block in self.res_blocks:
            x = block(x)  # [B, C_top, T, h, w]
        return self.conv2(self.act(self.norm1(x)))  # [B, 2 * latent_embed_dim, T, h, w]


class TemporalDecoder(nn.Module):
    """Mirror of the encoder; temporal upsampling is a causal conv to 2x channels, then depth-to-time."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        top = cfg.filters * cfg.channel_multipliers[-1]
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, top, 3)
        self.res_blocks = _res_level(top, top, cfg)
        # Built from the top level down, but indexed like the encoder (level i, conv_blocks[i - 1]).
        levels, ups, prev = [], [], top
        for i in reversed(range(len(cfg.channel_multipliers))):
            levels.insert(0, _res_level(prev, cfg.filters * cfg.channel_multipliers[i], cfg))
            prev = cfg.filters * cfg.channel_multipliers[i]
            if i > 0:
                up = cfg.temporal_downsample[i - 1]
                ups.insert(0, CausalConv3d(prev, prev * 2, 3) if up else nn.Identity())
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(levels), nn.ModuleList(ups)
        self.t_strides = [2 if up else 1 for up in cfg.temporal_downsample]
        self.norm1 = nn.GroupNorm(cfg.num_groups, prev)
        self.act = _activation(cfg)()
        self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv1(z)  # [B, C_top, T, h, w]
        for block in self.res_blocks:
            x = block(x)  # [B, C_top, T, h, w]
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)  # [B, C_i, T_i, h, w]
            if i > 0:
                ts = self.t_strides[i - 1]
                x = self.conv_blocks[i - 1](x)  # [B, C_i * ts, T_i, h, w]
                # depth-to-time; the official pattern also has spatial factors, but they are always 1
                x = rearrange(x, "B (C ts) T h w -> B C (T ts) h w", ts=ts)  # [B, C_i, T_i * ts, h, w]
        return self.conv_out(self.act(self.norm1(x)))  # [B, in_out_channels, F, h, w]


class TemporalVAE(nn.Module):
    """Official `VAE_Temporal`: 4x temporal compression of spatial latents, causal in time."""

    def __init__(self, config: TemporalVAEConfig = VAE_TEMPORAL_SD):
        super().__init__()
        self.config = config
        self.encoder = TemporalEncoder(config)
        self.quant_conv = CausalConv3d(2 * config.latent_embed_dim, 2 * config.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(config.embed_dim, config.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(config)

    def front_padding(self, num_frames: int) -> int:
        """Frames added in front so the count divides the time downsample factor (4)."""
        return -num_frames % self.config.time_downsample_factor

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames + self.front_padding(num_frames)) // self.config.time_downsample_factor

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance (clamped to [-30, 20]) of x [B, C, F, h, w]."""
        x = F.pad(x, (0, 0, 0, 0, self.front_padding(x.shape[2]), 0))  # [B, C, F + pad, h, w], zeros in front
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)  # [B, 2 * embed_dim, T, h, w]
        mean, logvar = moments.chunk(2, dim=1)  # [B, embed_dim, T, h, w] each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, num_frames: int) -> Tensor:
        """z [B, embed_dim, T, h, w] -> [B, C, num_frames, h, w], without the encoder's front padding."""
        x = self.decoder(self.post_quant_conv(z))  # [B, C, 4T, h, w]
        return x[:, :, self.front_padding(num_frames) :]  # [B, C, num_frames, h, w]


#################################################################################
#                     Spatial VAE and the video pipeline                        #
#################################################################################


class SpatialVAE(nn.Module):
    """Official `VideoAutoencoderKL`: a diffusers AutoencoderKL (`module`) applied to every frame."""

    def __init__(self, config: dict[str, Any], micro_batch_size: int):
        super().__init__()
        self.module = AutoencoderKL(**config)
        self.micro_batch_size = micro_batch_size
        self.downsample = 2 ** (len(config["block_out_channels"]) - 1)

    def encode(self, video: Tensor, sample_posterior: bool, generator: torch.Generator | None) -> Tensor:
        b = video.shape[0]
        x = rearrange(video, "B C F H W -> (B F) C H W")
        zs = []
        for frames in x.split(self.micro_batch_size):  # [N, 3, H, W]
            dist = self.module.encode(frames).latent_dist
            zs.append(dist.sample(generator) if sample_posterior else dist.mode())  # [N, 4, h, w]
        z = torch.cat(zs) * SPATIAL_LATENT_SCALE  # [B * F, 4, h, w]
        return rearrange(z, "(B F) C h w -> B C F h w", B=b)

    def decode(self, z: Tensor) -> Tensor:
        b = z.shape[0]
        z = rearrange(z, "B C F h w -> (B F) C h w") / SPATIAL_LATENT_SCALE
        xs = [self.module.decode(zs).sample for zs in z.split(self.micro_batch_size)]  # [N, 3, H, W] each
        return rearrange(torch.cat(xs), "(B F) C H W -> B C F H W", B=b)


class OpenSoraVAE(nn.Module):
    """Official `VideoAutoencoderPipeline` as built by OpenSoraVAE_V1_2 (inference path, `cal_loss=False`)."""

    def __init__(self, config: OpenSoraVAEConfig = OPENSORA_VAE_V1_2):
        super().__init__()
        self.config = config
        self.spatial_vae = SpatialVAE(config.vae_2d, config.micro_batch_size)
        self.temporal_vae = TemporalVAE(config.vae_temporal)
        # Persistent buffers: the official checkpoint stores them as `scale` and `shift`.
        self.register_buffer("scale", torch.tensor(config.scale).view(1, -1, 1, 1, 1))  # [1, C, 1, 1, 1]
        self.register_buffer("shift", torch.tensor(config.shift).view(1, -1, 1, 1, 1))  # [1, C, 1, 1, 1]

    @property
    def micro_z_frame_size(self) -> int:
        """Latent frames of one full temporal chunk (17 frames -> 5)."""
        return self.temporal_vae.latent_frames(self.config.micro_frame_size)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, h, w) exactly as the official get_latent_size: 5 latent frames per full 17-frame chunk plus
        ceil(rest / 4) for the remainder (51 -> 15, 102 -> 30); h, w = H // 8, W // 8, rounded down as
        officially (240x426 -> 30x53; decoding then gives 424 pixels)."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        chunks, rest = divmod(num_frames, self.config.micro_frame_size)
        t = chunks * self.micro_z_frame_size + (self.temporal_vae.latent_frames(rest) if rest else 0)
        d = self.spatial_vae.downsample
        return t, height // d, width // d

    @torch.no_grad()  # frozen at inference: no graph over a long video
    def encode(
        self, video: Tensor, *, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 4, T, H/8, W/8].

        Args:
            sample_posterior: draw from both posteriors as the official encode does (False: their means).
            generator: RNG for those draws (None: the global RNG, which reproduces a seeded official run).
        """
        d = self.spatial_vae.downsample
        if video.ndim != 5 or video.shape[1] != 3 or video.shape[3] % d or video.shape[4] % d:
            raise ValueError(
                f"expected a video [B, 3, F, H, W] with H, W divisible by {d}, got {tuple(video.shape)}"
            )
        video = video.to(self.scale.dtype)  # the VAE's dtype (bf16 in official inference)
        x_z = self.spatial_vae.encode(video, sample_posterior, generator)  # [B, 4, F, h, w]
        zs = []
        for chunk in x_z.split(self.config.micro_frame_size, dim=2):  # [B, 4, <=17, h, w]
            mean, logvar = self.temporal_vae.encode(chunk)  # [B, 4, <=5, h, w] each
            zs.append(sample_gaussian(mean, logvar, generator) if sample_posterior else mean)
        z = torch.cat(zs, dim=2)  # [B, 4, T, h, w]
        return (z - self.shift) / self.scale

    @torch.no_grad()
    def decode(self, z: Tensor, num_frames: int) -> Tensor:
        """Normalised latents [B, 4, T, h, w] -> video [B, 3, num_frames, 8h, 8w] (roughly in [-1, 1])."""
        c = self.config.vae_temporal.embed_dim
        if z.ndim != 5 or z.shape[1] != c:
            raise ValueError(f"expected latents [B, {c}, T, h, w], got {tuple(z.shape)}")
        t = self.latent_shape(num_frames, 0, 0)[0]
        if z.shape[2] != t:
            raise ValueError(f"{num_frames} frames encode to {t} latent frames, but z has {z.shape[2]}")
        # The official sampler casts latents to the VAE's dtype before decoding, so do it here.
        z = z.to(self.scale.dtype) * self.scale + self.shift
        x_z, left = [], num_frames
        for chunk in z.split(self.micro_z_frame_size, dim=2):  # [B, 4, <=5, h, w]
            n = min(self.config.micro_frame_size, left)
            x_z.append(self.temporal_vae.decode(chunk, num_frames=n))  # [B, 4, n, h, w]
            left -= n
        return self.spatial_vae.decode(torch.cat(x_z, dim=2))  # [B, 3, num_frames, H, W]

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: OpenSoraVAEConfig = OPENSORA_VAE_V1_2,
    ) -> OpenSoraVAE:
        """Load `model.safetensors` of hpcai-tech/OpenSora-VAE-v1.2 (spatial and temporal VAE in one file).

        Args:
            ckpt_dir: local directory holding model.safetensors (config.json is not needed).
            device, dtype: where the weights go (the official inference casts the VAE to bf16 on GPU).
            config: architecture; the default is the official one.
        """
        require_files(ckpt_dir, [CKPT_FILE], repo_id=REPO_ID)
        with torch.device("meta"):  # no random init of ~393M parameters that the checkpoint replaces
            model = cls(config)
        state_dict = load_file_state_dict(os.path.join(ckpt_dir, CKPT_FILE))
        load_strict(model, state_dict, source=os.path.join(ckpt_dir, CKPT_FILE))
        return model.to(device=device, dtype=dtype).eval()
