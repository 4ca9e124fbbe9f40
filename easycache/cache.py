"""EasyCache: skip a DiT call while the predicted change of its output stays small.

Paper: Zhou, Liang et al., "Less is Enough: Training-Free Video Diffusion Acceleration via Runtime-Adaptive
Caching", arXiv 2507.02860, Sec. 3. Authors' code: github.com/H-EmbodVis/EasyCache (the decision below
reproduces it step for step). docs/method.md states the rule, its symbols and the choices kept;
reference.py holds it as 25 plain lines.

Symbols (paper -> code), at sampling step t with i the last fully computed step and j the one before:
    x_t                      DiT input (noisy latent)                    `x`
    v_t = u(x_t | prompt)    DiT output                                  `v`
    Δ_i = v_i − x_i          transformation vector, reused on skips      `self._delta`  (base.py)
    k_i = ‖v_i − v_j‖ / ‖x_i − x_j‖   transformation rate (a chord over the skip gap)   `self.k`
    ε_t = k_i ‖x_t − x_{t−1}‖ / ‖v_i‖  predicted relative output change of one step  `eps`
    E_t = Σ_{n=i+1..t} ε_n   accumulated predicted change                 `self.acc`
    skip step t  iff  t ≥ R, t ≠ N−1, k exists and E_t < τ;  then v̂_t = x_t + Δ_i.
‖·‖ is the mean absolute value over all elements of the whole batch (the authors concatenate the samples
of a batch and take `.abs().mean()`), so one decision covers the batch and every CFG branch.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import Tensor

from .base import StepCache
from .configs import K_UPDATES, EasyCacheConfig  # noqa: F401 (re-exported: the config lives with the others)


class EasyCache(StepCache):
    """The paper's runtime-adaptive criterion; one instance per generation."""

    method = "easycache"

    def __init__(
        self,
        config: EasyCacheConfig,
        num_steps: int,
        *,
        group: dist.ProcessGroup | None = None,
        decision_group: dist.ProcessGroup | None = None,
        first_step: int = 0,
    ):
        if not isinstance(config, EasyCacheConfig):
            raise TypeError(f"config must be an EasyCacheConfig, got {type(config).__name__}")
        kw = dict(reuse_output=config.reuse_output, forecast=config.forecast, branch=config.branch)
        kw.update(group=group, first_step=first_step)
        super().__init__(num_steps, **kw, decision_group=decision_group)
        if config.warmup >= num_steps:
            raise ValueError(
                f"EasyCacheConfig.warmup (R={config.warmup}) must be smaller than the {num_steps} sampling "
                "steps, otherwise nothing can be cached"
            )
        self.config = config
        self.k: float | None = None  # k_i as used in ε (host float)
        self.acc = 0.0  # E_t
        self.integral = 0.0  # S_t (accumulate="integral")
        self.run = 0  # skipped steps in a row (max_skips)
        self._before_reset = (0.0, 0.0, 0)  # (E, S, run) before the last threshold reset
        self._num_rates = 0  # finite rates folded into k (for "mean")
        self._new_rates: list[Tensor] = []  # rates measured since the last host sync, still on the device
        self._last_v_norm: Tensor | None = None  # ‖v_i‖ of the last computed step (first branch)
        self._last_v: Tensor | None = None  # v_i (first branch), for the next chord

    def _decide(self, step: int, x: Tensor, record: dict) -> tuple[bool, str]:
        cfg = self.config
        if step < cfg.warmup or (cfg.compute_last and step == self.num_steps - 1):
            self._restart()  # warm-up and the last step always compute and reset E
            record["acc"] = 0.0
            return True, "warmup" if step < cfg.warmup else "last_step"
        # One host sync per decision: fetch ‖x_t − x_{t−1}‖, ‖v_i‖ and the rates measured since the last
        # decision together (warm-up steps never sync; their statistics stay on the device until `trace`).
        stats = [record["input_change"], self._last_v_norm, *self._new_rates]
        if any(s is None for s in stats[:2]):
            return True, "no_k"  # cannot happen after a computed step; kept for a clear trace
        values = [float(s) for s in _host(stats)]
        input_change, last_v_norm, rates = values[0], values[1], values[2:]
        record["input_change"] = input_change
        bad_rate = self._fold_rates(rates)
        record["k"] = self.k
        if self.k is None and not bad_rate:
            return True, "no_k"  # k needs two computed steps
        if bad_rate or not (math.isfinite(input_change) and math.isfinite(last_v_norm) and last_v_norm > 0):
            # A zero denominator (no input change between the two computed steps, an all-zero output) or a
            # non-finite statistic: the prediction is meaningless, so compute and start afresh.
            self._restart()
            record["note"] = "degenerate statistic: " + (
                "transformation rate is not finite"
                if bad_rate
                else f"‖v_i‖ = {last_v_norm}, ‖Δx‖ = {input_change}"
            )
            return True, "degenerate"
        eps = self.k * input_change / last_v_norm  # ε_t = k_i ‖x_t − x_{t−1}‖ / ‖v_i‖
        self.acc += eps  # E_t = E_{t−1} + ε_t
        self.integral += self.acc  # S_t = S_{t−1} + E_t (accumulate="integral")
        measure = self.acc if cfg.accumulate == "change" else self.integral
        record["eps"], record["acc"] = eps, measure
        capped = cfg.max_skips and self.run >= cfg.max_skips
        if measure < cfg.thresh and not capped:
            self.run += 1
            return False, "reuse"
        self._before_reset = (self.acc, self.integral, self.run)  # for _follow, should rank 0 have skipped
        self._restart()  # E_t ≥ τ: compute this step and restart the accumulation
        return True, "threshold" if not capped or measure >= cfg.thresh else "max_skips"

    def _restart(self) -> None:
        """A computed step: the accumulated change E, its integral S and the run of skips start from zero."""
        self.acc = self.integral = 0.0
        self.run = 0

    def _observe(self, x: Tensor, v: Tensor) -> None:
        if self._last_v is not None:
            # k = ‖v_t − v_i‖ / ‖x_t − x_i‖ between this and the previous *computed* step (the authors'
            # chord over the whole skip gap, not a one-step rate). Stays on the device until the next
            # decision.
            rate = self.mean_abs(v - self._last_v) / self.mean_abs(x - self._last_x)
            self._new_rates.append(rate)
            self._records[-1]["rate"] = rate
        self._last_v = v.detach().clone()
        self._last_v_norm = self.mean_abs(v)

    def _follow(self, compute: bool, record: dict) -> None:
        # Rank 0 computed: E restarts, as after any computed step. Rank 0 skipped: E_t stays accumulated
        # (this rank's E_t, which reached τ here, equals rank 0's but for the last bits).
        if compute:
            self._restart()
        elif record["acc"] is not None:
            self.acc, self.integral, run = self._before_reset
            self.run = run + 1

    def _fold_rates(self, rates: list[float]) -> bool:
        """Fold newly measured rates into k; True if the newest one is not finite (a zero denominator)."""
        self._new_rates = []
        bad = False
        for r in rates:
            bad = not math.isfinite(r)
            if bad:
                continue  # never let a broken rate into k; the caller forces a compute instead
            if self.k is None or self.config.k_update == "local":
                self.k = r
            elif self.config.k_update == "mean":
                self.k = (self.k * self._num_rates + r) / (self._num_rates + 1)
            else:  # "ema"
                self.k = self.config.ema_decay * self.k + (1.0 - self.config.ema_decay) * r
            self._num_rates += 1
        return bad

    @property
    def stats(self) -> dict:
        return {**super().stats, "config": asdict(self.config)}


def _host(tensors: list) -> list:
    """Fetch a list of 0-dim tensors (or floats) to the host with one synchronisation."""
    dev = [t for t in tensors if isinstance(t, Tensor)]
    if not dev:
        return tensors
    fetched = iter(torch.stack([t.detach().float().to(dev[0].device) for t in dev]).tolist())
    return [next(fetched) if isinstance(t, Tensor) else t for t in tensors]
