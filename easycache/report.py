"""Timing and the JSON run report that every sample script writes next to its video."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager

import torch


class Stopwatch:
    """Accumulates wall time of named phases; synchronises CUDA around each one so GPU work is counted."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}  # total per phase
        self._last: dict[str, float] = {}  # duration of the latest block per phase

    def _sync(self) -> None:
        if self.device.type == "cuda":
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
