"""Wan-VAE: official key names, numeric parity with diffusers and with the official code, input rules."""

import math
import os

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import load_file

from models.wan_vae import (
    WAN_VAE_CONFIG,
    WAN_VAE_FILE,
    WAN_VAE_MEAN,
    WAN_VAE_STD,
    WanVAE,
    WanVAEConfig,
    convert_diffusers_wan_vae_to_official,
    convert_official_wan_vae,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
# Same layout as the official VAE (4 levels, strides 4x8x8), 12x narrower; ~130k parameters.
TINY = WanVAEConfig(base_dim=8, z_dim=4, latents_mean=WAN_VAE_MEAN[:4], latents_std=WAN_VAE_STD[:4])


def seeded_weights(shapes: dict[str, torch.Size], seed: int = 0) -> dict[str, torch.Tensor]:
    """Reproducible weights with unit-scale activations, by key name (so the same in any module order).
    The golden file was made with this function; changing it invalidates tests/data/wan_vae_golden."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        x = torch.randn(shapes[key], generator=g)
        if key.endswith("gamma"):
            out[key] = 1.0 + 0.1 * x
        elif key.endswith("bias"):
            out[key] = 0.1 * x
        else:
            out[key] = x / math.sqrt(math.prod(shapes[key][1:]))  # fan-in scaling
    return out


def golden_video() -> torch.Tensor:
    """The input of the golden file: 9 frames (3 latent frames), 16x24 (non-square, so h/w swaps show)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 9, 16, 24, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny AutoencoderKLWan, its weights saved as an official-layout Wan2.1_VAE.pth, and the
    WanVAE loaded from that file."""
    ref = AutoencoderKLWan(**TINY.diffusers_kwargs()).eval()
    official = seeded_weights(
        {k: v.shape for k, v in convert_diffusers_wan_vae_to_official(ref.state_dict()).items()}
    )
    ref.load_state_dict(convert_official_wan_vae(official), strict=True)
    path = str(tmp_path_factory.mktemp("wan") / WAN_VAE_FILE)
    torch.save(official, path)
    return ref, path, WanVAE.from_checkpoint(path, config=TINY)


@pytest.fixture(scope="module")
def encoded(tiny):
    """WanVAE's z and reconstruction of golden_video(), computed once."""
    vae = tiny[2]
    z = vae.encode(golden_video())
    return z, vae.decode(z)


STATS = (
    torch.tensor(TINY.latents_mean).view(1, -1, 1, 1, 1),
    torch.tensor(TINY.latents_std).view(1, -1, 1, 1, 1),
)


def read_official_keys() -> dict[str, tuple[int, ...]]:
    # Made in a scratch dir from the official wan/modules/vae.py (Wan2.1 @ 9737cba): WanVAE_(**cfg) on the
    # meta device with _video_vae's cfg (dim=96, z_dim=16, dim_mult=[1,2,4,4], num_res_blocks=2,
    # attn_scales=[], temperal_downsample=[False,True,True]); one "key d0,d1,..." line per state_dict() entry.
    with open(os.path.join(DATA, "wan_vae_keys.txt")) as f:
        rows = [line.split() for line in f if line.strip()]
    return {k: tuple(int(d) for d in s.split(",")) for k, s in rows}


def test_full_size_keys_are_official():
    with torch.device("meta"):
        model = AutoencoderKLWan(**WAN_VAE_CONFIG.diffusers_kwargs())
    official = convert_diffusers_wan_vae_to_official(model.state_dict())
    expected = read_official_keys()
    assert len(expected) == 194
    assert {k: tuple(v.shape) for k, v in official.items()} == expected
    # and back: the two conversions are inverse, key for key
    assert set(convert_official_wan_vae(official)) == set(model.state_dict())
    assert sum(math.prod(s) for s in expected.values()) == 126_892_531  # the 127M-parameter Wan-VAE
    # diffusers' own single-file converter agrees on the official layout
    assert set(convert_wan_vae_to_diffusers(official)) == set(model.state_dict())


@pytest.mark.parametrize("num_res_blocks", [1, 3])
def test_conversion_round_trip_other_depths(num_res_blocks):
    # the decoder regrouping is derived from the keys, not hard-coded for num_res_blocks=2
    with torch.device("meta"):
        model = AutoencoderKLWan(**WanVAEConfig(num_res_blocks=num_res_blocks).diffusers_kwargs())
    official = convert_diffusers_wan_vae_to_official(model.state_dict())
    per_level = num_res_blocks + 2
    assert f"decoder.upsamples.{per_level - 1}.resample.1.weight" in official
    assert f"decoder.upsamples.{4 * per_level - 2}.residual.6.weight" in official  # last level, no resample
    assert list(convert_official_wan_vae(official)) == list(model.state_dict())


def test_checkpoint_matches_diffusers(tiny, encoded):
    ref, _, vae = tiny
    z, rec = encoded
    assert z.shape == (1, *vae.latent_shape(9, 16, 24)) == (1, 4, 3, 2, 3)
    with torch.no_grad():
        mu = ref.encode(golden_video()).latent_dist.mode()
        rec_ref = ref.decode(mu).sample
    mean, std = STATS
    torch.testing.assert_close(z * std + mean, mu, atol=1e-5, rtol=0)  # the posterior mean, normalised
    assert rec.shape == golden_video().shape and rec.dtype == torch.float32
    torch.testing.assert_close(rec, rec_ref, atol=1e-5, rtol=0)


def test_matches_official_golden(tiny, encoded):
    # tests/data/wan_vae_golden.safetensors was made in a scratch dir by the official code
    # (wan/modules/vae.py, Wan2.1 @ 9737cba): WanVAE_(dim=8, z_dim=4, other args as _video_vae) loaded with
    # seeded_weights(); z = WanVAE_.encode(golden_video(), [mean, 1/std]) and
    # video = WanVAE_.decode(z, [mean, 1/std]).clamp(-1, 1), with mean/std = TINY.latents_mean/std, exactly
    # as the official WanVAE wrapper calls them (its safetensors metadata says the same).
    golden = load_file(os.path.join(DATA, "wan_vae_golden.safetensors"))
    torch.testing.assert_close(encoded[0], golden["z"], atol=1e-5, rtol=0)
    rec = tiny[2].decode(golden["z"])
    torch.testing.assert_close(rec, golden["video"], atol=1e-5, rtol=0)
    assert rec.abs().lt(0.99).float().mean() > 0.9  # the golden video is not just the clamp bounds


def test_normalisation_round_trip(tiny):
    # decode un-normalises with mean + std·z (not z / std): recover z exactly from what the decoder sees.
    # (encode's (mu - mean) / std is checked against diffusers' posterior mean in the parity test.)
    vae = tiny[2]
    z = torch.randn(1, 4, 3, 2, 3)
    seen = {}
    hook = vae.model.post_quant_conv.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0]))
    try:
        vae.decode(z)
    finally:
        hook.remove()
    mean, std = STATS
    torch.testing.assert_close((seen["z"] - mean) / std, z, atol=1e-6, rtol=0)
    assert not torch.allclose(seen["z"], z, atol=0.1)  # the statistics were really applied


