"""Caches that act *inside* the DiT call: TeaCache and MagCache skip the block stack, PAB single attentions.

They keep the three verbs of `StepCache` so the sampling loop stays the same, but `should_compute` is always
True (the DiT runs at every step: the patch embedding and the head are never skipped) and the loop hands the
DiT one hook per call, `cache.hook(branch)`, as its explicit `cache=` argument. The DiT forward calls the hook
at two visible places, with no monkeypatching:

    if cache is not None and not cache.compute_blocks(x, probes):     # before the block stack
        x = cache.reuse_blocks(x)                                     #   x + the cached residual
    else:
        x_in = x
        for i, block in enumerate(blocks):
            x = block(..., pab=cache.attention(i) if cache is not None else None)
        if cache is not None:
            cache.store_blocks(x_in, x)                               #   residual = x_out − x_in

`probes` are the named tensors a decision may measure (Wan: the time embeddings "e" and "e0"; HunyuanVideo
and OpenSora: "modulated", block 0's modulated, normalised image tokens), as the official TeaCache reads them.
`attention(i)` returns None or a callable `pab(kind, fn, *args)` that runs `fn(*args)` or returns its output
from an earlier step (Pyramid Attention Broadcast); kind is "spatial", "temporal" or "cross".

Every (step, branch) call is recorded, so `stats` count DiT calls whose block stack ran (NFE) and, given the
analytic cost of one call, the work ratio (baseline FLOPs / FLOPs spent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .base import StepCache, broadcast_decision


def rel_l1(cur: Tensor, prev: Tensor, group: dist.ProcessGroup | None = None) -> float:
    """‖cur − prev‖₁ / ‖prev‖₁ with ‖·‖ the mean absolute value over the whole tensor (official TeaCache).

    With `group`, `cur` and `prev` are this rank's part of the tokens (sequence parallelism): both sums are
    all-reduced over the group first (fp32), so every rank gets the value of the whole tensors, as one process
    would (up to the order of the sums), and the same value on every rank."""
    if group is None:
        return ((cur - prev).abs().mean() / prev.abs().mean()).item()
    sums = torch.stack([(cur - prev).float().abs().sum(), prev.float().abs().sum()])  # [2]
    dist.all_reduce(sums, group=group)
    return (sums[0] / sums[1]).item()


class BlockHook:
    """What the DiT forward receives as `cache=`: the hook of one (step, branch) DiT call."""

    def __init__(self, owner: HookCache, step: int, branch: str):
        self.owner, self.step, self.branch = owner, step, branch
        self.ran_blocks: bool | None = None  # set by compute_blocks

    def compute_blocks(self, x: Tensor, probes: dict[str, Tensor], split: Iterable[str] = ()) -> bool:
        """True: run the block stack and call `store_blocks`; False: call `reuse_blocks` instead.

        `split`: under sequence parallelism, the names of the probes that hold only this rank's part of the
        tokens (HunyuanVideo's "modulated"; not Wan's time embeddings, which every rank holds whole), and
        "x" when x does; their statistics are reduced over the cache's decision group (easycache.base)."""
        if self.ran_blocks is not None:
            raise RuntimeError(
                f"the hook of step {self.step} ({self.branch}) was already used: one per DiT call"
            )
        split = frozenset(split)
        if split - set(probes) - {"x"}:
            raise ValueError(f"split names {sorted(split - set(probes) - {'x'})}, which are not probes")
        self.ran_blocks = self.owner._compute_blocks(self.step, self.branch, x, probes, split)
        self.owner._calls.append(self)
        return self.ran_blocks

    def reuse_blocks(self, x: Tensor) -> Tensor:
        if self.ran_blocks is not False:
            raise RuntimeError("reuse_blocks() without a skip decision from compute_blocks()")
        residual = self.owner._residual.get(self.branch)
        if residual is None or residual.shape != x.shape:
            raise RuntimeError(
                f"no cached block-stack residual of shape {tuple(x.shape)} for {self.branch!r}"
            )
        return x + residual  # x after the embeddings + (x_out − x_in) of the last computed call

    def store_blocks(self, x_in: Tensor, x_out: Tensor) -> None:
        if self.ran_blocks is not True:
            raise RuntimeError("store_blocks() without a compute decision from compute_blocks()")
        self.owner._store(self.step, self.branch, x_in, x_out)

    def attention(self, layer: int) -> Callable | None:
        """PAB: the broadcaster of block `layer`; None for the methods that never skip single attentions."""
        return self.owner._attention(self, layer)


