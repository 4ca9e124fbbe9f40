"""Baselines behind the same three-verb interface as EasyCache, so a sample script switches with one flag."""

from __future__ import annotations

from dataclasses import asdict

import torch.distributed as dist
from torch import Tensor

from .base import StepCache
from .configs import StaticCacheConfig


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
