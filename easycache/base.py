"""Bookkeeping shared by every step-level cache: call order, named branches, the cached Δ, the trace.

A step-level cache sits *outside* the DiT, in the sampling loop. At every sampling step the loop asks
`should_compute(step, x)`; if the answer is True it runs the DiT and hands the output to `update(x, v)`,
otherwise it takes `reuse(x)` instead. Subclasses only implement the decision (`_decide`) and, if they
need statistics of computed steps, `_observe`.

`v` is either one tensor or a dict of named branches (e.g. {"cond": ..., "uncond": ...} for classifier-free
guidance). All branches share one decision per step; each keeps its own transformation vector Δ = v − x.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .forecast import DeltaForecast

Branches = Tensor | dict[str, Tensor]

_SINGLE = "v"  # internal branch name when the caller passes a plain tensor


class StepCache:
    """One instance serves one generation of `num_steps` sampling steps; build a new one per video."""

    method = "none"

    def __init__(
        self,
        num_steps: int,
        *,
        reuse_output: bool = False,
        forecast: str = "none",
        branch: str | None = None,
        group: dist.ProcessGroup | None = None,
        decision_group: dist.ProcessGroup | None = None,
        first_step: int = 0,
    ):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if isinstance(first_step, bool) or not isinstance(first_step, int) or not 0 <= first_step < num_steps:
            raise ValueError(f"first_step must be an int in [0, {num_steps}), got {first_step!r}")
        self.num_steps = num_steps
        self.reuse_output = reuse_output
        # Δ on skipped steps: reused as it is ("none", the paper) or forecast (easycache.forecast, issue 25)
        self._forecast = DeltaForecast(forecast) if forecast != "none" else None
        self.branch = branch  # the branch whose output the statistics read (None: the first one)
        # With a process group, every norm is reduced over all ranks, so ranks that hold different samples
        # of one batch still take the same decision (as if the whole batch were on one device).
        self.group = group
        # With a decision group (multi-GPU sequence parallelism: ranks that share every DiT call), the
        # decision of the group's first rank is broadcast and taken by all. Their statistics come from
        # identical tensors (the full latent, the gathered output), but an identical decision must not rest
        # on bit-identical float arithmetic: one rank skipping while another computes hangs the collectives.
        self.decision_group = decision_group
        # Last step decided. A cache may join a generation late (`first_step` > 0: the second expert of
        # Wan2.2, which takes over at the boundary step); steps keep their global numbers, so the warm-up
        # and the forced last step mean the same sampling steps for every expert.
        self._step = first_step - 1
        self._pending: bool | None = None  # decision of `_step` still waiting for update()/reuse()
        self._shape: torch.Size | None = None
        self._prev_x: Tensor | None = None  # input of the previous step, computed or not
        self._last_x: Tensor | None = None  # input of the last computed step
        self._delta: dict[str, Tensor] | None = None  # Δ_i = v_i − x_i per branch
        self._names: tuple[str, ...] | None = None
        self._is_dict: bool | None = None
        self._records: list[dict] = []

    # ----------------------------------------------------------------------------------------------
    # The three verbs
    # ----------------------------------------------------------------------------------------------
    def should_compute(self, step: int, x: Tensor) -> bool:
        """Decide whether sampling step `step` (0-based, consecutive) needs a full DiT call.

        Args:
            step: the sampling step; steps must come in order 0, 1, ..., num_steps − 1.
            x: the DiT input of this step (the noisy latent, before any condition is concatenated).
        Returns:
            True: run the DiT and call `update(x, v)`. False: call `reuse(x)` instead.
        """
        if self._pending is not None:
            verb = "update(x, v)" if self._pending else "reuse(x)"
            raise RuntimeError(f"step {self._step} is not finished: call {verb} before deciding step {step}")
        if step != self._step + 1:
            raise RuntimeError(
                f"steps must come in order: expected step {self._step + 1}, got {step} "
                "(build a new cache for every generation)"
            )
        if step >= self.num_steps:
            raise RuntimeError(f"step {step} is beyond the {self.num_steps} steps this cache was built for")
        if self._shape is not None and x.shape != self._shape:
            raise ValueError(f"x changed shape from {tuple(self._shape)} to {tuple(x.shape)} at step {step}")
        self._shape = x.shape
        record = {
            "step": step,
            "compute": True,
            "reason": "",
            "input_change": None,
            "k": None,
            "eps": None,
            "acc": None,
            "rate": None,
            "dit_seconds": None,
            "note": None,
        }
        if self._prev_x is not None:
            record["input_change"] = self.mean_abs(x - self._prev_x)  # ‖x_t − x_{t−1}‖, a 0-dim tensor
        record["compute"], record["reason"] = self._decide(step, x, record)
        if self.decision_group is not None:
            mine = record["compute"]
            record["compute"] = broadcast_decision(mine, self.decision_group, x.device)
            if record["compute"] != mine:  # never expected; recorded so that a trace shows it
                record["reason"] = "rank0_compute" if record["compute"] else "rank0_reuse"
                record["note"] = f"this rank decided {'compute' if mine else 'skip'}; rank 0's decision taken"
                self._follow(record["compute"], record)
        self._records.append(record)
        self._prev_x = x.detach().clone()
        self._step, self._pending = step, record["compute"]
        return record["compute"]

    def update(self, x: Tensor, v: Branches, dit_seconds: float | None = None) -> None:
        """Store the output of a fully computed step.

        Args:
            x: the same input that was passed to `should_compute` for this step.
            v: the DiT output: a tensor, or a dict of named branches (the first one drives the statistics).
            dit_seconds: optional wall time of the DiT call(s), kept in the trace.
        """
        if self._pending is not True:
            raise RuntimeError(self._misuse("update"))
        branches = self._branches(v, x)
        if self.branch is not None and self.branch not in branches:
            raise ValueError(f"the statistics read branch {self.branch!r}, but update() got {list(branches)}")
        stats_branch = self.branch if self.branch is not None else self._names[0]
        self._observe(x, branches[stats_branch])
        self._delta = {name: b - x for name, b in branches.items()}  # Δ_t = v_t − x_t
        if self._forecast is not None:
            self._forecast.push(self._step, self._delta, stats_branch)
        self._last_x = x.detach().clone()
        self._records[-1]["dit_seconds"] = dit_seconds
        self._pending = None

    def reuse(self, x: Tensor) -> Branches:
        """Approximate the DiT output of a skipped step: v̂_t = x_t + Δ_i, for every branch.

        Returns the same structure that was passed to `update` (tensor or dict with the same names).
        """
        if self._pending is not False:
            raise RuntimeError(self._misuse("reuse"))
        if self._delta is None:
            raise RuntimeError("reuse() before any update(): no transformation vector is cached yet")
        # `reuse_output` is the naive cache the paper improves on: hand back v_i itself (x_i + Δ_i).
        base = self._last_x if self.reuse_output else x
        delta = self._delta if self._forecast is None else self._forecast.at(self._step)
        out = {name: base + d for name, d in delta.items()}
        self._pending = None
        return out if self._is_dict else out[_SINGLE]

    def hook(self, branch: str):
        """The `cache=` argument of one DiT call of this step: None here (a step cache never acts inside the
        DiT); TeaCache, MagCache, PAB and the analysis mode return a hook (easycache.hooks)."""
        return None

    # ----------------------------------------------------------------------------------------------
    # Hooks for subclasses
    # ----------------------------------------------------------------------------------------------
    def _decide(self, step: int, x: Tensor, record: dict) -> tuple[bool, str]:
        raise NotImplementedError

    def _observe(self, x: Tensor, v: Tensor) -> None:
        """Called on every computed step with the first branch, before Δ and last_x are replaced."""

    def _follow(self, compute: bool, record: dict) -> None:
        """This rank decided otherwise and takes rank 0's decision `compute`: bring the decision state (e.g.
        an accumulator that a computed step resets) in line with it."""

    # ----------------------------------------------------------------------------------------------
    # Trace and statistics
    # ----------------------------------------------------------------------------------------------
    def split_group(self, split: bool) -> dist.ProcessGroup | None:
        """The group to reduce a statistic over when its tensor holds only this rank's part of the tokens
        (`split`, sequence parallelism): the decision group, the ranks that share every DiT call. None when
        the tensor is whole on every rank."""
        if not split:
            return None
        if self.decision_group is None:
            raise RuntimeError(
                f"{type(self).__name__} got tensors split over ranks (sequence parallelism) without a "
                "decision_group to reduce their statistics over"
            )
        return self.decision_group

    def mean_abs(self, t: Tensor) -> Tensor:
        """‖t‖ as the authors define it: mean |t| over every element of the whole batch (0-dim fp32)."""
        if self.group is None:
            return t.float().abs().mean()
        total = torch.stack([t.float().abs().sum(), t.new_tensor(t.numel(), dtype=torch.float32)])
        dist.all_reduce(total, group=self.group)
        return total[0] / total[1]

    @property
    def trace(self) -> list[dict]:
        """One JSON-serialisable record per decided step (non-finite statistics become None + a note)."""
        out = []
        for r in self._records:
            rec = dict(r)
            for key in ("input_change", "k", "eps", "acc", "rate"):
                val = rec[key]
                if isinstance(val, Tensor):  # statistics of warm-up steps are fetched only now: no host sync
                    val = val.item()
                if val is not None and not math.isfinite(val):
                    rec["note"] = (rec["note"] + "; " if rec["note"] else "") + f"{key} = {val}"
                    val = None
                rec[key] = val
            out.append(rec)
        return out

    @property
    def stats(self) -> dict:
        """Computed and skipped steps so far, the NFE ratio (decided steps / computed steps) and DiT time."""
        computed = [r["step"] for r in self._records if r["compute"]]
        skipped = [r["step"] for r in self._records if not r["compute"]]
        times = [r["dit_seconds"] for r in self._records if r["dit_seconds"] is not None]
        return {
            "method": self.method,
            "num_steps": self.num_steps,
            "computed_steps": computed,
            "skipped_steps": skipped,
            "num_computed": len(computed),
            "num_skipped": len(skipped),
            "nfe_ratio": len(self._records) / len(computed) if computed else None,
            # A skipped step does no DiT work at all, so the work ratio (FLOPs) equals the NFE ratio.
            "work_ratio": len(self._records) / len(computed) if computed else None,
            "dit_seconds": sum(times) if times else None,
        }

    def summary(self) -> str:
        s = self.stats
        ratio = f"{s['nfe_ratio']:.2f}x" if s["nfe_ratio"] else "n/a"
        return f"{self.method}: computed {s['num_computed']}/{len(self._records)} steps (NFE ratio {ratio})"

    # ----------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------
    def _branches(self, v: Branches, x: Tensor) -> dict[str, Tensor]:
        is_dict = isinstance(v, dict)
        branches = v if is_dict else {_SINGLE: v}
        if is_dict and not branches:
            raise ValueError("update() got an empty dict of branches")
        names = tuple(branches)
        if self._names is not None and (names != self._names or is_dict != self._is_dict):
            got = names if is_dict else "a tensor"
            want = self._names if self._is_dict else "a tensor"
            raise ValueError(f"the branches changed between computed steps: got {got}, expected {want}")
        for name, b in branches.items():
            if not isinstance(b, Tensor) or b.shape != x.shape:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(
                    f"branch {name!r} has shape {shape}, expected the shape of x {tuple(x.shape)}"
                )
        self._names, self._is_dict = names, is_dict
        return branches

    def _misuse(self, verb: str) -> str:
        if self._pending is None:
            return f"{verb}() called without a pending decision: call should_compute(step, x) first"
        want = "update(x, v)" if self._pending else "reuse(x)"
        decided = "compute" if self._pending else "skip"
        return f"step {self._step} was decided {decided}: call {want}, not {verb}()"


def broadcast_decision(compute: bool, group: dist.ProcessGroup, device: torch.device) -> bool:
    """The decision of `group`'s first rank, on every rank of it (one small broadcast per step; the tensor
    lives on `device` so that NCCL can carry it, on the CPU for gloo)."""
    device = torch.device("cpu") if dist.get_backend(group) == "gloo" else device
    flag = torch.tensor([int(compute)], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=dist.get_global_rank(group, 0), group=group)
    return bool(flag.item())
