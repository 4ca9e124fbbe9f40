"""The cache seams of the three DiTs: a hook that computes gives the plain forward bit for bit (same process,
same inputs, same kernels); a skip returns x + the cached residual; a broadcast returns the stored attention;
and the sample loops with TeaCache/MagCache/PAB at threshold 0 are bit-identical to no cache."""

import numpy as np
import pytest
import torch

from easycache import PAB, MagCache, MagCacheConfig, PABConfig, TeaCache, TeaCacheConfig
from easycache.analyze import Analyze, AnalyzeConfig
from models.hunyuan import HunyuanVideoModel
from models.opensora import STDiT3
from models.wan import WanModel, flops_per_call
from tests.test_hunyuan_model import TINY as HY_TINY
from tests.test_hunyuan_model import randomize_, tiny_inputs
from tests.test_opensora_model import TINY as OS_TINY
from tests.test_wan_model import _inputs, _tiny


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; a shared 2-core machine only loses time to a second thread
    yield
    torch.set_num_threads(threads)


def wan():
    torch.manual_seed(0)
    cfg = _tiny()
    model = WanModel(cfg).eval()
    x, t, context, _, _ = _inputs(cfg)
    return model, lambda cache=None: model(x, t, context, cache=cache)


def opensora():
    torch.manual_seed(0)
    model = STDiT3(OS_TINY).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    y = torch.randn(2, 1, 12, 32, generator=g)
    args = (x, torch.tensor([900.0, 900.0]), y, None, torch.tensor([24.0]), torch.tensor([64.0]),
            torch.tensor([64.0]))  # fmt: skip
    return model, lambda cache=None: model(*args, cache=cache)


def hunyuan():
    torch.manual_seed(0)
    model = HunyuanVideoModel(HY_TINY).eval()
    randomize_(model)
    args = tiny_inputs()
    return model, lambda cache=None: model(*args, cache=cache)


MODELS = {"wan": wan, "opensora": opensora, "hunyuan": hunyuan}


def drive(cache, call, steps):
    """Run `steps` sampling steps of one branch through the DiT with the cache's hook; outputs per step."""
    outs = []
    for i in range(steps):
        x = torch.zeros(1)  # the step-level input is not what these caches read
        assert cache.should_compute(i, x)
        with torch.no_grad():
            outs.append(call(cache.hook("cond")))
        cache.update(x, torch.zeros(1))
    return outs


@pytest.mark.parametrize("name", list(MODELS))
def test_hooks_that_compute_equal_the_plain_forward(name):
    model, call = MODELS[name]()
    with torch.no_grad():
        plain = call()
    caches = [
        TeaCache(TeaCacheConfig(rel_l1_thresh=0.0, probe="e" if name == "wan" else "modulated"), 3),
        MagCache(MagCacheConfig(magcache_thresh=0.0, mag_ratios={"cond": (1.0, 1.0, 1.0)}), 3),
        PAB(
            PABConfig(
                spatial_range=1,
                cross_broadcast=True,
                cross_range=1,
                temporal_broadcast=True,
                temporal_range=1,
            ),
            3,
            timesteps=[500.0] * 3,
        ),  # fmt: skip
        Analyze(AnalyzeConfig(), 3),
    ]
    for cache in caches:
        for out in drive(cache, call, 3):
            assert torch.equal(out, plain), type(cache).__name__
    assert caches[3].trace[1]["calib"]["cond"]["mag_ratio"] == pytest.approx(1.0)  # same input, same residual


