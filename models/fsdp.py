"""FSDP2 sharding of a loaded model for multi-GPU inference (`--dit_fsdp`, `--t5_fsdp`).

Each rank keeps 1/N of every parameter (dim-0 chunks) and all-gathers one unit (a DiT block, a T5 block)
just before it runs, freeing the gathered copy right after. The official Wan code does the same with FSDP1
per attention block (`wan/distributed/fsdp.py`), whose `sync_module_states=True` refuses CPU parameters;
FSDP2's `fully_shard` runs on gloo/CPU as on NCCL/GPU, and is bitwise equal to the unsharded model there.

FSDP2 all-gathers a unit's parameters as one flat buffer of one dtype, while our half-precision models keep
fp32 islands (norms, modulation tables, time embedding: see models.wan.fp32_island_keys). So every unit is
split by dtype: its half-precision leaf modules form one group, the rest (fp32) stays with the unit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def shard_model(model: nn.Module, units: Iterable[nn.Module]) -> nn.Module:
    """Shard `model` in place over all ranks of the default process group: each of `units` (e.g. the DiT
    blocks, in forward order) is one all-gather unit, and the root holds what is left (embeddings, head).
    Parameters stay in their dtype; the forward is unchanged. Returns `model`."""
    for unit in units:
        _shard_by_dtype(unit)
    _shard_by_dtype(model)
    return model


def _shard_by_dtype(unit: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    groups: dict[torch.dtype, list[nn.Module]] = {}

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, FSDPModule):  # an inner unit, sharded already
                continue
            own = list(child.parameters(recurse=False))
            if own:
                groups.setdefault(own[0].dtype, []).append(child)
            visit(child)

    visit(unit)
    dtypes = set(groups) | {p.dtype for p in unit.parameters(recurse=False)}
    # One dtype: the unit is one group. Mixed: fp32 (the islands) stays with the unit itself, and each other
    # dtype becomes its own group of leaf modules (the Linear/Conv weights of the half-precision model).
    for dtype, modules in groups.items():
        if len(dtypes) > 1 and dtype != torch.float32:
            mixed = [m for m in modules if any(p.dtype != dtype for p in m.parameters(recurse=False))]
            if mixed:
                raise ValueError(f"cannot shard {type(mixed[0]).__name__}: its parameters mix dtypes")
            fully_shard(modules, reshard_after_forward=True)
    # reshard_after_forward=True given explicitly: FSDP2 otherwise keeps the *root's* parameters gathered
    # after a forward (a heuristic for training, whose backward needs them at once); for inference every rank
    # then keeps holding the whole embeddings and head. Explicit, each rank holds 1/N between calls.
    fully_shard(unit, reshard_after_forward=True)


def sharded_fraction(model: nn.Module) -> float:
    """Elements this rank holds / elements of the full model (1/N for a fully sharded model)."""
    from torch.distributed.tensor import DTensor

    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


def load_sharded(
    model: nn.Module,
    units: Iterable[nn.Module],
    tensors: Iterable[tuple[str, object]],
    *,
    device: torch.device | str,
    source: str = "checkpoint",
) -> nn.Module:
    """Shard `model` as `shard_model` does and fill it from a checkpoint, each rank reading and holding only
    its 1/N of every parameter: the whole model never exists on any rank, in host or device memory.

    Args:
        model: built on the meta device with every parameter already in its final dtype (FSDP2 groups the
            parameters by dtype when it shards; see `shard_model`), and its keys checked against the
            checkpoint (models.loading.check_shapes).
        units: as in `shard_model` (e.g. the DiT blocks).
        tensors: (key, rows) pairs, one per state-dict key, where `rows[a:b]` gives rows a..b (dim 0) of
            the full tensor in any dtype (a safetensors slice: models.loading.stream_safetensors_slices).
        device: where each rank's shard lives (its GPU; "cpu" under gloo).
    FSDP2 splits dim 0 into torch.chunk pieces (rank r: rows r·c .. (r+1)·c, c = ceil(rows / N)), so rank r
    reads exactly those rows and copies them into its local shard; the cast happens in that copy, element by
    element, so the result is bitwise the unsharded load's shard. Buffers are not supported (the Wan DiT has
    none): a model with buffers is refused.
    """
    from torch.distributed.tensor import DTensor, Shard

    if any(True for _ in model.buffers()):
        raise ValueError(f"load_sharded: {type(model).__name__} has buffers, which it does not load")
    shard_model(model, units)
    model.to_empty(device=device)  # allocates this rank's shards only (uninitialised)
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for key, rows in tensors:
            if key not in params:
                raise ValueError(f"{source}: unexpected key {key} (the keys must be checked before loading)")
            param = params[key]
            if isinstance(param, DTensor):
                if tuple(param.placements) != (Shard(0),):
                    raise ValueError(f"{key}: expected FSDP2's dim-0 sharding, got {param.placements}")
                local = param.to_local()  # [ceil(rows / N) or fewer, ...], this rank's chunk
                chunk = -(-param.shape[0] // param.device_mesh.size())
                start = min(param.device_mesh.get_local_rank() * chunk, param.shape[0])
                local.copy_(rows[start : start + local.shape[0]])
            else:
                param.copy_(rows[:])
            seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} keys: {missing[:10]}")
    return model
