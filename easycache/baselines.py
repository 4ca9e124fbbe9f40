"""Baselines behind the same three-verb interface as EasyCache, so a sample script switches with one flag."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.distributed as dist
from torch import Tensor

from .base import StepCache
from .forecast import FORECASTS


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
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"StaticCacheConfig.interval must be an int >= 1, got {self.interval!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"StaticCacheConfig.warmup (R) must be an int >= 0, got {self.warmup!r}")
        if not isinstance(self.compute_last, bool):
            raise ValueError(f"StaticCacheConfig.compute_last must be a bool, got {self.compute_last!r}")
        if self.forecast not in FORECASTS:
            raise ValueError(f"StaticCacheConfig.forecast must be one of {FORECASTS}, got {self.forecast!r}")


class StaticCache(StepCache):
    """Static-interval caching: the schedule is fixed before sampling starts; Δ is reused on skipped steps."""

    method = "static"

    def __init__(
        self,
        config: StaticCacheConfig,
        num_steps: int,
        *,
        group: dist.ProcessGroup | None = None,
        decision_group: dist.ProcessGroup | None = None,
    ):
        if not isinstance(config, StaticCacheConfig):
            raise TypeError(f"config must be a StaticCacheConfig, got {type(config).__name__}")
        super().__init__(num_steps, forecast=config.forecast, group=group, decision_group=decision_group)
        if config.warmup >= num_steps:
            raise ValueError(
                f"StaticCacheConfig.warmup (R={config.warmup}) must be smaller than the {num_steps} "
                "sampling steps"
            )
        self.config = config

    def _decide(self, step: int, x: Tensor, record: dict) -> tuple[bool, str]:
        cfg = self.config
        if step < cfg.warmup:
            return True, "warmup"
        if cfg.compute_last and step == self.num_steps - 1:
            return True, "last_step"
        if (step - cfg.warmup) % cfg.interval == 0:
            return True, "interval"
        return False, "reuse"

    @property
    def stats(self) -> dict:
        return {**super().stats, "config": asdict(self.config)}