class HookCache(StepCache):
    """Base of the in-DiT caches: every step runs the DiT; the per-call hooks decide what runs inside."""

    method = "hook"

    def __init__(
        self,
        num_steps: int,
        *,
        branches: str = "separate",
        cost: dict[str, float] | None = None,
        group=None,
        decision_group=None,
    ):
        super().__init__(num_steps, group=group, decision_group=decision_group)
        if not isinstance(branches, str) or not branches:
            raise ValueError(f"branches must be 'separate' or a branch name, got {branches!r}")
        self.branches = branches
        # Analytic FLOPs of one DiT call: "call" (all of it), "blocks" (the block stack), and per layer
        # "spatial" / "temporal" / "cross" attention (one number, or a list by layer); without it the work
        # ratio is not reported.
        self.cost = cost
        self._residual: dict[str, Tensor] = {}  # branch -> x_out − x_in of its last computed block stack
        self._calls: list[BlockHook] = []  # every hook that decided, in order
        self._decided: dict[tuple[int, str], bool] = {}  # (step, branch) -> ran the blocks

    # ----------------------------------------------------------------------------------------------
    def _decide(self, step: int, x: Tensor, record: dict) -> tuple[bool, str]:
        record["branches"] = {}
        return True, "dit"  # the DiT runs every step; its hooks decide inside

    def hook(self, branch: str) -> BlockHook:
        """The `cache=` argument of one DiT call of the current step (`branch`: "cond", "uncond", ...)."""
        if self._pending is not True:
            raise RuntimeError("hook() must be taken after should_compute(step, x) and before update()")
        if (self._step, branch) in self._decided:
            raise RuntimeError(f"step {self._step} already has a hook for branch {branch!r}")
        return BlockHook(self, self._step, branch)

    def _compute_blocks(
        self,
        step: int,
        branch: str,
        x: Tensor,
        probes: dict[str, Tensor],
        split: frozenset[str] = frozenset(),
    ) -> bool:
        if step != self._step or self._pending is not True:
            raise RuntimeError(f"a hook of step {step} was used after its step was finished")
        if self.branches != "separate" and branch != self.branches:
            leader = self._decided.get((step, self.branches))
            if leader is None:
                raise RuntimeError(
                    f"branches={self.branches!r}: the {self.branches!r} call must come before {branch!r} in "
                    f"step {step}"
                )
            compute, reason = leader, "follows " + self.branches
            self._observe_probes(step, branch, probes)
        else:
            compute, reason = self._decide_blocks(step, branch, x, probes, split)
            if self.decision_group is not None:  # rank 0's decision, as StepCache.should_compute does
                mine = compute
                compute = broadcast_decision(mine, self.decision_group, x.device)
                if compute != mine:  # never expected; recorded so that a trace shows it
                    reason = "rank0_compute" if compute else "rank0_reuse"
                    self._follow_blocks(branch, compute)
        if not compute and branch not in self._residual:
            compute, reason = True, "no_residual"
        self._decided[(step, branch)] = compute
        self._records[-1]["branches"][branch] = "compute" if compute else "reuse"
        self._records[-1].setdefault("branch_reasons", {})[branch] = reason
        return compute

    def _store(self, step: int, branch: str, x_in: Tensor, x_out: Tensor) -> None:
        self._residual[branch] = x_out - x_in

    def _attention(self, hook: BlockHook, layer: int) -> Callable | None:
        return None

    # Subclasses: the decision of one branch at one step (and the probe bookkeeping of a follower).
    def _decide_blocks(
        self,
        step: int,
        branch: str,
        x: Tensor,
        probes: dict[str, Tensor],
        split: frozenset[str] = frozenset(),
    ) -> tuple[bool, str]:
        """`split`: the probes that hold only this rank's tokens (reduce their statistics over
        `self.split_group(...)`)."""
        raise NotImplementedError

    def _follow_blocks(self, branch: str, compute: bool) -> None:
        """This rank decided otherwise for `branch` and takes rank 0's decision: align the accumulators."""

    def _observe_probes(self, step: int, branch: str, probes: dict[str, Tensor]) -> None:
        """A follower branch still sees its probes (TeaCache keeps its previous input up to date)."""

    # ----------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        s = super().stats
        calls = self._calls
        ran = [h for h in calls if h.ran_blocks]
        steps_ran = sorted({h.step for h in ran})
        s.update(
            computed_steps=steps_ran,
            skipped_steps=[r["step"] for r in self._records if r["step"] not in set(steps_ran)],
            num_computed=len(steps_ran),
            num_skipped=len(self._records) - len(steps_ran),
            dit_calls=len(calls),
            block_calls=len(ran),  # NFE: DiT calls whose block stack ran (a skipped one is embed + head only)
            nfe_ratio=len(calls) / len(ran) if ran else None,
            work_ratio=self.work_ratio(),
            branches=self.branches,
        )
        return s

    def work_ratio(self) -> float | None:
        """Baseline FLOPs / FLOPs spent, from the analytic cost of one call (None without `cost`)."""
        if not self.cost or not self._calls:
            return None
        spent = sum(self.cost["call"] - self._saved(h) for h in self._calls)
        return len(self._calls) * self.cost["call"] / spent if spent > 0 else None

    def _saved(self, hook: BlockHook) -> float:
        """FLOPs this call did not spend: the whole block stack when it was skipped."""
        return 0.0 if hook.ran_blocks else self.cost["blocks"]


def nearest_interp(values: Sequence[float], length: int) -> list[float]:
    """Resample a per-step table to `length` steps by nearest index (official MagCache `nearest_interp`)."""
    values = list(values)
    if length == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (length - 1)
    # np.round rounds half to even; torch.round does the same, so the indices match the official ones.
    idx = torch.round(torch.arange(length, dtype=torch.float64) * scale).long().tolist()
    return [values[i] for i in idx]
