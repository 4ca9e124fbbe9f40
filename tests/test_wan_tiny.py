"""The embedded demo model (checkpoints/wan-tiny, made by train_wan_tiny.py) through the same loaders and
sampling loop as the real Wan2.1: what it follows of its prompts, with and without EasyCache, graded by the
detector of models.toy_videos, and the README's main command."""

import dataclasses
import json
import os

import pytest

import sample_wan
from easycache import EasyCacheConfig
from easycache.metrics import psnr_global
from models.toy_videos import Caption, detect

CKPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "wan-tiny")
# Every colour, shape, direction and background at least once; sampling seeds the training never saw (the
# training videos come from render seeds, the DiT never sees a sampling seed).
CAPTIONS = [
    "a red circle moving right on a blue background",
    "a green square moving up on a black background",
    "a yellow triangle moving left on a gray background",
    "a white circle moving down on a blue background",
    "a blue triangle moving right on a gray background",
    "a red square moving down on a black background",
    "a green triangle moving left on a blue background",
    "a white square moving up on a gray background",
]
SEEDS = (1234, 5678)
# Global PSNR (dB) floor for the cached videos; measured at τ 0.05 on prompts/tiny_captions.txt × 2 seeds:
# 37.5 to 49.1 dB, mean 45.0 (the shipped checkpoint: the DiT of the "large-inset" shapes, the decoder of
# "large").
MIN_PSNR = 28.0


@pytest.fixture(scope="module")
def pipe():
    args = sample_wan.parse_args(["--task", "tiny", "--quiet"])
    sample_wan.check_args(args)
    return sample_wan.WanT2V(sample_wan.TASKS["tiny"], CKPT, args)


@pytest.fixture(scope="module")
def graded(pipe):
    """Every caption × seed, uncached and with the default cache (τ 0.05, R 10): detector hit rates per
    attribute, the cache's skipped steps, and the global PSNR of each cached video against its baseline."""
    hits = {run: dict.fromkeys(("colour", "shape", "direction", "background"), 0) for run in ("off", "on")}
    skipped, psnrs = 0, []
    for caption in CAPTIONS:
        want = dataclasses.asdict(Caption.parse(caption))
        for seed in SEEDS:
            base = pipe.generate(caption, seed, None)
            cached = pipe.generate(caption, seed, EasyCacheConfig())
            for run, gen in (("off", base), ("on", cached)):
                got = detect(gen.frames)
                for key in hits[run]:
                    hits[run][key] += got[key] == want[key]
            skipped += cached.cache_stats["num_skipped"]
            psnrs.append(psnr_global(base.frames, cached.frames))
    runs = len(CAPTIONS) * len(SEEDS)
    acc = {run: {key: n / runs for key, n in h.items()} for run, h in hits.items()}
    return acc, skipped, psnrs


@pytest.mark.slow
def test_colours_backgrounds_and_motion_follow_the_prompt_with_and_without_cache(graded):
    acc, _, _ = graded
    for run in ("off", "on"):
        assert acc[run]["background"] >= 0.95 and acc[run]["colour"] >= 0.95, acc
        assert acc[run]["direction"] >= 0.9, acc


@pytest.mark.slow
def test_shapes_follow_the_prompt_with_and_without_cache(graded):
    # The target of issue 7. The shipped checkpoint reads 100% here (16 of 16, cache on and off) and 95-96%
    # over the whole grammar (benchmarks/tiny_prompts.py; its misses are squares read as circles), so one
    # video of these 16 (6 points) is the slack before the test fails. Chance is 33%.
    acc, _, _ = graded
    for run in ("off", "on"):
        assert acc[run]["shape"] >= 0.9, acc


@pytest.mark.slow
def test_cache_skips_steps_and_stays_close_to_the_baseline(graded):
    _, skipped, psnrs = graded
    assert skipped > 0  # the cache did skip steps on these runs
    assert min(psnrs) >= MIN_PSNR, psnrs


def test_main_command_writes_video_and_report(tmp_path):
    out = tmp_path / "tiny.mp4"
    sample_wan.main(["--task", "tiny", "--prompt", CAPTIONS[0], "--save_file", str(out), "--quiet"])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["args"]["cache"] == "easycache" and report["cache"]["config"]["thresh"] == 0.05
    assert report["cache"]["num_skipped"] > 0 and report["cache"]["num_steps"] == 50
    assert os.path.getsize(out) > 1000


def test_prompt_benchmark_reads_every_requested_video(tmp_path):
    from benchmarks.tiny_prompts import main as tiny_prompts

    report = tmp_path / "reads.json"
    res = tiny_prompts(["--stride", "84", "--seeds", "1234", "--report", str(report)])  # 2 captions × 1 seed
    assert list(res) == ["off"] and res["off"]["videos"] == 2
    assert sum(res["off"]["shape_confusion"].values()) == 2
    assert res["off"]["accuracy"]["colour"] == 1.0  # red and blue: the colours are read 100% (the test above)
    assert json.loads(report.read_text())["results"] == res


@pytest.mark.parametrize(
    "flags", [["--cache", "maybe"], ["--seeds", "1,x"], ["--stride", "7", "--offset", "7"]]
)
def test_prompt_benchmark_refuses_bad_flags(flags):
    from benchmarks.tiny_prompts import parse_args

    with pytest.raises(SystemExit):
        parse_args(flags)
