"""One device check of the GPU speed path, for a person with one GPU and no weights (random weights).

    python -m benchmarks.gpu_check                  # CUDA, bf16: Wan2.1-1.3B 832x480x81, HunyuanVideo-13B
                                                    # 960x544x33, OpenSora 1.2 STDiT3-XL/2 480p x 51
    python -m benchmarks.gpu_check --small          # CPU smoke run: demo-size models, fp32, about a minute

Per model, on the same random weights and inputs: seconds per DiT forward for ours and for diffusers' class
(both on PyTorch SDPA, so the kernels match), the ratio, TFLOP/s and model-FLOP utilisation from the
analytic FLOP count (benchmarks/flops.py), the peak memory and what a forward adds over the weights; ours
again with the --attention backend, with --compile (per-block torch.compile) and with --cfg_batch (one
batch-2 call against two batch-1 calls); the cost of one EasyCache decision and of one skipped step against
the DiT. OpenSora 1.2 has no diffusers class and always batches its CFG pair: ours only, batch 2, with and
without --compile. Written to <out>/gpu_check.json and <out>/gpu_check.md (a Markdown table for the README).

Targets on an H100 (issue 23; a benchmark, never a timed test): ours >= 1.0x diffusers' speed, >= 40% MFU at
480p x 81 in bf16, an EasyCache decision < 0.5% of one DiT call, a skipped step < 1% of a computed one.
The full run does about 40-60 forwards and two compilations per block kind and model; estimated (not
measured: no GPU was at hand) 5-7 minutes on an H100, most of it inductor compiling; --no-compile or
--models shorten it. --budget-min (default 7.5) bounds it: compiled rows whose estimated time would overrun
the budget, and models once it is spent, are left out and named in the JSON and the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.flops import hunyuan_forward_flops, opensora_forward_flops, wan_forward_flops
from easycache import EasyCache, EasyCacheConfig
from models.attention import BACKENDS, check_backend, resolve_backend
from models.fast import compile_blocks
from models.hunyuan import HUNYUAN_CONFIGS, HunyuanVideoConfig, guidance_input
from models.opensora import STDIT3_XL_2, STDiT3Config
from models.wan import WAN_CONFIGS, WAN_TINY, WanConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAMILIES = ("wan", "hunyuan", "opensora")
# Dense bf16/fp16 tensor-core peaks (vendor datasheets; SXM unless named); the longest name found in the
# GPU's name wins (an "H100 PCIe" is not an H100 SXM); --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H800": 989.0,
               "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # fmt: skip
# A CPU-sized HunyuanVideo with the real structure (double + single blocks, refiner, guidance input).
HUNYUAN_SMALL = HunyuanVideoConfig(
    hidden_size=128, heads_num=2, mm_double_blocks_depth=2, mm_single_blocks_depth=2,
    rope_dim_list=(16, 24, 24), text_states_dim=64, text_states_dim_2=32, guidance_embed=True,
)  # fmt: skip
# A CPU-sized STDiT3 (spatial and temporal blocks, cross-attention to a 32-token caption).
OPENSORA_SMALL = STDiT3Config(hidden_size=128, depth=2, num_heads=2, caption_channels=64, model_max_length=32)


@dataclass(frozen=True)
class Case:
    """One model at one size: the latent grid (T, H, W) follows the VAEs (4n+1 frames, 8x8 pixels)."""

    name: str
    family: str  # "wan", "hunyuan" or "opensora"
    config: WanConfig | HunyuanVideoConfig | STDiT3Config
    latent: tuple[int, int, int]
    text_len: int  # padded text tokens the DiT sees (Wan: text_len; HunyuanVideo: 256; OpenSora: 300)
    text_valid: int  # valid (unpadded) text tokens

    @property
    def channels(self) -> int:
        """Latent channels (what the sampling loop and the cache hold)."""
        return self.config.in_channels if self.family != "wan" else self.config.out_dim

    @property
    def has_diffusers(self) -> bool:
        return self.family != "opensora"  # diffusers has no OpenSora 1.2 (STDiT3) class


def cases(small: bool, hunyuan_frames: int) -> list[Case]:
    if small:  # the demo model's architecture at its size (64x64x17 -> 5x16x16 latent, 320 tokens)
        return [
            Case("Wan tiny (demo) 64x64x17", "wan", WAN_TINY, (5, 16, 16), WAN_TINY.text_len, 12),
            Case("HunyuanVideo small 128x128x17", "hunyuan", HUNYUAN_SMALL, (5, 16, 16), 32, 12),
            Case("OpenSora small 128x128x17", "opensora", OPENSORA_SMALL, (5, 16, 16), 32, 12),
        ]
    frames = (hunyuan_frames - 1) // 4 + 1
    return [
        Case("Wan2.1-T2V-1.3B 832x480x81", "wan", WAN_CONFIGS["t2v-1.3B"], (21, 60, 104), 512, 77),
        Case(
            f"HunyuanVideo-13B 960x544x{hunyuan_frames}", "hunyuan", HUNYUAN_CONFIGS["t2v-720p"],
            (frames, 68, 120), 256, 60,
        ),
        # the paper's OpenSora setting: 480p 9:16 (480x854), 51 frames -> latent 15x60x106 (the VAE's rule)
        Case("OpenSora 1.2 STDiT3-XL/2 854x480x51", "opensora", STDIT3_XL_2, (15, 60, 106), 300, 30),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------------------


def build(case: Case, device: str, dtype: torch.dtype, attn_backend: str):
    """(ours, diffusers') with the same random weights; ours on `attn_backend` (OpenSora: ours, None)."""
    torch.manual_seed(0)
    if case.family == "opensora":  # random init on the device (no fp32 host copy), then the model dtype
        from models.opensora import STDiT3

        with torch.device(device):
            ours = STDiT3(case.config, attn_backend)
        return ours.to(dtype).eval().requires_grad_(False), None
    if case.family == "wan":
        from benchmarks.bench_wan import build_models

        return build_models(case.config, device, dtype, attn_backend)
    from benchmarks.bench_hunyuan import build_models

    ref, ours = build_models(case.config, device, dtype, attn_backend)
    return ours, ref


def calls(case: Case, ours, ref, batch: int, device: str, dtype: torch.dtype):
    """(run ours, run diffusers') on one set of inputs of `batch` samples (the CFG pair when batch is 2)."""
    g = torch.Generator().manual_seed(1)
    cfg = case.config
    if case.family == "opensora":  # as sample_opensora.py: [z; z], [y; y_null], mask and scalars once
        x = torch.randn(batch, cfg.in_channels, *case.latent, generator=g).to(device)
        t = torch.full((batch,), 900.0, device=device)
        y = torch.randn(batch, 1, case.text_len, cfg.caption_channels, generator=g).to(device)
        mask = (torch.arange(case.text_len) < case.text_valid).long()[None].to(device)  # [1, L]
        fps, h, w = (
            torch.tensor([v], device=device) for v in (24.0, 8.0 * case.latent[1], 8.0 * case.latent[2])
        )
        return (lambda: ours(x, t, y, mask, fps, h, w)), None
    if case.family == "wan":
        x = torch.randn(batch, cfg.in_dim, *case.latent, generator=g).to(device)
        t = torch.full((batch,), 999.0, device=device)
        ctx = torch.zeros(batch, case.text_len, cfg.text_dim)
        ctx[:, : case.text_valid] = torch.randn(batch, case.text_valid, cfg.text_dim, generator=g)
        ctx = ctx.to(device)
        xr, ctxr = x.to(dtype), ctx.to(dtype)  # diffusers' pipeline hands inputs in the model dtype
        return (lambda: ours(x, t, ctx)), (lambda: ref(xr, t, ctxr, return_dict=False)[0])
    mask = (torch.arange(case.text_len) < case.text_valid).long()[None].expand(batch, -1).to(device)
    a = dict(
        x=torch.randn(batch, cfg.in_channels, *case.latent, generator=g).to(device, dtype),
        t=torch.full((batch,), 900.0, device=device),
        text_states=torch.randn(batch, case.text_len, cfg.text_states_dim, generator=g).to(device, dtype),
        text_mask=mask.contiguous(),
        text_states_2=torch.randn(batch, cfg.text_states_dim_2, generator=g).to(device, dtype),
        guidance=guidance_input(6.0, batch, device, dtype),
    )
    ref_args = (a["x"], a["t"], a["text_states"], a["text_mask"], a["text_states_2"])
    return (lambda: ours(**a)), (lambda: ref(*ref_args, guidance=a["guidance"], return_dict=False)[0])


def forward_flops(case: Case, batch: int) -> int:
    if case.family == "opensora":
        return sum(opensora_forward_flops(case.config, case.latent, batch).values())
    if case.family == "wan":
        return sum(wan_forward_flops(case.config, case.latent, batch).values())
    return sum(hunyuan_forward_flops(case.config, case.latent, case.text_len, batch).values())


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


class Device:
    """Synchronisation and memory readings for one device (memory only on CUDA)."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else 0

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def seconds(fn, dev: Device, clock=time.perf_counter) -> float:
    dev.sync()
    start = clock()
    fn()
    dev.sync()
    return clock() - start


def measure(fn, dev: Device, warmup: int, reps: int) -> dict:
    """First-call, median and min wall seconds of `fn`, and the memory it adds over what was allocated before.
    On the CPU also the median process CPU seconds (`cpu_s`): on a shared machine they leave out the time
    spent waiting for other processes, which wall time does not; ratios on the CPU use them."""
    first = seconds(fn, dev)  # includes compilation for a compiled model
    for _ in range(warmup - 1):
        fn()
    before = dev.allocated()
    dev.reset_peak()
    times, cpu = [], []
    for _ in range(reps):
        start = time.process_time()
        times.append(seconds(fn, dev))
        cpu.append(time.process_time() - start)
    return {
        "first_s": first,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_s": None if dev.cuda else statistics.median(cpu),
        "activation_gib": (dev.peak() - before) / 2**30 if dev.cuda else None,
        "peak_gib": dev.peak_gib(),  # everything allocated at the peak of a timed call, weights included
    }


def paired_speedup(single, batched, dev: Device, reps: int) -> float:
    """Median over interleaved pairs of (two batch-1 calls) / (one batch-2 call): the --cfg_batch speed-up
    measured so that load drifting on a shared machine hits both sides alike (CPU seconds on the CPU)."""
    clock = time.perf_counter if dev.cuda else time.process_time
    ratios = []
    for _ in range(reps):
        a = seconds(lambda: (single(), single()), dev, clock)
        ratios.append(a / seconds(batched, dev, clock))
    return statistics.median(ratios)


class Budget:
    """The wall-clock budget of the whole check (--budget-min). A compiled row is left out, with a note in
    the JSON and the table, when its estimated time (compiling every block kind, then warm-up and timed calls
    at the eager speed) would overrun the budget, and a model is left out when the budget is spent, so that a
    run ends in about that time whatever the GPU. Compilation is guessed at 60 s per block kind until a
    compiled row has been measured, then the slowest one measured."""

    def __init__(self, minutes: float):
        self.start = time.perf_counter()
        self.limit = minutes * 60 if minutes > 0 else math.inf
        self.compile_per_kind = 60.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, seconds: float) -> bool:
        return self.elapsed() + seconds <= self.limit

    def observe_compile(self, m: dict, kinds: int) -> None:
        self.compile_per_kind = max(m["first_s"] - m["median_s"], 0.0) / kinds

    def __str__(self) -> str:
        return f"{self.limit / 60:g}-minute budget (--budget-min)"


def cost(m: dict) -> float:
    """The seconds a ratio compares: wall median on a GPU, process CPU seconds on the CPU (see measure)."""
    return m["median_s"] if m["cpu_s"] is None else m["cpu_s"]


def cache_costs(x: torch.Tensor, dev: Device, reps: int) -> dict:
    """Seconds of one EasyCache decision (should_compute at a deciding step: the norms and the one host sync),
    of update() after a computed step, and of a whole skipped step (decision + reuse of both CFG branches +
    the guidance combine), on latents of the real size in fp32 (the sample loops keep latents fp32). Wall
    seconds on a GPU, process CPU seconds on the CPU (as `cost`)."""
    clock = time.perf_counter if dev.cuda else time.process_time
    n = reps + 2
    cache = EasyCache(EasyCacheConfig(thresh=1e30, warmup=2), num_steps=n + 1)  # skip every step after R
    g = torch.Generator(x.device).manual_seed(2)
    dx = torch.randn(x.shape, generator=g, device=x.device)
    decide, update, skip = [], [], []
    for i in range(n):
        xi = x + (0.01 * i) * dx  # the latent moves from step to step, as in sampling
        if i < 2:  # warm-up steps: computed, they give the cache its k
            cache.should_compute(i, xi)
            v = {"cond": xi * (1.0 - 0.1 * i) + dx, "uncond": xi * 0.5 - dx}
            update.append(seconds(lambda: cache.update(xi, v), dev, clock))  # noqa: B023
            continue
        dev.sync()
        start = clock()
        computed = cache.should_compute(i, xi)  # a Python bool: the host has synchronised
        mid = clock()
        v = cache.reuse(xi)
        noise_pred = v["uncond"] + 5.0 * (v["cond"] - v["uncond"])
        dev.sync()
        end = clock()
        assert not computed and noise_pred.shape == x.shape
        decide.append(mid - start)
        skip.append(end - start)
    return {
        "decision_s": statistics.median(decide),
        "update_s": statistics.median(update),
        "skipped_step_s": statistics.median(skip),
    }


# ---------------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------------


def run_case(
    case: Case, args, dev: Device, dtype: torch.dtype, peak: float | None, budget: Budget | None = None
) -> dict:
    """Every measurement of one model; the diffusers model is freed before ours is compiled."""
    rows, w, r, skipped = [], args.warmup, args.reps, []
    budget = budget or Budget(0)

    def row(label: str, batch: int, m: dict, attn: str, compiled: bool = False) -> dict:
        flops = forward_flops(case, batch)
        tflops = flops / cost(m) / 1e12
        rows.append(
            dict(label=label, batch=batch, attention=attn, compiled=compiled, flops=flops, tflops=tflops,
                 mfu=tflops / peak if peak else None, **m)
        )  # fmt: skip
        mfu = f"  MFU {tflops / peak:.1%}" if peak else ""
        cpu = "" if m["cpu_s"] is None else f"  CPU {m['cpu_s']:.4f} s"
        mem = "" if m["peak_gib"] is None else f"  peak {m['peak_gib']:.1f} GiB"
        print(f"  {label:<34} B={batch}  median {m['median_s']:.4f} s  min {m['min_s']:.4f} s{cpu}  "
              f"{tflops:8.4g} TFLOP/s{mfu}{mem}", flush=True)  # fmt: skip
        return m

    start = time.perf_counter()
    ours, ref = build(case, args.device, dtype, "sdpa")
    weights_gib = dev.allocated() / 2**30 if dev.cuda else None
    rel = ours_m = ref_m = None
    if case.has_diffusers:
        one_ours, one_ref = calls(case, ours, ref, 1, args.device, dtype)
        with torch.inference_mode():
            out, expected = one_ours().float(), one_ref().float()
            rel = ((out - expected).norm() / expected.norm()).item()
            print(f"{case.name}: relative difference ours vs diffusers {rel:.2e}", flush=True)
            ref_m = row("diffusers (SDPA)", 1, measure(one_ref, dev, w, r), "sdpa")
            ours_m = row("ours (SDPA)", 1, measure(one_ours, dev, w, r), "sdpa")
        del one_ref, one_ours, out, expected
    else:
        print(f"{case.name}: no diffusers class; ours only, the CFG pair as one batch-2 call", flush=True)
    del ref
    dev.free()
    backend = resolve_backend(args.attention, args.device, dtype)
    backend_rel = None
    if backend != "sdpa":  # the same weights on the chosen kernel (ours only: diffusers has its own)
        # Its numerics against SDPA: one call on the same inputs with each kernel (the CFG pair for OpenSora).
        probe = 1 if case.has_diffusers else 2
        with torch.inference_mode():
            sdpa_out = calls(case, ours, None, probe, args.device, dtype)[0]().float()
            ours = _rebuild_with(ours, case, backend)
            out = calls(case, ours, None, probe, args.device, dtype)[0]().float()
            backend_rel = ((out - sdpa_out).norm() / sdpa_out.norm()).item()
        print(f"  {backend} vs SDPA: relative L2 difference {backend_rel:.2e}", flush=True)
        del sdpa_out, out
    one, _ = calls(case, ours, None, 1, args.device, dtype)
    two, _ = calls(case, ours, None, 2, args.device, dtype)
    # OpenSora's one DiT call of a computed step is the batch-2 pair; the others' is one batch-1 branch.
    cfg_label = "--cfg_batch" if case.has_diffusers else "(batched CFG, as always)"
    with torch.inference_mode():
        eager1 = None
        if case.has_diffusers:
            eager1 = (
                row(f"ours ({backend})", 1, measure(one, dev, w, r), backend) if backend != "sdpa" else ours_m
            )
        eager2 = row(f"ours ({backend}) {cfg_label}", 2, measure(two, dev, w, r), backend)
        cfg_speedup = None
        if case.has_diffusers:  # interleaved pairs on the CPU, where load drifts; the rows on a GPU
            cfg_speedup = 2 * cost(eager1) / cost(eager2) if dev.cuda else paired_speedup(one, two, dev, r)
        x = torch.randn(1, case.channels, *case.latent, device=args.device)
        costs = cache_costs(x, dev, max(r, 10))
        compiled = {}
        if not args.no_compile:
            # one static graph per block kind and batch size
            compile_blocks(ours, dynamic=False, backend=args.compile_backend)
            kinds = sum(isinstance(m, torch.nn.ModuleList) for m in ours.children())
            todo = [(1, one, eager1, "--compile"), (2, two, eager2, f"--compile {cfg_label}")]
            for batch, fn, eager, flags in todo if case.has_diffusers else todo[1:]:
                estimate = budget.compile_per_kind * kinds + (w + r) * eager["median_s"]
                if not budget.allows(estimate):
                    note = f"ours {flags} (B={batch}): about {estimate:.0f} s more would overrun the {budget}"
                    print(f"  left out: {note}", flush=True)
                    skipped.append(note)
                    continue
                compiled[batch] = row(
                    f"ours ({backend}) {flags}", batch, measure(fn, dev, w, r), backend, True
                )
                budget.observe_compile(compiled[batch], kinds)
    del ours, one, two
    dev.free()
    if case.has_diffusers:
        fwd = cost(eager1)
        computed_step = costs["decision_s"] + 2 * fwd + costs["update_s"]  # two CFG calls, the official loop
    else:
        fwd = cost(eager2)
        computed_step = costs["decision_s"] + fwd + costs["update_s"]  # one batched call
    summary = {
        "ours_over_diffusers_time": cost(ours_m) / cost(ref_m) if case.has_diffusers else None,
        "cfg_batch_speedup": cfg_speedup,
        "compile_speedup": (
            fwd / cost(compiled[1 if case.has_diffusers else 2])
            if (1 if case.has_diffusers else 2) in compiled
            else None
        ),
        "compile_cfg_batch_speedup": (
            2 * cost(compiled[1]) / cost(compiled[2]) if {1, 2} <= set(compiled) else None
        ),
        "attention_rel_diff_vs_sdpa": backend_rel,  # None when the speed rows run on SDPA itself
        "decision_over_dit_call": costs["decision_s"] / fwd,
        "skipped_over_computed_step": costs["skipped_step_s"] / computed_step,
    }
    print("  " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if v is not None), flush=True)
    seconds_spent = time.perf_counter() - start
    print(f"  {case.name}: {seconds_spent:.0f} s (building, timing and compiling)", flush=True)
    return dict(
        name=case.name, family=case.family, latent=list(case.latent), text_len=case.text_len,
        tokens=math.prod(-(-s // p) for s, p in zip(case.latent, case.config.patch_size)),
        rel_diff_vs_diffusers=rel, weights_gib=weights_gib, rows=rows, cache=costs, summary=summary,
        seconds=seconds_spent, skipped=skipped,
    )  # fmt: skip


def _rebuild_with(ours, case: Case, backend: str):
    """The same module tree and tensors on another attention kernel (built on meta, tensors assigned)."""
    from models.hunyuan import HunyuanVideoModel
    from models.opensora import STDiT3
    from models.wan import WanModel

    cls = {"wan": WanModel, "hunyuan": HunyuanVideoModel, "opensora": STDiT3}[case.family]
    with torch.device("meta"):
        other = cls(case.config, attn_backend=backend)
    other.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return other.eval()


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; {env['dtype']}; "
        f"peak {env['peak_tflops'] or 'n/a'} TFLOP/s; {env['warmup']} warm-up + {env['reps']} timed calls; "
        f"torch.compile backend {env['compile_backend']}; ratios and TFLOP/s from {env['timing']} seconds; "
        f"{env['total_seconds']:.0f} s in all ("
        + ", ".join(f"{c['name']} {c['seconds']:.0f} s" for c in result["cases"])
        + ").",
        "",
        "| model | run | B | s / forward (median) | min | CPU s | first call | TFLOP/s | MFU | peak GiB "
        "| +GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        for r in case["rows"]:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            mem = f"{r['activation_gib']:.1f}" if r["activation_gib"] is not None else "n/a"
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
            cpu = f"{r['cpu_s']:.4f}" if r["cpu_s"] is not None else "n/a"
            lines.append(
                f"| {case['name']} | {r['label']} | {r['batch']} | {r['median_s']:.4f} | {r['min_s']:.4f} | "
                f"{cpu} | {r['first_s']:.2f} | {r['tflops']:.4g} | {mfu} | {peak} | {mem} |"
            )
    lines += [
        "",
        "| model | ours / diffusers time | --cfg_batch speed-up | --compile speed-up | both | "
        "decision / DiT call | skipped / computed step | attention vs SDPA (rel. L2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "n/a" if v is None else format(v, f) + ("x" if f == ".3f" else "")  # noqa: E731
    for case in result["cases"]:
        s = case["summary"]
        both = None
        if s["compile_cfg_batch_speedup"] is not None:
            both = s["compile_speedup"] * s["compile_cfg_batch_speedup"]
        lines.append(
            f"| {case['name']} | {fmt(s['ours_over_diffusers_time'], '.4f')} | "
            f"{fmt(s['cfg_batch_speedup'], '.3f')} | {fmt(s['compile_speedup'], '.3f')} | "
            f"{fmt(both, '.3f')} | "
            f"{fmt(s['decision_over_dit_call'], '.3%')} | {fmt(s['skipped_over_computed_step'], '.3%')} | "
            f"{fmt(s['attention_rel_diff_vs_sdpa'], '.2e')} |"
        )
    left_out = result["environment"].get("skipped", []) + [n for c in result["cases"] for n in c["skipped"]]
    if left_out:
        lines += ["", "Left out to stay within the time budget: " + "; ".join(left_out) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU smoke run: demo-size models in fp32")
    p.add_argument("--device", help="default: cuda (cpu with --small)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 (fp32 with --small)")
    p.add_argument("--attention", choices=BACKENDS, default="auto", help="ours' kernel for the speed rows")
    p.add_argument("--models", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--hunyuan-frames", type=int, default=33, help="HunyuanVideo frames at 960x544 (4n+1)")
    p.add_argument("--warmup", type=int, default=2, help="calls before timing (the first one is reported)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per row")
    p.add_argument("--no-compile", action="store_true", help="skip the --compile rows")
    p.add_argument(
        "--compile-backend",
        help="torch.compile backend (default inductor; with --small aot_eager: inductor's C++ compilation "
        "takes minutes on a small CPU, and CPU timings prove nothing about a GPU anyway)",
    )
    p.add_argument(
        "--budget-min",
        type=float,
        default=7.5,
        help="wall-clock minutes for the whole check (0: no limit); compiled rows that would overrun it, and "
        "models once it is spent, are left out with a note (default 7.5: 8 minutes less start-up)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 gives steadier CPU seconds)")
    p.add_argument("--peak-tflops", type=float, help="for MFU (default: from the GPU's name; none on CPU)")
    p.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.small else "cuda")
    args.dtype = args.dtype or ("fp32" if args.small else "bf16")
    args.compile_backend = args.compile_backend or ("aot_eager" if args.small else "inductor")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("no CUDA device here: run with --small (CPU) or on a GPU machine")
        if args.warmup < 1 or args.reps < 1 or (args.hunyuan_frames - 1) % 4:
            raise ValueError("need --warmup >= 1, --reps >= 1 and --hunyuan-frames = 4n+1")
        if not math.isfinite(args.budget_min) or args.budget_min < 0:
            raise ValueError(f"--budget-min must be >= 0 minutes (0: no limit), got {args.budget_min}")
        families = [m.strip() for m in args.models.split(",") if m.strip()]
        if not families or set(families) - set(FAMILIES):
            raise ValueError(f"--models takes a comma list of {', '.join(FAMILIES)}; got {args.models!r}")
        check_backend(args.attention, args.device, DTYPES[args.dtype])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dtype = Device(args.device), DTYPES[args.dtype]
    names = sorted(PEAK_TFLOPS, key=len, reverse=True)  # "H100 PCIe" before "H100"
    peak = args.peak_tflops or next((PEAK_TFLOPS[k] for k in names if k in dev.name()), None)
    if not dev.cuda:
        peak = args.peak_tflops  # no vendor peak for a CPU
    env = dict(device=dev.name(), torch=torch.__version__, dtype=args.dtype, peak_tflops=peak,
               warmup=args.warmup, reps=args.reps, attention=args.attention, small=args.small,
               compile_backend=args.compile_backend,
               timing="wall" if dev.cuda else "process CPU")  # fmt: skip
    print(f"gpu_check on {env['device']}, {args.dtype}, torch {torch.__version__}", flush=True)
    budget = Budget(args.budget_min)
    results, env["skipped"] = [], []
    for case in cases(args.small, args.hunyuan_frames):
        if case.family not in families:
            continue
        if not budget.allows(0):
            env["skipped"].append(f"{case.name}: the {budget} was spent")
            print(f"left out: {env['skipped'][-1]}", flush=True)
            continue
        results.append(run_case(case, args, dev, dtype, peak, budget))
    env["total_seconds"] = budget.elapsed()
    result = {"environment": env, "cases": results}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = markdown(result)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table)
    print(table + f"written to {args.out}/gpu_check.{{json,md}} in {env['total_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
