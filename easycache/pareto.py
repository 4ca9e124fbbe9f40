"""Speed-up against fidelity for every cache of one or more `--compare` reports: the Pareto curve.

    python sample_wan.py --task tiny --compare --prompts prompts/tiny_captions.txt --num-seeds 3 \
        --sweep-thresh 0.02,0.05,0.1,0.2 --sweep-interval 2,3,4,6 --report outputs/sweep.json
    python -m easycache.pareto outputs/sweep.json -o outputs/pareto.png --x nfe_ratio
    python -m easycache.pareto seed1.json seed2.json --merge --table -o pareto.png   # a sweep split by seed

Each point is a cache configuration (label), at the mean over all (prompt, seed) pairs, with ± one standard
deviation as error bars; every method of the report (easycache, static, teacache, magcache, pab) gets one line
and one colour. `--x work_ratio` puts them all on the analytic-FLOPs axis (PAB saves FLOPs inside DiT calls,
so its NFE ratio is 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os

X_KEYS = {"nfe_ratio": "NFE ratio (DiT calls saved)", "work_ratio": "work ratio (DiT FLOPs saved, analytic)",
          "speedup_dit": "DiT speed-up", "speedup_e2e": "end-to-end speed-up"}  # fmt: skip
# One colour per method, the same in every plot.
COLORS = {"easycache": "tab:red", "static": "tab:gray", "teacache": "tab:blue", "magcache": "tab:green",
          "pab": "tab:orange"}  # fmt: skip
Y_KEYS = {"psnr_global": "PSNR, global MSE (dB)", "psnr_per_frame": "PSNR, per-frame mean (dB)",
          "ssim": "SSIM", "latent_psnr": "latent PSNR (dB)"}  # fmt: skip


def points(report: dict, x: str, y: str) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """{method: [(label, x mean, x std, y mean, y std), ...]} from a report's per-config means."""
    means = (report.get("comparison") or {}).get("means")
    if not means:
        raise ValueError("the report holds no --compare results")
    out: dict[str, list] = {}
    for label, m in means.items():
        values = (m.get(x), m.get(y))
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            continue  # e.g. τ = 0: identical to the baseline, infinite PSNR (written "inf" in the JSON)
        method = label.split()[0]
        out.setdefault(method, []).append(
            (label, m[x], m.get(f"{x}_std") or 0.0, m[y], m.get(f"{y}_std") or 0.0)
        )
    return {k: sorted(v, key=lambda p: p[1]) for k, v in out.items()}


def merge(reports: list[dict]) -> dict:
    """One report from several --compare reports of the same sweep (e.g. seeds run on different machines):
    all their rows, and the mean ± std of each configuration over all of them."""
    from .compare import aggregate

    rows = [r for rep in reports for r in (rep.get("comparison") or {}).get("rows", [])]
    if not rows:
        raise ValueError("the reports hold no --compare results")
    labels = list(dict.fromkeys(r["label"] for r in rows))
    drop = ("cache_stats", "trace", "outputs")
    means = {
        label: aggregate([{k: v for k, v in r.items() if k not in drop} for r in rows if r["label"] == label])
        for label in labels
    }
    return {"comparison": {"rows": rows, "means": means}}


TABLE = [  # (key, header, format) of `table`
    ("nfe_ratio", "NFE ratio", "{:.2f}×"), ("work_ratio", "work ratio", "{:.2f}×"),
    ("speedup_dit", "DiT speed-up", "{:.2f}×"), ("psnr_global", "PSNR (dB)", "{:.1f}"),
    ("ssim", "SSIM", "{:.3f}"),
]  # fmt: skip


def table(report: dict) -> str:
    """A markdown table of every configuration's means (± std) in the report, grouped by method."""
    means = report["comparison"]["means"]
    lines = ["| cache | runs | " + " | ".join(h for _, h, _ in TABLE) + " |", "|---" * (len(TABLE) + 2) + "|"]
    for label in sorted(means, key=lambda s: (s.split()[0], means[s].get("nfe_ratio") or 0)):
        m, cells = means[label], []
        for key, _, fmt in TABLE:
            v, sd = m.get(key), m.get(f"{key}_std")
            cells.append("n/a" if v is None else fmt.format(v) + (f" ± {fmt.format(sd)}" if sd else ""))
        lines.append(f"| {label} | {m['num_prompts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    reports: list[str], path: str, x: str = "nfe_ratio", y: str = "psnr_global", merged: bool = False
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    loaded = [(p, _load(p)) for p in reports]
    if merged:
        loaded = [("merged", merge([r for _, r in loaded]))]
    for report_path, report in loaded:
        curves = points(report, x, y)
        name = os.path.basename(report_path) if len(loaded) > 1 else ""
        for method, pts in curves.items():
            _, xs, xerr, ys, yerr = zip(*pts)
            style = {"color": COLORS[method]} if method in COLORS and len(loaded) == 1 else {}
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=f"{method} {name}".strip(),
                        **style)  # fmt: skip
            for label, px, _, py, _ in pts:
                ax.annotate(label.split(" ", 1)[-1], (px, py), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)  # fmt: skip
    ax.set_xlabel(X_KEYS[x])
    ax.set_ylabel(Y_KEYS[y])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="speed-up vs fidelity of the caches in --compare reports")
    p.add_argument("reports", nargs="+", help="JSON reports written with --compare (and sweeps)")
    p.add_argument("-o", "--output", default="pareto.png")
    p.add_argument("--x", choices=X_KEYS, default="nfe_ratio")
    p.add_argument("--y", choices=Y_KEYS, default="psnr_global")
    p.add_argument(
        "--merge", action="store_true", help="one curve per method over all reports (a sweep split by seed)"
    )
    p.add_argument("--table", action="store_true", help="also print the means (± std) as a markdown table")
    args = p.parse_args(argv)
    print(plot(args.reports, args.output, args.x, args.y, merged=args.merge))
    if args.table:
        reports = [_load(path) for path in args.reports]
        print(table(merge(reports) if args.merge or len(reports) > 1 else reports[0]))


if __name__ == "__main__":
    main()
