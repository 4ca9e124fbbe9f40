"""Moving pipeline components between the GPU and the CPU around each phase (the offload flags), on record.

The official scripts free device memory by moving whole models: Wan's generate.py with --offload_model puts
umT5 back on the CPU after encoding and the DiT on the CPU before the VAE decodes (--t5_cpu keeps umT5 there
throughout); HunyuanVideo's --use-cpu-offload keeps the text encoders and the DiT on the CPU except while each
runs. `Placement.move` makes every such move and records, per phase, the device each component's parameters
are on afterwards (read back, not assumed), so a report shows where everything was when each phase ran and
the tests can check the sequence of moves on a CPU-only machine, where every move is to the CPU.
"""

from __future__ import annotations

import torch
from torch import nn


def module_device(module: nn.Module) -> str:
    """The device of a module's parameters (all of them must agree), e.g. "cuda:0" or "cpu"."""
    devices = {str(p.device) for p in module.parameters()}
    if len(devices) != 1:
        raise ValueError(f"{type(module).__name__} is spread over {sorted(devices)}")
    return devices.pop()


class Placement:
    """A record of the moves of one generation: [{"phase", "component", "device"}, ...] in order."""

    def __init__(self):
        self.moves: list[dict[str, str]] = []

    def move(self, phase: str, component: str, module: nn.Module, device: torch.device | str) -> None:
        """Move `module` to `device` before (or after) `phase`; the CUDA cache is emptied after a move to the
        CPU so that the freed memory is really available to the next phase (as the official code does)."""
        module.to(device)
        if torch.device(device).type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.moves.append({"phase": phase, "component": component, "device": module_device(module)})
