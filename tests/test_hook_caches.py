"""TeaCache, MagCache and PAB: exact decisions against a re-statement of each official rule, τ = 0 equal to no
cache, misuse errors, the flags and sweeps, and the calibration fits. No model: a toy DiT whose block stack is
`2 x` (so the residual is x), called through the same hook seam as the real DiTs."""

import argparse
import json

import numpy as np
import pytest
import torch

from easycache import PAB, MagCache, MagCacheConfig, PABConfig, TeaCache, TeaCacheConfig
from easycache.calibrate import fit_magcache, fit_teacache
from easycache.cli import add_cache_args, add_output_args, cache_config, compare_configs, make_cache
from easycache.hooks import nearest_interp
from easycache.published import MAG_RATIOS
from easycache.teacache import COEFFICIENTS


def toy_dit(hook, x, probes):
    """The seam of models/wan.py with a block stack `2 x`: returns (output, ran the blocks)."""
    if hook is not None and not hook.compute_blocks(x, probes):
        return hook.reuse_blocks(x), False
    out = 2 * x
    if hook is not None:
        hook.store_blocks(x, out)
    return out, True


def run(cache, probes_by_step, branches=("cond", "uncond")):
    """Drive `cache` like sample_wan.py; probes_by_step[i][branch] is that call's probe dict. Returns, per
    call in order (cond, uncond of step 0, ...), whether the blocks ran."""
    ran = []
    for i, probes in enumerate(probes_by_step):
        x = torch.full((1, 4, 3), 1.0 - 0.01 * i)
        assert cache.should_compute(i, x)  # the DiT runs every step; its hooks decide inside
        v = {}
        for b in branches:
            v[b], r = toy_dit(cache.hook(b), x, probes[b])
            ran.append(r)
        cache.update(x, v)
    return ran


def random_probes(n, seed=0):
    """Per step and branch, a probe walking with a step size that varies (some small, some large moves)."""
    g = torch.Generator().manual_seed(seed)
    out, cur = [], {b: torch.randn(8, generator=g) + 3 for b in ("cond", "uncond")}
    for _ in range(n):
        step = {}
        for b in cur:
            scale = 0.002 + 0.06 * torch.rand(1, generator=g).item()
            cur[b] = cur[b] + scale * torch.randn(8, generator=g)
            step[b] = {"e": cur[b].clone()}
        out.append(step)
    return out


# --------------------------------------------------------------------------------------------------------
# TeaCache
# --------------------------------------------------------------------------------------------------------


def official_teacache(calls, coefficients, thresh, ret_calls, cutoff_calls):
    """TeaCache4Wan2.1 teacache_forward, restated: even calls (cond) and odd calls (uncond) keep their own
    accumulator and previous input; compute while cnt < ret_steps or cnt >= cutoff_steps."""
    acc, prev, out = [0.0, 0.0], [None, None], []
    rescale = np.poly1d(coefficients)
    for cnt, inp in enumerate(calls):
        k = cnt % 2
        if cnt < ret_calls or cnt >= cutoff_calls:
            calc, acc[k] = True, 0.0
        else:
            acc[k] += rescale(((inp - prev[k]).abs().mean() / prev[k].abs().mean()).cpu().item())
            calc = acc[k] >= thresh
            if calc:
                acc[k] = 0.0
        prev[k] = inp.clone()
        out.append(calc)
    return out


@pytest.mark.parametrize("thresh", [0.05, 0.08, 0.2])
@pytest.mark.parametrize("ret", [False, True])
def test_teacache_decisions_match_the_official_rule(thresh, ret):
    n = 30
    probes = random_probes(n)
    coefficients = COEFFICIENTS["wan-t2v-1.3B-ret" if ret else "wan-t2v-1.3B"]
    cfg = TeaCacheConfig(
        rel_l1_thresh=thresh, coefficients=coefficients, ret_steps=5 if ret else 1, compute_last=not ret
    )
    ran = run(TeaCache(cfg, n), probes)
    calls = [p[b]["e"] for p in probes for b in ("cond", "uncond")]
    # official: ret_steps = 5*2 / cutoff = 2N with --use_ret_steps, else 1*2 / 2N - 2
    expected = official_teacache(calls, coefficients, thresh, 10 if ret else 2, 2 * n if ret else 2 * n - 2)
    assert ran == expected
    assert 0 < sum(expected) < len(expected)  # the trajectory exercises both decisions


