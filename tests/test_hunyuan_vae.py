"""HunyuanVideo VAE wrapper on a tiny random AutoencoderKLHunyuanVideo saved in the diffusers layout."""

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo

from models.hunyuan_vae import SCALING_FACTOR, HunyuanVAE, VAETiling, latent_shape

SMALL_TILES = VAETiling(
    sample_size=32, sample_tsize=16
)  # 4x4 latent tiles every 3, 4(+1) latent frames every 3

# Official AutoencoderKLCausal3D (hyvideo/vae, sample_size=32, sample_tsize=16, enable_tiling()) with the same
# weights (`_fill`; the key names are identical) decoding the latent of `test_tiled_decode_matches_official`:
# output[0, :, [0, 8, 14]][:, :, [4, 28]][..., [4, 28]] (frame 14 and pixel 28 lie in blended overlaps).
OFFICIAL_TILED = [
    0.79675,
    -0.05559,
    0.05727,
    0.38986,
    1.0,
    -0.1161,
    0.09332,
    0.4204,
    0.63994,
    -0.03108,
    0.11878,
    0.30918,
    -0.857,
    -0.3925,
    0.31412,
    -0.46944,
    -0.56999,
    -0.57559,
    0.01293,
    -0.41317,
    -0.41528,
    -0.54009,
    -0.1602,
    -0.32351,
    -0.06282,
    1.0,
    -0.83024,
    -0.16601,
    -0.74359,
    1.0,
    -0.76087,
    -0.28193,
    -0.5593,
    0.9403,
    -0.52873,
    -0.12821,
]


def _fill(model: torch.nn.Module) -> None:
    """Seeded weights independent of the library's init order: norm scales near 1, the rest N(0, 0.1)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4
    )
    _fill(vae)
    path = tmp_path_factory.mktemp("hunyuan") / "vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(vae_dir):
    return AutoencoderKLHunyuanVideo.from_pretrained(vae_dir).eval()


def _video(frames: int, size: int) -> torch.Tensor:
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_decode_match_the_library(vae_dir, reference):
    vae = HunyuanVAE.from_pretrained(str(vae_dir), device="cpu", dtype=torch.float32, tiling=None)
    video = _video(9, 32)
    z = vae.encode(video)
    assert z.shape == (1, 4, 3, 4, 4) and z.dtype == torch.float32
    with torch.no_grad():
        ref_z = reference.encode(video).latent_dist.mode() * SCALING_FACTOR
        ref_video = reference.decode(ref_z / SCALING_FACTOR).sample.clamp(-1, 1)
    torch.testing.assert_close(z, ref_z, rtol=1e-5, atol=1e-6)
    out = vae.decode(z)
    assert out.shape == video.shape and out.abs().max() <= 1
    torch.testing.assert_close(out, ref_video, rtol=1e-5, atol=1e-6)


def test_official_tiling_is_set_on_the_library_model(vae_dir):
    vae = HunyuanVAE.from_pretrained(str(vae_dir), device="cpu", dtype=torch.float32).vae
    assert vae.use_tiling and vae.use_framewise_decoding and vae.use_framewise_encoding
    spatial = (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height)
    assert spatial == (256, 256, 192) and vae.tile_sample_stride_width == 192
    assert (vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames) == (64, 48)
    with pytest.raises(ValueError, match="multiples of 8"):
        VAETiling(sample_size=100)


def test_tiled_decode_matches_official(vae_dir):
    vae = HunyuanVAE.from_pretrained(str(vae_dir), device="cpu", dtype=torch.float32, tiling=SMALL_TILES)
    z = torch.randn(
        1, 4, 5, 5, 5, generator=torch.Generator().manual_seed(2)
    )  # 2 temporal x 2x2 spatial tiles
    tiled = vae.decode(z)
    assert tiled.shape == (1, 3, 17, 40, 40)
    sub = tiled[0, :, [0, 8, 14]][:, :, [4, 28]][..., [4, 28]]
    torch.testing.assert_close(sub.flatten(), torch.tensor(OFFICIAL_TILED), rtol=0, atol=1e-4)
    vae.set_tiling(None)  # tiling really ran: one pass gives another result (random weights, small tiles)
    assert (vae.decode(z) - tiled).abs().max() > 0.1
    small = z[:, :, :4, :4, :4]  # fits in one tile: tiling must not change anything
    untiled = vae.decode(small)
    vae.set_tiling(SMALL_TILES)
    torch.testing.assert_close(vae.decode(small), untiled, rtol=0, atol=0)


def test_bad_shapes_and_values_are_refused(vae_dir):
    vae = HunyuanVAE.from_pretrained(str(vae_dir), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="4n\\+1"):
        vae.encode(_video(8, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(_video(9, 36))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vae.encode(_video(9, 32) * 3)
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(1, 16, 3, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        vae.decode(torch.full((1, 4, 3, 4, 4), float("nan")))


def test_latent_shape_rules():
    assert latent_shape(129, 544, 960) == (33, 68, 120)
    assert latent_shape(1, 16, 16) == (1, 2, 2)
    with pytest.raises(ValueError, match="multiples of 16"):
        latent_shape(129, 540, 960)  # fine for the VAE, not for the DiT's 2x2 patches
    with pytest.raises(ValueError, match="4n\\+1"):
        latent_shape(128, 544, 960)


def test_missing_files_name_the_repo(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"config\.json.*hunyuanvideo-community/HunyuanVideo.*'vae/\*'"
    ):
        HunyuanVAE.from_pretrained(str(tmp_path), device="cpu")
