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
    stats = cached.cache_stats or {}
    # NFE counts whole DiT calls; a call whose block stack was skipped (TeaCache, MagCache) ran only the
    # embeddings and the head, so it is not counted (the work ratio has the exact FLOPs).
    nfe = stats.get("block_calls", cached.dit_calls)
    row = {
        "dit_seconds_baseline": base.seconds["dit"],
        "dit_seconds_cached": cached.seconds["dit"],
        "e2e_seconds_baseline": base.seconds["end_to_end"],
        "e2e_seconds_cached": cached.seconds["end_to_end"],
        "speedup_dit": base.seconds["dit"] / cached.seconds["dit"],
        "speedup_e2e": base.seconds["end_to_end"] / cached.seconds["end_to_end"],
        "nfe_baseline": base.dit_calls,
        "nfe_cached": nfe,
        "nfe_ratio": base.dit_calls / nfe,
        # Baseline FLOPs / FLOPs spent (the caches' analytic count; None where the model gave no cost).
        "work_ratio": stats.get("work_ratio"),
    }
    row.update(video_metrics(base.frames, cached.frames, lpips=lpips))
    row.update(latent_metrics(base.latents, cached.latents))
    return row


def aggregate(rows: list[dict]) -> dict:
    """Mean and standard deviation of every numeric column (inf stays inf: identical videos)."""
    out = {"num_prompts": len(rows)}
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
    ("work_ratio", "work ratio", "{:.2f}x"),
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
    heads = ["cache", *(h for _, h, _ in TABLE_COLUMNS)]
    return "| " + " | ".join(heads) + " |\n|" + "---|" * len(heads)


def compare_runs(
    generate: Callable[[str, int, object], Generation],
    prompts: list[str],
    seeds: list[int],
    configs: list[tuple[str, object]],
    *,
    warmup: Callable[[], None] | None = None,
    lpips: bool = True,
    on_pair: Callable[[Generation, Generation, dict], None] | None = None,
    measure: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict:
    """The baseline of every (prompt, seed) once, then each cache config from the same seed; rows and means.

    `generate(prompt, seed, cache_config_or_None)` is the sample script's own generation; `configs` is a
    list of (label, cache config), e.g. one EasyCache, or a τ sweep and static intervals for a Pareto curve.
    `warmup` runs once first so neither side pays for kernel selection or allocator growth. `on_pair` may
    save the videos. `measure=False` (the other ranks of a multi-GPU run) makes the same generations and
    nothing else: every DiT call needs all ranks, only rank 0 measures and writes. `shard=(rank, world)`
    (data parallel over prompts): this rank makes every world-th (prompt, seed) pair from its rank on.
    """
    if warmup is not None:
        warmup()
    rows = []
    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    for index, (prompt, seed) in enumerate(pairs):
        if shard is not None and index % shard[1] != shard[0]:
            continue
        base = generate(prompt, seed, None)
        for label, config in configs:
            cached = generate(prompt, seed, config)
            if not measure:
                continue
            row = {"label": label, "run_index": index, "prompt": prompt, "seed": seed}
            row.update(compare_pair(base, cached, lpips=lpips))
            row["cache_stats"] = cached.cache_stats
            rows.append(row)
            if on_pair is not None:
                on_pair(base, cached, row)
    return {"rows": rows, "means": compare_means(rows, [label for label, _ in configs])}


def compare_means(rows: list[dict], labels: list[str]) -> dict:
    """Mean ± std of every numeric column per cache label (labels without rows are left out)."""
    means = {}
    for label in labels:
        mine = [{k: v for k, v in r.items() if k != "cache_stats"} for r in rows if r["label"] == label]
        if mine:
            means[label] = aggregate(mine)
    return means


def generate_and_report(
    generate,
    prompts: list[str],
    seed: int,
    args,
    out,
    report: dict,
    label: str,
    *,
    write: bool = True,
    shard: tuple[int, int] | None = None,
) -> None:
    """The end of every sample script's main(): with --compare, the baseline against each cache of
    `compare_configs(args)` (one table row each); otherwise one video per prompt. Writes videos and report;
    with `write=False` (ranks other than 0 of a sequence-parallel run) it makes the same generations,
    silently. `shard=(rank, world)`: data parallel over prompts (torch.distributed initialised): each rank
    makes and writes its share of the videos, and rank 0 gathers every rank's part of the report.

    `generate(prompt, seed, cache_config, num_steps=None)` is the script's generation; `out` a RunOutputs.
    """
    from .cli import cache_config, compare_configs
    from .metrics import json_safe
    from .report import summary_line, write_json

    if args.compare:
        warmup = lambda: generate(prompts[0], seed, None, num_steps=2)  # noqa: E731  kernels, allocator
        seeds = [seed + i for i in range(args.num_seeds)]
        configs = compare_configs(args)
        on_pair = out.save_pair if write else None
        kw = dict(warmup=warmup, lpips=args.lpips, on_pair=on_pair, measure=write, shard=shard)
        result = compare_runs(generate, prompts, seeds, configs, **kw)
        if shard is not None:
            rows = sorted(_gather(result["rows"]), key=lambda r: r["run_index"])
            result = {"rows": rows, "means": compare_means(rows, [c[0] for c in configs])}
            write = shard[0] == 0
        if not write:
            return
        print_comparison(result, label)
        report["comparison"] = result
    else:
        runs = []
        for i, prompt in enumerate(prompts):
            if shard is not None and i % shard[1] != shard[0]:
                continue
            gen = generate(prompt, seed, cache_config(args))
            if not write:
                continue
            runs.append(out.save_single(gen, prompt=prompt, seed=seed, index=i if len(prompts) > 1 else None))
            print(summary_line(label, gen, runs[-1]["outputs"]["video"]))
        if shard is not None:  # every rank's runs, in prompt order
            runs = [r for _, r in sorted(_gather([(i * shard[1] + shard[0], r) for i, r in enumerate(runs)]))]
            write = shard[0] == 0
        if not write:
            return
        report.update(runs[0] if len(runs) == 1 else {"runs": runs})
    print(f"report: {write_json(out.report, json_safe(report))}")


def _gather(items: list) -> list:
    """The concatenation of every rank's `items` (small picklable objects), on every rank."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def print_comparison(result: dict, title: str) -> None:
    print(title)
    print(table_header())
    many = len({r["run_index"] for r in result["rows"]}) > 1
    for row in result["rows"]:
        print(format_row(row, f"{row['label']} #{row['run_index']}" if many else row["label"]))
    if many:
        for label, mean in result["means"].items():
            print(format_row(mean, f"{label} (mean)"))


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
