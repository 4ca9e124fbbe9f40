"""Fidelity metrics against independent references (scikit-image, torchmetrics) on synthetic videos."""

import importlib.util
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio
from torchmetrics.image import StructuralSimilarityIndexMeasure

from easycache.metrics import json_safe, latent_metrics, psnr_global, psnr_per_frame, ssim, video_metrics
from models.toy_videos import render


def perturbed(video, amplitude, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.integers(-amplitude, amplitude + 1, video.shape)
    return np.clip(video.astype(np.int64) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def video():
    return render("a yellow triangle moving up on a gray background", 7)


@pytest.mark.parametrize("amplitude", [1, 8, 40])
def test_psnr_conventions_match_scikit_image(video, amplitude):
    test = perturbed(video, amplitude)
    test[3] = video[3]  # one identical frame: the per-frame mean must handle it per convention (inf)
    assert psnr_global(video, test) == pytest.approx(
        peak_signal_noise_ratio(video, test, data_range=255), rel=1e-9
    )
    frames = [peak_signal_noise_ratio(video[i], test[i], data_range=255) for i in range(len(video)) if i != 3]
    assert math.isinf(psnr_per_frame(video, test))
    test[3] = perturbed(video[3:4], amplitude, seed=1)[0]
    frames.insert(3, peak_signal_noise_ratio(video[3], test[3], data_range=255))
    assert psnr_per_frame(video, test) == pytest.approx(np.mean(frames), rel=1e-9)
    assert (
        psnr_per_frame(video, test) >= psnr_global(video, test) - 1e-9
    )  # Jensen: the mean of logs reads higher


@pytest.mark.parametrize("amplitude", [2, 16, 60])
def test_ssim_matches_torchmetrics(video, amplitude):
    test = perturbed(video, amplitude)
    to01 = lambda v: torch.from_numpy(v).permute(0, 3, 1, 2).double() / 255  # noqa: E731
    ref = StructuralSimilarityIndexMeasure(data_range=1.0)(to01(test), to01(video)).item()
    assert ssim(video, test) == pytest.approx(ref, abs=1e-7)


def test_identical_videos(video):
    m = video_metrics(video, video.copy(), lpips=False)
    assert (
        math.isinf(m["psnr_global"]) and math.isinf(m["psnr_per_frame"]) and m["ssim"] == pytest.approx(1.0)
    )
    assert json_safe(m)["psnr_global"] == "inf"


def test_mismatched_videos_are_rejected(video):
    with pytest.raises(ValueError, match="frame count or size"):
        psnr_global(video, video[:-1])
    with pytest.raises(ValueError, match="uint8"):
        ssim(video, video.astype(np.float32))


@pytest.mark.skipif(importlib.util.find_spec("lpips") is not None, reason="lpips is installed here")
def test_lpips_unavailable_is_reported_with_a_reason(video):
    m = video_metrics(video, perturbed(video, 4))
    assert m["lpips"] is None and "lpips" in m["lpips_unavailable"]


def test_latent_metrics():
    a = torch.linspace(-2, 2, 64, dtype=torch.float64).view(1, 4, 1, 4, 4)
    b = a + 0.01
    m = latent_metrics(a, b)
    assert m["latent_mse"] == pytest.approx(1e-4)
    assert m["latent_psnr"] == pytest.approx(10 * math.log10(16 / 1e-4))
    assert m["latent_rel_l2"] == pytest.approx(0.01 * 8 / a.norm().item())
    assert math.isinf(latent_metrics(a, a.clone())["latent_psnr"])
    with pytest.raises(ValueError, match="shape"):
        latent_metrics(a, a[:, :2])
