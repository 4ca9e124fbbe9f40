"""OpenSora 1.2 text-to-video with EasyCache: T5 -> STDiT3 loop (cache visible) -> VAE -> video + report.

    python sample_opensora.py --num-frames 4s --resolution 720p --prompt "a beautiful waterfall"
    python sample_opensora.py --resolution 480p --cache none ...                # the baseline, same loop
    python sample_opensora.py --resolution 480p --compare --prompts prompts.txt  # baseline vs cache
    torchrun --nproc_per_node=8 sample_opensora.py --prompts prompts.txt   # the prompts split over 8 GPUs

Flags keep the official scripts/inference.py names (--num-frames with the 2s/4s/8s/16s aliases,
--resolution, --aspect-ratio (H:W), --image-size, --num-sampling-steps, --cfg-scale, --aes, --fps, --seed,
--save-dir, --sample-name, --ckpt-path, --dtype); the cache flags come from easycache.cli. The weights come
from three Hub repos; without --ckpt-path/--vae-path/--t5-path the needed files are downloaded into
checkpoints/<repo name>/. The DiT's and T5's sizes are read from their config.json; the VAE's architecture is
fixed (its config.json names classes, not sizes), so tests pass a tiny one to `main(argv, vae_config=...)`.

main() runs: parse_args -> check_args -> the files -> load -> run, as sample_wan.py. Parse first, then import
the heavy modules: the top of this file imports only configs and the standard library, so `--help` and a bad
flag answer at once; torch and the models are imported where first needed.
"""

from __future__ import annotations

import argparse
import os
import random
from typing import TYPE_CHECKING

from easycache import checks
from easycache.cli import add_cache_args, add_output_args, check_run_args, make_cache, no_grad, parse_flags
from easycache.configs import COEFFICIENTS, PAB_OPENSORA, MagCacheConfig, TeaCacheConfig
from easycache.published import MAG_RATIOS
from easycache.report import RunOutputs, Stopwatch, environment, slug
from models.flags import add_device_arg, add_speed_args

if TYPE_CHECKING:
    import torch

    from easycache.compare import Generation
    from models.opensora_vae import OpenSoraVAEConfig
    from models.parallel import Launch

HUB_REPO = "hpcai-tech/OpenSora-STDiT-v3"  # = models.opensora.HUB_REPO (tests check these copies)
VAE_REPO_ID = "hpcai-tech/OpenSora-VAE-v1.2"  # = models.opensora_vae.REPO_ID
T5_REPO_ID = "DeepFloyd/t5-v1_1-xxl"  # = models.opensora_text.T5_REPO_ID
DEFAULT_AES = 6.5  # configs/opensora-v1-2/inference/sample.py (= models.opensora_text.DEFAULT_AES)

# Official opensora/datasets/aspect.py: aspect ratios are H:W, and each resolution has a hand-tuned
# (height, width) per ratio (not a formula: e.g. 240p 9:16 is 240x426, 480p 9:16 is 480x854).
ASPECT_RATIOS = ("3:8", "9:21", "12:25", "1:2", "9:17", "27:50", "9:16", "5:8", "2:3", "3:4", "1:1", "4:3",
                 "3:2", "16:9", "17:9", "2:1", "50:27")  # fmt: skip
