"""OpenSora 1.2 VAE: parity with golden outputs of the official code, the full key list, the loader, errors.

tests/data/opensora/vae_tiny.safetensors holds a tiny official VideoAutoencoderPipeline (random weights in
official names, configs in its metadata), an input video and what the official code computed from it; see
tests/data/opensora/README.md.
"""

import json
import os

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.loading import load_strict
from models.opensora_vae import (
    OPENSORA_VAE_V1_2,
    SPATIAL_LATENT_SCALE,
    OpenSoraVAE,
    OpenSoraVAEConfig,
    TemporalVAE,
    TemporalVAEConfig,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
GOLDEN = os.path.join(DATA, "opensora", "vae_tiny.safetensors")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny convolutions gain nothing from a second thread, and on a busy 2-core machine OpenMP's waiting
    # threads made these tests ~50x slower (8 s instead of 0.15 s for one encode).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def golden():
    with safe_open(GOLDEN, "pt") as f:
        meta = f.metadata()
    temporal = {
        k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta["temporal_config"]).items()
    }
    config = OpenSoraVAEConfig(
        vae_2d=json.loads(meta["spatial_config"]),
        vae_temporal=TemporalVAEConfig(**temporal),
        micro_batch_size=int(meta["micro_batch_size"]),
        micro_frame_size=int(meta["micro_frame_size"]),
        shift=tuple(json.loads(meta["shift"])),
        scale=tuple(json.loads(meta["scale"])),
    )
    tensors = load_file(GOLDEN)
    state_dict = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    return config, state_dict, tensors


@pytest.fixture(scope="module")
def tiny_vae(golden):
    config, state_dict, _ = golden
    return load_strict(OpenSoraVAE(config), dict(state_dict)).eval()


def test_full_size_state_dict_matches_official_key_list():
    with torch.device("meta"):
        model = OpenSoraVAE(OPENSORA_VAE_V1_2)
    ours = [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]
    with open(os.path.join(DATA, "opensora_vae_keys.txt")) as f:
        official = f.read().splitlines()
    assert ours == official
    assert sum(v.numel() for v in model.state_dict().values()) == 393_341_015  # ~1.57 GB in fp32


def test_latent_shape_matches_official(golden, tiny_vae):
    _, _, t = golden
    frames = t["latent_frames.input"].tolist()
    assert [tiny_vae.latent_shape(n, 8, 8)[0] for n in frames] == t["latent_frames.official"].tolist()
    with torch.device("meta"):
        vae = OpenSoraVAE()
    assert vae.latent_shape(51, 240, 426) == (15, 30, 53)  # "2s" at 240p 9:16; W rounds down as officially
    assert vae.latent_shape(102, 720, 1280) == (30, 90, 160)
    assert [vae.latent_shape(n, 8, 8)[0] for n in (1, 17, 20, 37)] == [1, 5, 6, 11]


def test_temporal_vae_matches_official(golden):
    config, state_dict, t = golden
    temporal = {
        k.removeprefix("temporal_vae."): v for k, v in state_dict.items() if k.startswith("temporal_vae.")
    }
    model = load_strict(TemporalVAE(config.vae_temporal), temporal).eval()
    with torch.no_grad():
        mean, logvar = model.encode(t["temporal.x"])  # 7 frames: one frame of front padding
        decoded = model.decode(t["temporal.mean"], num_frames=7)
    assert mean.shape == (1, 4, 2, 4, 4) and decoded.shape == (1, 4, 7, 4, 4)
    assert rel_err(mean, t["temporal.mean"]) <= 1e-4
    assert rel_err(logvar, t["temporal.logvar"]) <= 1e-4
    assert rel_err(decoded, t["temporal.decoded"]) <= 1e-4


def test_pipeline_matches_official_on_17_plus_3_frames(golden, tiny_vae):
    _, _, t = (
        golden  # video [2, 3, 20, 8, 8]: a 17-frame chunk and a 3-frame remainder -> 5 + 1 latent frames
    )
    z_mode = tiny_vae.encode(t["video"], sample_posterior=False)
    assert z_mode.shape == (2, 4, 6, 4, 4)
    assert rel_err(z_mode, t["z_mode"]) <= 1e-4
    # The official encode samples both posteriors from the global RNG; the same seed gives the same draws.
    torch.manual_seed(2)
    z = tiny_vae.encode(t["video"])
    assert rel_err(z, t["z_sample"]) <= 1e-4
    assert rel_err(z, t["z_mode"]) > 1e-2  # the noise is really there
    decoded = tiny_vae.decode(t["z_sample"], num_frames=20)
    assert decoded.shape == (2, 3, 20, 8, 8)
    assert rel_err(decoded, t["decoded"]) <= 1e-4