@pytest.mark.parametrize("name", list(MODELS))
def test_a_skipped_block_stack_reuses_the_residual(name):
    model, call = MODELS[name]()
    with torch.no_grad():
        plain = call()
    # τ huge, nothing forced but step 0: steps 1 and 2 run embed + head on x + the cached residual
    cache = TeaCache(TeaCacheConfig(rel_l1_thresh=1e9, probe="e" if name == "wan" else "modulated",
                                    coefficients=(1.0, 0.0), compute_last=False), 3)  # fmt: skip
    outs = drive(cache, call, 3)
    assert cache.stats["computed_steps"] == [0]
    # x_in + (x_out − x_in) differs from x_out by at most one rounding per element (fp32, relative ~1e-7 of
    # the residual stream's magnitude); the head maps that to the output.
    for out in outs[1:]:
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_broadcast_attention_is_the_stored_one(name):
    model, call = MODELS[name]()
    with torch.no_grad():
        plain = call()
    # step 1 broadcasts every kind (1 % 2 != 0, inside the window): with the same inputs as step 0 the stored
    # outputs are the ones the plain forward computes, so the result is bit-identical
    everywhere = (0, 1000)
    kinds = {f"{k}_{f}": v for k in ("spatial", "temporal", "cross") for f, v in
             (("broadcast", True), ("range", 2), ("threshold", everywhere))}  # fmt: skip
    cfg = PABConfig(**kinds)
    cache = PAB(cfg, 2, timesteps=[900.0, 800.0])
    outs = drive(cache, call, 2)
    assert all(torch.equal(o, plain) for o in outs)
    broadcast = sum(c["broadcast"] for c in cache.stats["attention"].values())
    layers = {"wan": 2, "opensora": 4, "hunyuan": 4}[name]
    kinds = {"wan": 2, "opensora": 2, "hunyuan": 1}[name]  # OpenSora: spatial or temporal, and cross
    assert broadcast == layers * kinds


def test_wan_flops_per_call_counts_each_part():
    cfg = _tiny()
    cost = flops_per_call(cfg, (3, 4, 3))
    L, D = 36, cfg.dim  # noqa: N806
    assert cost["spatial"] == 8 * L * D * D + 4 * L * L * D
    assert cost["blocks"] == cfg.num_layers * (cost["spatial"] + cost["cross"] + 4 * L * D * cfg.ffn_dim)
    embed = 2 * L * D * 4 * 4 + 2 * cfg.text_len * (cfg.text_dim * D + D * D)  # patches, text MLP
    assert cost["call"] == cost["blocks"] + embed + 2 * L * D * 4 * 4  # + the head
    assert flops_per_call(cfg, (3, 4, 3), batch=2)["call"] == 2 * cost["call"]


# --------------------------------------------------------------------------------------------------------
# The sample loops end to end
# --------------------------------------------------------------------------------------------------------

from tests.test_sample_wan import PROMPT, ckpt_dir  # noqa: E402, F401 (a fixture)


@pytest.mark.slow
def test_wan_loop_with_each_method_at_threshold_zero_is_the_baseline(ckpt_dir):  # noqa: F811
    import sample_wan

    args = sample_wan.parse_args(["--task", "tiny", "--sample_steps", "8", "--warmup", "2", "--quiet"])
    sample_wan.check_args(args)
    pipe = sample_wan.WanT2V(sample_wan.TASKS["tiny"], str(ckpt_dir), args)
    base = pipe.generate(PROMPT, 5, None)
    for cfg in (
        TeaCacheConfig(rel_l1_thresh=0.0),
        MagCacheConfig(magcache_thresh=0.0),
        PABConfig(spatial_broadcast=False),
        AnalyzeConfig(),
    ):
        gen = pipe.generate(PROMPT, 5, cfg)
        assert torch.equal(base.latents, gen.latents) and np.array_equal(base.frames, gen.frames), cfg
    skip = pipe.generate(PROMPT, 5, TeaCacheConfig(rel_l1_thresh=1.0, coefficients=(1.0, 0.0)))
    s = skip.cache_stats
    assert s["method"] == "teacache" and 0 < s["block_calls"] < s["dit_calls"] == 16
    assert s["work_ratio"] > 1 and not torch.equal(base.latents, skip.latents)
    pab = pipe.generate(PROMPT, 5, PABConfig(spatial_threshold=(0, 1000), cross_broadcast=True))
    assert pab.cache_stats["nfe_ratio"] == 1.0 and pab.cache_stats["work_ratio"] > 1.0
    assert torch.equal(base.latents, pipe.generate(PROMPT, 5, None).latents)  # no state leaks