def test_teacache_branches_decide_separately_or_follow_one():
    probes = random_probes(20)
    for step in probes:  # uncond barely moves: with separate accumulators it skips more
        step["uncond"]["e"] = step["cond"]["e"] * 0 + 3.0 + 1e-4 * step["cond"]["e"]
    cfg = TeaCacheConfig(rel_l1_thresh=0.05, coefficients=(1.0, 0.0))
    ran = run(TeaCache(cfg, 20), probes)
    cond, uncond = ran[0::2], ran[1::2]
    assert sum(uncond) < sum(cond)
    cfg = TeaCacheConfig(rel_l1_thresh=0.05, coefficients=(1.0, 0.0), branches="cond")
    follow = run(TeaCache(cfg, 20), probes)
    assert follow[0::2] == cond and follow[1::2] == cond


def test_teacache_threshold_zero_computes_every_call_and_reuses_the_residual():
    cache = TeaCache(TeaCacheConfig(rel_l1_thresh=0.0), 12)
    assert all(run(cache, random_probes(12)))
    s = cache.stats
    assert s["nfe_ratio"] == 1.0 and s["block_calls"] == 24 and s["num_computed"] == 12
    # A skip returns x + the residual of the last computed call of the same branch (toy: residual = x_prev)
    cache = TeaCache(TeaCacheConfig(rel_l1_thresh=1e9, coefficients=(1.0, 0.0), compute_last=False), 3)
    outs = []
    for i in range(3):
        x = torch.full((1, 2), float(i + 1))
        cache.should_compute(i, x)
        out, _ = toy_dit(cache.hook("cond"), x, {"e": torch.full((2,), float(i + 1))})
        cache.update(x, out)
        outs.append(out)
    assert torch.equal(outs[1], torch.full((1, 2), 2.0 + 1.0))
    assert torch.equal(outs[2], torch.full((1, 2), 3.0 + 1.0))
    assert cache.stats["computed_steps"] == [0] and cache.stats["nfe_ratio"] == 3.0


def test_teacache_misuse():
    with pytest.raises(ValueError, match="rel_l1_thresh"):
        TeaCacheConfig(rel_l1_thresh=-0.1)
    with pytest.raises(ValueError, match="ret_steps"):
        TeaCache(TeaCacheConfig(ret_steps=10), 10)
    cache = TeaCache(TeaCacheConfig(probe="modulated"), 4)
    x = torch.ones(1, 2)
    with pytest.raises(RuntimeError, match="should_compute"):
        cache.hook("cond")
    cache.should_compute(0, x)
    hook = cache.hook("cond")
    with pytest.raises(ValueError, match="modulated"):
        hook.compute_blocks(x, {"e": x})
    cache = TeaCache(TeaCacheConfig(), 4)
    cache.should_compute(0, x)
    hook = cache.hook("cond")
    assert hook.compute_blocks(x, {"e": x})
    with pytest.raises(RuntimeError, match="already used"):
        hook.compute_blocks(x, {"e": x})
    with pytest.raises(RuntimeError, match="reuse_blocks"):
        hook.reuse_blocks(x)
    hook.store_blocks(x, 2 * x)
    with pytest.raises(RuntimeError, match="already has a hook"):
        cache.hook("cond")
    follow = TeaCache(TeaCacheConfig(branches="cond"), 4)
    follow.should_compute(0, x)
    with pytest.raises(RuntimeError, match="must come before"):
        follow.hook("uncond").compute_blocks(x, {"e": x})


# --------------------------------------------------------------------------------------------------------
# MagCache
# --------------------------------------------------------------------------------------------------------


def official_magcache(mag_ratios, num_calls, thresh, K, retention_ratio):  # noqa: N803
    """MagCache4Wan2.1 magcache_forward, restated: interleaved cond/uncond calls, one accumulator each."""
    ratio, steps, err, out = [1.0, 1.0], [0, 0], [0.0, 0.0], []
    for cnt in range(num_calls):
        skip = False
        if cnt >= int(num_calls * retention_ratio):
            k = cnt % 2
            ratio[k] *= mag_ratios[cnt]
            steps[k] += 1
            err[k] += np.abs(1 - ratio[k])
            if err[k] < thresh and steps[k] <= K:
                skip = True
            else:
                ratio[k], steps[k], err[k] = 1.0, 0, 0.0
        out.append(not skip)
    return out


