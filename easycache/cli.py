"""Command-line flags shared by the sample scripts: pick a cache with `--cache` and set its knobs.

Importing this module needs no torch (the cache classes are imported where a cache is built), so that a
sample script parses and checks its flags, and answers --help, before any heavy import. Keep it that way
when adding a method: import its module inside the function that builds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import StepCache
    from .baselines import StaticCacheConfig
    from .cache import EasyCacheConfig

METHODS = ("easycache", "static", "none", "analyze")
K_UPDATES = ("local", "mean", "ema")  # easycache.cache.K_UPDATES (a test keeps the two equal)


def add_cache_args(parser: argparse.ArgumentParser, *, thresh: float = 0.05, warmup: int = 10) -> None:
    """Add the cache flags; `thresh`, `warmup`: the model's defaults (Wan 0.05/10, HunyuanVideo 0.025/5)."""
    g = parser.add_argument_group("caching")
    g.add_argument(
        "--cache",
        choices=METHODS,
        default="easycache",
        help="step cache: the paper's runtime-adaptive EasyCache, a static interval, none (the baseline), or "
        "analyze (the baseline, recording the transformation rate k_t at every step)",
    )
    g.add_argument("--thresh", type=float, default=thresh, help="EasyCache τ (default %(default)s)")
    g.add_argument(
        "--warmup",
        type=int,
        default=warmup,
        help="R: sampling steps always computed at the start (default %(default)s)",
    )
    g.add_argument(
        "--interval", type=int, default=2, help="static cache: compute every n-th step after warm-up"
    )
    g.add_argument(
        "--k-update",
        "--k_update",
        dest="k_update",
        choices=K_UPDATES,
        default="local",
        help="EasyCache ablation: how k follows the measured rates (default %(default)s)",
    )
    g.add_argument(
        "--ema-decay",
        "--ema_decay",
        dest="ema_decay",
        type=float,
        default=0.9,
        help="weight of the past for --k-update ema",
    )
    g.add_argument(
        "--reuse-output",
        "--reuse_output",
        dest="reuse_output",
        action="store_true",
        help="EasyCache ablation: reuse the last output v_i instead of x_t + Δ_i",
    )
    g.add_argument(
        "--no-compute-last",
        "--no_compute_last",
        dest="compute_last",
        action="store_false",
        help="allow the last step to be skipped",
    )


def cache_config(args: argparse.Namespace) -> EasyCacheConfig | StaticCacheConfig | None:
    """Validate the cache flags early (before any model is loaded); None for `--cache none`."""
    from .baselines import StaticCacheConfig
    from .cache import EasyCacheConfig

    if args.cache == "none":
        return None
    if args.cache == "analyze":  # τ = 0, R = 0 computes every step (bit-identical to none) and records k_t
        return EasyCacheConfig(thresh=0.0, warmup=0)
    if args.cache == "static":
        return StaticCacheConfig(interval=args.interval, warmup=args.warmup, compute_last=args.compute_last)
    return EasyCacheConfig(
        thresh=args.thresh,
        warmup=args.warmup,
        compute_last=args.compute_last,
        k_update=args.k_update,
        ema_decay=args.ema_decay,
        reuse_output=args.reuse_output,
    )


def make_cache(
    config: EasyCacheConfig | StaticCacheConfig | None, num_steps: int, **kwargs
) -> StepCache | None:
    """A fresh cache for one generation (None runs the uncached baseline through the same loop)."""
    from .baselines import StaticCache, StaticCacheConfig
    from .cache import EasyCache

    if config is None:
        return None
    if isinstance(config, StaticCacheConfig):
        return StaticCache(config, num_steps, **kwargs)
    return EasyCache(config, num_steps, **kwargs)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """Flags every sample script shares for its outputs and the comparison mode."""
    g = parser.add_argument_group("outputs and comparison")
    g.add_argument("--report", help="JSON report path (default: next to the video, .json)")
    g.add_argument("--lossless", action="store_true", help="also write a lossless .mkv (FFV1) for measuring")
    g.add_argument(
        "--compare",
        action="store_true",
        help="run the uncached baseline and the chosen cache from the same seed, print one table row",
    )
    g.add_argument(
        "--prompts", help="a text file with one prompt per line (# comments); reports means over it"
    )
    g.add_argument(
        "--num-seeds",
        "--num_seeds",
        dest="num_seeds",
        type=int,
        default=1,
        help="--compare: run every prompt with this many seeds (seed, seed+1, ...) and average over all",
    )
    g.add_argument(
        "--sweep-thresh",
        "--sweep_thresh",
        dest="sweep_thresh",
        type=_floats,
        default=[],
        help="--compare: EasyCache at each τ of this comma list (one baseline per prompt serves all)",
    )
    g.add_argument(
        "--sweep-interval",
        "--sweep_interval",
        dest="sweep_interval",
        type=_ints,
        default=[],
        help="--compare: static caching at each interval of this comma list (same warm-up R)",
    )
    g.add_argument(
        "--no-lpips", "--no_lpips", dest="lpips", action="store_false", help="skip LPIPS in --compare"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def compare_configs(args: argparse.Namespace) -> list[tuple[str, EasyCacheConfig | StaticCacheConfig]]:
    """(label, config) of every cache `--compare` runs against the baseline: the chosen one, or the sweeps."""
    from .baselines import StaticCacheConfig

    if not (args.sweep_thresh or args.sweep_interval):
        if args.cache in ("none", "analyze"):
            raise ValueError(
                f"--compare needs a cache to compare with the baseline, not --cache {args.cache}"
            )
        return [(args.cache, cache_config(args))]
    base = cache_config(argparse.Namespace(**{**vars(args), "cache": "easycache"}))
    configs = [(f"easycache τ={t}", dataclasses.replace(base, thresh=t)) for t in args.sweep_thresh]
    static = StaticCacheConfig(warmup=args.warmup, compute_last=args.compute_last)
    configs += [(f"static n={n}", dataclasses.replace(static, interval=n)) for n in args.sweep_interval]
    return configs


def check_cache_args(args: argparse.Namespace, num_steps: int) -> None:
    """Build every cache the run will use once, so bad values fail before any model is loaded."""
    make_cache(cache_config(args), num_steps)
    if getattr(args, "num_seeds", 1) < 1:
        raise ValueError(f"--num-seeds must be >= 1, got {args.num_seeds}")
    if getattr(args, "compare", False):
        for _, config in compare_configs(args):
            make_cache(config, num_steps)


def check_run_args(args: argparse.Namespace, num_steps: int) -> list[str]:
    """The checks every sample script shares, before anything heavy: every cache of the run can be built for
    `num_steps` steps, and the prompts (`--prompts FILE`, else `--prompt`) can be read; returns them."""
    check_cache_args(args, num_steps)
    return read_prompts(args.prompts) if args.prompts else [args.prompt]


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of a prompt file that do not start with '#'."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts file {path} holds no prompt")
    return prompts


def no_grad(fn):
    """`@torch.no_grad()` for a sample script's generate(), importing torch only when it runs: the scripts
    import torch after parsing and checking their flags (see sample_wan.py's docstring)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return run
