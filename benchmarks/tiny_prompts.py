"""How well the embedded demo model follows its prompts, read by the detector, over many captions and seeds.

The test (tests/test_wan_tiny.py) reads 8 captions × 2 seeds, where one video is 6 points of shape accuracy;
this reads as many as you like, so that two checkpoints can be told apart by more than that noise:

    python -m benchmarks.tiny_prompts               # every caption of the grammar, seed 1, cache off
    python -m benchmarks.tiny_prompts --seeds 1,2 --cache off,on --ckpt_dir outputs/my-run/export

Prints, per cache setting, the share of videos whose colour, shape, direction and background the detector
reads as the caption says, and the shape confusion (want -> got; "unread": no frame where the shape is clear
of the frame's edge). `--report` writes the same as JSON. Sampling as `sample_wan.py --task tiny` (50 UniPC
steps, CFG 5); the cache is EasyCache at its defaults (τ 0.05, R 10).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time

from tqdm import tqdm

import sample_wan
from easycache import EasyCacheConfig
from models.toy_videos import Caption, all_captions, detect

ATTRIBUTES = tuple(f.name for f in dataclasses.fields(Caption))  # what the detector reads back


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return values


def parse_cache(text: str) -> list[str]:
    runs = text.split(",")
    if any(r not in ("off", "on") for r in runs):
        raise argparse.ArgumentTypeError(f"--cache takes off, on or off,on; got {text!r}")
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default="checkpoints/wan-tiny", help="an exported tiny checkpoint")
    p.add_argument("--seeds", type=parse_ints, default=[1], help="sampling seeds, comma-separated")
    p.add_argument("--stride", type=int, default=1, help="every n-th caption of the grammar (168 captions)")
    p.add_argument("--offset", type=int, default=0, help="first caption index (with --stride)")
    p.add_argument("--cache", type=parse_cache, default=["off"], help="off, on, or off,on")
    p.add_argument("--report", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.stride < 1 or not 0 <= args.offset < args.stride:
        p.error(f"need --stride >= 1 and 0 <= --offset < --stride, got {args.stride} and {args.offset}")
    return args


def grade(pipe: sample_wan.WanT2V, captions: list[Caption], seeds: list[int], cache: str) -> dict:
    """Detector reads of every caption × seed: per-attribute accuracy and the shape confusion."""
    hits, confusion = collections.Counter(), collections.Counter()
    for cap in tqdm(captions, desc=f"cache {cache}", leave=False):
        want = dataclasses.asdict(cap)
        for seed in seeds:
            got = detect(pipe.generate(str(cap), seed, EasyCacheConfig() if cache == "on" else None).frames)
            hits.update(a for a in ATTRIBUTES if got[a] == want[a])
            confusion[f"{want['shape']} -> {got['shape'] or 'unread'}"] += 1
    n = len(captions) * len(seeds)
    return {"videos": n, "accuracy": {a: hits[a] / n for a in ATTRIBUTES}, "shape_confusion": dict(confusion)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run_args = sample_wan.parse_args(["--task", "tiny", "--quiet", "--ckpt_dir", args.ckpt_dir])
    task, _, _ = sample_wan.check_args(run_args)
    pipe = sample_wan.WanT2V(task, args.ckpt_dir, run_args)
    captions = all_captions()[args.offset :: args.stride]
    results = {}
    for cache in args.cache:
        t0 = time.perf_counter()
        results[cache] = grade(pipe, captions, args.seeds, cache)
        acc = "  ".join(f"{a} {v:.1%}" for a, v in results[cache]["accuracy"].items())
        print(f"cache {cache}: {results[cache]['videos']} videos ({time.perf_counter() - t0:.0f} s)  {acc}")
        for pair, count in sorted(results[cache]["shape_confusion"].items()):
            print(f"    {pair:<22} {count}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"ckpt_dir": args.ckpt_dir, "seeds": args.seeds, "stride": args.stride,
                       "offset": args.offset, "results": results}, f, indent=2)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
