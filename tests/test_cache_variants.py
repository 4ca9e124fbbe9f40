"""Issue 25's variants of the EasyCache rule (EasyCacheConfig.forecast / accumulate / max_skips), on
trajectories whose decisions and outputs can be worked out by hand."""

import pytest
import torch

from easycache import EasyCache, EasyCacheConfig
from easycache.baselines import StaticCache, StaticCacheConfig
from tests.test_cache import linear_trajectory, run


def test_forecast_extrapolates_delta_from_the_last_two_computed_steps():
    # v = x² + 1, so Δ_t = x_t² − x_t + 1 is known at every step; R = 3 computes steps 0..2, then all skip
    # (τ huge) but the last: Δ̂_t = Δ_2 + (t − 2)/(2 − 1)·(Δ_2 − Δ_1), exactly (same float ops)
    xs = linear_trajectory(8)
    model = lambda x: x * x + 1  # noqa: E731
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=3, forecast="linear"), num_steps=8)
    pattern, outs = run(cache, xs, model)
    assert pattern == "CCCSSSSC"
    d1, d2 = model(xs[1]) - xs[1], model(xs[2]) - xs[2]
    for t in range(3, 7):
        assert torch.equal(outs[t], xs[t] + (d2 + (t - 2) / 1 * (d2 - d1)))


def test_forecast_uses_the_gap_between_computed_steps():
    # static every 3rd step after R = 1: computed 0, 1, 4, 7; at step 5, j = 1, i = 4: w = (5 − 4)/(4 − 1)
    xs = linear_trajectory(9)
    model = lambda x: x * x + 1  # noqa: E731
    cache = StaticCache(StaticCacheConfig(interval=3, warmup=1, forecast="linear"), num_steps=9)
    pattern, outs = run(cache, xs, model)
    assert pattern == "CCSSCSSCC"
    d1, d4 = model(xs[1]) - xs[1], model(xs[4]) - xs[4]
    assert torch.equal(outs[5], xs[5] + (d4 + (1 / 3) * (d4 - d1)))
    # steps 2, 3: only one earlier computed pair (0, 1) -> extrapolated from it
    d0 = model(xs[0]) - xs[0]
    assert torch.equal(outs[2], xs[2] + (d1 + 1.0 * (d1 - d0)))


def test_forecast_with_one_computed_step_reuses_delta_as_it_is():
    xs = linear_trajectory(4)
    cache = StaticCache(StaticCacheConfig(interval=3, warmup=0, forecast="linear"), num_steps=4)
    pattern, outs = run(cache, xs, lambda x: 2 * x)
    assert pattern == "CSSC"
    assert torch.equal(outs[1], xs[1] + (2 * xs[0] - xs[0]))


def test_integral_accumulator_sums_the_accumulated_change():
    # As tests/test_cache.py's hand-worked pattern (v = 2x, R = 2): ε = 0.05/0.95 = 0.0526 from step 2, so
    # E = 0.053, 0.105, 0.158 and S = ΣE = 0.053, 0.158, 0.316 at steps 2, 3, 4: with τ = 0.25 steps 2, 3
    # skip and step 4 computes. From i = 4 (s = 0.8): ε = 0.0625: S = 0.0625, 0.1875, 0.375: 5, 6 skip, 7
    # computes; from i = 7 (s = 0.65): ε = 0.0769, S = 0.077 (8 skips), 9 is the last.
    cache = EasyCache(EasyCacheConfig(thresh=0.25, warmup=2, accumulate="integral"), num_steps=10)
    pattern, _ = run(cache, linear_trajectory(10), lambda x: 2 * x)
    assert pattern == "CCSSCSSCSC"
    trace = cache.trace
    assert trace[3]["acc"] == pytest.approx(3 * 0.05 / 0.95, rel=1e-5)
    assert trace[6]["acc"] == pytest.approx(3 * 0.05 / 0.8, rel=1e-5)


def test_max_skips_caps_a_run_of_skips():
    cache = EasyCache(EasyCacheConfig(thresh=1e9, warmup=2, max_skips=2), num_steps=10)
    pattern, _ = run(cache, linear_trajectory(10), lambda x: 2 * x)
    assert pattern == "CCSSCSSCSC"
    assert [r["reason"] for r in cache.trace][4] == "max_skips"


