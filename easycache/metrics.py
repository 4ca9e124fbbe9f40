"""Fidelity of a cached video against the uncached one of the same seed: PSNR, SSIM, LPIPS; and latent errors.

Conventions (spec/method.md):
- PSNR "global" is the authors' (EasyCache, tools/video_metrics.py): one MSE over every frame and pixel of the
  8-bit videos. PSNR "per-frame" is the mean of per-frame PSNRs (TeaCache/MagCache); it reads higher, because
  the few bad frames weigh less. Both are reported; identical inputs give inf.
- SSIM: Gaussian window 11, σ 1.5, K = (0.01, 0.03), on [0, 1] RGB, mean over channels, pixels and frames
  (what torchmetrics' StructuralSimilarityIndexMeasure computes per frame, as the authors use it).
- LPIPS (AlexNet, inputs in [−1, 1], mean over frames) needs the optional `lpips` package (and torchvision);
  when it cannot be used, it is reported as None with the reason.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F


def _as_float_frames(video: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float64 [F, 3, H, W] in [0, 255]."""
    v = torch.as_tensor(np.asarray(video))
    if v.dtype != torch.uint8 or v.dim() != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {v.dtype} {tuple(v.shape)}")
    return v.permute(0, 3, 1, 2).to(torch.float64)


def _check_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_float_frames(a), _as_float_frames(b)
    if x.shape != y.shape:
        shapes = f"{tuple(np.asarray(a).shape)} vs {tuple(np.asarray(b).shape)}"
        raise ValueError(f"videos differ in frame count or size: {shapes}")
    return x, y


def _psnr(mse: torch.Tensor, peak: float) -> torch.Tensor:
    return torch.where(mse == 0, torch.full_like(mse, math.inf), 10 * torch.log10(peak**2 / mse))


def psnr_global(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB from one MSE over all frames and pixels (the authors' convention)."""
    x, y = _check_pair(a, b)
    return float(_psnr(((x - y) ** 2).mean(), 255.0))


def psnr_per_frame(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of each frame's PSNR in dB (TeaCache's convention; inf if any frame is identical)."""
    x, y = _check_pair(a, b)
    return float(_psnr(((x - y) ** 2).mean(dim=(1, 2, 3)), 255.0).mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, size, size]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames, channels and pixels on [0, 1] RGB, as torchmetrics (>= 1.x) computes it: the
    frames are reflect-padded by 5 pixels so every pixel has a full window, and variances are clamped at 0.
    (scikit-image instead averages only the valid interior; on large frames the two agree closely.)"""
    x, y = _check_pair(a, b)
    x, y = x / 255.0, y / 255.0
    if min(x.shape[-2:]) < 6:
        raise ValueError(f"SSIM needs frames of at least 6×6 pixels, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    w = _gaussian_window().expand(c, 1, 11, 11)
    blur = lambda t: F.conv2d(F.pad(t, (5, 5, 5, 5), mode="reflect"), w, groups=c)  # noqa: E731  [F, 3, H, W]
    mx, my = blur(x), blur(y)
    sxx = (blur(x * x) - mx**2).clamp_min(0)
    syy = (blur(y * y) - my**2).clamp_min(0)
    sxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def lpips_alex(
    a: np.ndarray, b: np.ndarray, device: str | torch.device = "cpu"
) -> tuple[float | None, str | None]:
    """(LPIPS-AlexNet mean over frames, None) or (None, why it is unavailable)."""
    x, y = _check_pair(a, b)
    try:
        import lpips  # optional: pip install lpips torchvision (CUDA machines)

        net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as e:  # missing package, no torchvision, weights not downloadable, ...
        return None, f"{type(e).__name__}: {e}".splitlines()[0]
    with torch.no_grad():
        to_unit = lambda t: (t.float() / 127.5 - 1.0).to(device)  # noqa: E731  [0, 255] -> [−1, 1]
        values = [net(to_unit(x[i : i + 1]), to_unit(y[i : i + 1])).item() for i in range(x.shape[0])]
    return float(np.mean(values)), None


def video_metrics(reference: np.ndarray, test: np.ndarray, *, lpips: bool = True) -> dict:
    """All frame metrics of `test` against `reference` (uint8 [F, H, W, 3] each)."""
    out = {
        "psnr_global": psnr_global(reference, test),
        "psnr_per_frame": psnr_per_frame(reference, test),
        "ssim": ssim(reference, test),
        "lpips": None,
        "lpips_unavailable": "not requested",
    }
    if lpips:
        out["lpips"], out["lpips_unavailable"] = lpips_alex(reference, test)
    return out


def latent_metrics(reference: torch.Tensor, test: torch.Tensor) -> dict:
    """Errors between final latents: MSE, relative L2 ‖a − b‖ / ‖a‖, and PSNR over the reference's range."""
    if reference.shape != test.shape:
        raise ValueError(f"latents differ in shape: {tuple(reference.shape)} vs {tuple(test.shape)}")
    a, b = reference.double(), test.double()
    mse = ((a - b) ** 2).mean()
    peak = float(a.max() - a.min())
    return {
        "latent_mse": float(mse),
        "latent_rel_l2": float((a - b).norm() / a.norm().clamp_min(1e-30)),
        "latent_psnr": float(_psnr(mse, peak)),
    }


def json_safe(value):
    """inf -> "inf" (JSON has no infinity; an identical video has infinite PSNR), recursively."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a cache config in the args
        return json_safe(dataclasses.asdict(value))
    return value
