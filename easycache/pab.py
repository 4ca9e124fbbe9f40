"""Pyramid Attention Broadcast (PAB): reuse attention outputs across steps, with a range per attention kind.

Paper: Zhao et al., "Real-Time Video Generation with Pyramid Attention Broadcast", ICLR 2025. Official code:
NUS-HPC-AI-Lab/VideoSys (videosys/core/pab/pab_mgr.py `if_broadcast_spatial/temporal/cross`; the OpenSora
settings in videosys/pipelines/open_sora/pipeline_open_sora.py `OpenSoraPABConfig`); diffusers
hooks/pyramid_attention_broadcast.py applies the same rule to Wan and HunyuanVideo. Restated: the attention of
kind k in block l, at sampling step s with timestep t, is *broadcast* (its output at the last computed step
returned) iff

    {k}_broadcast  and  s % {k}_range != 0  and  {k}_threshold[0] < t < {k}_threshold[1]

and computed (and stored) otherwise. The step counter is per attention module in the official code, so it
equals the sampling step. Each CFG branch keeps its own stored outputs (diffusers keeps one state per module,
which mixes the branches of separate cond/uncond calls; VideoSys batches them). The MLP broadcast of
VideoSys' OpenSora config is not implemented (diffusers leaves it out too: "very limited speedup").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch
from torch import Tensor

from .configs import KINDS, PAB_OPENSORA, PABConfig  # noqa: F401 (re-exported)
from .hooks import BlockHook, HookCache


class _LayerBroadcast:
    """The `pab` a block receives: `pab(kind, fn, *args)` runs fn(*args) or returns its stored output."""

    def __init__(self, owner: PAB, hook: BlockHook, layer: int):
        self.owner, self.hook, self.layer = owner, hook, layer

    def __call__(self, kind: str, fn: Callable[..., Tensor], *args) -> Tensor:
        return self.owner._attend_eagerly(self.hook, self.layer, kind, fn, args)


class PAB(HookCache):
    """Pyramid Attention Broadcast; needs the timesteps of the schedule (`timesteps[step]` in [0, 1000])."""

    method = "pab"

    def __init__(
        self,
        config: PABConfig,
        num_steps: int,
        *,
        timesteps: Sequence[float] | None = None,
        cost=None,
        group=None,
        decision_group=None,
    ):
        if not isinstance(config, PABConfig):
            raise TypeError(f"config must be a PABConfig, got {type(config).__name__}")
        super().__init__(num_steps, cost=cost, group=group, decision_group=decision_group)
        self.config = config
        self.timesteps = None if timesteps is None else [float(t) for t in timesteps]
        if self.timesteps is not None and len(self.timesteps) != num_steps:
            raise ValueError(f"PAB got {len(self.timesteps)} timesteps for {num_steps} steps")
        self._outputs: dict[tuple[str, str, int], Tensor] = {}  # (branch, kind, layer) -> last output
        self.counts = {k: {"computed": 0, "broadcast": 0} for k in KINDS}
        self._broadcast_calls: dict[int, list[str]] = {}  # id(hook) -> kinds broadcast in that call
        # Under --compile (compiled blocks) the broadcast decision stays out of the graph, as every cache
        # decision does: traced, its step-dependent branch would recompile the blocks at every step. Marked
        # here, the block's graph breaks around the attention, which runs eagerly (computed or reused).
        # Wrapped per instance, not at import: torch.compiler.disable imports torch._dynamo (seconds).
        self._attend_eagerly = torch.compiler.disable(self._attend)

    def _decide_blocks(self, step, branch, x, probes, split=frozenset()) -> tuple[bool, str]:
        if self.timesteps is None:
            raise RuntimeError("PAB needs the schedule's timesteps: make_cache(config, steps, timesteps=...)")
        return True, "dit"  # the block stack always runs; single attentions are broadcast inside it

    def _attention(self, hook: BlockHook, layer: int) -> _LayerBroadcast:
        return _LayerBroadcast(self, hook, layer)

    def _attend(self, hook: BlockHook, layer: int, kind: str, fn, args) -> Tensor:
        if kind not in KINDS:
            raise ValueError(f"unknown attention kind {kind!r}; expected one of {KINDS}")
        key = (hook.branch, kind, layer)
        stored = self._outputs.get(key)
        if stored is not None and self.config.broadcast(kind, hook.step, self.timesteps[hook.step]):
            self.counts[kind]["broadcast"] += 1
            self._broadcast_calls.setdefault(id(hook), []).append((kind, layer))
            return stored
        out = fn(*args)
        self._outputs[key] = out
        self.counts[kind]["computed"] += 1
        return out

    def _saved(self, hook: BlockHook) -> float:
        """FLOPs of the attentions broadcast in this call; a cost entry is one number for every layer or a
        list per layer (HunyuanVideo's double and single blocks differ)."""
        saved = 0.0
        for kind, layer in self._broadcast_calls.get(id(hook), []):
            c = self.cost.get(kind, 0.0)
            saved += c[layer] if isinstance(c, (list, tuple)) else c
        return saved

    @property
    def stats(self) -> dict:
        return {**super().stats, "attention": self.counts, "config": asdict(self.config)}
