"""The GPU speed path that the sample scripts share: batched CFG, torch.compile of the blocks, attention.

    --cfg_batch / --no-cfg_batch   cond and uncond as ONE batch-2 DiT call per computed step (default: on on
                                   CUDA, off on the CPU; see cfg_batch_default)
    --compile                      torch.compile every DiT block once (compile_blocks)
    --attention {auto,sdpa,flash,sage}   the attention kernel (models.attention)

The cache never enters the compiled region: the sample loop decides (`cache.should_compute`) in eager Python
and only the transformer blocks are compiled, so a skipped step runs no compiled code at all and a computed
step runs the same compiled blocks as every other step (tests/test_fast.py counts the compiled frames).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from models.attention import check_backend, flash_attn_module, sage_attn_module
from models.flags import add_speed_args  # noqa: F401 (re-exported; defined torch-free for parsing)


def default_device() -> str:
    """The --device default, resolved after parsing: cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cfg_batch_default(device: torch.device | str) -> bool:
    """Batched CFG by default on CUDA only. On a GPU a batch-2 call does the same FLOPs in half the kernel
    launches and with twice the rows per GEMM (a reasoned choice, not yet measured: benchmarks/gpu_check.py
    measures it). On the CPU the demo-size model is a little faster batched too (README), but the default
    stays two calls there so that every earlier CPU result, report and test stays bit-identical."""
    return torch.device(device).type == "cuda"


def check_speed_args(args: argparse.Namespace, device: torch.device | str, dtype: torch.dtype) -> None:
    """Resolve the --cfg_batch default and refuse an attention kernel that cannot run (before loading)."""
    if getattr(args, "cfg_batch", False) is None:
        args.cfg_batch = cfg_batch_default(device)
    check_backend(args.attention, device, dtype)


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """torch.compile every block of the model's top-level block lists in place (`nn.Module.compile`), the
    per-block pattern: all blocks of one kind share one compiled graph (their weights are graph inputs), so
    a 30-block model compiles once per block kind and input shape, not 30 times, and the embeddings, RoPE
    tables and head stay eager. `options` go to torch.compile (e.g. backend="aot_eager" in the tests)."""
    lists = [m for m in model.children() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no block list (nn.ModuleList) to compile")
    # Look the optional kernel packages up once now: an import inside traced code would break the graph.
    flash_attn_module(), sage_attn_module()
    for blocks in lists:
        for block in blocks:
            block.compile(**options)
    return model
