"""sample_hunyuan.py on 2 CPU ranks (gloo): Ulysses and ring degree 2 give one process's generation and
cache decisions (tiny random DiT and parts in the official layout, from test_sample_hunyuan)."""

import os
import pathlib

import pytest
import torch
import torch.multiprocessing as mp

import sample_hunyuan
from easycache.cli import cache_config
from models.hunyuan import CKPT_FILE
from models.parallel import init_distributed, init_sequence_parallel
from tests.test_sample_hunyuan import PROMPT, argv, model_base  # noqa: F401  (model_base: a fixture)
from tests.test_sample_wan_parallel import free_port

CACHE = ["--infer-steps", "8", "--warmup", "2", "--thresh", "1.0"]


def _worker(rank, world, port, base, out_dir):
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(env, WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    base = pathlib.Path(base)
    args = sample_hunyuan.parse_args(argv(base, *CACHE, "--ulysses-degree", "2"))
    _, dit_config, _ = sample_hunyuan.check_args(args)
    launch = init_distributed("cpu")
    pipe = sample_hunyuan.HunyuanT2V(str(base / CKPT_FILE), str(base), dit_config, args, launch)
    config, res = cache_config(args), {}
    res["ulysses"] = pipe.generate(PROMPT, 3, config)
    pipe.sp = init_sequence_parallel(1, 2, device=torch.device("cpu"), dtype=torch.float32)
    res["ring"] = pipe.generate(PROMPT, 3, config)
    if rank == 0:  # the same pipeline as one process
        pipe.sp = pipe.decision_group = None
        res["one"] = pipe.generate(PROMPT, 3, config)
    keep = {k: (g.latents, g.cache_stats) for k, g in res.items()}
    torch.save(keep, os.path.join(out_dir, f"rank{rank}.pt"))
    launch.close()


def test_parallel_generation_equals_one_process(model_base, tmp_path):  # noqa: F811
    mp.spawn(_worker, args=(2, free_port(), str(model_base), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    one_latents, one_stats = ranks[0]["one"]
    assert one_stats["num_skipped"] > 0
    for res in ranks:
        for layout in ("ulysses", "ring"):
            latents, stats = res[layout]
            assert stats["computed_steps"] == one_stats["computed_steps"]
            # fp32; the joint text attention merges through the log-sum-exp: ~4e-7 per call (test_parallel)
            err = float((latents - one_latents).norm() / one_latents.norm())
            assert err <= 1e-5, (layout, err)


@pytest.mark.parametrize(
    "world, flags, message",
    [
        ("2", ["--ulysses-degree", "2", "--ring-degree", "2"], "must equal the world size 2"),
        ("4", ["--ulysses-degree", "4"], "the 2 attention heads over 4 ranks.* 1x4, 2x2"),
        ("4", ["--ring-degree", "4"], "2x2 patch grid that splits over 4 ranks neither"),
        ("2", ["--ring-degree", "2", "--use-cpu-offload"], "--use-cpu-offload cannot be combined"),
        ("1", ["--ring-degree", "2"], "need several processes: launch with torchrun"),
    ],
)
def test_bad_layouts_are_refused_before_loading(model_base, monkeypatch, world, flags, message):  # noqa: F811
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(SystemExit, match="^error: .*" + message):
        sample_hunyuan.main(argv(model_base, *flags))