def test_tiled_decode_close_to_untiled(tiny):
    # 48-pixel (6-latent) tiles every 32 pixels (4 latents), blended over 16 pixels
    vae = WanVAE(TINY, tile_sample_size=48, tile_sample_stride=32)
    vae.model.load_state_dict(tiny[2].model.state_dict())
    z = torch.randn(1, 4, 1, 8, 8)  # 2x2 tiles over 64x64 pixels
    full, tiled = vae.decode(z), vae.decode(z, tiled=True)
    assert tiled.shape == full.shape == (1, 3, 1, 64, 64)
    # Random weights have no locality (each output pixel sees ~all of an 8x8 latent), so tiles differ from
    # the untiled decode far more than with the trained VAE: a loose bound (measured over 5 seeds:
    # 24.5-26 dB, max 0.7-0.9).
    psnr = 10 * torch.log10(4 / (tiled - full).pow(2).mean())  # peak-to-peak 2 for [-1, 1]
    assert 18 < psnr < 60  # close, yet really tiled
    assert (tiled - full).abs().max() < 1.5
    # a latent no larger than the tile stride is one tile: exactly the untiled computation
    torch.testing.assert_close(vae.decode(z[..., :4, :4], tiled=True), vae.decode(z[..., :4, :4]))
    # the default switches tiling on only above 480x832 pixels
    assert not vae.tiles_by_default(60, 104) and not vae.tiles_by_default(104, 60)
    assert vae.tiles_by_default(90, 160)


@pytest.mark.parametrize("frames", [8, 10, 0])
def test_frames_must_be_4n_plus_1(frames):
    with pytest.raises(ValueError, match="4n\\+1 frames"):
        WanVAE(TINY).encode(torch.zeros(1, 3, frames, 16, 16))
    with pytest.raises(ValueError, match="4n\\+1"):
        WanVAE(TINY).latent_shape(frames, 480, 832)


@pytest.mark.parametrize("size", [(20, 16), (16, 12)])
def test_size_must_be_divisible_by_8(size):
    with pytest.raises(ValueError, match="divisible by 8"):
        WanVAE(TINY).encode(torch.zeros(1, 3, 5, *size))


def test_latent_shape_official():
    with torch.device("meta"):  # no weights needed
        vae = WanVAE()
    assert vae.latent_shape(81, 480, 832) == (16, 21, 60, 104)  # the official 480p T2V latent
    assert vae.latent_shape(1, 8, 16) == (16, 1, 1, 2)
    assert (vae.config.temporal_stride, vae.config.spatial_stride) == (4, 8)


def test_bad_inputs():
    vae = WanVAE(TINY)
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        vae.encode(torch.full((1, 3, 5, 16, 16), 255.0))
    with pytest.raises(ValueError, match="B,3,F,H,W"):
        vae.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match="latents \\[B,4,T,h,w\\]"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        vae.decode(torch.full((1, 4, 2, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="one temperal_downsample flag per downsampling"):
        WanVAEConfig(dim_mult=(1, 2, 4))
    with pytest.raises(ValueError, match="z_dim=4"):
        WanVAEConfig(z_dim=4)


def test_missing_corrupt_or_wrong_checkpoint(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="not found"):
        WanVAE.from_checkpoint(str(tmp_path / WAN_VAE_FILE), config=TINY)
    with pytest.raises(ValueError, match="is a directory"):
        WanVAE.from_checkpoint(str(tmp_path), config=TINY)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="corrupt"):
        WanVAE.from_checkpoint(str(corrupt), config=TINY)
    # the tiny checkpoint into the full-size architecture: every shape is wrong, and the error says so
    with pytest.raises(ValueError, match="shape mismatches"):
        WanVAE.from_checkpoint(tiny[1])
    with pytest.raises(ValueError, match="not an official Wan2.1 VAE"):
        convert_official_wan_vae({"blocks.0.weight": torch.zeros(1)})
    state = torch.load(tiny[1], weights_only=True)
    with pytest.raises(ValueError, match="1 keys have no diffusers"):
        convert_official_wan_vae({**state, "encoder.extra.weight": torch.zeros(1)})
