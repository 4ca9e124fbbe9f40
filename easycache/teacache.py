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

import math
from dataclasses import asdict, dataclass

from torch import Tensor

from .hooks import HookCache, rel_l1

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
