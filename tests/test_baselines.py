"""The static-interval baseline and the shared command-line flags."""

import argparse

import pytest
import torch

from easycache import EasyCache, EasyCacheConfig, StaticCache, StaticCacheConfig
from easycache.cli import add_cache_args, add_output_args, cache_config, make_cache


def pattern_of(cache, n, model=lambda x: 2 * x + 1):
    out, last = "", None
    for step in range(n):
        x = torch.full((2, 3), 1.0 - 0.03 * step)
        if cache.should_compute(step, x):
            cache.update(x, model(x))
            out, last = out + "C", x
        else:
            assert torch.equal(cache.reuse(x), x + (model(last) - last))  # x_t + Δ_i
            out += "S"
    return out


@pytest.mark.parametrize(
    "interval,warmup,compute_last,expected",
    [
        (3, 2, True, "CCCSSCSSCC"),  # computes 0, 1 (warm-up), then 2, 5, 8 and the last step 9
        (2, 0, True, "CSCSCSCSCC"),
        (1, 4, True, "CCCCCCCCCC"),
        (4, 1, False, "CCSSSCSSSC"),  # 1, 5, 9 come from the interval
        (4, 2, False, "CCCSSSCSSS"),
    ],
)
def test_static_schedule(interval, warmup, compute_last, expected):
    cache = StaticCache(StaticCacheConfig(interval=interval, warmup=warmup, compute_last=compute_last), 10)
    assert pattern_of(cache, 10) == expected
    reasons = {r["reason"] for r in cache.trace}
    assert reasons <= {"warmup", "interval", "last_step", "reuse"}
    assert cache.stats["method"] == "static" and cache.stats["config"]["interval"] == interval


def test_static_dict_branches():
    cache = StaticCache(StaticCacheConfig(interval=2, warmup=1), 4)
    x0, x1 = torch.ones(3), torch.full((3,), 0.5)
    assert cache.should_compute(0, x0)
    cache.update(x0, {"cond": 2 * x0, "uncond": 3 * x0})
    assert cache.should_compute(1, x1)  # (1 − R) % 2 == 0
    cache.update(x1, {"cond": 2 * x1, "uncond": 3 * x1})
    assert not cache.should_compute(2, x0)
    out = cache.reuse(x0)
    assert torch.equal(out["cond"], x0 + x1) and torch.equal(out["uncond"], x0 + 2 * x1)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(interval=0), "interval"),
        (dict(warmup=-2), "warmup"),
        (dict(interval=1.5), "interval"),
        (dict(compute_last=None), "compute_last"),
    ],
)
def test_static_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StaticCacheConfig(**kwargs)


def parse(*argv, **defaults):
    parser = argparse.ArgumentParser()
    add_cache_args(parser, **defaults)
    add_output_args(parser)
    return parser.parse_args(list(argv))


def test_cli_defaults_are_the_model_defaults():
    args = parse(thresh=0.025, warmup=5)
    cfg = cache_config(args)
    assert cfg == EasyCacheConfig(thresh=0.025, warmup=5)
    assert isinstance(make_cache(cfg, 50), EasyCache)
    assert cache_config(parse()) == EasyCacheConfig()


def test_cli_switches_method_with_one_flag():
    assert cache_config(parse("--cache", "none")) is None
    assert make_cache(None, 50) is None
    cfg = cache_config(parse("--cache", "static", "--interval", "3", "--warmup", "4"))
    assert cfg == StaticCacheConfig(interval=3, warmup=4)
    assert isinstance(make_cache(cfg, 50), StaticCache)
    cfg = cache_config(
        parse("--k_update", "ema", "--ema-decay", "0.8", "--reuse-output", "--no-compute-last")
    )
    assert cfg == EasyCacheConfig(k_update="ema", ema_decay=0.8, reuse_output=True, compute_last=False)


def test_cli_rejects_bad_values_early():
    with pytest.raises(ValueError, match="thresh"):
        cache_config(parse("--thresh", "-1"))
    with pytest.raises(SystemExit):
        parse("--cache", "fastercache")  # not a method of this project
    with pytest.raises(ValueError, match="warmup"):
        make_cache(cache_config(parse("--warmup", "50")), 50)


def test_compare_configs():
    from easycache.cli import check_cache_args, compare_configs

    assert compare_configs(parse("--thresh", "0.1", "--compare")) == [
        ("easycache", EasyCacheConfig(thresh=0.1))
    ]
    sweep = compare_configs(parse("--sweep-thresh", "0.02,0.1", "--sweep-interval", "2,4", "--warmup", "3"))
    assert [label for label, _ in sweep] == [
        "easycache τ=0.02",
        "easycache τ=0.1",
        "static n=2",
        "static n=4",
    ]
    assert sweep[1][1] == EasyCacheConfig(thresh=0.1, warmup=3)
    assert sweep[3][1] == StaticCacheConfig(interval=4, warmup=3)
    with pytest.raises(ValueError, match="needs a cache"):
        compare_configs(parse("--cache", "none", "--compare"))
    with pytest.raises(ValueError, match="interval"):
        check_cache_args(parse("--compare", "--sweep-interval", "0"), 50)
