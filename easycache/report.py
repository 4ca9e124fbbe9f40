"""Timing and the JSON run report that every sample script writes next to its video.

Importing this module needs no torch (Stopwatch and environment import it when used), so that a sample
script can name and check its outputs before any heavy import.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

from . import checks

if TYPE_CHECKING:
    import torch


class Stopwatch:
    """Accumulates wall time of named phases; synchronises CUDA around each one so GPU work is counted."""

    def __init__(self, device: torch.device | str = "cpu"):
        import torch

        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}  # total per phase
        self._last: dict[str, float] = {}  # duration of the latest block per phase

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._last[name] = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + self._last[name]

    def last(self, name: str) -> float:
        """Time the most recent `phase(name)` block took (read right after the block)."""
        return self._last[name]

    def __getitem__(self, name: str) -> float:
        return self.seconds.get(name, 0.0)


def environment(device: torch.device | str) -> dict:
    import torch

    device = torch.device(device)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_json(path: str, data: dict) -> str:
    """Write JSON atomically (a temporary file renamed into place); NaN/inf are refused, not written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return s[:limit].rstrip("_") or "prompt"


def describe_cache(stats: dict | None) -> str:
    if stats is None:
        return "no cache"
    cfg = stats.get("config", {})
    method = stats["method"]
    if method == "easycache" and cfg["thresh"] == 0 and cfg["warmup"] == 0:
        knobs = "τ=0 R=0 (--cache analyze: the uncached run with k_t recorded)"
    elif method == "easycache":
        knobs = f"τ={cfg['thresh']} R={cfg['warmup']}"
        # issue 25's variants and the paper's k ablation, named only when they differ from the paper's rule
        paper = {"k_update": "local", "forecast": "none", "accumulate": "change", "max_skips": 0}
        knobs += "".join(f" {k}={cfg[k]}" for k, v in paper.items() if cfg.get(k, v) != v)
    elif method == "teacache":
        knobs = f"τ={cfg['rel_l1_thresh']} ret_steps={cfg['ret_steps']} probe={cfg['probe']}"
    elif method == "magcache":
        knobs = f"δ={cfg['magcache_thresh']} K={cfg['magcache_K']} retention={cfg['retention_ratio']}"
    elif method == "pab":
        on = [k for k in ("spatial", "temporal", "cross") if cfg[f"{k}_broadcast"]]
        knobs = " ".join(f"{k}={cfg[f'{k}_range']}@{tuple(cfg[f'{k}_threshold'])}" for k in on) or "off"
    else:
        knobs = f"n={cfg.get('interval')} R={cfg.get('warmup')}"
        knobs += f" forecast={cfg['forecast']}" if cfg.get("forecast", "none") != "none" else ""
    nfe = f"{stats['nfe_ratio']:.2f}x" if stats.get("nfe_ratio") else "n/a"
    work = f", work ratio {stats['work_ratio']:.2f}x" if method == "pab" and stats.get("work_ratio") else ""
    done = f"computed {stats['num_computed']}/{stats['num_steps']} steps"
    return f"{method} {knobs}: {done} (NFE ratio {nfe}{work})"


class RunOutputs:
    """Where a sample script writes its video(s) and report, and how it names them. Every path is checked
    when this is built (suffix, a folder that can take files), so a bad one fails before any model loads.

    `video`, `report`: the user's paths (None: named by `name(label, prompt, seed)` in `folder`, one name per
    prompt, seed and cache label: "baseline", "easycache", "static_n_3", ...); `label`: the label of the
    default report name ("compare" for --compare); `video_flag`: the flag to name in errors.
    """

    def __init__(
        self,
        video: str | None,
        report: str | None,
        *,
        fps: float,
        lossless: bool,
        name: Callable[[str, str, int], str],
        prompts: list[str],
        seed: int,
        label: str,
        folder: str = "outputs",
        video_flag: str = "--save_file",
    ):
        self._name, self._folder, self._explicit = name, folder, video is not None
        self.video = video or os.path.join(folder, f"{name(label, prompts[0], seed)}.mp4")
        if not self.video.endswith(".mp4"):
            raise ValueError(f"{video_flag}: the video is written as .mp4, got {self.video}")
        self.report = report or self.video[: -len(".mp4")] + ".json"
        if not self.report.endswith(".json"):
            raise ValueError(f"--report: the report is written as .json, got {self.report}")
        checks.check_writable(self.video, video_flag)
        checks.check_writable(self.report, "--report")
        self.fps, self.lossless = fps, lossless
        self._baselines: dict[int, dict] = {}  # prompt index -> paths of its baseline video
        self._used: set[str] = set()

    def _path(self, label: str, prompt: str, seed: int, index: int | None) -> str:
        """The .mp4 of one video: the user's name plus index and label, or a name of its own prompt."""
        if self._explicit:
            stem = self.video[: -len(".mp4")]
            path = "_".join([stem, *([str(index)] if index is not None else []), *([label] if label else [])])
        else:
            path = os.path.join(self._folder, self._name(label, prompt, seed))
        if path in self._used:  # two prompts with the same first 40 characters
            path = f"{path}_{index}"
        self._used.add(path)
        return f"{path}.mp4"

    def _write(self, path_mp4: str, frames) -> dict:
        from .video import LOSSLESS_SUFFIX, write_video

        paths = {"video": write_video(path_mp4, frames, self.fps)}
        if self.lossless:
            paths["lossless"] = write_video(path_mp4[: -len(".mp4")] + LOSSLESS_SUFFIX, frames, self.fps)
        return paths

    def save_single(self, gen, *, prompt: str, seed: int, index: int | None = None, label: str = "") -> dict:
        """Write the video (and lossless copy); return the report section of this generation. `index` numbers
        the videos of a prompt list; `label` names the cache in a default name."""
        label = "" if self._explicit else label  # a user's file name is numbered, not labelled
        path = self.video if index is None else self._path(label, prompt, seed, index)
        return {
            "prompt": prompt,
            "seed": seed,
            "outputs": self._write(path, gen.frames),
            "seconds": gen.seconds,
            "dit_calls": gen.dit_calls,
            "cache": gen.cache_stats,
            "trace": gen.trace,
        }

    def save_pair(self, base, cached, row: dict) -> None:
        """--compare: write the baseline (once per prompt and seed) and the cached video, each named after its
        own prompt, seed and cache; the row records both."""
        index, prompt, seed = row["run_index"], row["prompt"], row["seed"]
        label = re.sub(r"[^A-Za-z0-9.]+", "_", row["label"]).strip("_")
        if index not in self._baselines:
            self._baselines[index] = self._write(self._path("baseline", prompt, seed, index), base.frames)
        cached_paths = self._write(self._path(label, prompt, seed, index), cached.frames)
        row["outputs"] = {"baseline": self._baselines[index], "cached": cached_paths}
        row["trace"] = cached.trace


def summary_line(label: str, gen, video: str) -> str:
    s = gen.seconds
    return (
        f"{label} | {describe_cache(gen.cache_stats)} | DiT calls {gen.dit_calls} | DiT {s['dit']:.2f} s, "
        f"end-to-end {s['end_to_end']:.2f} s | {video}"
    )
