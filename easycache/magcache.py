"""MagCache: skip the block stack while the accumulated magnitude-ratio error of its residual stays small.

Paper: Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache", NeurIPS 2025. Official code:
github.com/Zehong-Ma/MagCache (MagCache4Wan2.1/magcache_generate.py `magcache_forward`, lines 277-300).
Restated per branch b at sampling step t, with γ_t the calibrated ratio ‖r_t‖ / ‖r_{t−1}‖ of consecutive
block-stack residuals (mean over tokens of the per-token L2 norms, recorded once from one prompt):

    if t ≥ int(N · retention_ratio):
        R ← R · γ_t;  n ← n + 1;  E ← E + |1 − R|
        skip if E < magcache_thresh and n ≤ magcache_K     (reuse the last residual)
        else R, n, E ← 1, 0, 0 and compute
    otherwise compute.

The ratios are fixed per model, so the schedule is the same for every prompt (MagCache#32). Tables of other
lengths are resampled by nearest index (official `nearest_interp`).
"""

from __future__ import annotations

from dataclasses import asdict

from torch import Tensor

from .configs import MagCacheConfig
from .hooks import HookCache, nearest_interp


class MagCache(HookCache):
    """MagCache's decision, per CFG branch; one instance per generation."""

    method = "magcache"

    def __init__(self, config: MagCacheConfig, num_steps: int, *, cost=None, group=None, decision_group=None):
        if not isinstance(config, MagCacheConfig):
            raise TypeError(f"config must be a MagCacheConfig, got {type(config).__name__}")
        kw = dict(branches=config.branches, cost=cost, group=group, decision_group=decision_group)
        super().__init__(num_steps, **kw)
        if config.branches != "separate" and config.branches not in config.mag_ratios:
            raise ValueError(
                f"MagCacheConfig.branches={config.branches!r} has no ratios ({sorted(config.mag_ratios)})"
            )
        self.config = config
        self.retained = int(num_steps * config.retention_ratio)  # official int(num_steps * retention_ratio)
        # Resample each table to this run's step count (official: nearest interpolation when lengths differ).
        self.ratios = {
            b: vs if len(vs) == num_steps else tuple(nearest_interp(vs, num_steps))
            for b, vs in config.mag_ratios.items()
        }
        self.acc_ratio: dict[str, float] = {}
        self.acc_err: dict[str, float] = {}
        self.acc_steps: dict[str, int] = {}
        self._before_reset: tuple[float, int, float] | None = None  # this call's accumulators before a reset

    def _decide_blocks(
        self, step: int, branch: str, x: Tensor, probes, split=frozenset()
    ) -> tuple[bool, str]:
        # The decision reads only the calibrated ratios and the step, no tensor statistic: the same on every
        # rank and under any layout (rank 0's is still the one taken, see HookCache).
        self._before_reset = None
        if branch not in self.ratios:
            raise ValueError(
                f"MagCache has no ratios for branch {branch!r} (have {sorted(self.ratios)}); calibrate them "
                "with `--cache analyze` and `python -m easycache.calibrate`, or set branches to one that has"
            )
        if step < self.retained:
            return True, "warmup"
        cfg = self.config
        self.acc_ratio[branch] = self.acc_ratio.get(branch, 1.0) * self.ratios[branch][step]
        self.acc_steps[branch] = self.acc_steps.get(branch, 0) + 1
        self.acc_err[branch] = self.acc_err.get(branch, 0.0) + abs(1.0 - self.acc_ratio[branch])
        rec = self._records[-1]
        rec.setdefault("acc_by_branch", {})[branch] = self.acc_err[branch]
        if self.acc_err[branch] < cfg.magcache_thresh and self.acc_steps[branch] <= cfg.magcache_K:
            return False, "reuse"
        self._before_reset = (self.acc_ratio[branch], self.acc_steps[branch], self.acc_err[branch])
        self.acc_ratio[branch], self.acc_steps[branch], self.acc_err[branch] = 1.0, 0, 0.0
        return True, "threshold"

    def _follow_blocks(self, branch: str, compute: bool) -> None:
        if compute:  # rank 0 computed: restart, as after any computed call
            self.acc_ratio[branch], self.acc_steps[branch], self.acc_err[branch] = 1.0, 0, 0.0
        elif self._before_reset is not None:  # rank 0 skipped: undo this rank's reset
            self.acc_ratio[branch], self.acc_steps[branch], self.acc_err[branch] = self._before_reset

    @property
    def stats(self) -> dict:
        return {**super().stats, "config": asdict(self.config)}