@pytest.mark.parametrize("thresh,K", [(0.12, 2), (0.06, 2), (0.24, 4), (0.5, 1)])
def test_magcache_decisions_match_the_official_rule(thresh, K):  # noqa: N803
    table = MAG_RATIOS["wan-t2v-1.3B"]
    interleaved = [r for pair in zip(table["cond"], table["uncond"]) for r in pair]  # the official list
    cfg = MagCacheConfig(magcache_thresh=thresh, magcache_K=K)
    ran = run(MagCache(cfg, 50), [{"cond": {}, "uncond": {}}] * 50)
    expected = official_magcache(interleaved, 100, thresh, K, 0.2)
    assert ran == expected and 0 < sum(expected) < 100


def test_magcache_nearest_interpolation_is_the_official_one():
    src = np.array(MAG_RATIOS["wan-t2v-1.3B"]["cond"])
    for length in (1, 7, 30, 50, 77):
        scale = (len(src) - 1) / (length - 1) if length > 1 else 0
        official = src[np.round(np.arange(length) * scale).astype(int)] if length > 1 else src[-1:]
        assert nearest_interp(src.tolist(), length) == official.tolist()
    cache = MagCache(MagCacheConfig(), 30)
    assert len(cache.ratios["cond"]) == 30 and cache.retained == 6


def test_magcache_threshold_zero_and_misuse():
    assert all(run(MagCache(MagCacheConfig(magcache_thresh=0.0), 20), [{"cond": {}, "uncond": {}}] * 20))
    with pytest.raises(ValueError, match="magcache_K"):
        MagCacheConfig(magcache_K=-1)
    with pytest.raises(ValueError, match="retention_ratio"):
        MagCacheConfig(retention_ratio=1.5)
    with pytest.raises(ValueError, match="mag_ratios"):
        MagCacheConfig(mag_ratios={"cond": (1.0, -2.0)})
    cache = MagCache(MagCacheConfig(mag_ratios={"cond": (1.0,) * 10}, retention_ratio=0.0), 10)
    x = torch.ones(1, 2)
    cache.should_compute(0, x)
    with pytest.raises(ValueError, match="no ratios for branch 'uncond'"):
        cache.hook("uncond").compute_blocks(x, {})


# --------------------------------------------------------------------------------------------------------
# PAB
# --------------------------------------------------------------------------------------------------------


def test_pab_broadcasts_as_the_official_rule_per_kind_and_branch():
    cfg = PABConfig(
        spatial_range=2,
        spatial_threshold=(100, 800),
        cross_broadcast=True,
        cross_range=3,
        cross_threshold=(0, 1000),
        temporal_broadcast=True,
        temporal_range=4,
        temporal_threshold=(300, 700),
    )
    n, layers = 12, 2
    timesteps = np.linspace(999, 0, n).tolist()
    cache = PAB(cfg, n, timesteps=timesteps)
    got, calls = [], {"n": 0}

    def attn(tag):
        def fn(x):
            calls["n"] += 1
            return x + tag

        return fn

    for i in range(n):
        x = torch.full((1, 3), float(i))
        cache.should_compute(i, x)
        v = {}
        for b in ("cond", "uncond"):
            hook = cache.hook(b)
            assert hook.compute_blocks(x, {})
            for layer in range(layers):
                pab = hook.attention(layer)
                for kind in ("spatial", "temporal", "cross"):
                    out = pab(kind, attn(layer), x + (b == "uncond"))
                    computed = torch.equal(out, x + (b == "uncond") + layer)
                    got.append((i, b, layer, kind, not computed))
            hook.store_blocks(x, 2 * x)
            v[b] = 2 * x
        cache.update(x, v)
    # VideoSys pab_mgr.if_broadcast_*: broadcast iff enabled, count % range != 0 and low < t < high
    for i, b, layer, kind, broadcast in got:
        low, high = getattr(cfg, f"{kind}_threshold")
        rng = getattr(cfg, f"{kind}_range")
        assert broadcast == (i % rng != 0 and low < timesteps[i] < high), (i, b, layer, kind)
    assert any(g[-1] for g in got) and not all(g[-1] for g in got)
    s = cache.stats
    assert s["nfe_ratio"] == 1.0 and s["attention"]["cross"]["broadcast"] > 0
    assert calls["n"] == sum(c["computed"] for c in s["attention"].values())


