"""The command-line flags of models/ that the sample scripts share (the GPU speed path), torch-free: a
script parses and checks its flags before it imports torch or any model, so that `--help` and a bad flag
answer at once. What the flags do lives in models/fast.py (batched CFG, compile) and models/attention.py.
"""

from __future__ import annotations

import argparse

BACKENDS = ("auto", "sdpa", "flash", "sage")  # --attention (models.attention.attention's backends)


def add_speed_args(parser: argparse.ArgumentParser, *, cfg_batch: bool = True) -> None:
    """Add --compile, --attention and (for models with true CFG) --cfg_batch; dash spellings are accepted too
    (HunyuanVideo's official flags use dashes, Wan's underscores)."""
    g = parser.add_argument_group("speed (GPU path)")
    if cfg_batch:
        g.add_argument(
            "--cfg_batch",
            "--cfg-batch",
            dest="cfg_batch",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="run the cond and uncond CFG branches as one batch-2 DiT call (default: on on CUDA, off on "
            "the CPU); the cache still sees the two named branches. teacache, magcache and pab always "
            "make two calls (their hooks act per branch)",
        )
    g.add_argument(
        "--compile", action="store_true", help="torch.compile each DiT block once (first step slow)"
    )
    g.add_argument(
        "--attention",
        choices=BACKENDS,
        default="auto",
        help="attention kernel: flash-attn when installed, else SDPA (auto); sdpa; flash; sage (approximate)",
    )


def add_device_arg(parser: argparse.ArgumentParser, **kwargs) -> None:
    """--device; its default (cuda when available, else cpu) is resolved after parsing (models.fast
    .default_device), since asking needs torch."""
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)", **kwargs)
