"""Peak host memory of loading a sharded fp32 Wan checkpoint into bf16: streaming (load_wan: tensor by tensor,
each from a memory map of its own) vs reading the whole fp32 state first (what load_wan did before), and
under --dit_fsdp on 2 ranks: sharded while loading (load_wan(fsdp=True): each rank reads its 1/N) vs the
whole model loaded on every rank, then sharded.

    python -m benchmarks.loader_memory                 # mid-size config (~0.3 B parameters), six shards

Writes random fp32 weights in the official sharded layout (diffusion_pytorch_model-0000i-of-00006 +
index.json, as the 14B ships) to a temporary folder, then loads them in fresh subprocesses (2 gloo ranks for
FSDP) and prints the peak RSS (VmHWM, Linux) above the RSS after imports. "After imports" includes what the
first model built on the meta device imports: torch runs `torch.randn` on meta tensors through its Python
reference kernels, whose first use imports sympy and torch's symbolic-shape modules (~70 MB of Python
modules, the same for any model size); the child builds a tiny model on the meta device first, so the
number measured is the memory of loading, not of those imports (printed too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

from models.wan import WanConfig, WanModel, fp32_island_keys

MID = WanConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=16, text_dim=1024)
SHARDS = 6

_CHILD = """
import json, os, sys, torch
from models.loading import load_sharded_safetensors, load_strict
from models.wan import WanConfig, WanModel, fp32_island_keys, load_wan
def rss():  # peak resident set of this process image (VmHWM; ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
ckpt, method = sys.argv[1], sys.argv[2]
config = WanConfig.from_json(ckpt + "/config.json")
imported = rss()
with torch.device("meta"):  # the one-off imports of torch's meta kernels (see the module docstring)
    WanModel(WanConfig(dim=16, ffn_dim=16, freq_dim=16, num_heads=1, num_layers=1, text_dim=16))
base = rss()
if "fsdp" in method:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard  # noqa: F401 (its imports, ~45 MB, before `base` too)
    from models.fsdp import shard_model
    dist.init_process_group("gloo")
    base = rss()
if method == "streaming":
    model = load_wan(ckpt, dtype=torch.bfloat16)
elif method == "fsdp: sharded while loading":
    model = load_wan(ckpt, dtype=torch.bfloat16, fsdp=True)
elif method == "fsdp: whole, then sharded":  # what --dit_fsdp did before: every rank loads the whole DiT
    model = load_wan(ckpt, dtype=torch.bfloat16)
    shard_model(model, model.blocks)
else:  # load_wan before streaming: the whole fp32 state, then cast key by key, fp32 islands kept
    with torch.device("meta"):
        model = WanModel(config)
    keep = fp32_island_keys(model)
    state = load_sharded_safetensors(ckpt)
    for k in list(state):
        state[k] = state[k].to(torch.float32 if k in keep else torch.bfloat16)
    load_strict(model, state)
print(json.dumps({"imports": base - imported, "base": base, "peak": rss()}))
if "fsdp" in method:
    dist.destroy_process_group()
"""


def write_checkpoint(path: str, config: WanConfig) -> dict:
    """Random fp32 weights in SHARDS files plus the index, as the official 14B repo lays them out."""
    torch.manual_seed(0)
    state = WanModel(config).state_dict()
    keys = list(state)
    weight_map, sizes = {}, []
    for i in range(SHARDS):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {
            k: state[k].contiguous() for k in keys[i * len(keys) // SHARDS : (i + 1) * len(keys) // SHARDS]
        }
        save_file(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
        sizes.append(os.path.getsize(os.path.join(path, name)))
    with open(os.path.join(path, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "WanModel", **dataclasses.asdict(config)}, f)
    params = sum(v.numel() for v in state.values())
    keep = fp32_island_keys(WanModel(config))
    cast = sum(v.numel() * (4 if k in keep else 2) for k, v in state.items())  # bf16, fp32 islands kept
    largest_tensor = max(4 * v.numel() for v in state.values())
    return {"params": params, "fp32_bytes": 4 * params, "cast_bytes": cast, "largest_shard": max(sizes),
            "largest_tensor": largest_tensor}  # fmt: skip


def run_child(root: str, ckpt: str, method: str, ranks: int) -> list[dict]:
    """One fresh process per rank (gloo on localhost when ranks > 1); each one's measurement."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, ckpt, method],
            cwd=root,
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(ranks)
    ]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{method} failed:\n{err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    gb = 1e9
    with tempfile.TemporaryDirectory() as tmp:
        sizes = write_checkpoint(tmp, MID)
        params, largest, cast = sizes["params"], sizes["largest_shard"], sizes["cast_bytes"]
        print(
            f"mid-size Wan: {params / 1e6:.0f} M parameters, fp32 {sizes['fp32_bytes'] / gb:.2f} GB in "
            f"{SHARDS} shards (largest {largest / gb:.2f} GB); bf16 with fp32 islands {cast / gb:.2f} GB"
        )
        tensor = sizes["largest_tensor"]
        print(f"the issue's bound: cast model + largest shard = {(cast + largest) / gb:.3f} GB")
        print(f"the streaming loader's own: cast model + largest fp32 tensor = {(cast + tensor) / gb:.3f} GB")
        print(f"per rank under --dit_fsdp on 2 ranks, half of that: {(cast + tensor) / 2 / gb:.3f} GB")
        for method, ranks in (
            ("before (whole state)", 1),
            ("streaming", 1),
            ("fsdp: whole, then sharded", 2),
            ("fsdp: sharded while loading", 2),
        ):
            results = run_child(root, tmp, method, ranks)
            above = max(r["peak"] - r["base"] for r in results) / gb
            peak = max(r["peak"] for r in results) / gb
            who = "" if ranks == 1 else f" (largest of {ranks} ranks)"
            print(f"{method:>27}: peak RSS {peak:.2f} GB, {above:.3f} GB above the RSS after imports{who}")
        print(
            f"imports of the first meta-device model (not counted above): {results[0]['imports'] / gb:.3f} GB"
        )


if __name__ == "__main__":
    main()
