"""The configs of every caching method: frozen dataclasses with the official field names, checked on
construction. Torch-free on purpose: the sample scripts build and check them from the command line before
they import torch or any model (so `--help` and a bad flag answer at once). Each method's module re-exports
its config (`from easycache.teacache import TeaCacheConfig` keeps working); the rule itself lives there.

    EasyCacheConfig (cache.py)   StaticCacheConfig (baselines.py)   AnalyzeConfig (analyze.py)
    TeaCacheConfig (teacache.py) MagCacheConfig (magcache.py)       PABConfig (pab.py)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .published import MAG_RATIOS

# EasyCache (cache.py): the paper's runtime-adaptive criterion, and issue 25's variants (forecast.py).
K_UPDATES = ("local", "mean", "ema")
FORECASTS = ("none", "linear", "fitted")
ACCUMULATE = ("change", "integral")


@dataclass(frozen=True)
class EasyCacheConfig:
    """Settings of the runtime-adaptive criterion; defaults are the paper's Wan2.1 setting."""

    thresh: float = 0.05
    """τ: skip while the accumulated deviation E_t stays below it (authors: `thresh`; Wan 0.05,
    HunyuanVideo 0.025). τ = 0 computes every step."""

    warmup: int = 10
    """R: the first R sampling steps are always computed (authors: `ret_steps`, counted there in forward
    calls, `10 * 2` for Wan with CFG; here in sampling steps)."""

    compute_last: bool = True
    """Always compute the last step (authors: `cutoff_steps`, the last step's calls)."""

    k_update: str = "local"
    """How k follows the rates measured at computed steps: "local" keeps the latest one (paper: k_local, the
    adopted variant; authors: `k`), "mean" averages all of them (paper: k_avg), "ema" keeps an exponential
    moving average with weight `ema_decay` on the past (paper: k_ema)."""

    ema_decay: float = 0.9
    """Weight of the past in the "ema" k update (ours: the paper does not state its value)."""

    reuse_output: bool = False
    """Ablation: on a skipped step return the last computed output v_i itself instead of x_t + Δ_i (the
    naive output cache that the transformation vector improves on; commented out in the authors' code)."""

    forecast: str = "none"
    """Variant (issue 25, not in the paper): what a skipped step adds to x_t. "none": Δ_i as it is (the
    paper); "linear": Δ extrapolated to first order from the last two computed steps (TaylorSeer's forecast
    on the whole-model Δ); "fitted": the same with a gain in [0, 1] measured at run time and at most one
    computed gap ahead (easycache/forecast.py)."""

    accumulate: str = "change"
    """What is held against τ: "change" (the paper) E_t = Σ ε_n, the predicted change of the output since
    step i; "integral" (variant) S_t = Σ_{m=i+1..t} E_m, the summed error of every output reused since step
    i, which grows with the age of the cache (each reused output's error feeds the sampler again)."""

    max_skips: int = 0
    """Variant: at most this many skipped steps in a row (MagCache's K); 0 = no cap (the paper)."""

    branch: str | None = None
    """The CFG branch whose output drives k and ‖v_i‖ (e.g. "cond", as the authors' even calls); None: the
    first branch handed to update(). All branches share the one decision per step either way."""

    def __post_init__(self):
        if self.branch is not None and (not isinstance(self.branch, str) or not self.branch):
            raise ValueError(f"EasyCacheConfig.branch must be a branch name or None, got {self.branch!r}")
        if isinstance(self.thresh, bool) or not isinstance(self.thresh, (int, float)) or not self.thresh >= 0:
            raise ValueError(f"EasyCacheConfig.thresh (τ) must be a number >= 0, got {self.thresh!r}")
        if math.isinf(self.thresh):
            raise ValueError(
                "EasyCacheConfig.thresh (τ) must be finite; use a large number to skip aggressively"
            )
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"EasyCacheConfig.warmup (R) must be an int >= 0, got {self.warmup!r}")
        if self.k_update not in K_UPDATES:
            raise ValueError(f"EasyCacheConfig.k_update must be one of {K_UPDATES}, got {self.k_update!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"EasyCacheConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.forecast not in FORECASTS:
            raise ValueError(f"EasyCacheConfig.forecast must be one of {FORECASTS}, got {self.forecast!r}")
        if self.forecast != "none" and self.reuse_output:
            raise ValueError(
                "EasyCacheConfig: forecast extrapolates Δ; it cannot be combined with reuse_output"
            )
        if self.accumulate not in ACCUMULATE:
            raise ValueError(
                f"EasyCacheConfig.accumulate must be one of {ACCUMULATE}, got {self.accumulate!r}"
            )
        if isinstance(self.max_skips, bool) or not isinstance(self.max_skips, int) or self.max_skips < 0:
            raise ValueError(f"EasyCacheConfig.max_skips must be an int >= 0, got {self.max_skips!r}")
        for name in ("compute_last", "reuse_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EasyCacheConfig.{name} must be a bool, got {getattr(self, name)!r}")


# The static-interval baseline (baselines.py).
@dataclass(frozen=True)
class StaticCacheConfig:
    """A fixed schedule: compute every `interval`-th step after a warm-up (the paper's Fig. 1b)."""

    interval: int = 2
    """n: after the warm-up, compute steps R, R+n, R+2n, ... and reuse Δ in between (n = 1 never skips)."""

    warmup: int = 10
    """R: the first R sampling steps are always computed (same meaning as EasyCacheConfig.warmup)."""

    compute_last: bool = True
    """Always compute the last step."""

    forecast: str = "none"
    """What a skipped step adds to x_t, as EasyCacheConfig.forecast (issue 25's ablation)."""

    def __post_init__(self):
        if self.forecast not in FORECASTS:
            raise ValueError(f"StaticCacheConfig.forecast must be one of {FORECASTS}, got {self.forecast!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"StaticCacheConfig.interval must be an int >= 1, got {self.interval!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"StaticCacheConfig.warmup (R) must be an int >= 0, got {self.warmup!r}")
        if not isinstance(self.compute_last, bool):
            raise ValueError(f"StaticCacheConfig.compute_last must be a bool, got {self.compute_last!r}")


# `--cache analyze` (analyze.py).
@dataclass(frozen=True)
class AnalyzeConfig(EasyCacheConfig):
    """`--cache analyze`: EasyCache at τ = 0, R = 0 (every step computed), also recording calibration data."""

    thresh: float = 0.0
    warmup: int = 0


# TeaCache (teacache.py).
# Published rescaling polynomials (np.poly1d order), fitted by the authors on 70 T2V-CompBench prompts
# (TeaCache issue #2). Source: ali-vilab/TeaCache@7c10efc, TeaCache4Wan2.1/teacache_generate.py (Wan, with
# and without --use_ret_steps), TeaCache4HunyuanVideo/teacache_sample_video.py, and
# eval/teacache/experiments/opensora.py.
COEFFICIENTS = {
    "wan-t2v-1.3B": (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
    "wan-t2v-1.3B-ret": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    "wan-t2v-14B": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    "wan-t2v-14B-ret": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    "wan-i2v-14B-480P": (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
    "wan-i2v-14B-480P-ret": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "wan-i2v-14B-720P": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
    "wan-i2v-14B-720P-ret": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
    "hunyuan-t2v-720p": (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02),
    "opensora-v1.2": (2.17546007e02, -1.18329252e02, 2.68662585e01, -4.59364272e-02, 4.84426240e-02),
}
IDENTITY = (1.0, 0.0)  # poly(d) = d: no rescaling (a model without a calibration)


@dataclass(frozen=True)
class TeaCacheConfig:
    """TeaCache knobs (official names); defaults: Wan2.1-T2V-1.3B without retention steps, τ 0.08."""

    rel_l1_thresh: float = 0.08
    """τ: skip while the accumulated rescaled distance stays below it (Wan `--teacache_thresh`: 1.3B 0.05 /
    0.08; Hunyuan 0.1 (1.6x) / 0.15 (2.1x); OpenSora 0.1 / 0.2). 0 computes every step."""

    coefficients: tuple[float, ...] = COEFFICIENTS["wan-t2v-1.3B"]
    """The rescaling polynomial, highest power first (np.poly1d); see COEFFICIENTS and easycache.calibrate."""

    ret_steps: int = 1
    """Sampling steps always computed at the start (official: `ret_steps` in calls, 1*2 for Wan, 5*2 with
    --use_ret_steps; Hunyuan and OpenSora compute step 0)."""

    compute_last: bool = True
    """Always compute the last step (official Wan: cutoff_steps = 2N − 2 calls; off with --use_ret_steps)."""

    probe: str = "e"
    """Which input the distance is measured on: Wan "e" (time embedding) or "e0" (its 6-way projection,
    official with --use_ret_steps); HunyuanVideo and OpenSora "modulated" (block 0's modulated input)."""

    branches: str = "separate"
    """"separate": each CFG branch keeps its own accumulator (official Wan, even/odd calls); a branch name
    ("cond"): that branch decides and the others follow at the same step."""

    def __post_init__(self):
        t = self.rel_l1_thresh
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"TeaCacheConfig.rel_l1_thresh must be a finite number >= 0, got {t!r}")
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        if not self.coefficients or not all(math.isfinite(c) for c in self.coefficients):
            raise ValueError(f"TeaCacheConfig.coefficients must be finite numbers, got {self.coefficients}")
        if isinstance(self.ret_steps, bool) or not isinstance(self.ret_steps, int) or self.ret_steps < 0:
            raise ValueError(f"TeaCacheConfig.ret_steps must be an int >= 0, got {self.ret_steps!r}")
        if not isinstance(self.compute_last, bool):
            raise ValueError(f"TeaCacheConfig.compute_last must be a bool, got {self.compute_last!r}")
        if not isinstance(self.probe, str) or not self.probe:
            raise ValueError(f"TeaCacheConfig.probe must be a probe name, got {self.probe!r}")


# MagCache (magcache.py).
@dataclass(frozen=True)
class MagCacheConfig:
    """MagCache knobs (official names); defaults: the official Wan2.1 script (thresh 0.12, K 2, 0.2)."""

    magcache_thresh: float = 0.12
    """δ: skip while the accumulated error stays below it (Wan 0.12; HunyuanVideo 0.24; OpenSora 0.12)."""

    magcache_K: int = 2  # noqa: N815 (the official name)
    """K: at most this many consecutive skips (Wan 2, HunyuanVideo 6, OpenSora 3)."""

    retention_ratio: float = 0.2
    """The first int(N · retention_ratio) steps are always computed."""

    mag_ratios: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(MAG_RATIOS["wan-t2v-1.3B"]))
    """{branch: γ per sampling step, γ_0 = 1 padding}; see easycache.published and easycache.calibrate."""

    branches: str = "separate"
    """"separate": each CFG branch its own accumulators and ratios (official Wan); or the name of the branch
    that decides for all (its ratios are the ones used)."""

    def __post_init__(self):
        t = self.magcache_thresh
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"MagCacheConfig.magcache_thresh must be a finite number >= 0, got {t!r}")
        k = self.magcache_K
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"MagCacheConfig.magcache_K must be an int >= 0, got {k!r}")
        r = self.retention_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"MagCacheConfig.retention_ratio must be in [0, 1], got {r!r}")
        if not isinstance(self.mag_ratios, dict) or not self.mag_ratios:
            raise ValueError("MagCacheConfig.mag_ratios must be a non-empty {branch: ratios} dict")
        ratios = {str(b): tuple(float(v) for v in vs) for b, vs in self.mag_ratios.items()}
        for b, vs in ratios.items():
            if not vs or not all(math.isfinite(v) and v > 0 for v in vs):
                raise ValueError(f"MagCacheConfig.mag_ratios[{b!r}] must be positive finite numbers")
        object.__setattr__(self, "mag_ratios", ratios)


