"""Speed of our WanModel forward against diffusers' WanTransformer3DModel on the same weights and inputs.

CPU default (a moderate config, ~0.1-1 s per forward):  python -m benchmarks.bench_wan
GPU, the real 1.3B at 480p x 81 frames (random weights):
    python -m benchmarks.bench_wan --device cuda --dtype bf16 --preset t2v-1.3B --size 832*480 --frames 81

Prints median/min seconds per forward of both models, their ratio, the analytic matmul FLOPs of one
forward and the achieved FLOP rate (model-FLOP utilisation for --peak-tflops; CUDA default: H100 bf16).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from models.loading import load_strict
from models.wan import WAN_CONFIGS, WanConfig, WanModel, cast_wan, convert_diffusers_to_official

# dim 768 / 6 heads keeps head_dim 128 (the real RoPE split); text width and length as the real model.
CPU_CONFIG = WanConfig(dim=768, ffn_dim=3072, num_heads=6, num_layers=4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLIP_TOKENS = 257


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(WAN_CONFIGS), default=None, help="default: a small CPU config")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--size", default="256*256", help="video width*height in pixels (VAE stride 8, patch 2)")
    p.add_argument("--frames", type=int, default=9, help="video frames, 4n+1 (VAE stride 4)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--prompt-tokens", type=int, default=77, help="true prompt length; the rest is zero-padded"
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU; default 989 on CUDA (H100 bf16)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def latent_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    width, height = (int(v) for v in args.size.lower().replace("x", "*").split("*"))
    if width % 16 or height % 16 or (args.frames - 1) % 4:
        raise ValueError(
            f"--size must be multiples of 16 and --frames 4n+1, got {args.size} and {args.frames}"
        )
    return (args.frames - 1) // 4 + 1, height // 8, width // 8


def forward_flops(cfg: WanConfig, batch: int, latent: tuple[int, int, int]) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one forward; norms, RoPE and elementwise work are left out."""
    d, t = cfg.dim, cfg.text_len
    n_tok = math.prod(s // p for s, p in zip(latent, cfg.patch_size))
    img = CLIP_TOKENS if cfg.model_type == "i2v" else 0
    per_block = {
        "self-attn projections": 2 * n_tok * d * d * 4,
        "self-attn scores+values": 4 * n_tok * n_tok * d,
        "cross-attn projections": 2 * n_tok * d * d * 2 + 2 * (t + img) * d * d * 2,
        "cross-attn scores+values": 4 * n_tok * (t + img) * d,
        "ffn": 2 * n_tok * d * cfg.ffn_dim * 2,
    }
    flops = {k: v * cfg.num_layers for k, v in per_block.items()}
    flops["embeddings+head"] = 2 * (
        n_tok * d * cfg.in_dim * math.prod(cfg.patch_size)
        + t * (cfg.text_dim * d + d * d)
        + img * (1280 * 1280 + 1280 * d)
        + n_tok * d * cfg.out_dim * math.prod(cfg.patch_size)
    )
    return {k: v * batch for k, v in flops.items()}


def build_models(cfg: WanConfig, device: str, dtype: torch.dtype, attn_backend: str = "auto"):
    """diffusers' model with its default random init, and ours loaded from its converted state dict."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # its warning about .to(dtype) is handled below, as from_pretrained does
    ref = WanTransformer3DModel(**cfg.diffusers_kwargs())
    with torch.device("meta"):
        ours = WanModel(cfg, attn_backend)
    load_strict(ours, convert_diffusers_to_official(ref.state_dict()), source="diffusers weights")
    ours = cast_wan(ours, dtype).to(device).eval()
    ref = ref.to(device, dtype).eval()
    for name, module in ref.named_modules():  # what diffusers' from_pretrained keeps in fp32
        if any(part in ref._keep_in_fp32_modules for part in name.split(".")):
            module.float()
    return ours, ref


def make_inputs(cfg: WanConfig, args: argparse.Namespace, grid: tuple[int, int, int]):
    g = torch.Generator().manual_seed(args.seed)
    b, dev = args.batch, args.device
    x = torch.randn(b, 16, *grid, generator=g).to(dev)
    t = torch.full((b,), 999, dtype=torch.long, device=dev)
    context = torch.zeros(b, cfg.text_len, cfg.text_dim)
    context[:, : args.prompt_tokens] = torch.randn(b, args.prompt_tokens, cfg.text_dim, generator=g)
    clip = y = None
    if cfg.model_type == "i2v":
        clip = torch.randn(b, CLIP_TOKENS, 1280, generator=g).to(dev)
        y = torch.randn(b, cfg.in_dim - 16, *grid, generator=g).to(dev)
    return x, t, context.to(dev), clip, y


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    cfg = WAN_CONFIGS[args.preset] if args.preset else CPU_CONFIG
    grid = latent_shape(args)
    ours, ref = build_models(cfg, args.device, DTYPES[args.dtype])
    x, t, context, clip, y = make_inputs(cfg, args, grid)
    # diffusers' pipeline hands its transformer inputs already in the model dtype; ours casts inside.
    dt = DTYPES[args.dtype]
    hidden = (x if y is None else torch.cat([x, y], dim=1)).to(dt)
    ref_ctx, ref_clip = context.to(dt), None if clip is None else clip.to(dt)
    run_ours = lambda: ours(x, t, context, clip_fea=clip, y=y)  # noqa: E731
    run_ref = lambda: ref(hidden, t, ref_ctx, encoder_hidden_states_image=ref_clip, return_dict=False)[0]  # noqa: E731

    with torch.inference_mode():
        out, out_ref = run_ours(), run_ref().float()
        rel = ((out - out_ref).norm() / out_ref.norm()).item()
        for _ in range(args.warmup):
            run_ours(), run_ref()
        times_ours, times_ref = [], []
        for _ in range(args.reps):  # interleaved, so that machine noise hits both alike
            times_ours.append(timed(run_ours, args.device))
            times_ref.append(timed(run_ref, args.device))

    flops = forward_flops(cfg, args.batch, grid)
    total = sum(flops.values())
    tokens = math.prod(s // p for s, p in zip(grid, cfg.patch_size))
    print(f"config: {args.preset or 'cpu-bench'} {cfg}")
    print(
        f"device {args.device}, dtype {args.dtype}, batch {args.batch}, latent {grid}, {tokens} video tokens"
    )
    print(f"relative difference ours vs diffusers: {rel:.2e}")
    print("analytic matmul FLOPs per forward: " + ", ".join(f"{k} {v / 1e12:.3f}T" for k, v in flops.items()))
    print(f"  total {total / 1e12:.3f} TFLOP")
    med_o, med_r = statistics.median(times_ours), statistics.median(times_ref)
    for name, ts in (("ours", times_ours), ("diffusers", times_ref)):
        med = statistics.median(ts)
        print(f"{name:>9}: median {med:.4f} s, min {min(ts):.4f} s ({total / med / 1e12:.3f} TFLOP/s)")
    print(f"ours / diffusers time: median {med_o / med_r:.3f}, min {min(times_ours) / min(times_ref):.3f}")
    peak = args.peak_tflops or (989.0 if args.device.startswith("cuda") else None)
    if peak:
        mfu_o, mfu_r = total / med_o / 1e12 / peak, total / med_r / 1e12 / peak
        print(f"MFU at {peak:.0f} TFLOP/s peak: ours {mfu_o:.1%}, diffusers {mfu_r:.1%}")


if __name__ == "__main__":
    main(parse_args())
