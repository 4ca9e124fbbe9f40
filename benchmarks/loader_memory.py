"""Peak host memory of loading a sharded fp32 Wan checkpoint into bf16: streaming (load_wan) vs reading the
whole fp32 state first (what load_wan did before).

    python -m benchmarks.loader_memory                 # mid-size config (~0.3 B parameters), six shards

Writes random fp32 weights in the official sharded layout (diffusion_pytorch_model-0000i-of-00006 +
index.json, as the 14B ships) to a temporary folder, then loads them in a fresh subprocess per method and
prints the peak RSS (VmHWM, Linux) above the RSS after imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

from models.wan import WanConfig, WanModel, fp32_island_keys

MID = WanConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=16, text_dim=1024)
SHARDS = 6

_CHILD = """
import json, sys, torch
from models.loading import load_sharded_safetensors, load_strict
from models.wan import WanConfig, WanModel, fp32_island_keys, load_wan
def rss():  # peak resident set of this process image (VmHWM; ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
ckpt, method = sys.argv[1], sys.argv[2]
config = WanConfig.from_json(ckpt + "/config.json")
base = rss()
if method == "streaming":
    model = load_wan(ckpt, dtype=torch.bfloat16)
else:  # load_wan before streaming: the whole fp32 state, then cast key by key, fp32 islands kept
    with torch.device("meta"):
        model = WanModel(config)
    keep = fp32_island_keys(model)
    state = load_sharded_safetensors(ckpt)
    for k in list(state):
        state[k] = state[k].to(torch.float32 if k in keep else torch.bfloat16)
    load_strict(model, state)
print(json.dumps({"base": base, "peak": rss()}))
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
    return {"params": params, "fp32_bytes": 4 * params, "cast_bytes": cast, "largest_shard": max(sizes)}


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
        print(f"bound of the streaming loader: cast model + largest shard = {(cast + largest) / gb:.2f} GB")
        for method in ("before (whole state)", "streaming"):
            out = subprocess.run([sys.executable, "-c", _CHILD, tmp, method], cwd=root, capture_output=True,
                                 text=True, check=True)  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            above = (r["peak"] - r["base"]) / gb
            print(
                f"{method:>22}: peak RSS {r['peak'] / gb:.2f} GB, {above:.2f} GB above the RSS after imports"
            )


if __name__ == "__main__":
    main()
