"""How well the I2V demo model (`--task i2v-tiny`) animates held-out images, cache off and on.

    python -m benchmarks.tiny_i2v                        # 12 held-out first frames, sampling seed 1
    python -m benchmarks.tiny_i2v --stride 7 --seeds 1,2 --report outputs/i2v.json

Each image is the first frame of a video rendered from a caption with a render seed the training set never
used (seeds below 1,000,000); the prompt is that caption. Read per cache setting: the first frame against the
image (PSNR, 8-bit), and the share of videos whose colour and shape (the image's) and direction (the prompt's)
the detector reads back; with the cache on, also the NFE ratio and the PSNR of the video against the uncached
one of the same seed (global MSE over all frames, the authors' convention). Sampling as `sample_wan.py --task
i2v-tiny` (50 UniPC steps, CFG 5); the cache is EasyCache at the defaults (τ 0.05, R 10).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import sample_wan
from benchmarks.tiny_prompts import parse_ints
from easycache import EasyCacheConfig
from easycache.metrics import psnr_global
from models.toy_videos import Caption, all_captions, detect, render

ATTRIBUTES = tuple(f.name for f in dataclasses.fields(Caption))
RENDER_SEED = 500  # held out: the training videos use render seeds >= 1,000,000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default="checkpoints/wan-i2v-tiny", help="an exported I2V demo checkpoint")
    p.add_argument("--seeds", type=parse_ints, default=[1], help="sampling seeds, comma-separated")
    p.add_argument("--stride", type=int, default=14, help="every n-th caption of the grammar (168 captions)")
    p.add_argument("--report", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.stride < 1:
        p.error(f"--stride must be >= 1, got {args.stride}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    captions = all_captions()[:: args.stride]
    rows, t0 = [], time.perf_counter()
    pipe = None
    for i, cap in enumerate(tqdm(captions, desc="images")):
        first = render(cap, RENDER_SEED + i, geometry="large-inset")[0]  # uint8 [64, 64, 3]
        image = torch.from_numpy(first).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)  # as load_image
        if pipe is None:
            pipe = load_pipe(args.ckpt_dir, image)
        pipe.image = image
        for seed in args.seeds:
            off = pipe.generate(str(cap), seed, None)
            on = pipe.generate(str(cap), seed, EasyCacheConfig())
            want = dataclasses.asdict(cap)
            row = {"caption": str(cap), "render_seed": RENDER_SEED + i, "seed": seed}
            for name, gen in (("off", off), ("on", on)):
                got = detect(gen.frames)
                row[name] = {
                    "first_frame_psnr": psnr_global(first[None], gen.frames[:1]),
                    **{a: got[a] == want[a] for a in ATTRIBUTES},
                    "dit_calls": gen.dit_calls,
                }
            row["psnr_vs_uncached"] = psnr_global(off.frames, on.frames)
            rows.append(row)
    summary = {}
    for name in ("off", "on"):
        psnrs = [r[name]["first_frame_psnr"] for r in rows]
        summary[name] = {
            "first_frame_psnr_mean": float(np.mean(psnrs)),
            "first_frame_psnr_min": float(np.min(psnrs)),
            **{a: float(np.mean([r[name][a] for r in rows])) for a in ATTRIBUTES},
        }
    summary["nfe_ratio"] = float(np.mean([r["off"]["dit_calls"] / r["on"]["dit_calls"] for r in rows]))
    summary["psnr_vs_uncached_mean"] = float(np.mean([r["psnr_vs_uncached"] for r in rows]))
    summary["videos"] = len(rows)
    print(f"{len(rows)} videos, {time.perf_counter() - t0:.0f} s")
    for name in ("off", "on"):
        s = summary[name]
        acc = "  ".join(f"{a} {s[a]:.0%}" for a in ATTRIBUTES)
        print(f"cache {name}: first frame PSNR {s['first_frame_psnr_mean']:.1f} dB (min "
              f"{s['first_frame_psnr_min']:.1f})  {acc}")  # fmt: skip
    nfe, psnr = summary["nfe_ratio"], summary["psnr_vs_uncached_mean"]
    print(f"EasyCache: NFE ratio {nfe:.2f}x, PSNR vs uncached {psnr:.1f} dB")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"ckpt_dir": args.ckpt_dir, "summary": summary, "rows": rows}, f, indent=2)
    return summary


def load_pipe(ckpt_dir: str, image: torch.Tensor) -> sample_wan.WanT2V:
    """The sample script's pipeline for i2v-tiny, built through its own argument parsing and checks."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "first.png")
        Image.fromarray(image.mul(0.5).add(0.5).mul(255).round().byte().permute(1, 2, 0).numpy()).save(path)
        args = sample_wan.parse_args(
            ["--task", "i2v-tiny", "--quiet", "--ckpt_dir", ckpt_dir, "--image", path]
        )
        task, _, _ = sample_wan.check_args(args)
        return sample_wan.WanT2V(task, ckpt_dir, args)


if __name__ == "__main__":
    main()