# Pyramid Attention Broadcast (pab.py).
KINDS = ("spatial", "temporal", "cross")


@dataclass(frozen=True)
class PABConfig:
    """PAB knobs (VideoSys names). Defaults: diffusers' documented setting (spatial attention every 2nd step
    inside (100, 800)), our stand-in for the paper's PAB rows on Wan2.1 and HunyuanVideo; OpenSora:
    PAB_OPENSORA."""

    spatial_broadcast: bool = True
    spatial_threshold: tuple[float, float] = (100, 800)
    spatial_range: int = 2
    temporal_broadcast: bool = False
    temporal_threshold: tuple[float, float] = (100, 800)
    temporal_range: int = 4
    cross_broadcast: bool = False
    cross_threshold: tuple[float, float] = (100, 800)
    cross_range: int = 6

    def __post_init__(self):
        for kind in KINDS:
            on, lim, rng = (getattr(self, f"{kind}_{f}") for f in ("broadcast", "threshold", "range"))
            if not isinstance(on, bool):
                raise ValueError(f"PABConfig.{kind}_broadcast must be a bool, got {on!r}")
            if isinstance(rng, bool) or not isinstance(rng, int) or rng < 1:
                raise ValueError(f"PABConfig.{kind}_range must be an int >= 1, got {rng!r}")
            lim = tuple(float(v) for v in lim)
            if len(lim) != 2 or not lim[0] <= lim[1]:
                raise ValueError(
                    f"PABConfig.{kind}_threshold must be (low, high) with low <= high, got {lim}"
                )
            object.__setattr__(self, f"{kind}_threshold", lim)

    def broadcast(self, kind: str, step: int, timestep: float) -> bool:
        """The official rule (pab_mgr.if_broadcast_*): True = reuse the stored output."""
        low, high = getattr(self, f"{kind}_threshold")
        return (
            getattr(self, f"{kind}_broadcast")
            and step % getattr(self, f"{kind}_range") != 0
            and low < timestep < high
        )


# VideoSys' OpenSora 1.2 setting (OpenSoraPABConfig; its MLP broadcast is left out, see pab.py).
PAB_OPENSORA = PABConfig(
    spatial_broadcast=True, spatial_threshold=(450, 930), spatial_range=2,
    temporal_broadcast=True, temporal_threshold=(450, 930), temporal_range=4,
    cross_broadcast=True, cross_threshold=(450, 930), cross_range=6,
)  # fmt: skip
