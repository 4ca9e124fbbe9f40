"""Plots of what the cache saw and did, from a sample script's JSON report.

    python -m easycache.plot outputs/run.json                 # -> outputs/run.png
    python -m easycache.plot outputs/run.json -o trace.png --run 2

Top panel: the transformation rate, both the k the decision used and the rate measured at each computed step
(with `--cache analyze` every step is computed, so this is the paper's k_t profile of an uncached run).
Bottom panel: ε_t and the accumulated error E_t against τ; computed steps are filled markers, skipped steps
hollow, the warm-up is shaded.
"""

from __future__ import annotations

import argparse
import json
import os


def traces_of(report: dict) -> list[tuple[str, list[dict], dict | None]]:
    """(label, trace, cache stats) for every run a report holds (single run, prompt list or comparison)."""
    if report.get("trace"):
        return [(report.get("prompt", "run"), report["trace"], report.get("cache"))]
    runs = report.get("runs") or (report.get("comparison") or {}).get("rows") or []
    out = [(r.get("prompt", f"run {i}"), r["trace"], r.get("cache") or r.get("cache_stats")) for i, r in
           enumerate(runs) if r.get("trace")]  # fmt: skip
    if not out:
        raise ValueError("the report holds no per-step trace (was it written with --cache none?)")
    return out


def plot_trace(trace: list[dict], stats: dict | None, title: str, path: str) -> str:
    fig = trace_figure(trace, stats, title)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trace_figure(trace: list[dict], stats: dict | None, title: str):
    """The two-panel matplotlib figure of one run's trace (the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    cfg = (stats or {}).get("config", {})
    steps = [r["step"] for r in trace]
    computed = [r["compute"] for r in trace]
    fig, (ax_k, ax_e) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, constrained_layout=True)
    warmup = cfg.get("warmup", 0)
    for ax in (ax_k, ax_e):
        if warmup:
            ax.axvspan(-0.5, warmup - 0.5, color="0.9", label="warm-up (R)")
        ax.grid(alpha=0.3)
    rate = [(r["step"], r["rate"]) for r in trace if r["rate"] is not None]
    used = [(r["step"], r["k"]) for r in trace if r["k"] is not None]
    if rate:
        ax_k.plot(*zip(*rate), "o-", ms=3, label="rate measured at a computed step")
    if used:
        ax_k.plot(*zip(*used), "s", ms=3, mfc="none", label="k used in the decision")
    ax_k.set_ylabel("transformation rate k")
    ax_k.legend(fontsize=8)
    for key, style, label in (("eps", "^", "ε_t"), ("acc", "-", "accumulated E_t")):
        pts = [(r["step"], r[key]) for r in trace if r[key] is not None]
        if pts:
            ax_e.plot(*zip(*pts), style, ms=4, label=label)
    if cfg.get("thresh"):  # τ = 0 is --cache analyze (every step computed): no threshold to draw
        ax_e.axhline(cfg["thresh"], color="r", ls="--", lw=1, label=f"τ = {cfg['thresh']}")
    ymin = ax_e.get_ylim()[0]
    ax_e.scatter([s for s, c in zip(steps, computed) if c], [ymin] * sum(computed), marker="|", color="k",
                 s=80, label="computed step")  # fmt: skip
    ax_e.set_xlabel("sampling step")
    ax_e.set_ylabel("predicted change")
    ax_e.legend(fontsize=8)
    n = sum(computed)
    ax_k.set_title(f"{title}\n{n}/{len(trace)} steps computed", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="plot k, ε and E against τ over the steps of a run")
    p.add_argument(
        "report", help="a JSON report written by sample_wan.py / sample_hunyuan.py / sample_opensora.py"
    )
    p.add_argument("-o", "--output", help="PNG path (default: the report's path with .png)")
    p.add_argument("--run", type=int, default=0, help="which run of a prompt list / comparison to plot")
    args = p.parse_args(argv)
    with open(args.report) as f:
        runs = traces_of(json.load(f))
    if not 0 <= args.run < len(runs):
        p.error(f"--run must be in [0, {len(runs) - 1}]")
    label, trace, stats = runs[args.run]
    out = args.output or os.path.splitext(args.report)[0] + ".png"
    print(plot_trace(trace, stats, label, out))


if __name__ == "__main__":
    main()
