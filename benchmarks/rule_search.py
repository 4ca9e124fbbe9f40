"""Issue 25's experiment: variants of the EasyCache rule against every baseline, two settings, equal work.

    python -m benchmarks.rule_search run --out outputs/rule_search     # every (setting, series) missing
    python -m benchmarks.rule_search run --out outputs/rule_search --only demo:static,demo:easycache
    python -m benchmarks.rule_search analyze --out outputs/rule_search --md docs/rule_search_table.md

`run` is `sample_wan.py --task tiny --compare --sweep ...` once per (setting, series), on the 6 captions of
`prompts/tiny_captions.txt` x 2 seeds (12 runs, each against its own uncached video); one JSON each, kept, so
that an interrupted search resumes. The settings: the demo model as trained and shipped (50 UniPC steps,
shift 3, CFG 5) and the same weights under another solver, step count and shift (40 Euler steps, shift 5),
on which no choice was tuned. TeaCache and MagCache are calibrated per setting on other captions and another
seed (`prompts/tiny_calibration.txt`, seed 7; `calibrate`), never on the measured runs.

`analyze` puts every series on the work-ratio axis (analytic DiT FLOPs of the baseline over those spent; for
the step caches it equals the NFE ratio), interpolates each run's PSNR (global, against its uncached video)
linearly between the series' points at work ratios 1.5, 2, 2.5, 3 and 3.5, and reports per setting the mean
± std over the 12 runs, and the paired difference per run against the authors' rule and against the best
baseline at that ratio. A series is compared only where its points cover the ratio (no extrapolation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

TARGETS = (1.5, 2.0, 2.5, 3.0, 3.5)
PROMPTS, SEEDS, BASE_SEED = "prompts/tiny_captions.txt", 2, 1234
CALIB_PROMPTS, CALIB_SEED = "prompts/tiny_calibration.txt", 7
SETTINGS = {  # name -> sample_wan.py flags
    "demo": [],  # the tiny task's defaults: 50 UniPC steps, shift 3
    "euler40": ["--sample_solver", "euler", "--sample_steps", "40", "--sample_shift", "5"],
}
TAU = "0.025,0.05,0.1,0.2,0.3"
TAU_INTEGRAL = "0.03,0.1,0.2,0.4,0.8,1.6"
PAB = [
    "--pab.cross_broadcast",
    "true",
    "--pab.spatial_threshold",
    "50:950",
    "--pab.cross_threshold",
    "50:950",
]
# series -> (flags, sweep). "authors" is the paper's rule; the other easycache series are the candidates.
SERIES = {
    "authors": ([], f"easycache.thresh={TAU}"),
    "k_ema": (["--easycache.k_update", "ema"], f"easycache.thresh={TAU}"),
    "integral": (["--easycache.accumulate", "integral"], f"easycache.thresh={TAU_INTEGRAL}"),
    "fitted": (["--easycache.forecast", "fitted"], f"easycache.thresh={TAU}"),
    "integral_fitted": (
        ["--easycache.accumulate", "integral", "--easycache.forecast", "fitted"],
        f"easycache.thresh={TAU_INTEGRAL}",
    ),
    "static_fitted": (["--static.forecast", "fitted"], "static.interval=2,3,4,6,8"),
    # the low end (below 1.6x) and, with a shorter warm-up R = 5, the high end (R = 10 of 40 Euler steps caps
    # the NFE ratio at 40/11 = 3.6x and leaves few steps to skip at 3x)
    "integral_fitted_low": (
        ["--easycache.accumulate", "integral", "--easycache.forecast", "fitted"],
        "easycache.thresh=0.01,0.02",
    ),
    "authors_r5": (["--warmup", "5"], f"easycache.thresh={TAU},0.5"),
    "integral_fitted_r5": (
        ["--warmup", "5", "--easycache.accumulate", "integral", "--easycache.forecast", "fitted"],
        f"easycache.thresh={TAU_INTEGRAL},3.2,6.4",
    ),
    "static": ([], "static.interval=2,3,4,6,8"),
    "teacache": ([], "teacache.rel_l1_thresh=0.025,0.035,0.05,0.08,0.12"),
    "magcache": (["--magcache_K", "6"], "magcache.magcache_thresh=0.05,0.1,0.2,0.5,1.0"),
    "pab": (PAB, "pab.spatial_range=2,4,8"),
}
JOIN = {"integral_fitted": ("integral_fitted_low",)}  # more points of the same rule, analysed as one series
BASELINES = ("static", "teacache", "magcache", "pab")


def calibration(out: str, setting: str) -> str:
    return os.path.join(out, setting, "calibration.json")


def calibrate(out: str, setting: str) -> str:
    """TeaCache's polynomial and MagCache's ratios for `setting`, from the calibration captions and seed."""
    path = calibration(out, setting)
    if not os.path.exists(path):
        analyze = os.path.join(out, setting, "calib", "analyze.mp4")
        seed = ["--base_seed", str(CALIB_SEED)]
        _run(
            [
                *_sample(setting),
                "--cache",
                "analyze",
                "--prompts",
                CALIB_PROMPTS,
                *seed,
                "--save_file",
                analyze,
            ]
        )
        _run(
            [sys.executable, "-m", "easycache.calibrate", analyze[:-4] + ".json", "-o", path, "--probe", "e"]
        )
    return path


def run(out: str, only: list[str] | None, seeds: int = SEEDS) -> None:
    for setting in SETTINGS:
        calib = calibrate(out, setting)
        for name, (flags, sweep) in SERIES.items():
            if only and f"{setting}:{name}" not in only:
                continue
            report = os.path.join(out, setting, f"{name}.json")
            if os.path.exists(report):
                continue
            calib_flags = ["--teacache.coefficients", calib, "--magcache.mag_ratios", calib]
            runs = ["--prompts", PROMPTS, "--num-seeds", str(seeds), "--base_seed", str(BASE_SEED)]
            files = ["--save_file", os.path.join(out, setting, name, "x.mp4"), "--report", report]
            sweep_flags = [*calib_flags, *flags, "--sweep", sweep, "--no-lpips", "--quiet"]
            _run([*_sample(setting), "--compare", *runs, *sweep_flags, *files])


def _sample(setting: str) -> list[str]:
    return [sys.executable, "sample_wan.py", "--task", "tiny", *SETTINGS[setting]]


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(
        cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    )


# ------------------------------------------------------------------------------------------------------------
# Analysis
# ------------------------------------------------------------------------------------------------------------
def load_runs(path: str, method: str) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """{(prompt, seed): [(work ratio, PSNR), ...]} of one series' report (its rows of `method`: a report
    of a wider --compare may stand in for several series), sorted by work ratio."""
    with open(path) as f:
        rows = json.load(f)["comparison"]["rows"]
    runs: dict[tuple[str, int], list] = {}
    for r in rows:
        if r["label"].split()[0] != method:
            continue
        x, y = r.get("work_ratio"), r.get("psnr_global")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            runs.setdefault((r["prompt"], r["seed"]), []).append((float(x), float(y)))
    return {k: sorted(v) for k, v in runs.items()}


def at(points: list[tuple[float, float]], x: float) -> float | None:
    """PSNR at work ratio `x`, linear between the neighbouring points; None outside their range."""
    xs, ys = zip(*points)
    if not xs[0] <= x <= xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def curves(out: str, setting: str) -> tuple[dict, dict]:
    """{series: {target: {run: PSNR}}} (only runs whose points cover the target), {series: its runs}."""
    result, runs_of = {}, {}
    joined = {part for parts in JOIN.values() for part in parts}
    for name in SERIES:
        path = os.path.join(out, setting, f"{name}.json")
        if name in joined or not os.path.exists(path):
            continue
        runs = load_runs(path, SERIES[name][1].split(".")[0])
        for part in JOIN.get(name, ()):
            extra = os.path.join(out, setting, f"{part}.json")
            if os.path.exists(extra):
                for run, pts in load_runs(extra, "easycache").items():
                    if run in runs:
                        runs[run] = sorted(runs[run] + pts)
        runs_of[name] = list(runs)
        result[name] = {
            x: {run: v for run, pts in runs.items() if (v := at(pts, x)) is not None} for x in TARGETS
        }
    return result, runs_of


def summarise(out: str, setting: str) -> dict:
    """Per target: every series' mean ± std (where all its runs reach it), and the paired differences
    (same prompt and seed) against the authors' rule and the best baseline at that ratio."""
    c, runs_of = curves(out, setting)
    table = {}
    for x in TARGETS:
        row = {}
        for name, per_target in c.items():
            vals = list(per_target[x].values())
            if vals and len(vals) == len(runs_of[name]):
                row[name] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "runs": len(vals)}
        best = max((b for b in BASELINES if b in row), key=lambda b: row[b]["mean"], default=None)
        for name in row:
            for ref, key in (("authors", "vs_authors"), (best, "vs_best_baseline")):
                if ref is None or ref not in row or ref == name:
                    continue
                diff = [c[name][x][run] - c[ref][x][run] for run in c[name][x] if run in c[ref][x]]
                wins = int(sum(d > 0 for d in diff))
                row[name][key] = {"mean": float(np.mean(diff)), "std": float(np.std(diff)), "wins": wins,
                                  "n": len(diff), "ref": ref}  # fmt: skip
        table[x] = {"best_baseline": best, "series": row}
    return table


