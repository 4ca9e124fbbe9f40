"""sample_opensora.py under torchrun-style launch on 2 CPU ranks (gloo): data parallel over the prompts.
Each rank makes every other prompt with its own cache and writes its videos; rank 0 writes one report."""

import json
import os

import numpy as np
import torch
import torch.multiprocessing as mp

import sample_opensora
from easycache.video import read_video
from tests.test_sample_opensora import TINY_VAE, ckpt, flags  # noqa: F401  (ckpt: a fixture)
from tests.test_sample_wan_parallel import free_port

PROMPTS = ["a red car drives through a city at night", "a beautiful waterfall", "a cat on the grass"]


def _worker(rank, world, ports, ckpt, prompts, out_dir):  # noqa: F811
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    for port, extra in zip(ports, ([], ["--compare", "--no-lpips"])):
        os.environ["MASTER_PORT"] = str(port)
        name = "cmp" if extra else "v"
        argv = [*flags(ckpt), "--prompts", prompts, "--save-dir", out_dir, "--sample-name", name, *extra]
        sample_opensora.main([*argv, "--thresh", "10"], vae_config=TINY_VAE)


def test_prompts_are_split_over_ranks_and_gathered_by_rank_0(ckpt, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    two, one = tmp_path / "two", tmp_path / "one"
    ports = (free_port(), free_port())
    mp.spawn(_worker, args=(2, ports, ckpt, str(prompts), str(two)), nprocs=2, join=True)
    torch.set_num_threads(1)
    base = [*flags(ckpt), "--prompts", str(prompts), "--save-dir", str(one), "--thresh", "10"]
    sample_opensora.main([*base, "--sample-name", "v"], vae_config=TINY_VAE)
    sample_opensora.main([*base, "--sample-name", "cmp", "--compare", "--no-lpips"], vae_config=TINY_VAE)

    ref, got = (json.loads((d / "v.json").read_text()) for d in (one, two))
    assert got["parallel"] == {"world_size": 2, "data_parallel": "prompts"}
    assert [r["prompt"] for r in got["runs"]] == PROMPTS  # in prompt order, from both ranks
    assert [r["cache"]["computed_steps"] for r in got["runs"]] == [
        r["cache"]["computed_steps"] for r in ref["runs"]
    ]
    for i in range(3):  # rank i % 2 wrote video i; the same computation as one process (1 thread each)
        diff = np.abs(read_video(str(two / f"v_{i}.mp4")).astype(int) - read_video(str(one / f"v_{i}.mp4")))
        assert diff.max() <= 1
    ref, got = (json.loads((d / "cmp.json").read_text())["comparison"] for d in (one, two))
    assert [r["run_index"] for r in got["rows"]] == [0, 1, 2]
    assert got["means"].keys() == ref["means"].keys()
    assert [r["nfe_ratio"] for r in got["rows"]] == [r["nfe_ratio"] for r in ref["rows"]]
