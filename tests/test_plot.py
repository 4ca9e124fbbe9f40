"""Trace plots from a report, and the analysis mode that records k_t at every step."""

import json

import pytest
import torch

from easycache import make_cache
from easycache.cli import cache_config
from easycache.plot import main as plot_main
from easycache.plot import trace_figure, traces_of
from tests.test_baselines import parse


def run_cache(cfg, n=12):
    cache = make_cache(cfg, n)
    x = torch.ones(2, 3)
    for step in range(n):
        x = x * 0.95
        if cache.should_compute(step, x):
            cache.update(x, {"cond": x * x, "uncond": 2 * x})
        else:
            cache.reuse(x)
    return cache


def test_analyze_mode_computes_every_step_and_records_the_rate():
    cfg = cache_config(parse("--cache", "analyze"))
    cache = run_cache(cfg)
    trace = cache.trace
    assert all(r["compute"] for r in trace)
    assert trace[0]["rate"] is None and all(r["rate"] is not None for r in trace[1:])
    # v = x² along x_t = 0.95^(t+1): the one-step rate is x_t + x_{t-1}
    assert trace[5]["rate"] == pytest.approx(0.95**6 + 0.95**5, rel=1e-5)


def test_plot_writes_a_png_for_each_report_layout(tmp_path):
    cache = run_cache(cache_config(parse("--thresh", "0.2", "--warmup", "3")))
    single = {"prompt": "p", "trace": cache.trace, "cache": cache.stats}
    listed = {"runs": [single, {**single, "prompt": "q"}]}
    compared = {
        "comparison": {
            "rows": [{"prompt": "p", "label": "easycache", "trace": cache.trace, "cache_stats": cache.stats}]
        }
    }
    for name, report in (("single", single), ("runs", listed), ("compare", compared)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(report))
        plot_main([str(path)] + (["--run", "1"] if name == "runs" else []))
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert [label for label, _, _ in traces_of(listed)] == ["p", "q"]


def test_threshold_line_only_where_the_run_had_a_threshold():
    def labels(cfg):
        cache = run_cache(cfg)
        fig = trace_figure(cache.trace, cache.stats, "t")
        _, names = fig.axes[1].get_legend_handles_labels()
        fig.clf()
        return names

    assert "τ = 0.2" in labels(cache_config(parse("--thresh", "0.2", "--warmup", "3")))
    analyze = labels(cache_config(parse("--cache", "analyze")))  # τ = 0: every step computed, no threshold
    assert not [n for n in analyze if n.startswith("τ")] and "accumulated E_t" in analyze


def test_plot_refuses_a_report_without_trace(tmp_path):
    path = tmp_path / "none.json"
    path.write_text(json.dumps({"prompt": "p", "trace": None}))
    with pytest.raises(ValueError, match="no per-step trace"):
        plot_main([str(path)])
    with pytest.raises(SystemExit):
        path.write_text(json.dumps({"trace": run_cache(cache_config(parse())).trace}))
        plot_main([str(path), "--run", "3"])


def test_pareto_plot_from_a_sweep_report(tmp_path):
    from easycache.pareto import main as pareto_main
    from easycache.pareto import points

    def mean(nfe, psnr):
        return {"nfe_ratio": nfe, "nfe_ratio_std": 0.1, "psnr_global": psnr, "psnr_global_std": 0.5}

    means = {"easycache τ=0.0": mean(1.0, "inf"), "easycache τ=0.1": mean(2.0, 30.0),
             "easycache τ=0.05": mean(1.5, 35.0), "static n=2": mean(1.8, 28.0)}  # fmt: skip
    report = {"comparison": {"rows": [], "means": means}}
    curves = points(report, "nfe_ratio", "psnr_global")
    assert [p[0] for p in curves["easycache"]] == [
        "easycache τ=0.05",
        "easycache τ=0.1",
    ]  # sorted by x, inf out
    assert curves["static"] == [("static n=2", 1.8, 0.1, 28.0, 0.5)]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(report, allow_nan=False))
    pareto_main([str(path), "-o", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="no --compare"):
        points({"trace": []}, "nfe_ratio", "psnr_global")