def markdown(summaries: dict[str, dict]) -> str:
    lines = []
    for setting, table in summaries.items():
        names = [n for n in SERIES if any(n in table[x]["series"] for x in TARGETS)]
        head = (
            f"**{setting}** (PSNR in dB at equal work ratio, mean ± std over the runs; below: the paired "
            "difference against the best baseline at that ratio / the authors' rule, and the runs it wins)"
        )
        cols = "| series | " + " | ".join(f"{x:g}×" for x in TARGETS) + " |"
        lines += [head, "", cols, "|---" * (len(TARGETS) + 1) + "|"]
        for name in names:
            cells = []
            for x in TARGETS:
                s = table[x]["series"].get(name)
                if s is None:
                    cells.append("–")
                    continue
                cell = f"{s['mean']:.1f} ± {s['std']:.1f}"
                if name not in BASELINES and "vs_best_baseline" in s:
                    d = s["vs_best_baseline"]
                    cell += f"<br>{d['mean']:+.1f} vs {d['ref']} ({d['wins']}/{d['n']})"
                if name not in BASELINES and name != "authors" and "vs_authors" in s:
                    d = s["vs_authors"]
                    cell += f"<br>{d['mean']:+.1f} vs authors ({d['wins']}/{d['n']})"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(out: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(6 * len(SETTINGS), 4.5), constrained_layout=True)
    for ax, setting in zip(np.atleast_1d(axes), SETTINGS):
        joined = {part for parts in JOIN.values() for part in parts}
        for name in SERIES:
            if name in joined:
                continue
            method, means = SERIES[name][1].split(".")[0], []
            for part in (name, *JOIN.get(name, ())):
                file = os.path.join(out, setting, f"{part}.json")
                if os.path.exists(file):
                    with open(file) as f:
                        means += [m for label, m in json.load(f)["comparison"]["means"].items()
                                  if label.split()[0] == method]  # fmt: skip
            pts = sorted(
                (m["work_ratio"], m["psnr_global"], m.get("psnr_global_std") or 0)
                for m in means
                if isinstance(m.get("psnr_global"), (int, float)) and math.isfinite(m["psnr_global"])
            )
            if pts:
                xs, ys, es = zip(*pts)
                style = "--" if name in BASELINES else "-"
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, ls=style, label=name)
        ax.set_title(setting)
        ax.set_xlabel("work ratio (analytic DiT FLOPs saved)")
        ax.set_ylabel("PSNR vs uncached, global (dB)")
        ax.set_xlim(1.3, 4.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "analyze"])
    p.add_argument("--out", default="outputs/rule_search")
    p.add_argument("--only", help="run: comma list of SETTING:SERIES (default: all that are missing)")
    p.add_argument("--seeds", type=int, default=SEEDS, help="run: sampling seeds per caption (default 2)")
    p.add_argument("--md", help="analyze: write the markdown tables here")
    p.add_argument("--json", help="analyze: write the summaries here")
    p.add_argument("--plot", help="analyze: write the Pareto curves here")
    args = p.parse_args(argv)
    if args.command == "run":
        run(args.out, args.only.split(",") if args.only else None, args.seeds)
        return
    summaries = {s: summarise(args.out, s) for s in SETTINGS if os.path.isdir(os.path.join(args.out, s))}
    text = markdown(summaries)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({s: {str(x): v for x, v in t.items()} for s, t in summaries.items()}, f, indent=1)
    if args.plot:
        plot(args.out, args.plot)


if __name__ == "__main__":
    main()
