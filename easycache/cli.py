"""Command-line flags shared by the sample scripts: pick a cache with `--cache` and set its knobs."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from typing import TYPE_CHECKING

# Configs only (torch-free): a script parses and checks its flags before torch is imported. The caches
# themselves are imported where they are built (make_cache).
from .configs import (
    K_UPDATES,
    AnalyzeConfig,
    EasyCacheConfig,
    MagCacheConfig,
    PABConfig,
    StaticCacheConfig,
    TeaCacheConfig,
)
from .methods import METHODS as METHOD_CONFIGS
from .methods import field_names, parse_assignment, parse_value

if TYPE_CHECKING:
    from .base import StepCache

METHODS = ("easycache", "static", "teacache", "pab", "magcache", "none", "analyze")
# The official flag names of TeaCache's and MagCache's scripts, as aliases of the config fields.
OFFICIAL_ALIASES = {
    "teacache_thresh": ("teacache", "rel_l1_thresh"),
    "rel_l1_thresh": ("teacache", "rel_l1_thresh"),
    "magcache_thresh": ("magcache", "magcache_thresh"),
    "magcache_K": ("magcache", "magcache_K"),
    "retention_ratio": ("magcache", "retention_ratio"),
}


def add_cache_args(
    parser: argparse.ArgumentParser,
    *,
    thresh: float = 0.05,
    warmup: int = 10,
    defaults: dict[str, object] | None = None,
) -> None:
    """Add the cache flags; `thresh`, `warmup`: the model's EasyCache defaults (Wan 0.05/10, HunyuanVideo
    0.025/5); `defaults`: the model's TeaCache/MagCache/PAB configs by method name (else the Wan2.1 ones)."""
    g = parser.add_argument_group("caching")
    g.add_argument(
        "--cache",
        choices=METHODS,
        default="easycache",
        help="the paper's runtime-adaptive EasyCache, a static interval, TeaCache, PAB (pyramid attention "
        "broadcast), MagCache, none (the baseline), or analyze (the baseline, recording k_t and the "
        "statistics `python -m easycache.calibrate` fits TeaCache and MagCache to)",
    )
    parser.set_defaults(method_defaults=dict(defaults or {}))
    m = parser.add_argument_group(
        "any field of any method",
        "--METHOD.FIELD VALUE sets one field of that method's config (e.g. --teacache.rel_l1_thresh 0.1, "
        "--magcache.mag_ratios calib.json, --pab.spatial_threshold 100:800); fields keep the official names",
    )
    for method in METHOD_CONFIGS:
        for name in field_names(method):
            m.add_argument(
                f"--{method}.{name}", dest=f"set:{method}.{name}", metavar="V", help=argparse.SUPPRESS
            )
    for flag, (method, name) in OFFICIAL_ALIASES.items():
        m.add_argument(f"--{flag}", dest=f"set:{method}.{name}", metavar="V", help=f"= --{method}.{name}")
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


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that an unknown --METHOD.FIELD (those flags are hidden from --help)
    is refused with the fields METHOD has."""
    args, rest = parser.parse_known_args(argv)
    for flag in rest:
        method, dot, name = flag.removeprefix("--").partition("=")[0].partition(".")
        if flag.startswith("--") and dot and method in METHOD_CONFIGS:
            cls = METHOD_CONFIGS[method]
            parser.error(
                f"{flag}: {cls.__name__} has no field {name!r} (fields: {', '.join(field_names(method))})"
            )
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def method_config(args: argparse.Namespace, method: str):
    """The config of `method` from the flags: the model's default, the classic flags, then --METHOD.FIELD."""
    if method == "static":
        cfg = StaticCacheConfig(interval=args.interval, warmup=args.warmup, compute_last=args.compute_last)
    elif method == "easycache":
        cfg = EasyCacheConfig(
            thresh=args.thresh,
            warmup=args.warmup,
            compute_last=args.compute_last,
            k_update=args.k_update,
            ema_decay=args.ema_decay,
            reuse_output=args.reuse_output,
        )
    else:
        cfg = getattr(args, "method_defaults", {}).get(method) or METHOD_CONFIGS[method]()
    cls, changes = type(cfg), {}
    for name in field_names(method):
        text = getattr(args, f"set:{method}.{name}", None)
        if text is not None:
            changes[name] = parse_value(cls, name, text)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def cache_config(args: argparse.Namespace):
    """Validate the cache flags early (before any model is loaded); None for `--cache none`."""
    if args.cache == "none":
        return None
    if args.cache == "analyze":  # τ = 0, R = 0 computes every step (bit-identical to none) and records k_t
        return AnalyzeConfig(thresh=0.0, warmup=0)
    return method_config(args, args.cache)


