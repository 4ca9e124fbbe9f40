"""Forward time of models.hunyuan.HunyuanVideoModel vs diffusers' HunyuanVideoTransformer3DModel.

Both models get the same random weights (diffusers' converted to the official names) and the same inputs; the
script prints median/min over the timed repetitions and the ratio ours / diffusers (< 1: ours is faster).

    python -m benchmarks.bench_hunyuan                                 # CPU, fp32, a moderate 2+2-block model
    python -m benchmarks.bench_hunyuan --device cuda --dtype bf16 --preset t2v-720p \
        --frames 129 --height 544 --width 960                          # the real 13B model at 540p (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch

from models.hunyuan import (
    HUNYUAN_CONFIGS,
    HunyuanVideoConfig,
    HunyuanVideoModel,
    convert_diffusers_to_official,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# A CPU-sized model with the real head_dim (128) and RoPE split; depth and width are cut.
MODERATE = HunyuanVideoConfig(
    hidden_size=512,
    heads_num=4,
    mm_double_blocks_depth=2,
    mm_single_blocks_depth=2,
    text_states_dim=1024,
    guidance_embed=True,
)


def build_models(cfg: HunyuanVideoConfig, device: str, dtype: torch.dtype, attn_backend: str = "auto"):
    """diffusers model with random weights (allocated once, in `dtype`); ours shares or fuses its tensors."""
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # its warning about .to(dtype) concerns fp32-kept modules; it has none
    with torch.device("meta"):
        ref = HunyuanVideoTransformer3DModel(**cfg.diffusers_kwargs()).to(dtype)
    ref = ref.to_empty(device=device).eval().requires_grad_(False)  # no fp32 copy of a 13B model
    with torch.no_grad():
        for p in ref.parameters():  # zero-initialised gates would make most of the model a no-op
            p.normal_().mul_(p[0].numel() ** -0.5 if p.ndim > 1 else 0.5)
    with torch.device("meta"):
        ours = HunyuanVideoModel(cfg, attn_backend)
    ours.load_state_dict(convert_diffusers_to_official(ref.state_dict(), cfg), strict=True, assign=True)
    return ref, ours.eval().requires_grad_(False)


def make_inputs(cfg: HunyuanVideoConfig, args, device: str, dtype: torch.dtype) -> dict:
    """Latents from the video size by the VAE rule (4n+1 frames, 8x spatial), text padded to --text_len."""
    latent = ((args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(args.text_len) < args.text_valid).long()[None].expand(args.batch, -1)
    inputs = dict(
        x=torch.randn(args.batch, cfg.in_channels, *latent, generator=g),
        t=torch.full((args.batch,), 900.0),
        text_states=torch.randn(args.batch, args.text_len, cfg.text_states_dim, generator=g),
        text_mask=mask.contiguous(),
        text_states_2=torch.randn(args.batch, cfg.text_states_dim_2, generator=g),
        guidance=torch.full((args.batch,), 6016.0),
    )
    floats = ("x", "text_states", "text_states_2")
    return {k: v.to(device=device, dtype=dtype if k in floats else v.dtype) for k, v in inputs.items()}


def timed(fn, warmup: int, reps: int, sync) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds per call. On a shared CPU box the CPU seconds are the steadier
    measure (time spent waiting for other processes is not counted); on a GPU only wall time counts."""
    for _ in range(warmup):  # first calls of a shape create kernels/primitives
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def main(args) -> None:
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        raise ValueError("need frames = 4n+1 and height, width multiples of 16 (VAE 4x8x8, patch 2)")
    if not 0 < args.text_valid <= args.text_len or args.warmup < 5 or args.reps < 10:
        raise ValueError("need 0 < --text_valid <= --text_len, --warmup >= 5 and --reps >= 10")
    device, dtype = args.device, DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = HUNYUAN_CONFIGS[args.preset] if args.preset != "moderate" else MODERATE
    if args.double is not None or args.single is not None:
        depth = dict(mm_double_blocks_depth=args.double, mm_single_blocks_depth=args.single)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in depth.items() if v is not None})
    torch.manual_seed(0)
    ref, ours = build_models(cfg, device, dtype)
    a = make_inputs(cfg, args, device, dtype)
    n_img = a["x"][0, 0].numel() // math.prod(cfg.patch_size)
    print(
        f"{args.preset} ({cfg.mm_double_blocks_depth}+{cfg.mm_single_blocks_depth} blocks, "
        f"D={cfg.hidden_size}), "
        f"{args.dtype} on {device}: x {tuple(a['x'].shape)} = {n_img} image + {args.text_len} text tokens"
    )

    def run_ref():
        ref_args = (a["x"], a["t"], a["text_states"], a["text_mask"], a["text_states_2"])
        return ref(*ref_args, guidance=a["guidance"], return_dict=False)[0]

    def run_ours():
        return ours(**a)

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    with torch.no_grad():
        expected = run_ref().float()
        diff = (run_ours().float() - expected).abs().max() / expected.abs().max()
        print(f"max |ours - diffusers| / max |diffusers| = {diff.item():.2e}")
        wall: dict[str, list[float]] = {"diffusers": [], "ours": []}
        cpu: dict[str, list[float]] = {"diffusers": [], "ours": []}
        for name, fn in (("diffusers", run_ref), ("ours", run_ours)) * 2:  # interleaved halves against drift
            w, c = timed(fn, args.warmup, args.reps // 2, sync)
            wall[name] += w
            cpu[name] += c
    for name in wall:
        med, low, med_cpu = statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name])
        print(f"{name:>9}: wall median {med * 1e3:8.1f} ms, min {low * 1e3:8.1f} ms; CPU {med_cpu:6.3f} s")
    ratios = {
        "wall median": statistics.median(wall["ours"]) / statistics.median(wall["diffusers"]),
        "wall min": min(wall["ours"]) / min(wall["diffusers"]),
        "CPU median": statistics.median(cpu["ours"]) / statistics.median(cpu["diffusers"]),
    }
    print(
        "ratio ours / diffusers (< 1: ours is faster): "
        + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--preset", choices=["moderate", *HUNYUAN_CONFIGS], default="moderate")
    p.add_argument("--double", type=int, default=None, help="override mm_double_blocks_depth")
    p.add_argument("--single", type=int, default=None, help="override mm_single_blocks_depth")
    p.add_argument("--frames", type=int, default=17, help="video frames (4n+1)")
    p.add_argument("--height", type=int, default=128, help="video height (multiple of 16)")
    p.add_argument("--width", type=int, default=128, help="video width (multiple of 16)")
    p.add_argument("--text_len", type=int, default=256, help="padded LLM tokens (official: 256)")
    p.add_argument("--text_valid", type=int, default=100, help="valid tokens among them")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (1: CPU time free of OpenMP spinning)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20, help="timed calls per model, interleaved in two halves")
    main(p.parse_args())
