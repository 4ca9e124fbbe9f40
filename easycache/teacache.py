"""TeaCache: skip the DiT's block stack while the rescaled change of its timestep-modulated input stays small.

Paper: Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", CVPR 2025.
Official code: github.com/ali-vilab/TeaCache (TeaCache4Wan2.1/teacache_generate.py `teacache_forward`,
TeaCache4HunyuanVideo/teacache_sample_video.py, eval/teacache/experiments/opensora.py). Restated per branch b
at sampling step t, with p_t the probe (Wan: the time embedding `e`, or `e0` with use_ret_steps; HunyuanVideo
and OpenSora: block 0's modulated, normalised image tokens):

    d_t = mean|p_t − p_{t−1}| / mean|p_{t−1}|          relative L1 change (p_{t−1}: previous step, any)
    A_t = A_{t−1} + poly(d_t)                          poly = np.poly1d(coefficients), highest power first
    compute if t < ret_steps, or t is the last step (compute_last), or A_t ≥ rel_l1_thresh (then A_t = 0);
    otherwise the block stack is skipped: x_out = x_in + (x_out − x_in) of the last computed call.

Wan keeps one accumulator per CFG branch (the official even/odd calls): branches="separate".
"""

from __future__ import annotations

from dataclasses import asdict

from torch import Tensor

from .configs import COEFFICIENTS, IDENTITY, TeaCacheConfig  # noqa: F401 (re-exported)
from .hooks import HookCache, rel_l1


def poly(coefficients: tuple[float, ...], d: float) -> float:
    """np.poly1d(coefficients)(d) by Horner's rule (highest power first)."""
    out = 0.0
    for c in coefficients:
        out = out * d + c
    return out


class TeaCache(HookCache):
    """TeaCache's decision, per CFG branch; one instance per generation."""

    method = "teacache"

    def __init__(self, config: TeaCacheConfig, num_steps: int, *, cost=None, group=None, decision_group=None):
        if not isinstance(config, TeaCacheConfig):
            raise TypeError(f"config must be a TeaCacheConfig, got {type(config).__name__}")
        kw = dict(branches=config.branches, cost=cost, group=group, decision_group=decision_group)
        super().__init__(num_steps, **kw)
        if config.ret_steps >= num_steps:
            raise ValueError(f"TeaCacheConfig.ret_steps ({config.ret_steps}) must be < the {num_steps} steps")
        self.config = config
        self.acc: dict[str, float] = {}  # branch -> accumulated rescaled distance A_t
        self._prev_probe: dict[str, Tensor] = {}  # branch -> p_{t−1}

    def _probe(self, probes: dict[str, Tensor]) -> Tensor:
        if self.config.probe not in probes:
            raise ValueError(
                f"TeaCacheConfig.probe={self.config.probe!r}, but this DiT offers {sorted(probes)} "
                "(Wan: e, e0; HunyuanVideo, OpenSora: modulated)"
            )
        return probes[self.config.probe]

    def _decide_blocks(self, step, branch, x, probes, split=frozenset()) -> tuple[bool, str]:
        cfg, p = self.config, self._probe(probes)
        prev = self._prev_probe.get(branch)
        self._prev_probe[branch] = p.detach().clone()
        rec = self._records[-1]
        if step < cfg.ret_steps or (cfg.compute_last and step == self.num_steps - 1) or prev is None:
            self.acc[branch] = 0.0
            return True, "warmup" if step < cfg.ret_steps or prev is None else "last_step"
        # One host sync per call, as the official `.cpu().item()`. Under sequence parallelism a token-wise
        # probe (HunyuanVideo's "modulated") is this rank's part: its sums are reduced over the ranks, so d is
        # the whole tensor's, as in one process.
        d = rel_l1(p, prev, self.split_group(cfg.probe in split))
        self.acc[branch] = self.acc.get(branch, 0.0) + poly(cfg.coefficients, d)
        rec.setdefault("rel_l1", {})[branch] = d
        rec.setdefault("acc_by_branch", {})[branch] = self.acc[branch]
        # A fitted polynomial can be negative for small d, and the official `acc < thresh` would then skip
        # even at τ = 0; here τ = 0 means "never skip" (bit-identical to no cache), as documented.
        if cfg.rel_l1_thresh > 0 and self.acc[branch] < cfg.rel_l1_thresh:
            return False, "reuse"
        self.acc[branch] = 0.0
        return True, "threshold"

    def _follow_blocks(self, branch: str, compute: bool) -> None:
        # Rank 0 computed: A restarts. Rank 0 skipped: A_t stays accumulated (this rank's, recorded before it
        # reached τ and was reset, equals rank 0's but for the last bits).
        acc = self._records[-1].get("acc_by_branch", {}).get(branch)
        self.acc[branch] = 0.0 if compute or acc is None else acc

    def _observe_probes(self, step, branch, probes) -> None:
        self._prev_probe[branch] = self._probe(probes).detach().clone()

    @property
    def stats(self) -> dict:
        return {**super().stats, "config": asdict(self.config)}
