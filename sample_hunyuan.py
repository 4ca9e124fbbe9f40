"""HunyuanVideo text-to-video with EasyCache: LLM + CLIP -> DiT sampling loop (cache visible) -> VAE -> video.

    python sample_hunyuan.py --video-size 544 960 --flow-reverse --seed 42 --prompt "A cat walks on grass."
    python sample_hunyuan.py --video-size 720 1280 --flow-reverse --use-cpu-offload --save-path ./results
    python sample_hunyuan.py --cache none ...                             # the uncached baseline, same loop
    python sample_hunyuan.py --compare --prompts prompts.txt              # baseline vs cache: one table row
    torchrun --nproc_per_node=8 sample_hunyuan.py --video-size 720 1280 --ulysses-degree 8 --ring-degree 1

Flags keep the names of the official sample_video.py (hyvideo/config.py); the cache flags come from
easycache.cli. Without --model-base only the needed files are downloaded into checkpoints/HunyuanVideo: the
DiT from tencent/HunyuanVideo, the text encoders and the VAE from hunyuanvideo-community/HunyuanVideo.

main() runs: parse_args -> check_args -> the files (headers, configs) -> load -> run, as sample_wan.py. Parse
first, then import the heavy modules: the top of this file imports only configs and the standard library,
so `--help` and a bad flag answer at once; torch and the models are imported where first needed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from easycache import checks
from easycache.cli import add_cache_args, add_output_args, check_run_args, make_cache, no_grad, parse_flags
from easycache.configs import COEFFICIENTS, MagCacheConfig, TeaCacheConfig
from easycache.published import MAG_RATIOS
from easycache.report import RunOutputs, Stopwatch, environment, slug
from models.flags import add_device_arg, add_speed_args

if TYPE_CHECKING:
    import torch

    from easycache.compare import Generation
    from models.hunyuan import HunyuanVideoConfig
    from models.parallel import Launch

CKPT_FILE = "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt"  # = models.hunyuan.CKPT_FILE
DIT_REPO = "tencent/HunyuanVideo"  # = models.hunyuan.HUB_REPO
PARTS_REPO = "hunyuanvideo-community/HunyuanVideo"  # = models.hunyuan_text.HUB_REPO

# The official NEGATIVE_PROMPT (hyvideo/constants.py); only used with --cfg-scale > 1, as there.
NEGATIVE_PROMPT = (
    "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, "
    "bad teeth, bad eyes, bad limbs, distortion"
)
DTYPES = ("fp32", "fp16", "bf16")  # --precision names (torch_dtype turns one into a torch.dtype)
# What this script needs of PARTS_REPO (transformers itself checks the LLM's shards against its index).
_PARTS_FILES = ["text_encoder/config.json", "tokenizer/tokenizer_config.json", "text_encoder_2/config.json",
                "tokenizer_2/tokenizer_config.json", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors"]  # fmt: skip


@dataclass(frozen=True)
class Task:
    """The defaults of the official sample_video.py for the released HYVideo-T/2-cfgdistill."""

    ckpt_dir: str  # both Hub repos download here (their paths do not collide): one --model-base
    dit_name: str  # a key of models.hunyuan.HUNYUAN_CONFIGS (looked up when used: models/ imports torch)
    sizes: tuple[tuple[int, int], ...]  # official (H, W); others (multiples of 16) are allowed with a note
    video_length: int = 129
    infer_steps: int = 50
    flow_shift: float = 7.0
    embedded_cfg_scale: float = 6.0  # the distilled model's guidance *input*: one DiT call per step
    cfg_scale: float = 1.0  # true CFG (a second, negative-prompt DiT call per step) only when > 1
    fps: int = 24
    prompt: str = "A cat walks on the grass, realistic style."  # official example; EasyCache's README too

    @property
    def dit(self) -> HunyuanVideoConfig:
        from models.hunyuan import HUNYUAN_CONFIGS

        return HUNYUAN_CONFIGS[self.dit_name]


_720P = ((720, 1280), (1280, 720), (1104, 832), (832, 1104), (960, 960))
_540P = ((544, 960), (960, 544), (624, 832), (832, 624), (720, 720))  # the authors ran EasyCache at 544 960
TASKS = {"t2v-720p": Task("checkpoints/HunyuanVideo", "t2v-720p", sizes=_720P + _540P)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = checks.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="t2v-720p", help="the 720p weights serve 540p too")
    p.add_argument("--video-size", type=int, nargs="+", help="H W, or one value for a square (720 1280)")
    p.add_argument("--video-length", type=int, help="frames, 4n+1 (default 129)")
    p.add_argument("--infer-steps", type=int, help="sampling steps (default 50)")
    p.add_argument("--flow-shift", type=float, help="flow shift (default 7.0)")
    p.add_argument("--flow-reverse", action="store_true", help="accepted; sampling always runs σ 1 -> 0")
    p.add_argument("--embedded-cfg-scale", type=float, help="distilled guidance input (default 6.0)")
    p.add_argument("--cfg-scale", type=float, help="true CFG; > 1 adds an uncond DiT call (default 1.0)")
    p.add_argument("--prompt", help="the prompt (default: the official example)")
    p.add_argument("--neg-prompt", help="negative prompt of --cfg-scale > 1 (default: the official one)")
    p.add_argument("--seed", type=int, help="seed (default: drawn in 0..1e6 as the official; recorded)")
    p.add_argument("--model-base", help="local folder holding all files (default: checkpoints/HunyuanVideo)")
    p.add_argument("--dit-weight", help=f"the DiT file (default: <model-base>/{CKPT_FILE})")
    p.add_argument("--dit-config", help="JSON of HunyuanVideoConfig fields: a non-release DiT (tests)")
    p.add_argument("--save-path", default="outputs", help="output folder (official), or a .mp4 path")
    p.add_argument("--use-cpu-offload", action="store_true", help="text encoders, DiT on the CPU when idle")
    p.add_argument("--ulysses-degree", type=int, default=1, help="torchrun: Ulysses degree (splits heads)")
    p.add_argument("--ring-degree", type=int, default=1, help="torchrun: ring-attention degree")
    add_device_arg(p)
    p.add_argument("--precision", choices=DTYPES, help="DiT dtype (official bf16; CPU default fp32)")
    p.add_argument("--vae-precision", choices=DTYPES, help="VAE dtype (official fp16; CPU default fp32)")
    p.add_argument("--text-encoder-precision", choices=DTYPES, help="LLM, CLIP (official fp16; CPU fp32)")
    add_cache_args(p, thresh=0.025, warmup=5, defaults=BASELINES)  # the authors' HunyuanVideo setting
    add_speed_args(p)  # --cfg-batch matters only with true CFG (--cfg-scale > 1)
    add_output_args(p)
    return parse_flags(p, argv)  # parse_args, with unknown --METHOD.FIELD named


# The baselines' official HunyuanVideo settings: TeaCache4HunyuanVideo (τ 0.15 "2.1x", 0.1 "1.6x"; probe:
# block 0's modulated image tokens; steps 0 and N-1 computed), MagCache4HunyuanVideo (δ 0.24, K 6, 0.2; the
# ratio table of the video size, set in check_args), and diffusers' PAB setting. MagCache's tables are of the
# cond call only (the official runs the distilled model without true CFG): an uncond call follows cond.
BASELINES = {
    "teacache": TeaCacheConfig(rel_l1_thresh=0.15, coefficients=COEFFICIENTS["hunyuan-t2v-720p"],
                               probe="modulated"),
    "magcache": MagCacheConfig(magcache_thresh=0.24, magcache_K=6, mag_ratios=MAG_RATIOS["hunyuan-t2v-544p"],
                               branches="cond"),
}  # fmt: skip


def check_args(args: argparse.Namespace) -> tuple[Task, HunyuanVideoConfig, list[str]]:
    """Fill task defaults and refuse bad input before anything heavy is loaded: first every flag that needs
    no torch (a bad one answers at once), then those that do (check_model_args imports torch)."""
    task = TASKS[args.task]
    for name in ("video_length", "infer_steps", "flow_shift", "embedded_cfg_scale", "cfg_scale", "prompt"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(task, name))
    args.neg_prompt = NEGATIVE_PROMPT if args.neg_prompt is None else args.neg_prompt
    size = args.video_size or task.sizes[0]
    if len(size) > 2:
        raise ValueError(f"--video-size takes H W (or one value for a square), got {size}")
    args.video_size = height, width = size[0], size[-1]
    if height == 720 or width == 720:  # MagCache's 720p table (the official picks it by video_size[0])
        magcache = replace(args.method_defaults["magcache"], mag_ratios=MAG_RATIOS["hunyuan-t2v-720p"])
        args.method_defaults = {**args.method_defaults, "magcache": magcache}
    if args.video_length < 1 or (args.video_length - 1) % 4:
        raise ValueError(f"--video-length must be 4n+1 (the VAE packs 4 frames in 1): {args.video_length}")
    if min(height, width) <= 0 or height % 16 or width % 16:  # the official rounds up to 16 silently
        raise ValueError(f"--video-size {height} {width}: need positive multiples of 16 (VAE 8 x patch 2)")
    if (height, width) not in task.sizes:
        print(f"note: {height}x{width} is not an official (H, W): {', '.join(map(str, task.sizes))}")
    checks.check_finite({"--embedded-cfg-scale": args.embedded_cfg_scale, "--cfg-scale": args.cfg_scale,
                         "--flow-shift": args.flow_shift})  # fmt: skip
    if args.infer_steps < 1 or args.cfg_scale < 1:
        raise ValueError("need --infer-steps >= 1 and --cfg-scale >= 1 (1: no true CFG, as released)")
    if args.flow_shift <= 0:
        raise ValueError(
            f"--flow-shift must be > 0 (1 = no shift; the release uses 7), got {args.flow_shift}"
        )
    if args.seed is not None:
        checks.check_seed(args.seed, "--seed", count=args.num_seeds, draw="leave it out to draw one")
    if args.dit_weight is not None and not os.path.isfile(args.dit_weight):
        raise FileNotFoundError(f"--dit-weight {args.dit_weight} is not a file (the official {CKPT_FILE})")
    if args.model_base is not None and not os.path.isdir(args.model_base):
        raise FileNotFoundError(f"--model-base {args.model_base} is not a directory")
    u, r, world = args.ulysses_degree, args.ring_degree, int(os.environ.get("WORLD_SIZE", "1"))
    if u * r > 1 and world == 1:  # (WORLD_SIZE: torchrun's, as models.parallel.launch_world_size)
        raise ValueError(
            "--ulysses-degree/--ring-degree need several processes: launch with torchrun "
            "--nproc_per_node=N sample_hunyuan.py ... (ulysses x ring degree = N)"
        )
    prompts = check_run_args(args, args.infer_steps)  # τ ≥ 0, R < steps, ... for every cache; prompts
    dit = check_model_args(args, task)
    if args.seed is None:
        args.seed = random.randint(0, 1_000_000)
    return task, dit, prompts


def check_model_args(args: argparse.Namespace, task: Task) -> HunyuanVideoConfig:
    """What needs torch or models/ (imported here, after the flags above): the --device default, the
    --cfg-batch default, the --attention kernel, the DiT's config and the parallel layout; returns the
    config."""
    from models.fast import check_speed_args, default_device

    args.device = args.device or default_device()
    dtype = torch_dtype(args.precision, args.device, "bf16")
    if args.ulysses_degree * args.ring_degree > 1:  # the sequence-parallel kernel must exist for this dtype
        from models.parallel import check_parallel_attention

        check_parallel_attention(args.attention, args.device, dtype)
    check_speed_args(args, args.device, dtype)
    dit = read_dit_config(args.dit_config) if args.dit_config else task.dit
    check_launch(args, dit)
    return dit


def torch_dtype(name: str | None, device: str, cuda_default: str) -> torch.dtype:
    """A --*-precision flag as a torch.dtype; unset: `cuda_default` on CUDA (official), fp32 on the CPU."""
    import torch

    cuda = torch.device(device).type == "cuda"
    name = name or (cuda_default if cuda else "fp32")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_launch(args: argparse.Namespace, dit: HunyuanVideoConfig) -> None:
    """The sequence-parallel flags against the torchrun launch, the heads and the video size (the official
    parallel forward splits the latent's patch rows, else its columns, over ulysses x ring ranks)."""
    from models.parallel import check_layout, launch_world_size

    u, r, world = args.ulysses_degree, args.ring_degree, launch_world_size()
    if u * r == 1:
        return
    check_layout(u, r, world, dit.heads_num)
    rows, cols = (s // (8 * p) for s, p in zip(args.video_size, dit.patch_size[1:]))  # VAE 8x, patch
    if rows % world and cols % world:
        raise ValueError(
            f"--video-size {args.video_size[0]} {args.video_size[1]} gives a {rows}x{cols} patch grid that "
            f"splits over {world} ranks neither by rows nor by columns; use a height or width that is a "
            f"multiple of {16 * world}"
        )
    if args.use_cpu_offload:  # as the official sample_video.py
        raise ValueError("--use-cpu-offload cannot be combined with --ulysses-degree/--ring-degree")


def video_file(args: argparse.Namespace) -> str | None:
    """--save-path: a folder (the official meaning; None here) or the .mp4 itself; any other suffix is
    refused rather than made into a folder named like a video."""
    suffix = os.path.splitext(args.save_path)[1]
    if suffix == ".mp4":
        return args.save_path
    videos = (".avi", ".mkv", ".mov", ".webm", ".gif", ".m4v", ".json")
    if suffix.lower() in videos and not os.path.isdir(args.save_path):
        raise ValueError(
            f"--save-path {args.save_path}: videos are written as .mp4; give a folder or a .mp4 path"
        )
    return None


def read_dit_config(path: str) -> HunyuanVideoConfig:
    from dataclasses import fields

    from models.hunyuan import HunyuanVideoConfig

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--dit-config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise checks.BadFile(f"--dit-config {path} is not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise checks.BadFile(f"--dit-config {path} must hold a JSON object of HunyuanVideoConfig fields")
    unknown = sorted(set(values) - {f.name for f in fields(HunyuanVideoConfig)})
    if unknown:
        raise checks.BadFile(f"--dit-config {path}: {unknown} are not HunyuanVideoConfig fields")
    try:
        return HunyuanVideoConfig(**values)
    except (TypeError, ValueError) as e:
        raise checks.BadFile(f"--dit-config {path}: {e}") from None


def check_parts(model_base: str, dit: HunyuanVideoConfig) -> None:
    """The parts must fit the DiT: read their config.json files before any weight is loaded."""
    pairs = [("vae", "latent_channels", "in_channels"), ("text_encoder", "hidden_size", "text_states_dim"),
             ("text_encoder_2", "hidden_size", "text_states_dim_2")]  # fmt: skip
    for folder, key, field in pairs:
        with open(os.path.join(model_base, folder, "config.json")) as f:
            got, want = json.load(f).get(key), getattr(dit, field)
        if got != want:
            raise ValueError(f"{folder}/config.json: {key}={got} does not fit the DiT's {field}={want}")


def check_dit_header(dit_weight: str, dit: HunyuanVideoConfig) -> None:
    """The DiT file's tensor names and shapes against the config, before any weight is read: the pickle is
    memory-mapped (torch's zip format), so only its small index is read, not the 25.6 GB of tensors."""
    import zipfile

    import torch

    from models.hunyuan import HunyuanVideoModel
    from models.loading import check_shapes

    if not zipfile.is_zipfile(dit_weight):
        return  # a legacy pickle cannot be mapped: its shapes are checked when it loads
    state = torch.load(dit_weight, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("module"), dict):
        state = state["module"]  # the official DeepSpeed layout (models.hunyuan.load_hunyuan)
    if not isinstance(state, dict):
        raise checks.BadFile(f"{dit_weight} holds a {type(state).__name__}, not the DiT's weights")
    with torch.device("meta"):
        model = HunyuanVideoModel(dit)
    shapes = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    check_shapes(model, shapes, source=dit_weight)


def resolve_files(args: argparse.Namespace, task: Task) -> tuple[str, str]:
    """(DiT file, folder of the text encoders and VAE); only missing files are downloaded, and every missing
    repository is named in one error."""
    from models.loading import resolve_checkpoint

    base = args.model_base
    dit = dict(files=[CKPT_FILE], patterns=[CKPT_FILE], default_dir=task.ckpt_dir, flag="--model-base")
    patterns = sorted({f"{f.split('/')[0]}/*" for f in _PARTS_FILES})  # only these folders are fetched
    parts = dict(files=_PARTS_FILES, patterns=patterns, default_dir=task.ckpt_dir, flag="--model-base")
    found = checks.gather({
        **({} if args.dit_weight else {"dit": lambda: resolve_checkpoint(base, repo_id=DIT_REPO, **dit)}),
        "parts": lambda: resolve_checkpoint(base, repo_id=PARTS_REPO, **parts),
    })  # fmt: skip
    return args.dit_weight or os.path.join(found["dit"], CKPT_FILE), found["parts"]


class HunyuanT2V:
    """The loaded components and how to run them once."""

    def __init__(
        self,
        dit_weight: str,
        model_base: str,
        dit_config: HunyuanVideoConfig,
        args,
        launch: Launch | None = None,
    ):
        import torch
        import torch.distributed as dist

        from models.fast import compile_blocks
        from models.hunyuan import load_hunyuan
        from models.hunyuan_text import HunyuanTextEncoders
        from models.hunyuan_vae import HunyuanVAE
        from models.parallel import Launch, init_sequence_parallel

        self.launch = launch or Launch(0, 1, torch.device(args.device))
        self.args, self.device = args, self.launch.device
        # official dtypes on GPUs; fp16 matmuls crawl on CPUs
        self.dtype = torch_dtype(args.precision, self.device, "bf16")
        self.text_dtype = torch_dtype(args.text_encoder_precision, self.device, "fp16")
        offload = args.use_cpu_offload  # each waits on the CPU and visits the device only to run
        self.text_encoders = HunyuanTextEncoders.from_pretrained(
            model_base, device=self.device, dtype=self.text_dtype, offload=offload
        )
        home = "cpu" if offload else self.device
        self.dit = load_hunyuan(
            dit_weight, config=dit_config, device=home, dtype=self.dtype, attn_backend=args.attention
        )
        if args.compile:  # the blocks only: the cache decision below stays eager
            compile_blocks(self.dit)
        vae_dtype = torch_dtype(args.vae_precision, self.device, "fp16")
        self.vae = HunyuanVAE.from_pretrained(f"{model_base}/vae", device=self.device, dtype=vae_dtype)
        self.sp = None  # sequence parallelism: each rank embeds 1/N of the latent's rows, text on every rank
        if args.ulysses_degree * args.ring_degree > 1:
            u, r = args.ulysses_degree, args.ring_degree
            self.sp = init_sequence_parallel(u, r, device=self.device, dtype=self.dtype)
        # Every rank must take every cache decision alike: rank 0's is broadcast (see StepCache).
        self.decision_group = dist.group.WORLD if self.launch.world_size > 1 else None

    def parallel_report(self) -> dict:
        """The multi-GPU layout, for the report."""
        return {
            "world_size": self.launch.world_size,
            "ulysses_degree": self.args.ulysses_degree,
            "ring_degree": self.args.ring_degree,
            "attention": self.sp.attn_type if self.sp else None,
        }

    def encode(self, prompt: str) -> dict[str, tuple]:
        """Named branches -> (text_states [1, L, Dt], text_mask [1, L], text_states_2 [1, Dp]): "cond", and
        "uncond" (the negative prompt) with true CFG only. One prompt at a time, as the official encodes."""
        prompts = {"cond": prompt, "uncond": self.args.neg_prompt}
        names = ["cond", "uncond"] if self.args.cfg_scale > 1 else ["cond"]
        return {k: self.text_encoders([prompts[k].strip()]) for k in names}

    @no_grad
    def generate(self, prompt: str, seed: int, cache_cfg, *, num_steps: int | None = None) -> Generation:
        import torch
        from tqdm import tqdm

        from easycache.compare import Generation
        from easycache.video import to_uint8_frames
        from models.hunyuan import flops_per_call, guidance_input
        from models.hunyuan_vae import latent_shape
        from models.offload import Placement
        from models.solvers import FlowEuler, hunyuan_sigmas

        args, device, cfg, sp = self.args, self.device, self.dit.config, self.sp
        sw, place = Stopwatch(device), Placement()
        with sw.phase("end_to_end"):
            with sw.phase("text"):
                text = self.encode(prompt)
                batched = args.cfg_batch and len(text) == 2  # true CFG as one batch-2 call, as the official
                if batched:  # the LLM pads every prompt to 256 tokens, so the branches stack: [2, ...] each
                    text_pair = tuple(torch.cat(parts) for parts in zip(text["cond"], text["uncond"]))
            shape = (1, cfg.in_channels, *latent_shape(args.video_length, *args.video_size))  # B C T h w
            g = torch.Generator(device).manual_seed(seed)
            # As the official: noise drawn in the text dtype (fp16); the solver keeps the latents in fp32.
            latents = torch.randn(shape, generator=g, device=device, dtype=self.text_dtype).float()
            # The distilled DiT's guidance input [1]: g·1000, rounded in the DiT dtype as the official does.
            g_in = (
                guidance_input(args.embedded_cfg_scale, 1, device, self.dtype) if cfg.guidance_embed else None
            )
            steps = num_steps or args.infer_steps
            solver = FlowEuler(hunyuan_sigmas(steps, args.flow_shift))
            grid = tuple(s // p for s, p in zip(shape[2:], cfg.patch_size))  # the DiT's patch grid
            cost = flops_per_call(cfg, grid, text_len=text["cond"][0].shape[1])  # for the work ratio
            kw = dict(timesteps=solver.timesteps.tolist(), cost=cost, decision_group=self.decision_group)
            cache = make_cache(cache_cfg, steps, **kw)
            calls = 0
            place.move("sampling", "dit", self.dit, device)
            quiet = args.quiet or not self.launch.is_main
            for i, t in enumerate(tqdm(solver.timesteps, desc="sampling", leave=False, disable=quiet)):
                t = t.to(device).expand(1)  # [1] float σ·1000
                if cache is None or cache.should_compute(i, latents):
                    with sw.phase("dit"):
                        # TeaCache, MagCache and PAB act inside the DiT through one hook per call (else None).
                        hooks = {k: cache.hook(k) if cache is not None else None for k in text}
                        one_call = batched and all(h is None for h in hooks.values())  # hooks are per branch
                        if one_call:  # one batch-2 call on [x; x] with [cond; uncond], split back
                            g2 = None if g_in is None else g_in.expand(2)
                            cond, uncond = self.dit(
                                torch.cat([latents] * 2), t.expand(2), *text_pair, g2, sp=sp
                            ).chunk(2)
                            v = {"cond": cond, "uncond": uncond}
                        else:  # one call per branch
                            v = {k: self.dit(latents, t, *text[k], g_in, cache=hooks[k], sp=sp) for k in text}
                    checks.check_dit_output(v, i)  # NaN/inf: stop at this step, not at the VAE
                    calls += 1 if one_call else len(v)  # DiT calls (NFE): a batched call counts once
                    if cache is not None:
                        cache.update(latents, v, dit_seconds=sw.last("dit"))
                else:
                    v = cache.reuse(latents)  # EasyCache/static: v̂ = x_t + Δ_i for every branch, no DiT call
                noise_pred = v["cond"]
                if "uncond" in v:  # true CFG
                    noise_pred = v["uncond"] + args.cfg_scale * (v["cond"] - v["uncond"])
                latents = solver.step(noise_pred, i, latents)  # [1, C, T, h, w] fp32
            if args.use_cpu_offload:  # free the device memory the VAE decode needs
                place.move("vae", "dit", self.dit, "cpu")
            with sw.phase("vae"):  # official tiling: 256-pixel, 64-frame tiles
                frames = to_uint8_frames(self.vae.decode(latents)) if self.launch.is_main else None  # rank 0
        stats, trace = (cache.stats, cache.trace) if cache is not None else (None, None)
        return Generation(
            frames, latents.cpu(), dict(sw.seconds), calls, stats, trace, {"placement": place.moves}
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # 1. parse (argparse exits 2 on a bad flag); nothing heavy is imported yet
    with checks.refuse_errors(checks.USAGE):  # 2. check the flags: exit 2, nothing loaded
        task, dit_config, prompts = check_args(args)
        out = RunOutputs(
            video_file(args), args.report, fps=task.fps, lossless=args.lossless, folder=args.save_path,
            name=lambda label, prompt, seed: f"hunyuan_{args.task}_{label}_{slug(prompt)}_{seed}",
            prompts=prompts, seed=args.seed, label="compare" if args.compare else args.cache,
            video_flag="--save-path",
        )  # fmt: skip
    from easycache.compare import generate_and_report
    from models.loading import check_checkpoint_files
    from models.parallel import init_distributed

    with checks.refuse_errors(checks.BAD_FILE):  # 3. check the files: exit 1, nothing loaded
        dit_weight, model_base = resolve_files(args, task)
        check_checkpoint_files(model_base, [f for f in _PARTS_FILES if not f.startswith("tokenizer")])
        check_checkpoint_files(os.path.dirname(dit_weight), [os.path.basename(dit_weight)])
        check_parts(model_base, dit_config)  # (first: its message names the part that does not fit)
        check_dit_header(dit_weight, dit_config)
    launch = init_distributed(args.device)
    args.seed = launch.broadcast(args.seed)  # a seed drawn at random: rank 0's for all
    with checks.refuse_errors(checks.BAD_FILE):  # 4. load
        pipe = HunyuanT2V(dit_weight, model_base, dit_config, args, launch)
    report = {"script": "sample_hunyuan.py", "args": vars(args), "environment": environment(pipe.device)}
    report["parallel"] = pipe.parallel_report()
    label = f"hunyuan {args.task}"
    with checks.refuse_run_errors():  # 5. run
        generate_and_report(pipe.generate, prompts, args.seed, args, out, report, label, write=launch.is_main)
    launch.close()


if __name__ == "__main__":
    checks.exit_cleanly_on_sigterm()  # a killed run removes its half-written files too
    main()
