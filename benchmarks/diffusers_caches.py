"""EasyCache next to diffusers' own MagCache and FirstBlockCache, all on one diffusers WanPipeline.

    python -m benchmarks.diffusers_caches              # the demo model, 4 captions x 1 seed, 50 steps
    python -m benchmarks.diffusers_caches --task t2v-1.3B --ckpt_dir DIR --size 832*480 --device cuda

The pipeline is the official-layout checkpoint converted by `models.wan_diffusers` (official σ's). Every
method runs the same prompts and seeds as the uncached pipeline, in this process, and is measured against it:
  full calls  transformer calls that ran the whole block stack / the baseline's (EasyCache and MagCache skip
              the whole stack, FirstBlockCache always runs block 0), counted below the caches (last block);
  blocks      block executions / the baseline's (the work ratio);
  PSNR        on the decoded 8-bit videos, global MSE (the authors' convention) and the per-frame mean;
  time        wall-clock ratio baseline / method, end to end (CPU numbers are ratios only).
MagCache needs per-model magnitude ratios: they are calibrated here (diffusers' `calibrate=True`) on the first
prompt and seed, which flatters it on that prompt (the published ratios come from one prompt as well).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import time

import numpy as np
import torch

from easycache import EasyCacheConfig
from easycache.diffusers import apply_easycache, remove_easycache
from easycache.metrics import psnr_global, psnr_per_frame
from models.wan_diffusers import wan_pipeline_from_official


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="tiny", help="a sample_wan.py task: its architectures and defaults")
    p.add_argument("--ckpt_dir", help="official-layout folder (default: the task's)")
    p.add_argument("--prompts", default="prompts/tiny_captions.txt", help="one prompt per line, # comments")
    p.add_argument("--num_prompts", type=int, default=4, help="every n-th line so that this many are used")
    p.add_argument("--seeds", default="42", help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="sampling steps (default: the task's, 50)")
    p.add_argument("--size", help="W*H (default: the task's first size)")
    p.add_argument("--frames", type=int, help="frames (default: the task's)")
    p.add_argument("--thresh", type=float, default=0.05, help="EasyCache τ (default %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="EasyCache R (default %(default)s)")
    p.add_argument("--mag_threshold", type=float, default=0.06, help="MagCache threshold (diffusers default)")
    p.add_argument("--fbc_threshold", type=float, default=0.05, help="FirstBlockCache threshold (default)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


class BlockCounter:
    """Counts executions of every transformer block and of the last one. The torch hooks sit on each block's
    self-attention: a block hook of diffusers replaces the block's forward, while a torch hook on the block
    itself would still fire for a skipped block."""

    def __init__(self, transformer):
        self.blocks = self.full = 0
        last = len(transformer.blocks) - 1
        self._handles = [
            block.attn1.register_forward_pre_hook(lambda *_, i=i: self._count(i == last))
            for i, block in enumerate(transformer.blocks)
        ]

    def _count(self, is_last: bool) -> None:
        self.blocks += 1
        self.full += is_last

    def reset(self) -> None:
        self.blocks = self.full = 0


def read_prompts(path: str, n: int) -> list[str]:
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    return lines[:: max(1, len(lines) // n)][:n]


def calibrate_mag_ratios(pipe, run, steps: int) -> list[float]:
    """diffusers' MagCache calibration run; it prints the ratios of each branch: take the conditional one."""
    from diffusers import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run()
    pipe.transformer.disable_cache()
    lists = [
        ast.literal_eval(ln)
        for ln in out.getvalue().splitlines()
        if ln.startswith("[") and not ln.startswith("[M")
    ]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios (diffusers changed its output?)")
    return lists[0]


def main(argv: list[str] | None = None) -> dict:
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    import sample_wan

    args = parse_args(argv)
    task = sample_wan.TASKS[args.task]
    steps, frames = args.steps or task.sample_steps, args.frames or task.frame_num
    width, height = (int(v) for v in (args.size or task.sizes[0]).split("*"))
    prompts, seeds = read_prompts(args.prompts, args.num_prompts), [int(s) for s in args.seeds.split(",")]
    pipe = wan_pipeline_from_official(
        args.ckpt_dir or task.ckpt_dir, dit=task.dit, t5=task.t5, vae=task.vae, shift=task.sample_shift
    ).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    counter = BlockCounter(pipe.transformer)

    def generate(prompt: str, seed: int) -> tuple[np.ndarray, float]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        video = pipe(prompt=prompt, negative_prompt=task.negative_prompt, height=height, width=width,
                     num_frames=frames, num_inference_steps=steps, guidance_scale=task.sample_guide_scale,
                     generator=torch.Generator().manual_seed(seed), max_sequence_length=task.text_len,
                     output_type="np").frames[0]  # fmt: skip
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (video * 255).round().astype(np.uint8), time.perf_counter() - t0

    generate(prompts[0], seeds[0])  # warm-up (allocator, first-call costs)
    mag_ratios = calibrate_mag_ratios(pipe, lambda: generate(prompts[0], seeds[0]), steps)
    methods = {
        "EasyCache": (
            lambda: apply_easycache(
                pipe.transformer, EasyCacheConfig(thresh=args.thresh, warmup=args.warmup), steps
            ),
            lambda: remove_easycache(pipe.transformer),
        ),
        "MagCache": (
            lambda: pipe.transformer.enable_cache(
                MagCacheConfig(threshold=args.mag_threshold, num_inference_steps=steps, mag_ratios=mag_ratios)
            ),
            pipe.transformer.disable_cache,
        ),
        "FirstBlockCache": (
            lambda: pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=args.fbc_threshold)),
            pipe.transformer.disable_cache,
        ),
    }
    rows = {name: [] for name in methods}
    for prompt in prompts:
        for seed in seeds:
            counter.reset()
            base, base_s = generate(prompt, seed)
            base_full, base_blocks = counter.full, counter.blocks
            for name, (enable, disable) in methods.items():
                enable()
                counter.reset()
                try:
                    video, seconds = generate(prompt, seed)
                finally:
                    disable()
                rows[name].append(
                    dict(
                        full=counter.full / base_full,
                        blocks=counter.blocks / base_blocks,
                        psnr=psnr_global(base, video),
                        psnr_frame=psnr_per_frame(base, video),
                        speed=base_s / seconds,
                    )
                )
    size = f"{width}x{height}x{frames}"
    print(f"{args.task}: {len(prompts)} prompts x {len(seeds)} seeds, {steps} steps, {size}, {args.device}")
    print(
        f"{'method':<16} {'full calls':>10} {'blocks':>7} {'NFE ratio':>9} {'PSNR':>6} {'PSNR/frame':>10} "
        f"{'speed':>6}"
    )
    summary = {}
    for name, rs in rows.items():
        mean = {
            k: float(np.mean([r[k] for r in rs])) for k in ("full", "blocks", "psnr", "psnr_frame", "speed")
        }
        summary[name] = mean
        print(f"{name:<16} {mean['full']:>10.3f} {mean['blocks']:>7.3f} {1 / mean['full']:>8.2f}x "
              f"{mean['psnr']:>6.2f} {mean['psnr_frame']:>10.2f} {mean['speed']:>5.2f}x")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