def test_pab_range_one_never_broadcasts_and_needs_timesteps():
    cache = PAB(PABConfig(spatial_range=1), 3, timesteps=[900.0, 500.0, 200.0])
    for i in range(3):
        x = torch.ones(1, 2)
        cache.should_compute(i, x)
        hook = cache.hook("cond")
        hook.compute_blocks(x, {})
        hook.attention(0)("spatial", lambda t: t + 1, x)
        hook.store_blocks(x, x)
        cache.update(x, x)
    assert cache.counts["spatial"] == {"computed": 3, "broadcast": 0}
    cache = PAB(PABConfig(), 3)
    cache.should_compute(0, torch.ones(1))
    with pytest.raises(RuntimeError, match="timesteps"):
        cache.hook("cond").compute_blocks(torch.ones(1), {})
    with pytest.raises(ValueError, match="spatial_range"):
        PABConfig(spatial_range=0)
    with pytest.raises(ValueError, match="threshold"):
        PABConfig(cross_threshold=(800, 100))


def test_work_ratio_counts_the_skipped_flops():
    cost = {"call": 100.0, "blocks": 90.0, "spatial": 10.0, "cross": 5.0}
    cfg = TeaCacheConfig(rel_l1_thresh=1e9, coefficients=(1.0, 0.0), compute_last=False)
    cache = TeaCache(cfg, 4, cost=cost)
    run(cache, [{"cond": {"e": torch.ones(2)}}] * 4, branches=("cond",))
    assert cache.stats["block_calls"] == 1
    assert cache.stats["work_ratio"] == pytest.approx(400 / (100 + 3 * 10))  # skipped calls: embed + head


# --------------------------------------------------------------------------------------------------------
# Flags, sweeps, calibration
# --------------------------------------------------------------------------------------------------------


def parse(*argv, **defaults):
    p = argparse.ArgumentParser()
    add_cache_args(p, **defaults)
    add_output_args(p)
    return p.parse_args(list(argv))


def test_cache_flags_set_any_field_with_official_aliases():
    assert cache_config(parse("--cache", "teacache")) == TeaCacheConfig()
    cfg = cache_config(
        parse(
            "--cache",
            "teacache",
            "--teacache_thresh",
            "0.2",
            "--teacache.coefficients",
            "hunyuan-t2v-720p",
            "--teacache.probe",
            "modulated",
            "--teacache.compute_last",
            "false",
        )
    )
    assert cfg == TeaCacheConfig(
        rel_l1_thresh=0.2,
        coefficients=COEFFICIENTS["hunyuan-t2v-720p"],
        probe="modulated",
        compute_last=False,
    )
    cfg = cache_config(
        parse("--cache", "magcache", "--magcache_K", "4", "--magcache.mag_ratios", "hunyuan-t2v-544p")
    )
    assert cfg.magcache_K == 4 and cfg.mag_ratios == MAG_RATIOS["hunyuan-t2v-544p"]
    cfg = cache_config(
        parse("--cache", "pab", "--pab.spatial_threshold", "50:950", "--pab.cross_broadcast", "1")
    )
    assert cfg.spatial_threshold == (50.0, 950.0) and cfg.cross_broadcast
    defaults = {"teacache": TeaCacheConfig(rel_l1_thresh=0.15, probe="modulated")}
    assert cache_config(parse("--cache", "teacache", defaults=defaults)) == defaults["teacache"]
    assert isinstance(make_cache(cache_config(parse("--cache", "pab")), 5, timesteps=[1.0] * 5), PAB)
    assert cache_config(parse("--easycache.branch", "cond")).branch == "cond"
    for bad in (
        ["--teacache.rel_l1_thresh", "x"],
        ["--teacache.coefficients", "no-such-model"],
        ["--magcache.mag_ratios", "nope"],
        ["--pab.cross_broadcast", "maybe"],
    ):
        with pytest.raises(ValueError):
            cache_config(parse("--cache", bad[0].split(".")[0][2:], *bad))


def test_sweep_any_field_of_any_method():
    configs = compare_configs(
        parse(
            "--sweep",
            "teacache.rel_l1_thresh=0.1,0.2",
            "--sweep",
            "easycache.k_update=local,ema",
            "--sweep",
            "pab.spatial_threshold=100:800,0:1000",
            "--sweep-interval",
            "3",
            "--magcache_K",
            "3",
            "--sweep",
            "magcache.magcache_thresh=0.1",
        )
    )
    labels = [label for label, _ in configs]
    assert labels == [
        "static n=3",
        "teacache rel_l1_thresh=0.1",
        "teacache rel_l1_thresh=0.2",
        "easycache k_update=local",
        "easycache k_update=ema",
        "pab spatial_threshold=100:800",
        "pab spatial_threshold=0:1000",
        "magcache magcache_thresh=0.1",
    ]
    assert configs[2][1] == TeaCacheConfig(rel_l1_thresh=0.2)
    assert configs[6][1].spatial_threshold == (0.0, 1000.0)
    assert configs[7][1].magcache_K == 3 and configs[7][1].magcache_thresh == 0.1  # other flags kept
    for bad in ("teacache.nope=1", "foo.x=1", "teacache.rel_l1_thresh", "teacache.rel_l1_thresh=-1"):
        with pytest.raises(ValueError):
            [make_cache(c, 50) for _, c in compare_configs(parse("--sweep", bad))]
    with pytest.raises(ValueError, match="twice"):
        compare_configs(parse("--sweep", "teacache.rel_l1_thresh=0.1,0.1"))


