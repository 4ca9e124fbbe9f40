"""Calibrate TeaCache and MagCache for any model from uncached runs, the way their authors did.

    python sample_wan.py --task tiny --cache analyze --prompts CAPTIONS.txt --report calib_runs.json
    python -m easycache.calibrate calib_runs.json -o calibration.json --probe e
    python sample_wan.py --task tiny --cache teacache --teacache.coefficients calibration.json ...
    python sample_wan.py --task tiny --cache magcache --magcache.mag_ratios calibration.json ...

`--cache analyze` runs the uncached baseline (every step computed, bit-identical to --cache none) and records,
per step and CFG branch, what the two methods are fitted to:
  - TeaCache: the relative L1 change of each probe of the DiT (Wan: e, e0; HunyuanVideo, OpenSora: modulated)
    and of the DiT output between consecutive steps. The authors fit `np.polyfit(input_change,
    output_change, 4)` over all steps of 70 prompts (TeaCache issue #2); so does `fit_teacache`.
  - MagCache: the ratio ‖r_t‖ / ‖r_{t−1}‖ of consecutive block-stack residuals r = x_out − x_in (mean over
    tokens of the per-token L2-norm ratio, official `magcache_calibration`). The authors record it from one
    prompt; with several runs `fit_magcache` averages them per step.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

# --------------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------------


def fit_teacache(traces: list[list[dict]], probe: str, degree: int = 4) -> dict:
    """TeaCache's rescaling polynomial: np.polyfit(probe change, output change, degree) over every step ≥ 1
    and branch of every run (highest power first, as `np.poly1d` and TeaCacheConfig.coefficients read it)."""
    xs, ys = [], []
    for trace in traces:
        for rec in trace:
            for calib in (rec.get("calib") or {}).values():
                x, y = (calib.get("probe_rel_l1") or {}).get(probe), calib.get("out_rel_l1")
                if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                    xs.append(x)
                    ys.append(y)
    if len(xs) <= degree:
        raise ValueError(
            f"only {len(xs)} (probe {probe!r}, output) pairs in the reports: record them with --cache analyze"
            " (the probe names a DiT offers: Wan e, e0; HunyuanVideo and OpenSora modulated)"
        )
    coefficients = np.polyfit(xs, ys, degree)
    rmse = float(np.sqrt(np.mean((np.polyval(coefficients, xs) - np.asarray(ys)) ** 2)))
    return {
        "coefficients": [float(c) for c in coefficients],
        "probe": probe,
        "num_pairs": len(xs),
        "rmse": rmse,
    }


def fit_magcache(traces: list[list[dict]]) -> dict:
    """MagCache's per-step magnitude ratios per branch (step 0 = 1.0, the official padding), averaged over
    runs."""
    sums: dict[str, dict[int, list[float]]] = {}
    num_steps = max(len(t) for t in traces)
    for trace in traces:
        for rec in trace:
            for branch, calib in (rec.get("calib") or {}).items():
                if calib.get("mag_ratio") is not None:
                    sums.setdefault(branch, {}).setdefault(rec["step"], []).append(calib["mag_ratio"])
    if not sums:
        raise ValueError("no block-stack residual ratios in the reports: record them with --cache analyze")
    ratios = {
        b: [1.0] + [float(np.mean(per_step[s])) if s in per_step else 1.0 for s in range(1, num_steps)]
        for b, per_step in sums.items()
    }
    return {"mag_ratios": ratios, "num_runs": len(traces)}


def main(argv: list[str] | None = None) -> None:
    from .plot import traces_of

    p = argparse.ArgumentParser(
        description="fit TeaCache's polynomial and MagCache's ratios from --cache analyze"
    )
    p.add_argument("reports", nargs="+", help="JSON reports written with --cache analyze")
    p.add_argument("-o", "--output", default="calibration.json")
    p.add_argument(
        "--probe", default="e", help="TeaCache's probe (Wan: e or e0; Hunyuan/OpenSora: modulated)"
    )
    p.add_argument("--degree", type=int, default=4, help="polynomial degree (official: 4)")
    args = p.parse_args(argv)
    traces = []
    try:
        for path in args.reports:
            with open(path) as f:
                traces += [trace for _, trace, _ in traces_of(json.load(f))]
        result = {
            "teacache": fit_teacache(traces, args.probe, args.degree),
            "magcache": fit_magcache(traces),
            "sources": args.reports,
        }
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {e}") from None
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    tc = result["teacache"]
    print(f"TeaCache ({tc['probe']}, {tc['num_pairs']} pairs, rmse {tc['rmse']:.3g}): {tc['coefficients']}")
    print(f"MagCache: {len(traces)} run(s), branches {sorted(result['magcache']['mag_ratios'])}")
    print(
        f"wrote {args.output}: use --teacache.coefficients {args.output}, --magcache.mag_ratios {args.output}"
    )


if __name__ == "__main__":
    main()
