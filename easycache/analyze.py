"""`--cache analyze`: the uncached run (every step computed, bit-identical to --cache none) that records k_t
and the statistics `python -m easycache.calibrate` fits TeaCache's polynomial and MagCache's ratios to."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from .cache import EasyCache
from .configs import AnalyzeConfig
from .hooks import rel_l1


class _RecordingHook:
    """The `cache=` hook of one analysis call: always computes, records the probes and the residual."""

    def __init__(self, owner: Analyze, branch: str):
        self.owner, self.branch = owner, branch
        self.split: frozenset[str] = frozenset()

    def compute_blocks(self, x: Tensor, probes: dict[str, Tensor], split: Iterable[str] = ()) -> bool:
        # `split` (sequence parallelism): what holds only this rank's tokens; see easycache.hooks.BlockHook.
        self.split = frozenset(split)
        prev = self.owner._prev_probes.get(self.branch, {})
        self.owner._calib(self.branch)["probe_rel_l1"] = {
            k: rel_l1(p, prev[k], self.owner.split_group(k in self.split))
            for k, p in probes.items()
            if k in prev
        }
        self.owner._prev_probes[self.branch] = {k: p.detach().clone() for k, p in probes.items()}
        return True

    def reuse_blocks(self, x: Tensor) -> Tensor:
        raise RuntimeError("the analysis mode never skips the block stack")

    def store_blocks(self, x_in: Tensor, x_out: Tensor) -> None:
        r = (x_out - x_in).float()  # [B, L, D]
        prev = self.owner._prev_residual.get(self.branch)
        if prev is not None and prev.shape == r.shape:
            # official: (residual.norm(dim=-1) / previous.norm(dim=-1)).mean(), over every token
            ratios = r.norm(dim=-1) / prev.norm(dim=-1)  # [B, L] (L: this rank's tokens when split)
            group = self.owner.split_group("x" in self.split)
            if group is None:
                mag = ratios.mean().item()
            else:  # the mean over all ranks' tokens: sum and count reduced, identical on every rank
                sums = torch.stack([ratios.sum(), ratios.new_tensor(ratios.numel())])
                dist.all_reduce(sums, group=group)
                mag = (sums[0] / sums[1]).item()
            self.owner._calib(self.branch)["mag_ratio"] = mag
        self.owner._prev_residual[self.branch] = r

    def attention(self, layer: int) -> None:
        return None


class Analyze(EasyCache):
    """The analysis mode: the uncached run with k_t and the TeaCache/MagCache calibration statistics."""

    def __init__(self, config: AnalyzeConfig, num_steps: int, **kwargs):
        super().__init__(config, num_steps, **kwargs)
        self._prev_probes: dict[str, dict[str, Tensor]] = {}
        self._prev_residual: dict[str, Tensor] = {}
        self._prev_out: dict[str, Tensor] = {}

    def hook(self, branch: str) -> _RecordingHook:
        return _RecordingHook(self, branch)

    def _calib(self, branch: str) -> dict:
        return self._records[-1].setdefault("calib", {}).setdefault(branch, {})

    def update(self, x: Tensor, v, dit_seconds: float | None = None) -> None:
        super().update(x, v, dit_seconds)
        for name, out in v.items() if isinstance(v, dict) else [("v", v)]:
            if name in self._prev_out:
                self._calib(name)["out_rel_l1"] = rel_l1(out, self._prev_out[name])
            self._prev_out[name] = out.detach().clone()