IMAGE_SIZES = {res: dict(zip(ASPECT_RATIOS, sizes)) for res, sizes in {
    "144p": [(117, 312), (125, 291), (133, 277), (135, 270), (139, 262), (141, 260), (144, 256), (151, 241),
             (156, 234), (166, 221), (192, 192), (221, 165), (235, 156), (256, 144), (263, 139), (271, 135),
             (277, 132)],
    "240p": [(196, 522), (210, 490), (222, 462), (226, 452), (232, 438), (236, 436), (240, 426), (252, 404),
             (262, 393), (276, 368), (320, 320), (370, 278), (392, 262), (426, 240), (440, 232), (452, 226),
             (462, 222)],
    "360p": [(294, 784), (314, 732), (332, 692), (340, 680), (350, 662), (352, 652), (360, 640), (380, 608),
             (392, 588), (416, 554), (480, 480), (554, 416), (588, 392), (640, 360), (660, 350), (678, 340),
             (692, 332)],
    "480p": [(392, 1046), (420, 980), (444, 925), (452, 904), (466, 880), (470, 870), (480, 854), (506, 810),
             (522, 784), (554, 738), (640, 640), (740, 555), (784, 522), (854, 480), (880, 466), (906, 454),
             (924, 444)],
    "720p": [(588, 1568), (628, 1466), (666, 1388), (678, 1356), (698, 1318), (706, 1306), (720, 1280),
             (758, 1212), (784, 1176), (832, 1110), (960, 960), (1108, 832), (1176, 784), (1280, 720),
             (1320, 698), (1358, 680), (1386, 666)],
}.items()}  # fmt: skip
NUM_FRAMES = {"2s": 51, "4s": 102, "8s": 204, "16s": 408, "32s": 816}  # official aliases (at 24 fps)
IMG_FPS = 120  # the fps condition of a single frame (official IMG_FPS)
T5_FILES = ["config.json", "model.safetensors.index.json", "spiece.model", "tokenizer_config.json",
            "special_tokens_map.json"]  # fmt: skip