@pytest.mark.parametrize(
    "variant", [dict(forecast="linear"), dict(accumulate="integral"), dict(max_skips=1), dict(k_update="ema")]
)
def test_thresh_zero_computes_every_step_and_equals_no_cache(variant):
    torch.manual_seed(0)
    xs = [torch.randn(2, 3, 4) * (1 - 0.05 * t) for t in range(10)]
    model = lambda x: torch.tanh(x) + 0.1  # noqa: E731
    cache = EasyCache(EasyCacheConfig(thresh=0.0, warmup=0, **variant), num_steps=10)
    pattern, outs = run(cache, xs, model)
    assert pattern == "C" * 10
    assert all(torch.equal(o, model(x)) for o, x in zip(outs, xs))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(accumulate="sum"), "accumulate"),
        (dict(max_skips=-1), "max_skips"),
        (dict(max_skips=True), "max_skips"),
        (dict(forecast=True), "forecast"),
        (dict(forecast="quadratic"), "forecast"),
        (dict(forecast="linear", reuse_output=True), "reuse_output"),
    ],
)
def test_bad_variant_settings_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EasyCacheConfig(**kwargs)


def test_fitted_forecast_measures_its_gain_at_run_time():
    # Δ_t exactly linear in t (v_t = x_t + a + b·t): the fitted gain is 1 and every forecast is exact
    xs = linear_trajectory(9)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    cache = StaticCache(StaticCacheConfig(interval=2, warmup=3, forecast="fitted"), num_steps=9)
    for t, x in enumerate(xs):
        if cache.should_compute(t, x):
            cache.update(x, x + a + b * t)
        else:
            torch.testing.assert_close(cache.reuse(x), x + a + b * t, rtol=0, atol=1e-5)
    assert cache.stats["skipped_steps"] == [4, 6]
    assert float(cache._forecast.gain) == pytest.approx(1.0, abs=1e-5)


def test_fitted_forecast_falls_back_to_the_hold_where_delta_zigzags():
    # Δ alternates +a, −a at computed steps 0..3: the linear forecast from (h, j) = (1, 2) would have moved
    # the wrong way at i = 3, so the least-squares gain clamps to 0 and skipped steps reuse Δ_3 as it is
    xs = linear_trajectory(8)
    a = torch.randn(2, 3, 4)
    signs = iter([1.0, -1.0, 1.0, -1.0, 1.0])
    cache = StaticCache(StaticCacheConfig(interval=9, warmup=3, forecast="fitted"), num_steps=8)
    pattern, outs = run(cache, xs, lambda x: x + next(signs) * a)
    assert pattern == "CCCCSSSC"
    assert float(cache._forecast.gain) == 0.0
    torch.testing.assert_close(outs[4], xs[4] - a, rtol=0, atol=1e-6)  # Δ_3 = (x_3 − a) − x_3, rounded


def test_fitted_forecast_looks_at_most_one_gap_ahead():
    # static, interval 9, R = 3: computed 0, 1, 2, 3, then skips; the secant of the last
    # gap (1 step) is trusted one step ahead only; with Δ exactly linear (gain 1) every skipped step gets
    # Δ_3 + (Δ_3 − Δ_2) = Δ_4, not Δ_t
    xs = linear_trajectory(9)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    cache = StaticCache(StaticCacheConfig(interval=9, warmup=3, forecast="fitted"), num_steps=9)
    for t, x in enumerate(xs):
        if cache.should_compute(t, x):
            cache.update(x, x + a + b * t)
        else:
            torch.testing.assert_close(cache.reuse(x), x + a + b * 4, rtol=0, atol=1e-5)
    assert cache.stats["skipped_steps"] == [4, 5, 6, 7]


def test_the_summary_names_a_variant_only_when_it_is_not_the_papers_rule():
    from easycache.report import describe_cache

    xs = linear_trajectory(6)
    paper = EasyCache(EasyCacheConfig(thresh=1e9, warmup=2), num_steps=6)
    variant = EasyCache(EasyCacheConfig(thresh=1e9, warmup=2, forecast="fitted", accumulate="integral"), 6)
    for cache in (paper, variant):
        run(cache, xs, lambda x: 2 * x)
    assert describe_cache(paper.stats).startswith("easycache τ=1000000000.0 R=2: ")
    assert describe_cache(variant.stats).startswith(
        "easycache τ=1000000000.0 R=2 forecast=fitted accumulate=integral:"
    )
