"""Wan2.1 text-to-video with EasyCache: umT5 -> DiT sampling loop (cache visible) -> VAE -> video + report.

    python sample_wan.py --task tiny --prompt "a red circle moving right on a blue background"
    python sample_wan.py --task t2v-1.3B --size 832*480 --prompt "A cat walks on the grass, realistic style."
    python sample_wan.py --task t2v-1.3B --cache none ...                  # the uncached baseline, same loop
    python sample_wan.py --task t2v-1.3B --compare --prompts prompts.txt   # baseline vs cache: one table row

Flags keep the official generate.py names (--task --size --frame_num --sample_steps --sample_shift
--sample_guide_scale --base_seed --ckpt_dir --save_file --offload_model --t5_cpu); the cache flags come from
easycache.cli. Without --ckpt_dir the needed files of the task's Hub repo are downloaded into checkpoints/.

How main() runs, and where a new flag or import goes (keep this order when you add to the script):
  1. parse_args   argparse and easycache only: no models/, transformers or diffusers at module level
  2. check_args   every check that needs no model (easycache.checks); a refusal is one `error:` line
  3. files        outputs writable, checkpoint files present and readable (still nothing loaded)
  4. load         heavy imports happen here, inside WanT2V: torch, models/, transformers, diffusers
  5. run          the sampling loop (WanT2V.generate), then the video and the report
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from easycache import checks
from easycache.cli import add_cache_args, add_output_args, check_run_args, no_grad
from easycache.magcache import MagCacheConfig
from easycache.methods import parse_value
from easycache.published import MAG_RATIOS
from easycache.report import RunOutputs, slug
from easycache.teacache import COEFFICIENTS, TeaCacheConfig
from models.loading import check_checkpoint_files, resolve_checkpoint  # standard library only

if TYPE_CHECKING:
    from easycache.compare import Generation

# models.wan_vae.WAN_VAE_FILE, repeated so that checking the files needs no models/ (a test keeps them equal)
WAN_VAE_FILE = "Wan2.1_VAE.pth"


@dataclass(frozen=True)
class Task:
    """Everything that differs between the Wan tasks; the defaults of the official generate.py."""

    repo_id: str | None  # Hub repo (None: the checkpoint ships with this repository)
    ckpt_dir: str  # where it lives or is downloaded to
    dit: str | None  # a preset of models.wan.WAN_CONFIGS; None: read the checkpoint's config.json
    t5: str  # "umt5-xxl" (official, bf16) or "tiny": models.wan_t5.UMT5_XXL / UMT5_TINY
    vae: str  # "official" or "tiny": models.wan_vae.WAN_VAE_CONFIG / WAN_VAE_TINY
    sizes: tuple[str, ...]  # the official sizes "W*H"; others (multiples of 16) are allowed with a note
    frame_num: int = 81
    sample_steps: int = 50
    sample_shift: float = 5.0
    sample_guide_scale: float = 5.0
    fps: int = 16
    text_len: int = 512
    negative_prompt: str | None = None  # None: the official one (models.wan_t5.WAN_NEGATIVE_PROMPT)
    prompt: str = (  # the official example prompt of t2v tasks
        "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted "
        "stage."
    )
    weights: str = "diffusion_pytorch_model.safetensors"  # or the shard index of a sharded DiT
    # The baselines' official settings for this model (TeaCache4Wan2.1 / MagCache4Wan2.1 scripts).
    teacache: TeaCacheConfig = TeaCacheConfig()
    magcache: MagCacheConfig = field(default_factory=MagCacheConfig)
    calibration: str | None = None  # a JSON of easycache.calibrate: its coefficients and ratios as defaults


_WAN_FILES = ["models_t5_umt5-xxl-enc-bf16.pth", WAN_VAE_FILE, "google/umt5-xxl/tokenizer_config.json"]
TASKS = {
    "t2v-1.3B": Task(
        "Wan-AI/Wan2.1-T2V-1.3B", "checkpoints/Wan2.1-T2V-1.3B", "t2v-1.3B", "umt5-xxl", "official",
        sizes=("832*480", "480*832"),
    ),
    "t2v-14B": Task(
        "Wan-AI/Wan2.1-T2V-14B", "checkpoints/Wan2.1-T2V-14B", "t2v-14B", "umt5-xxl", "official",
        sizes=("1280*720", "720*1280", "832*480", "480*832"),
        weights="diffusion_pytorch_model.safetensors.index.json",
        teacache=TeaCacheConfig(rel_l1_thresh=0.2, coefficients=COEFFICIENTS["wan-t2v-14B"]),
        magcache=MagCacheConfig(mag_ratios=MAG_RATIOS["wan-t2v-14B"]),
    ),
    # The embedded demo model (train_wan_tiny.py): same classes and file layout, toy sizes, runs on a CPU.
    "tiny": Task(
        None, "checkpoints/wan-tiny", None, "tiny", "tiny", sizes=("64*64",), frame_num=17,
        sample_shift=3.0, fps=8, text_len=16, negative_prompt="",
        prompt="a red circle moving right on a blue background",
        teacache=TeaCacheConfig(rel_l1_thresh=0.05), calibration="checkpoints/wan-tiny/calibration.json",
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="t2v-1.3B")
    p.add_argument("--size", help="W*H, e.g. 832*480 (default: the task's first official size)")
    p.add_argument("--frame_num", type=int, help="frames, 4n+1 (default 81; tiny 17)")
    p.add_argument("--sample_steps", type=int, help="sampling steps (default 50)")
    p.add_argument("--sample_shift", type=float, help="flow shift (default 5.0; tiny 3.0)")
    p.add_argument("--sample_guide_scale", type=float, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--sample_solver", choices=["unipc", "euler"], default="unipc")
    p.add_argument("--prompt", help="the prompt (default: the task's example prompt)")
    p.add_argument("--negative_prompt", help="default: the official negative prompt (tiny: empty)")
    p.add_argument("--base_seed", type=int, default=-1, help="seed; -1 draws one (recorded in the report)")
    p.add_argument("--ckpt_dir", help="local checkpoint folder (default: the task's folder in checkpoints/)")
    p.add_argument(
        "--save_file", help="output .mp4 (default: outputs/wan_<task>_<cache>_<prompt>_<seed>.mp4)"
    )
    p.add_argument(
        "--offload_model", action="store_true", help="move the DiT to the CPU while the VAE decodes"
    )
    p.add_argument("--t5_cpu", action="store_true", help="keep the umT5 encoder on the CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu (resolved when loading)")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="DiT dtype (default bf16 on CUDA, else fp32)"
    )
    add_cache_args(p, thresh=0.05, warmup=10)  # the paper's Wan2.1 setting
    add_output_args(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[Task, tuple[int, int], list[str]]:
    """Fill task defaults and refuse bad input before anything heavy is loaded."""
    task = TASKS[args.task]
    for name in (
        "frame_num",
        "sample_steps",
        "sample_shift",
        "sample_guide_scale",
        "prompt",
        "negative_prompt",
    ):
        if getattr(args, name) is None:
            setattr(args, name, getattr(task, name))
    args.size = args.size or task.sizes[0]
    try:
        width, height = (int(v) for v in args.size.split("*"))
    except ValueError:
        raise ValueError(f"--size must look like 832*480 (width*height), got {args.size!r}") from None
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise ValueError(
            f"--size {args.size}: width and height must be positive multiples of 16 (VAE stride × DiT patch)"
        )
    if args.size not in task.sizes:
        print(f"note: {args.size} is not an official size of {args.task} ({', '.join(task.sizes)})")
    if args.frame_num < 1 or (args.frame_num - 1) % 4:
        raise ValueError(
            f"--frame_num must be 4n+1 (the VAE compresses 4 frames into 1), got {args.frame_num}"
        )
    if args.sample_steps < 1:
        raise ValueError(f"--sample_steps must be >= 1, got {args.sample_steps}")
    checks.check_finite(
        {"--sample_shift": args.sample_shift, "--sample_guide_scale": args.sample_guide_scale}
    )
    if args.sample_shift <= 0:
        raise ValueError(f"--sample_shift must be > 0 (the σ schedule's shift), got {args.sample_shift}")
    if args.base_seed != -1:
        checks.check_seed(args.base_seed, "--base_seed", count=args.num_seeds)
    teacache, magcache = task.teacache, task.magcache
    if task.calibration:  # the demo model's own fit (the published ones belong to the real models)
        coefficients = parse_value(TeaCacheConfig, "coefficients", task.calibration)
        teacache = replace(teacache, coefficients=coefficients)
        magcache = replace(magcache, mag_ratios=parse_value(MagCacheConfig, "mag_ratios", task.calibration))
    args.method_defaults = {"teacache": teacache, "magcache": magcache, **args.method_defaults}
    prompts = check_run_args(args, args.sample_steps)  # τ ≥ 0, R < steps, ... for every cache; prompts
    if args.base_seed == -1:
        args.base_seed = random.randint(0, 2**31 - 1)
    return task, (width, height), prompts


def check_dit_header(ckpt_dir: str, task: Task) -> None:
    """The DiT's config.json and tensor shapes, read from the file headers before any weight is loaded."""
    import torch

    from models.loading import check_shapes, safetensors_header
    from models.wan import WAN_CONFIGS, WanConfig, WanModel

    path = os.path.join(ckpt_dir, "config.json")
    try:
        config = WAN_CONFIGS[task.dit] if task.dit else WanConfig.from_json(path)
    except (TypeError, ValueError, AttributeError) as e:
        raise checks.BadFile(f"{path} does not describe a Wan DiT: {e}") from None
    weights = os.path.join(ckpt_dir, task.weights)
    if weights.endswith(".index.json"):
        return  # shards: their headers are checked by check_checkpoint_files, their shapes when loading
    with torch.device("meta"):
        model = WanModel(config)
    check_shapes(model, {k: s for k, (_, s) in safetensors_header(weights).items()}, source=weights)