def make_cache(config, num_steps: int, *, timesteps=None, cost=None, **kwargs) -> StepCache | None:
    """A fresh cache for one generation (None runs the uncached baseline through the same loop).

    `timesteps`: the schedule's timesteps (PAB's windows are in timestep units); `cost`: the analytic FLOPs
    of one DiT call by part (see easycache.hooks), for the work ratio of the in-DiT caches."""
    if config is None:
        return None
    from .analyze import Analyze  # the caches import torch: only now, after the flags are checked
    from .baselines import StaticCache
    from .cache import EasyCache
    from .magcache import MagCache
    from .pab import PAB
    from .teacache import TeaCache

    if isinstance(config, AnalyzeConfig):
        return Analyze(config, num_steps, **kwargs)
    if isinstance(config, StaticCacheConfig):
        return StaticCache(config, num_steps, **kwargs)
    if isinstance(config, TeaCacheConfig):
        return TeaCache(config, num_steps, cost=cost, **kwargs)
    if isinstance(config, MagCacheConfig):
        return MagCache(config, num_steps, cost=cost, **kwargs)
    if isinstance(config, PABConfig):
        return PAB(config, num_steps, timesteps=timesteps, cost=cost, **kwargs)
    if isinstance(config, EasyCacheConfig):
        return EasyCache(config, num_steps, **kwargs)
    raise TypeError(f"not a cache config: {type(config).__name__}")


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
        "--sweep",
        action="append",
        default=[],
        metavar="METHOD.FIELD=v1,v2",
        help="--compare: run METHOD at each value of one config field, the rest as set by the flags; "
        "repeatable (each --sweep is its own series), e.g. --sweep teacache.rel_l1_thresh=0.1,0.2 "
        "--sweep easycache.k_update=local,ema --sweep pab.spatial_range=2,3",
    )
    g.add_argument(
        "--sweep-thresh",
        "--sweep_thresh",
        dest="sweep_thresh",
        type=_floats,
        default=[],
        help="--compare: EasyCache at each τ of this comma list (= --sweep easycache.thresh=...)",
    )
    g.add_argument(
        "--sweep-interval",
        "--sweep_interval",
        dest="sweep_interval",
        type=_ints,
        default=[],
        help="--compare: static caching at each interval of this comma list (= --sweep static.interval=...)",
    )
    g.add_argument(
        "--no-lpips", "--no_lpips", dest="lpips", action="store_false", help="skip LPIPS in --compare"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def compare_configs(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(label, config) of every cache `--compare` runs against the baseline: the chosen one, or the sweeps.

    A label starts with the method's name (the Pareto plot groups by it), then the swept field and value."""
    sweeps = getattr(args, "sweep", [])
    if not (args.sweep_thresh or args.sweep_interval or sweeps):
        if args.cache in ("none", "analyze"):
            raise ValueError(
                f"--compare needs a cache to compare with the baseline, not --cache {args.cache}"
            )
        return [(args.cache, cache_config(args))]
    base = method_config(args, "easycache")
    configs = [(f"easycache τ={t}", dataclasses.replace(base, thresh=t)) for t in args.sweep_thresh]
    static = StaticCacheConfig(warmup=args.warmup, compute_last=args.compute_last)
    configs += [(f"static n={n}", dataclasses.replace(static, interval=n)) for n in args.sweep_interval]
    for text in sweeps:
        method, name, values = parse_assignment(text)
        shown = [v.strip() for v in text.partition("=")[2].split(",") if v.strip()]  # as the user wrote them
        base = method_config(args, method)
        configs += [
            (f"{method} {name}={w}", dataclasses.replace(base, **{name: v})) for w, v in zip(shown, values)
        ]
    labels = [label for label, _ in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(
            f"--sweep runs a configuration twice: {sorted({x for x in labels if labels.count(x) > 1})}"
        )
    return configs


HOOKED = (TeaCacheConfig, MagCacheConfig, PABConfig)  # methods that act inside the DiT, one hook per call


def check_cache_args(args: argparse.Namespace, num_steps: int) -> None:
    """Build every config, then every cache, the run will use once, so bad values fail before any model is
    loaded: the configs first (torch-free: a bad field answers at once), then the caches (they import torch)
    for the checks against the number of steps (warm-up < steps, ...)."""
    if getattr(args, "num_seeds", 1) < 1:
        raise ValueError(f"--num-seeds must be >= 1, got {args.num_seeds}")
    configs = [cache_config(args)]
    if getattr(args, "compare", False):
        configs += [config for _, config in compare_configs(args)]
    hooked = sorted(
        {type(c).__name__.removesuffix("Config").lower() for c in configs if isinstance(c, HOOKED)}
    )
    if getattr(args, "cfg_batch", None) and hooked:  # an explicit --cfg_batch (None: the default, auto)
        raise ValueError(
            f"--cfg_batch runs cond and uncond as one DiT call, but {', '.join(hooked)} "
            f"{'act' if len(hooked) > 1 else 'acts'} inside the DiT with one hook per CFG branch, so it "
            "needs two calls: drop --cfg_batch (easycache, static and none batch the branches)"
        )
    for config in configs:
        make_cache(config, num_steps)  # PAB's timesteps come with the schedule, later


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
    import their models after parsing and checking their flags (see sample_wan.py's docstring)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return run