def test_calibration_fits_the_polynomial_and_the_ratios(tmp_path):
    true = (3.0, -2.0, 0.5, 0.9, 0.01)
    rng = np.random.default_rng(0)
    traces = []
    for run_index in range(2):
        trace = []
        for step in range(10):
            x = float(rng.uniform(0.01, 0.3))
            calib = {
                b: {
                    "probe_rel_l1": {"e": x},
                    "out_rel_l1": float(np.polyval(true, x)),
                    "mag_ratio": 1.0 + 0.01 * step + 0.02 * run_index,
                }
                for b in ("cond", "uncond")
            }
            trace.append({"step": step, "calib": calib if step else {}})
        traces.append(trace)
    tc = fit_teacache(traces, "e")
    assert np.allclose(tc["coefficients"], true, atol=1e-6) and tc["num_pairs"] == 36
    mc = fit_magcache(traces)["mag_ratios"]
    assert mc["cond"][0] == 1.0 and mc["uncond"][3] == pytest.approx(1.0 + 0.03 + 0.01)
    with pytest.raises(ValueError, match="pairs"):
        fit_teacache(traces, "modulated")
    from easycache.calibrate import main

    report = tmp_path / "runs.json"
    report.write_text(json.dumps({"runs": [{"prompt": str(i), "trace": t} for i, t in enumerate(traces)]}))
    main([str(report), "-o", str(tmp_path / "calib.json")])
    cfg = cache_config(parse("--cache", "teacache", "--teacache.coefficients", str(tmp_path / "calib.json")))
    assert np.allclose(cfg.coefficients, true, atol=1e-6)
    cfg = cache_config(parse("--cache", "magcache", "--magcache.mag_ratios", str(tmp_path / "calib.json")))
    assert set(cfg.mag_ratios) == {"cond", "uncond"} and len(cfg.mag_ratios["cond"]) == 10


def test_pareto_merges_reports_split_by_seed_and_prints_the_table(tmp_path, capsys):
    from easycache.pareto import main as pareto_main
    from easycache.pareto import merge, points

    def row(label, seed, nfe, work, psnr):
        return {"label": label, "seed": seed, "nfe_ratio": nfe, "work_ratio": work, "psnr_global": psnr,
                "speedup_dit": nfe, "ssim": 0.99, "cache_stats": {"method": label.split()[0]}}  # fmt: skip

    paths = []
    for seed, shift in ((1, 0.0), (2, 2.0)):
        rows = [row("teacache rel_l1_thresh=0.05", seed, 2.0, 1.9, 40.0 + shift),
                row("pab spatial_range=2", seed, 1.0, 1.4, 30.0 + shift)]  # fmt: skip
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"comparison": {"rows": rows, "means": {}}}))
        paths.append(str(path))
    merged = merge([json.loads(open(p).read()) for p in paths])
    m = merged["comparison"]["means"]["teacache rel_l1_thresh=0.05"]
    assert m["num_prompts"] == 2 and m["psnr_global"] == 41.0 and m["psnr_global_std"] == 1.0
    curves = points(merged, "work_ratio", "psnr_global")
    assert set(curves) == {"teacache", "pab"} and curves["pab"][0][1] == 1.4
    pareto_main([*paths, "--merge", "--table", "--x", "work_ratio", "-o", str(tmp_path / "m.png")])
    out = capsys.readouterr().out
    assert "| pab spatial_range=2 | 2 | 1.00× | 1.40× |" in out and "41.0 ± 1.0" in out
    assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG")


def test_teacache_threshold_zero_never_skips_even_where_the_polynomial_is_negative():
    coefficients = (0.0, -1.0)  # poly(d) = -d < 0: the accumulator goes negative
    ran = run(TeaCache(TeaCacheConfig(rel_l1_thresh=0.0, coefficients=coefficients), 10), random_probes(10))
    assert all(ran)