def test_encode_with_generator_is_reproducible(golden, tiny_vae):
    video = golden[2]["video"]
    z1 = tiny_vae.encode(video, generator=torch.Generator().manual_seed(5))
    z2 = tiny_vae.encode(video, generator=torch.Generator().manual_seed(5))
    assert torch.equal(z1, z2)


def test_spatial_part_equals_diffusers_autoencoder_per_frame(golden):
    config, state_dict, _ = golden
    config = OpenSoraVAEConfig(vae_2d=config.vae_2d, vae_temporal=config.vae_temporal, micro_batch_size=3)
    vae = load_strict(OpenSoraVAE(config), dict(state_dict)).eval()
    reference = AutoencoderKL(**config.vae_2d).eval()
    prefix = "spatial_vae.module."
    reference.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    )
    video = torch.rand(2, 3, 5, 8, 8) * 2 - 1  # 10 frames in micro-batches of 3: one spans both samples
    with torch.no_grad():
        z = vae.spatial_vae.encode(video, False, None)  # posterior means
        x = vae.spatial_vae.decode(z)
        for b in range(2):
            for f in range(5):
                frame = video[b : b + 1, :, f]  # [1, 3, H, W]
                z_ref = reference.encode(frame).latent_dist.mode() * SPATIAL_LATENT_SCALE
                assert rel_err(z[b : b + 1, :, f], z_ref) <= 1e-5
                x_ref = reference.decode(z_ref / SPATIAL_LATENT_SCALE).sample
                assert rel_err(x[b : b + 1, :, f], x_ref) <= 1e-5
    assert z.shape == (2, 4, 5, 4, 4) and x.shape == video.shape


def test_from_checkpoint_loads_official_layout(golden, tmp_path):
    config, state_dict, t = golden
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    vae = OpenSoraVAE.from_checkpoint(str(tmp_path), device="cpu", dtype=torch.float32, config=config)
    assert not vae.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in vae.parameters())
    assert rel_err(vae.decode(t["z_sample"], num_frames=20), t["decoded"]) <= 1e-4
    # bf16 as in official inference: fp32 latents are cast to the VAE's dtype, as the official sampler does
    vae = OpenSoraVAE.from_checkpoint(str(tmp_path), dtype=torch.bfloat16, config=config)
    decoded = vae.decode(t["z_sample"], num_frames=20)
    assert decoded.dtype == torch.bfloat16 and rel_err(decoded.float(), t["decoded"]) <= 5e-2


def test_from_checkpoint_errors(golden, tmp_path):
    config, state_dict, _ = golden
    with pytest.raises(FileNotFoundError, match="hpcai-tech/OpenSora-VAE-v1.2"):
        OpenSoraVAE.from_checkpoint(str(tmp_path), config=config)
    broken = {k: v for k, v in state_dict.items() if k != "scale"}
    broken["temporal_vae.quant_conv.conv.bias"] = torch.zeros(3)
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing keys: scale(.|\n)*temporal_vae.quant_conv.conv.bias: \(3,\)"
    ):
        OpenSoraVAE.from_checkpoint(str(tmp_path), config=config)


def test_bad_input_is_rejected(tiny_vae):
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny_vae.encode(torch.zeros(1, 3, 5, 8, 7))
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        tiny_vae.encode(torch.zeros(1, 4, 5, 8, 8))
    with pytest.raises(ValueError, match="20 frames encode to 6 latent frames, but z has 5"):
        tiny_vae.decode(torch.zeros(1, 4, 5, 4, 4), num_frames=20)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        tiny_vae.decode(torch.zeros(1, 4, 1, 4, 4), num_frames=0)
    with pytest.raises(ValueError, match="activation_fn"):
        TemporalVAEConfig(activation_fn="gelu")
