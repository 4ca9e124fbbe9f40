"""Wan2.1 image-to-video conditioning, as the official `wan/image2video.py` (`WanI2V.generate`).

The first frame conditions the DiT twice:
  - `clip_fea` [1, 257, 1280]: the CLIP image tokens (models.wan_clip), cross-attended by every block;
  - `y` [1, 20, T, h, w]: 4 mask channels (1 on the first frame's latent, 0 after) and the VAE latent of
    the video [first frame, zeros x (F-1)], concatenated to the noisy latent on the channel axis inside the
    DiT (16 + 20 = in_dim 36).
Both are the same in the conditional and the unconditional CFG branch (only the text differs).

The frame is resized, not cropped: the latent grid (lat_h, lat_w) keeps the image's aspect ratio under the
pixel budget `max_area` (the `--size` W*H), rounded down to whole DiT patches, and the image is stretched
to lat_h x lat_w times the VAE stride with torch's bicubic interpolation.

Shape letters: F frames (4n+1), T latent frames ((F-1)/4+1), h/w latent height/width, H/W pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MASK_CHANNELS = 4  # the VAE packs 4 frames per latent frame: one mask channel per packed frame


def load_image(path: str) -> Tensor:
    """An image file -> [3, H, W] float in [-1, 1] (as the official `TF.to_tensor(img).sub_(0.5).div_(0.5)`
    of `Image.open(path).convert("RGB")`)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)  # [H, W, 3] 0..255
    return torch.from_numpy(rgb).permute(2, 0, 1).div(255.0).sub(0.5).div(0.5)  # [3, H, W]


def latent_grid(
    height: int, width: int, max_area: int, vae_stride: tuple[int, int], patch_size: tuple[int, int]
) -> tuple[int, int]:
    """(lat_h, lat_w) for an image of height x width under `max_area` pixels, as the official code: the
    aspect ratio kept, each side floored to the VAE stride, then to whole DiT patches."""
    aspect = height / width
    lat_h = round(np.sqrt(max_area * aspect) // vae_stride[0] // patch_size[0] * patch_size[0])
    lat_w = round(np.sqrt(max_area / aspect) // vae_stride[1] // patch_size[1] * patch_size[1])
    if lat_h < patch_size[0] or lat_w < patch_size[1]:
        raise ValueError(
            f"an image of {width}x{height} under max area {max_area} leaves no whole DiT patch "
            f"({lat_w}x{lat_h} latent pixels); use a larger --size or a less elongated image"
        )
    return int(lat_h), int(lat_w)


def resize_image(image: Tensor, height: int, width: int) -> Tensor:
    """[3, H, W] -> [3, height, width]: torch bicubic, no crop, no antialias (official; values may leave
    [-1, 1] slightly, as there)."""
    return F.interpolate(image[None].float(), size=(height, width), mode="bicubic")[0]


def first_frame_mask(frames: int, lat_h: int, lat_w: int) -> Tensor:
    """[4, T, lat_h, lat_w]: 1 where a packed frame is the given first frame, else 0. Frame 0 is repeated 4
    times so that every latent frame packs 4 frames (the VAE's first latent frame holds frame 0 alone)."""
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.cat([msk[:, :1].repeat_interleave(MASK_CHANNELS, dim=1), msk[:, 1:]], dim=1)  # [1, F+3, h, w]
    return msk.view(1, -1, MASK_CHANNELS, lat_h, lat_w).transpose(1, 2)[0]  # [4, T, h, w]


@dataclass
class I2VCondition:
    """What the DiT gets besides the noise and the text: all [1, ...] batches."""

    y: Tensor  # [1, 20, T, h, w] mask channels then the VAE latent
    clip_fea: Tensor  # [1, 257, D]
    image: Tensor  # [3, H, W] the resized first frame in [-1, 1] (what the VAE encoded)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(16, T, h, w): the shape of the noise."""
        _, c, t, h, w = self.y.shape
        return c - MASK_CHANNELS, t, h, w


@torch.no_grad()
def encode_condition(
    image: Tensor,
    frames: int,
    max_area: int,
    vae,
    clip,
    patch_size: tuple[int, int] = (2, 2),
) -> I2VCondition:
    """The official I2V conditioning of `image` [3, H, W] in [-1, 1] for a video of `frames` frames.

    vae: a models.wan_vae.WanVAE (encode -> normalised latents); clip: a models.wan_clip.WanClipEncoder, or
    any callable [B, 3, H, W] -> [B, 257, D]. The CLIP tokens are taken from the image as given (the official
    code resizes it to 224x224 itself), the VAE latent from the resized frame.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"the first frame must be [3, H, W], got {tuple(image.shape)}")
    s = vae.config.spatial_stride
    lat_h, lat_w = latent_grid(image.shape[1], image.shape[2], max_area, (s, s), patch_size)
    h, w = lat_h * s, lat_w * s
    resized = resize_image(image, h, w)  # [3, H, W]
    clip_fea = clip(image[None])  # [1, 257, D]
    video = torch.cat([resized[:, None], resized.new_zeros(3, frames - 1, h, w)], dim=1)  # [3, F, H, W]
    # Bicubic overshoots [-1, 1] by up to ~0.1 at sharp edges; the official code encodes those values as is.
    z = vae.encode(video[None], check_range=False)  # [1, 16, T, h, w] normalised
    mask = first_frame_mask(frames, lat_h, lat_w).to(z.device)[None]  # [1, 4, T, h, w]
    return I2VCondition(torch.cat([mask, z], dim=1), clip_fea, resized)


def max_area_of(size: str) -> int:
    """`--size` "W*H" -> the pixel budget W*H (official MAX_AREA_CONFIGS)."""
    width, height = (int(v) for v in size.split("*"))
    return width * height