CHECKPOINTS = {  # flag -> (Hub repo, default folder, files read, download patterns)
    "ckpt_path": (HUB_REPO, "checkpoints/OpenSora-STDiT-v3", ["config.json", "model.safetensors"],
                  ["config.json", "model.safetensors"]),
    "vae_path": (VAE_REPO_ID, "checkpoints/OpenSora-VAE-v1.2", ["model.safetensors"],
                 ["config.json", "model.safetensors"]),
    "t5_path": (T5_REPO_ID, "checkpoints/t5-v1_1-xxl", T5_FILES,
                [*T5_FILES, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
}  # fmt: skip


# The baselines' official OpenSora 1.2 settings (all through VideoSys, batched CFG: one decision per call):
# TeaCache eval/teacache/experiments/opensora.py (τ 0.1 / 0.2; first and last step computed), MagCache
# eval/magcache/experiments/opensora.py (δ 0.12, K 3, skip_time 6 = 0.2 of 30 steps), VideoSys' PAB config.
BASELINES = {
    "teacache": TeaCacheConfig(
        rel_l1_thresh=0.1, coefficients=COEFFICIENTS["opensora-v1.2"], probe="modulated"
    ),
    "magcache": MagCacheConfig(magcache_thresh=0.12, magcache_K=3, mag_ratios=MAG_RATIOS["opensora-v1.2"]),
    "pab": PAB_OPENSORA,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = checks.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="a beautiful waterfall", help="the prompt (default: the README's)")
    p.add_argument("--num-frames", default="2s", help="frames (1, or >= 17) or an alias: 2s 4s 8s 16s 32s")
    p.add_argument("--resolution", choices=IMAGE_SIZES, default="240p")
    p.add_argument("--aspect-ratio", choices=ASPECT_RATIOS, default="9:16", help="H:W (9:16 is landscape)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="overrides the two above")
    p.add_argument("--num-sampling-steps", type=int, default=30)
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--aes", type=float, default=DEFAULT_AES, help="aesthetic score appended to the prompt")
    p.add_argument("--fps", type=int, default=24, help="frame-rate condition of the DiT and of the video")
    p.add_argument("--seed", type=int, default=42, help="seed; -1 draws one (recorded in the report)")
    p.add_argument("--save-dir", default="outputs", help="folder of the video and its report")
    p.add_argument("--sample-name", help="file name without suffix (default: sizes, cache, prompt, seed)")
    p.add_argument("--ckpt-path", help="local hpcai-tech/OpenSora-STDiT-v3 (default: checkpoints/...)")
    p.add_argument("--vae-path", help="local hpcai-tech/OpenSora-VAE-v1.2 (default: checkpoints/...)")
    p.add_argument("--t5-path", help="local DeepFloyd/t5-v1_1-xxl (default: checkpoints/...)")
    p.add_argument("--t5-cpu", action="store_true", help="run the T5 encoder (fp32, 19 GB) on the CPU")
    add_device_arg(p)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="DiT/VAE dtype (default bf16 on CUDA)")
    # The paper does not publish its OpenSora τ and R. Chosen by a 30-step flow-Euler sweep on the demo model
    # (README, "Defaults of τ and R"): the setting whose PSNR is closest to that of the Wan default (τ 0.05,
    # R 10 of 50 steps) on the same model; R 6 keeps the Wan warm-up share (10 of 50).
    add_cache_args(p, thresh=0.07, warmup=6, defaults=BASELINES)
    add_speed_args(p, cfg_batch=False)  # CFG is one batched call already, as the official sampler
    add_output_args(p)
    return parse_flags(p, argv)  # parse_args, with unknown --METHOD.FIELD named


def check_args(args: argparse.Namespace, vae_config: OpenSoraVAEConfig | None = None) -> list[str]:
    """Resolve aliases and tables into args.num_frames / args.image_size; refuse bad input before loading
    (every check but the --device default needs no torch). vae_config: None for the release's VAE."""
    frames = NUM_FRAMES.get(args.num_frames, args.num_frames)
    try:
        args.num_frames = int(frames)
    except ValueError:
        raise ValueError(
            f"--num-frames must be an int or one of {', '.join(NUM_FRAMES)}, got {args.num_frames!r}"
        ) from None
    if args.num_frames < 1 or 1 < args.num_frames < 17:
        raise ValueError(
            f"--num-frames {args.num_frames}: OpenSora 1.2 takes 1 frame (an image) or >= 17 (its timestep "
            "transform counts 5 latent frames per 17 frames)"
        )
    height, width = args.image_size or IMAGE_SIZES[args.resolution][args.aspect_ratio]
    blocks = len(vae_config.vae_2d["block_out_channels"]) if vae_config else 4  # 4: the release's SDXL VAE
    down = 2 ** (blocks - 1)  # 8 for the SDXL VAE
    if min(height, width) < down:
        raise ValueError(
            f"--image-size {height} {width}: height and width must be >= {down} (one latent pixel)"
        )
    args.image_size = [height, width]
    if args.num_sampling_steps < 1:
        raise ValueError(f"--num-sampling-steps must be >= 1, got {args.num_sampling_steps}")
    if args.fps < 1:
        raise ValueError(f"--fps must be >= 1, got {args.fps}")
    checks.check_finite({"--cfg-scale": args.cfg_scale, "--aes": args.aes})
    if args.seed != -1:
        checks.check_seed(args.seed, "--seed", count=args.num_seeds)
    if args.sample_name is not None:
        checks.check_file_name(args.sample_name, "--sample-name")  # stays inside --save-dir
    prompts = check_run_args(args, args.num_sampling_steps)  # τ ≥ 0, R < steps, ... for every cache; prompts
    from models.fast import check_speed_args, default_device  # import torch: only now

    args.device = args.device or default_device()
    check_speed_args(args, args.device, dit_dtype(args))  # --attention installed and usable here
    if args.seed == -1:
        args.seed = random.randint(0, 2**31 - 1)
    return prompts


def dit_dtype(args: argparse.Namespace) -> torch.dtype:
    """The DiT and VAE dtype: --dtype, else bf16 on CUDA (official) and fp32 elsewhere."""
    import torch

    name = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def check_dit_header(folder: str) -> None:
    """The DiT's config.json must give an STDiT3Config the model can be built from, and model.safetensors
    the tensor names and shapes of that model: both read from the file headers, before any weight loads."""
    import torch

    from models.loading import check_shapes, checkpoint_shapes
    from models.opensora import STDiT3, STDiT3Config

    path = os.path.join(folder, "config.json")
    try:
        config = STDiT3Config.from_json(path)  # check_checkpoint_files has parsed the JSON already
    except (TypeError, ValueError, AttributeError) as e:
        raise checks.BadFile(f"{path} does not describe an STDiT3: {e}") from None
    weights = os.path.join(folder, "model.safetensors")
    with torch.device("meta"):
        model = STDiT3(config)
    check_shapes(model, checkpoint_shapes(weights), source=weights)


def checkpoint_dir(args: argparse.Namespace, flag: str) -> str:
    """One Hub repo's local folder: the flag's (must be complete) or the default (downloaded if needed)."""
    from models.loading import resolve_checkpoint

    repo, default, files, patterns = CHECKPOINTS[flag]
    return resolve_checkpoint(
        getattr(args, flag),
        repo_id=repo,
        files=files,
        patterns=patterns,
        default_dir=default,
        flag="--" + flag.replace("_", "-"),
    )


class OpenSoraT2V:
    """The loaded T5, STDiT3 and VAE, and how to run them once."""

    def __init__(
        self,
        paths: dict[str, str],
        args: argparse.Namespace,
        vae_config: OpenSoraVAEConfig,
        launch: Launch | None = None,
    ):
        import torch

        from models.fast import compile_blocks
        from models.opensora import load_stdit3
        from models.opensora_text import OpenSoraTextEncoder
        from models.opensora_vae import OpenSoraVAE
        from models.parallel import Launch

        self.launch = launch or Launch(0, 1, torch.device(args.device))
        self.args, self.device = args, self.launch.device
        self.dtype = dit_dtype(args)  # official: bf16 DiT and VAE, fp32 T5
        self.dit = load_stdit3(
            paths["ckpt_path"], device=self.device, dtype=self.dtype, attn_backend=args.attention
        )
        if args.compile:  # the blocks only: the cache decision in generate() stays eager
            compile_blocks(self.dit)
        self.vae = OpenSoraVAE.from_checkpoint(
            paths["vae_path"], device=self.device, dtype=self.dtype, config=vae_config
        )
        self.text_encoder = OpenSoraTextEncoder.from_pretrained(  # as many tokens as the learned null caption
            paths["t5_path"], device="cpu" if args.t5_cpu else self.device,
            model_max_length=self.dit.config.model_max_length,
        )  # fmt: skip

    @no_grad
    def generate(self, prompt: str, seed: int, cache_cfg, *, num_steps: int | None = None) -> Generation:
        import torch
        from tqdm import tqdm

        from easycache.compare import Generation
        from easycache.video import to_uint8_frames
        from models.opensora import flops_per_call
        from models.solvers import RFEuler, opensora_timesteps

        args, device = self.args, self.device
        sw = Stopwatch(device)
        with sw.phase("end_to_end"):
            with sw.phase("text"):
                y, mask = self.text_encoder.encode([prompt], aes=args.aes)  # [1, 1, L, Dc], [1, L]
                # The null caption is the DiT's learned y_embedding; the DiT cuts it to the prompt's mask.
                y_null = self.dit.y_embedder.y_embedding[None, None]  # [1, 1, L, Dc]
                y = torch.cat([y.to(device), y_null.to(y.dtype)])  # [2, 1, L, Dc]: cond, uncond
                mask = mask.to(device)  # [1, L], the conditional mask only (the DiT repeats it)
            (height, width), frames = args.image_size, args.num_frames
            shape = (1, self.dit.config.in_channels, *self.vae.latent_shape(frames, height, width))
            g = torch.Generator(device).manual_seed(seed)
            # Official: noise drawn in the DiT dtype; the first Euler step promotes the latents to fp32.
            latents = torch.randn(shape, generator=g, device=device, dtype=self.dtype).float()  # [1,4,T,h,w]
            # Conditioning scalars, once for the pair: the DiT repeats them and rounds them to its dtype.
            fps = torch.tensor([float(args.fps if frames > 1 else IMG_FPS)], device=device)  # [1]
            hh, ww = (torch.tensor([float(v)], device=device) for v in (height, width))  # [1] pixels each
            steps = num_steps or args.num_sampling_steps
            solver = RFEuler(*opensora_timesteps(steps, height=height, width=width, num_frames=frames))
            grid = tuple(-(-s // p) for s, p in zip(shape[2:], self.dit.config.patch_size))  # padded grid
            cost = flops_per_call(self.dit.config, grid, batch=2)  # one batched call on [cond; uncond]
            cache = make_cache(cache_cfg, steps, timesteps=solver.timesteps.tolist(), cost=cost)
            calls = 0
            for i, t in enumerate(tqdm(solver.timesteps, desc="sampling", leave=False, disable=args.quiet)):
                t = t.to(device).repeat(2)  # [2]
                if cache is None or cache.should_compute(i, latents):
                    # ONE batched DiT call on [z; z] with [y; y_null], as the official RF sampler
                    with sw.phase("dit"):
                        hook = cache.hook("batch") if cache is not None else None  # TeaCache, MagCache, PAB
                        pred = self.dit(torch.cat([latents, latents]), t, y, mask, fps, hh, ww, cache=hook)
                        pred = pred[:, : self.dit.config.in_channels]  # velocity; the rest is the unused σ
                        v = {"cond": pred[:1], "uncond": pred[1:]}  # split first: one Δ per CFG half
                    checks.check_dit_output(v, i)  # NaN/inf: stop at this step, not at the VAE
                    calls += 1  # NFE counts batched calls: one per computed step
                    if cache is not None:
                        cache.update(latents, v, dit_seconds=sw.last("dit"))
                else:
                    v = cache.reuse(latents)  # EasyCache/static: v̂ = x_t + Δ_i for both halves, no DiT call
                noise_pred = v["uncond"] + args.cfg_scale * (v["cond"] - v["uncond"])  # x0 − noise direction
                latents = solver.step(noise_pred, i, latents)  # [1, 4, T, h, w] fp32
            with sw.phase("vae"):
                video = to_uint8_frames(self.vae.decode(latents, num_frames=frames))  # [F, H, W, 3]
        stats = cache.stats if cache is not None else None
        return Generation(
            video, latents.cpu(), dict(sw.seconds), calls, stats, cache.trace if cache else None
        )


def main(argv: list[str] | None = None, *, vae_config: OpenSoraVAEConfig | None = None) -> None:
    """Args: argv: the flags (None: sys.argv); vae_config: the VAE architecture (None: the release's
    OPENSORA_VAE_V1_2; tests pass a tiny one)."""
    args = parse_args(argv)  # 1. parse (argparse exits 2 on a bad flag); nothing heavy is imported yet
    with checks.refuse_errors(checks.USAGE):  # 2. check the flags: exit 2, nothing loaded
        prompts = check_args(args, vae_config)
        size = f"{args.num_frames}x{args.image_size[0]}x{args.image_size[1]}"
        name = lambda label, prompt, seed: f"opensora_{size}_{label}_{slug(prompt)}_{seed}"  # noqa: E731
        video = os.path.join(args.save_dir, f"{args.sample_name}.mp4") if args.sample_name else None
        out = RunOutputs(
            video, args.report, fps=args.fps, lossless=args.lossless, name=name, prompts=prompts,
            seed=args.seed, label="compare" if args.compare else args.cache, folder=args.save_dir,
            video_flag="--save-dir/--sample-name",
        )  # fmt: skip
    from easycache.compare import generate_and_report
    from models.loading import check_checkpoint_files
    from models.opensora_vae import OPENSORA_VAE_V1_2
    from models.parallel import init_distributed

    vae_config = vae_config or OPENSORA_VAE_V1_2
    with checks.refuse_errors(checks.BAD_FILE):  # 3. check the files: exit 1, nothing loaded
        paths = checks.gather({flag: (lambda f=flag: checkpoint_dir(args, f)) for flag in CHECKPOINTS})
        for flag, (_, _, files, _) in CHECKPOINTS.items():
            check_checkpoint_files(paths[flag], files)
        check_dit_header(paths["ckpt_path"])
    # Under torchrun: data parallel over the prompts. Each rank generates every N-th prompt alone (its own
    # cache: no DiT call spans ranks, so no decision needs sharing) and writes its videos; rank 0 the report.
    launch = init_distributed(args.device)
    args.seed = launch.broadcast(args.seed)  # a seed drawn at random: rank 0's for all
    with checks.refuse_errors(checks.BAD_FILE):  # 4. load
        pipe = OpenSoraT2V(paths, args, vae_config, launch)
    report = {"script": "sample_opensora.py", "args": vars(args), "environment": environment(pipe.device)}
    report["dit_call"] = "one batched call on [cond; uncond] per computed step"  # Wan's scripts make two
    report["parallel"] = {"world_size": launch.world_size, "data_parallel": "prompts"}
    label = f"opensora {size} (batched CFG: 1 DiT call per computed step)"
    shard = (launch.rank, launch.world_size) if launch.world_size > 1 else None
    with checks.refuse_run_errors():  # 5. run
        generate_and_report(pipe.generate, prompts, args.seed, args, out, report, label, shard=shard)
    launch.close()


if __name__ == "__main__":
    checks.exit_cleanly_on_sigterm()  # a killed run removes its half-written files too
    main()
