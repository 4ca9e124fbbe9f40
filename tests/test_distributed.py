"""Data-parallel sampling: ranks holding different samples of one batch must take identical decisions."""

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from easycache import EasyCache, EasyCacheConfig

N_STEPS, BATCH = 24, 4


def trajectory(x, model, cache):
    pattern = ""
    for t in range(N_STEPS):
        if cache.should_compute(t, x):
            v = model(x, t)
            cache.update(x, v)
            pattern += "C"
        else:
            v = cache.reuse(x)
            pattern += "S"
        x = x - 0.04 * v
    return pattern, x


def make_problem():
    g = torch.Generator().manual_seed(7)
    shape = (BATCH, 4, 3, 8, 8)
    a, b, x0 = (torch.randn(shape, generator=g) for _ in range(3))
    # Samples whose velocity drifts at very different speeds, so per-shard statistics would disagree.
    drift = torch.tensor([0.0, 0.01, 0.3, 0.5]).view(BATCH, 1, 1, 1, 1)
    model = lambda x, t: torch.tanh(a * x) + b * (1 + drift * t)  # noqa: E731
    return x0, model


def _worker(rank, world, init_file, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x0, model = make_problem()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    cache = EasyCache(EasyCacheConfig(thresh=0.1, warmup=4), N_STEPS, group=dist.group.WORLD)
    pattern, x = trajectory(x0[shard], lambda x, t: model_shard(model, x, t, shard), cache)
    torch.save({"pattern": pattern, "x": x}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def model_shard(model, x, t, shard):
    full = torch.zeros((BATCH, *x.shape[1:]))
    full[shard] = x
    return model(full, t)[shard]


def test_ranks_take_the_decisions_of_the_whole_batch():
    x0, model = make_problem()
    want_pattern, want_x = trajectory(x0, model, EasyCache(EasyCacheConfig(thresh=0.1, warmup=4), N_STEPS))
    assert "S" in want_pattern and want_pattern.count("C") > 6
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert [r["pattern"] for r in results] == [want_pattern, want_pattern]
    torch.testing.assert_close(torch.cat([r["x"] for r in results]), want_x, rtol=1e-5, atol=1e-6)
    # Without the group each rank would decide on its own shard and the ranks would disagree.
    solo = [
        trajectory(
            x0[s],
            lambda x, t, s=s: model_shard(model, x, t, s),
            EasyCache(EasyCacheConfig(thresh=0.1, warmup=4), N_STEPS),
        )[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert solo[0] != solo[1]


def _divergent_worker(rank, world, init_file, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    init = f"file://{init_file}"
    # A hang (ranks taking different branches) fails the test after a minute instead of blocking it.
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    x0, model = make_problem()

    def sharded_dit(x, t):  # every call has a collective, like a sequence-parallel DiT
        v = model(x, t)
        dist.all_reduce(v)
        return v / world

    # Rank 1 would compute every step on its own (τ = 0); rank 0's decisions must win on both.
    config = EasyCacheConfig(thresh=0.1 if rank == 0 else 0.0, warmup=4)
    cache = EasyCache(config, N_STEPS, decision_group=dist.group.WORLD)
    pattern, x = trajectory(x0, sharded_dit, cache)
    notes = [r["note"] for r in cache.trace if r["note"]]
    res = {"pattern": pattern, "x": x, "notes": notes, **_hook_checks(rank, world)}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def divergent_results():
    """One 2-rank run (a spawn costs ~10 s) for the step decisions and the in-DiT (hook) decisions."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_divergent_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]


def test_a_divergent_decision_is_overridden_by_rank_0(divergent_results):
    x0, model = make_problem()
    want_pattern, want_x = trajectory(x0, model, EasyCache(EasyCacheConfig(thresh=0.1, warmup=4), N_STEPS))
    assert "S" in want_pattern
    results = divergent_results
    assert [r["pattern"] for r in results] == [want_pattern, want_pattern]
    for r in results:  # v + v then / 2 is exact: the same trajectory bit for bit
        assert torch.equal(r["x"], want_x)
    assert results[0]["notes"] == []
    assert len(results[1]["notes"]) == want_pattern.count("S")  # every skip was overridden on rank 1


def half_still_probes() -> list:
    """TeaCache probes whose first half never moves (what rank 0 would hold of a still region)."""
    from tests.test_hook_caches import random_probes

    probes = random_probes(12)
    for step in probes:
        for p in step.values():
            p["e"][:4] = 1.0
    return probes


def _hook_checks(rank: int, world: int) -> dict:
    from easycache import TeaCache, TeaCacheConfig
    from tests.test_hook_caches import run, toy_dit

    probes, res = half_still_probes(), {}
    # Sequence parallelism: each rank holds half of every probe (split=("e",)): the relative L1 change is
    # reduced over the ranks, so the decisions are those of one process on the whole probes (rank 0's half
    # alone never changes: deciding on it would skip every call after the first).
    cache = TeaCache(
        TeaCacheConfig(rel_l1_thresh=0.05, coefficients=(1.0, 0.0)), 12, decision_group=dist.group.WORLD
    )
    ran = []
    for i, step in enumerate(probes):
        x = torch.full((1, 4, 3), 1.0 - 0.01 * i)
        assert cache.should_compute(i, x)
        v = {}
        for b in ("cond", "uncond"):
            hook, half = cache.hook(b), {"e": step[b]["e"].chunk(world)[rank]}
            if not hook.compute_blocks(x, half, split=("e",)):
                v[b] = hook.reuse_blocks(x)
            else:
                v[b] = toy_dit(None, x, half)[0]
                hook.store_blocks(x, v[b])
            ran.append(hook.ran_blocks)
        cache.update(x, v)
    res["split"] = ran
    # Rank 1 would never skip (τ = 0): rank 0's decision of every DiT call is taken on both.
    cfg = TeaCacheConfig(rel_l1_thresh=0.05 if rank == 0 else 0.0, coefficients=(1.0, 0.0))
    cache = TeaCache(cfg, 12, decision_group=dist.group.WORLD)
    res["divergent"] = run(cache, probes)
    res["reasons"] = [reason for r in cache.trace for reason in r.get("branch_reasons", {}).values()]
    return res


def test_hook_decisions_use_reduced_statistics_and_follow_rank_0(divergent_results):
    from easycache import TeaCache, TeaCacheConfig
    from tests.test_hook_caches import run

    want = run(TeaCache(TeaCacheConfig(rel_l1_thresh=0.05, coefficients=(1.0, 0.0)), 12), half_still_probes())
    assert not all(want) and sum(want) > 4  # some calls skipped, some computed
    results = divergent_results
    for r in results:
        assert r["split"] == want  # sums over the halves: the whole probe's statistic, up to rounding
        assert r["divergent"] == want
    assert "rank0_reuse" not in results[0]["reasons"]
    assert results[1]["reasons"].count("rank0_reuse") == want.count(False)  # every skip was rank 0's