class WanT2V:
    """The loaded components of one task and how to run them once."""

    def __init__(self, task: Task, ckpt_dir: str, args: argparse.Namespace):
        import torch  # the heavy imports, after parsing and checking (see the module docstring)

        from models.wan import WAN_CONFIGS, load_wan
        from models.wan_t5 import UMT5_TINY, UMT5_XXL, WAN_NEGATIVE_PROMPT, WanTextEncoder
        from models.wan_vae import WAN_VAE_CONFIG, WAN_VAE_TINY, WanVAE

        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.negative_prompt is None:
            args.negative_prompt = WAN_NEGATIVE_PROMPT
        self.task, self.args, self.device = task, args, torch.device(args.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            args.dtype or ("bf16" if self.device.type == "cuda" else "fp32")
        ]
        t5_device = "cpu" if args.t5_cpu else self.device
        t5_dtype = torch.bfloat16 if task.t5 == "umt5-xxl" else torch.float32  # official: bf16 umT5
        self.text_encoder = WanTextEncoder.from_checkpoint(
            ckpt_dir, config={"umt5-xxl": UMT5_XXL, "tiny": UMT5_TINY}[task.t5], device=t5_device,
            dtype=t5_dtype, text_len=task.text_len,
        )  # fmt: skip
        dit = WAN_CONFIGS[task.dit] if task.dit else None
        self.dit = load_wan(ckpt_dir, config=dit, device=self.device, dtype=dtype, repo_id=task.repo_id)
        vae = {"official": WAN_VAE_CONFIG, "tiny": WAN_VAE_TINY}[task.vae]
        self.vae = WanVAE.from_checkpoint(f"{ckpt_dir}/{WAN_VAE_FILE}", config=vae, device=self.device)

    def dit_grid(self, shape) -> tuple[int, int, int]:
        """The DiT's patch grid (f, h, w) for latents of `shape` [B, C, F, H, W]."""
        return tuple(s // p for s, p in zip(shape[2:], self.dit.config.patch_size))

    @no_grad
    def generate(self, prompt: str, seed: int, cache_cfg, *, num_steps: int | None = None) -> Generation:
        import torch
        from tqdm import tqdm

        from easycache.cli import make_cache
        from easycache.compare import Generation
        from easycache.report import Stopwatch
        from easycache.video import to_uint8_frames
        from models.solvers import FlowEuler, FlowUniPC, wan_sigmas
        from models.wan import flops_per_call
        from models.wan_t5 import pad_context

        args, device = self.args, self.device
        sw = Stopwatch(device)
        with sw.phase("end_to_end"):
            with sw.phase("text"):
                ctx, ctx_null = (
                    pad_context([c]).to(device) for c in self.text_encoder([prompt, args.negative_prompt])
                )
            width, height = (int(v) for v in args.size.split("*"))
            shape = self.vae.latent_shape(args.frame_num, height, width)  # (16, T, h, w)
            g = torch.Generator(device).manual_seed(seed)
            latents = torch.randn(shape, generator=g, device=device, dtype=torch.float32)[
                None
            ]  # [1, 16, T, h, w]
            steps = num_steps or args.sample_steps
            sigmas = wan_sigmas(steps, args.sample_shift)
            solver = FlowUniPC(sigmas) if args.sample_solver == "unipc" else FlowEuler(sigmas)
            cost = flops_per_call(self.dit.config, self.dit_grid(latents.shape))  # for the work ratio
            cache = make_cache(cache_cfg, steps, timesteps=solver.timesteps.tolist(), cost=cost)
            calls = 0
            self.dit.to(device)
            for i, t in enumerate(tqdm(solver.timesteps, desc="sampling", leave=False, disable=args.quiet)):
                t = t.to(device).expand(1)  # [1]
                if cache is None or cache.should_compute(i, latents):
                    # TeaCache, MagCache and PAB act inside the DiT through one hook per call (else None).
                    hc, hu = (cache.hook("cond"), cache.hook("uncond")) if cache is not None else (None, None)
                    with sw.phase("dit"):  # two DiT calls: the CFG branches, named
                        v = {
                            "cond": self.dit(latents, t, ctx, cache=hc),
                            "uncond": self.dit(latents, t, ctx_null, cache=hu),
                        }
                    checks.check_dit_output(v, i)  # NaN/inf: stop at this step, not at the VAE
                    calls += 2
                    if cache is not None:
                        cache.update(latents, v, dit_seconds=sw.last("dit"))
                else:
                    v = cache.reuse(latents)  # EasyCache/static: v̂ = x_t + Δ_i for both branches, no DiT call
                noise_pred = v["uncond"] + args.sample_guide_scale * (v["cond"] - v["uncond"])
                latents = solver.step(noise_pred, i, latents)  # [1, 16, T, h, w] fp32
            if args.offload_model and device.type == "cuda":
                self.dit.to("cpu")
                torch.cuda.empty_cache()
            with sw.phase("vae"):
                frames = to_uint8_frames(self.vae.decode(latents))  # [F, H, W, 3]
        stats = cache.stats if cache is not None else None
        return Generation(
            frames, latents.cpu(), dict(sw.seconds), calls, stats, cache.trace if cache else None
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # 1. parse (argparse exits 2 on a bad flag)
    with checks.refuse_errors(checks.USAGE):  # 2. check the flags: exit 2, nothing loaded
        task, _, prompts = check_args(args)
        out = RunOutputs(
            args.save_file, args.report, fps=task.fps, lossless=args.lossless,
            name=lambda label, prompt, seed: f"wan_{args.task}_{label}_{slug(prompt)}_{seed}",
            prompts=prompts, seed=args.base_seed, label="compare" if args.compare else args.cache,
        )  # fmt: skip
    with checks.refuse_errors(checks.BAD_FILE):  # 3. check the files: exit 1, nothing loaded
        files = [task.weights, *_WAN_FILES, *(["config.json"] if task.dit is None else [])]
        patterns = ["config.json", "diffusion_pytorch_model*", *_WAN_FILES[:2], "google/umt5-xxl/*"]
        ckpt_dir = resolve_checkpoint(
            args.ckpt_dir, repo_id=task.repo_id, files=files, patterns=patterns, default_dir=task.ckpt_dir
        )
        check_checkpoint_files(ckpt_dir, files)  # headers: truncated, garbled, refused pickles
        check_dit_header(ckpt_dir, task)
    with checks.refuse_errors(checks.BAD_FILE):  # 4. load: the heavy imports happen here
        pipe = WanT2V(task, ckpt_dir, args)
    from easycache.compare import generate_and_report
    from easycache.report import environment

    report = {"script": "sample_wan.py", "args": vars(args), "environment": environment(pipe.device)}
    with checks.refuse_run_errors():  # 5. run
        generate_and_report(pipe.generate, prompts, args.base_seed, args, out, report, f"wan {args.task}")


if __name__ == "__main__":
    checks.exit_cleanly_on_sigterm()  # a killed run removes its half-written files too
    main()
