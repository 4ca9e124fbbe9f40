"""sample_wan.py on 2 CPU ranks (gloo) with the shipped demo model: Ulysses, ring and FSDP give one process's
generation, with the same cache decisions; only rank 0 writes. Short runs (12 steps, R = 3, τ = 0.2: the
demo then computes 6 of 12 steps) keep them fast."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import sample_wan
from easycache.cli import cache_config
from easycache.video import read_video
from models.parallel import init_distributed, init_sequence_parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "wan-tiny")
STEPS = ["--sample_steps", "12", "--warmup", "3", "--thresh", "0.2", "--base_seed", "1", "--quiet"]
PROMPT = sample_wan.TASKS["tiny"].prompt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hook_configs() -> dict:
    """The demo's TeaCache (its calibrated polynomial, τ 0.15: 6 of 12 steps computed) and MagCache (its
    calibrated ratios: 5 of 12), the caches that decide inside the DiT on each rank."""
    configs = {}
    for name, extra in (("teacache", ["--teacache.rel_l1_thresh", "0.15"]), ("magcache", [])):
        args = sample_wan.parse_args(["--task", "tiny", *STEPS, "--cache", name, *extra])
        sample_wan.check_args(args)
        configs[name] = cache_config(args)
    return configs


def _worker(rank, world, port, out_dir):
    # What torchrun sets for each process (init_distributed reads it).
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(env, WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    args = sample_wan.parse_args(["--task", "tiny", *STEPS, "--ulysses_size", "2"])
    sample_wan.check_args(args)
    launch = init_distributed("cpu")
    pipe = sample_wan.WanT2V(sample_wan.TASKS["tiny"], CKPT, args, launch)
    config, res = cache_config(args), {}
    res["ulysses"] = pipe.generate(PROMPT, 1, config)
    ulysses, pipe.sp = pipe.sp, init_sequence_parallel(1, 2, device=torch.device("cpu"), dtype=torch.float32)
    res["ring"] = pipe.generate(PROMPT, 1, config)
    pipe.sp, hook_configs = ulysses, _hook_configs()
    for name, hook_config in hook_configs.items():
        res[name] = pipe.generate(PROMPT, 1, hook_config)
    if rank == 0:  # the same pipeline as one process: no sequence parallelism, no decision broadcast
        pipe.sp = pipe.decision_group = None
        res["one"] = pipe.generate(PROMPT, 1, config)
        for name, hook_config in hook_configs.items():
            res[f"one_{name}"] = pipe.generate(PROMPT, 1, hook_config)
    keep = {k: (g.latents, g.cache_stats, g.frames) for k, g in res.items()}
    torch.save(keep, os.path.join(out_dir, f"rank{rank}.pt"))
    launch.close()


@pytest.fixture(scope="module")
def generations(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("layout", ["ulysses", "ring"])
def test_parallel_generation_equals_one_process(generations, layout):
    one_latents, one_stats, one_frames = generations[0]["one"]
    assert one_stats["nfe_ratio"] >= 1.5
    for rank, res in enumerate(generations):
        latents, stats, frames = res[layout]
        assert stats["computed_steps"] == one_stats["computed_steps"]
        # fp32: the linears see half the tokens (other blocking, last-bit differences) and ring reorders the
        # softmax sums (~2e-7 relative per DiT call, test_parallel); CFG (scale 5: 11x on a difference) and
        # 12 solver steps carry them on.
        err = float((latents - one_latents).norm() / one_latents.norm())
        assert err <= 1e-5, err
        assert (frames is None) == (rank != 0)  # rank 0 alone decodes


@pytest.mark.parametrize("method", ["teacache", "magcache"])
def test_hook_caches_under_ulysses_compute_the_steps_of_one_process(generations, method):
    # Wan's TeaCache probe (the time embedding) is whole on every rank and MagCache reads no tensor, so their
    # decisions are the single process's; rank 0's decision of every DiT call is broadcast all the same.
    one_latents, one_stats, _ = generations[0][f"one_{method}"]
    assert one_stats["nfe_ratio"] >= 2.0
    for res in generations:
        latents, stats, _ = res[method]
        assert stats["computed_steps"] == one_stats["computed_steps"]
        assert float((latents - one_latents).norm() / one_latents.norm()) <= 1e-5  # as above


@pytest.mark.slow
def test_torchrun_compare_with_fsdp_writes_once_and_records_the_layout(tmp_path):
    """torchrun for real: --compare under Ulysses 2 with the DiT and umT5 sharded (FSDP2), against one
    process's generation."""
    one, two = tmp_path / "one", tmp_path / "two"
    sample_wan.main(["--task", "tiny", *STEPS, "--lossless", "--save_file", str(one / "v.mp4")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port", str(free_port()), "sample_wan.py", "--task", "tiny", *STEPS, "--lossless",
           "--save_file", str(two / "v.mp4"), "--compare", "--no-lpips",
           "--ulysses_size", "2", "--dit_fsdp", "--t5_fsdp"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchelastic_* lands in tmp_path
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    videos = ["v_0_baseline.mkv", "v_0_baseline.mp4", "v_0_easycache.mkv", "v_0_easycache.mp4"]
    assert sorted(os.listdir(two)) == ["v.json", *videos]  # rank 0 alone wrote
    assert proc.stdout.count("report:") == 1 and proc.stdout.count("| easycache |") == 1
    ref, report = (json.loads((d / "v.json").read_text()) for d in (one, two))
    assert report["parallel"] == {"world_size": 2, "ulysses_size": 2, "ring_size": 1, "dit_fsdp": True,
                                  "t5_fsdp": True, "attention": "torch_flash"}  # fmt: skip
    row = report["comparison"]["rows"][0]
    assert row["cache_stats"]["computed_steps"] == ref["cache"]["computed_steps"]
    assert row["nfe_ratio"] >= 1.5 and len(row["trace"]) == 12
    # Latents within ~1e-6 relative (see above): 8-bit rounding may flip a rare pixel by one level.
    diff = np.abs(read_video(str(two / "v_0_easycache.mkv")).astype(int) - read_video(str(one / "v.mkv")))
    assert diff.max() <= 1 and diff.mean() < 1e-3


@pytest.mark.parametrize(
    "world, flags, message",
    [
        ("2", ["--ulysses_size", "2", "--ring_size", "2"], "must equal the world size 2 .* 1x2, 2x1"),
        ("4", ["--ulysses_size", "4"], "the 2 attention heads over 4 ranks.* 1x4, 2x2"),
        ("2", ["--ulysses_size", "2", "--t5_fsdp", "--t5_cpu"], "drop --t5_cpu"),
        ("1", ["--ring_size", "2"], "need several processes: launch with torchrun"),
    ],
)
def test_bad_layouts_are_refused_before_loading(monkeypatch, world, flags, message):
    monkeypatch.setenv("WORLD_SIZE", world)  # as torchrun announces it; no process group is made
    with pytest.raises(SystemExit, match="^error: .*" + message):
        sample_wan.main(["--task", "tiny", *STEPS, *flags])
