"""Comparing a cached run with the uncached baseline: one row of the paper's table, for any sample script.

    python -m easycache.compare baseline.mkv cached.mkv      # metrics of two video files

The sample scripts' `--compare` mode runs the baseline and the cache from the same seed in one process
(`compare_runs`), after a warm-up, and reports speed-up (DiT-only and end-to-end), NFE, PSNR (both
conventions), SSIM and LPIPS, per prompt and as mean ± std over a prompt list.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .metrics import json_safe, latent_metrics, video_metrics
from .video import read_video


@dataclass
class Generation:
    """What one sample-script generation returns (the sample scripts fill it)."""

    frames: np.ndarray  # uint8 [F, H, W, 3]
    latents: torch.Tensor  # final latents before decoding
    seconds: dict[str, float]  # phases: "text", "dit", "vae", "end_to_end"
    dit_calls: int  # DiT forward calls (two per computed step with CFG, one with batched CFG)
    cache_stats: dict | None = None
    trace: list[dict] | None = None
    extra: dict = field(default_factory=dict)


def compare_pair(base: Generation, cached: Generation, *, lpips: bool = True) -> dict:
    """One table row: speed of `cached` relative to `base`, and its fidelity against `base`."""
    row = {
        "dit_seconds_baseline": base.seconds["dit"],
        "dit_seconds_cached": cached.seconds["dit"],
        "e2e_seconds_baseline": base.seconds["end_to_end"],
        "e2e_seconds_cached": cached.seconds["end_to_end"],
        "speedup_dit": base.seconds["dit"] / cached.seconds["dit"],
        "speedup_e2e": base.seconds["end_to_end"] / cached.seconds["end_to_end"],
        "nfe_baseline": base.dit_calls,
        "nfe_cached": cached.dit_calls,
        "nfe_ratio": base.dit_calls / cached.dit_calls,
    }
    row.update(video_metrics(base.frames, cached.frames, lpips=lpips))
    row.update(latent_metrics(base.latents, cached.latents))
    return row


def aggregate(rows: list[dict]) -> dict:
    """Mean and standard deviation of every numeric column (inf stays inf: identical videos)."""
    out = {}
    for key in rows[0]:
        values = [
            r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
        ]
        if len(values) == len(rows):
            out[key] = float(np.mean(values))
            finite = [v for v in values if math.isfinite(v)]
            out[f"{key}_std"] = float(np.std(finite)) if len(finite) == len(values) else None
    return out


TABLE_COLUMNS = [  # (key, header, format)
    ("speedup_dit", "speedup DiT", "{:.2f}x"),
    ("speedup_e2e", "speedup e2e", "{:.2f}x"),
    ("nfe_ratio", "NFE ratio", "{:.2f}x"),
    ("psnr_global", "PSNR (global)", "{:.2f}"),
    ("psnr_per_frame", "PSNR (per-frame)", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("lpips", "LPIPS", "{:.4f}"),
]


def format_row(row: dict, label: str) -> str:
    cells = []
    for key, _, fmt in TABLE_COLUMNS:
        v = row.get(key)
        cells.append(
            "n/a" if v is None else "inf" if isinstance(v, float) and math.isinf(v) else fmt.format(v)
        )
    return "| " + " | ".join([label, *cells]) + " |"


def table_header() -> str:
    heads = ["run", *(h for _, h, _ in TABLE_COLUMNS)]
    return "| " + " | ".join(heads) + " |\n|" + "---|" * len(heads)


def compare_runs(
    generate: Callable[[str, int, object], Generation],
    prompts: list[str],
    seed: int,
    cache_config,
    *,
    warmup: Callable[[], None] | None = None,
    lpips: bool = True,
    on_pair: Callable[[str, Generation, Generation, dict], None] | None = None,
) -> dict:
    """Baseline and cached generation of every prompt from the same seed; per-prompt rows and their mean.

    `generate(prompt, seed, cache_config_or_None)` is the sample script's own generation. `warmup` runs once
    first so neither side pays for kernel selection or allocator growth. `on_pair` may save the videos.
    """
    if warmup is not None:
        warmup()
    rows = []
    for prompt in prompts:
        base = generate(prompt, seed, None)
        cached = generate(prompt, seed, cache_config)
        row = {"prompt": prompt, "seed": seed, **compare_pair(base, cached, lpips=lpips)}
        row["cache_stats"] = cached.cache_stats
        rows.append(row)
        if on_pair is not None:
            on_pair(prompt, base, cached, row)
    return {
        "rows": rows,
        "mean": aggregate([{k: v for k, v in r.items() if k != "cache_stats"} for r in rows]),
    }


def print_comparison(result: dict, label: str) -> None:
    print(table_header())
    for i, row in enumerate(result["rows"]):
        print(format_row(row, f"{label} #{i}" if len(result["rows"]) > 1 else label))
    if len(result["rows"]) > 1:
        print(format_row(result["mean"], f"{label} (mean of {len(result['rows'])})"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="PSNR (both conventions), SSIM and LPIPS of two video files")
    p.add_argument("reference", help="the uncached video (use the lossless .mkv for measuring)")
    p.add_argument("test", help="the cached video")
    p.add_argument("--no-lpips", dest="lpips", action="store_false")
    args = p.parse_args(argv)
    a, b = read_video(args.reference), read_video(args.test)
    if a.shape != b.shape:
        p.error(f"the videos differ in frame count or size: {a.shape} vs {b.shape}")
    m = json_safe(video_metrics(a, b, lpips=args.lpips))
    for key, value in m.items():
        print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
