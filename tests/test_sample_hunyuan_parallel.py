"""sample_hunyuan.py on 2 CPU ranks (gloo): Ulysses and ring degree 2 give one process's generation and
cache decisions (tiny random DiT and parts in the official layout, from test_sample_hunyuan)."""

import os
import pathlib

import pytest
import torch
import torch.multiprocessing as mp

import sample_hunyuan
from easycache.cli import cache_config
from easycache.magcache import MagCacheConfig
from easycache.teacache import TeaCacheConfig
from models.hunyuan import CKPT_FILE
from models.parallel import init_distributed, init_sequence_parallel
from tests.test_sample_hunyuan import PROMPT, argv, model_base  # noqa: F401  (model_base: a fixture)
from tests.test_sample_wan_parallel import free_port

CACHE = ["--infer-steps", "8", "--warmup", "2", "--thresh", "1.0"]
# TeaCache on the token-wise probe (block 0's modulated image tokens: each rank holds its half under sequence
# parallelism, so the relative L1 change must be reduced over the ranks), and MagCache (calibrated ratios, no
# runtime statistic). TeaCache's setting makes step 4 hinge on d_4 alone (steps 0-3 computed): one process
# measures d_4 = 0.272 < τ = 0.277 (skip, then 5 computed, 6 skipped); rank 0's half alone measures 0.281
# (compute 4, skip 5, compute 6), so a per-shard statistic would change the computed steps.
HOOK_CACHES = {
    "teacache": TeaCacheConfig(rel_l1_thresh=0.277, coefficients=(1.0, 0.0), ret_steps=4, probe="modulated"),
    "magcache": MagCacheConfig(magcache_thresh=0.1, magcache_K=2, retention_ratio=0.25,
                               mag_ratios={"cond": (1.0, 0.99, 0.98, 1.02, 0.97, 0.99, 1.05, 1.0)}),
}  # fmt: skip


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
    ulysses, pipe.sp = pipe.sp, init_sequence_parallel(1, 2, device=torch.device("cpu"), dtype=torch.float32)
    res["ring"] = pipe.generate(PROMPT, 3, config)
    pipe.sp = ulysses
    for name, hook_config in HOOK_CACHES.items():  # decided inside the DiT, on each rank's image tokens
        res[name] = pipe.generate(PROMPT, 3, hook_config)
    if rank == 0:  # the same pipeline as one process
        pipe.sp = pipe.decision_group = None
        res["one"] = pipe.generate(PROMPT, 3, config)
        for name, hook_config in HOOK_CACHES.items():
            res[f"one_{name}"] = pipe.generate(PROMPT, 3, hook_config)
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
    for name in HOOK_CACHES:  # Ulysses 2: the same DiT calls skipped as in one process, on both ranks
        one_latents, one_stats = ranks[0][f"one_{name}"]
        assert 0 < one_stats["num_skipped"] < len(one_stats["computed_steps"]) + one_stats["num_skipped"] - 2
        for res in ranks:
            latents, stats = res[name]
            assert stats["computed_steps"] == one_stats["computed_steps"], name
            assert float((latents - one_latents).norm() / one_latents.norm()) <= 1e-5, name


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
