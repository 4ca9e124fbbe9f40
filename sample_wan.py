"""Wan2.1 text-to-video and image-to-video with EasyCache: umT5 (+ CLIP and the first frame's latent for
I2V) -> DiT sampling loop (cache visible) -> VAE -> video + report.

    python sample_wan.py --task tiny --prompt "a red circle moving right on a blue background"
    python sample_wan.py --task i2v-tiny --image first.png --prompt "a green square moving up on a black ..."
    python sample_wan.py --task i2v-14B --size 832*480 --image cat.jpg --prompt "..."  # 480P weights, shift 3
    python sample_wan.py --task t2v-1.3B --size 832*480 --prompt "A cat walks on the grass, realistic style."
    python sample_wan.py --task t2v-1.3B --cache none ...                  # the uncached baseline, same loop
    python sample_wan.py --task t2v-1.3B --compare --prompts prompts.txt   # baseline vs cache: one table row
    torchrun --nproc_per_node=8 sample_wan.py --task t2v-14B --ulysses_size 8 --dit_fsdp --t5_fsdp  # 8 GPUs

Flags keep the official generate.py names (--task --size --frame_num --sample_steps --sample_shift
--sample_guide_scale --base_seed --ckpt_dir --save_file --offload_model --t5_cpu --image --ulysses_size
--ring_size --dit_fsdp --t5_fsdp); the cache flags come from easycache.cli. Without --ckpt_dir the needed
files of the task's Hub repo are downloaded into checkpoints/.

main() runs: parse_args -> check_args (every check that needs no model; a refusal is one `error:` line,
easycache.checks) -> the files (outputs writable, checkpoint headers) -> load -> run. Keep that order when
adding a flag. Parse first, then import the heavy modules: the top of this file imports only configs and
the standard library, so `--help` and a bad flag answer at once; torch and the models are imported where
they are first needed (check_model_args, WanT2V, main's file checks), after the flags are parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from easycache import checks
from easycache.cli import add_cache_args, add_output_args, check_run_args, make_cache, no_grad, parse_flags
from easycache.configs import COEFFICIENTS, MagCacheConfig, TeaCacheConfig
from easycache.methods import parse_value
from easycache.published import MAG_RATIOS
from easycache.report import RunOutputs, Stopwatch, environment, slug
from models.flags import add_device_arg, add_speed_args

if TYPE_CHECKING:
    import torch

    from easycache.compare import Generation
    from models.parallel import Launch
    from models.wan import WanConfig
    from models.wan_clip import ClipVisionConfig
    from models.wan_t5 import WanT5Config
    from models.wan_vae import WanVAEConfig


@dataclass(frozen=True)
class Task:
    """Everything that differs between the Wan tasks; the defaults of the official generate.py. The model
    configs are named here and looked up in models/ when first used (the `dit`, `t5`, `vae` and `clip`
    properties below), since models/ imports torch and the flags are parsed before it."""

    repo_id: str | None  # Hub repo (None: the checkpoint ships with this repository)
    ckpt_dir: str  # where it lives or is downloaded to
    dit_name: str | None  # a key of models.wan.WAN_CONFIGS; None: read the checkpoint's config.json
    t5_name: str  # "umt5-xxl" or "tiny" (models.wan_t5)
    vae_name: str  # "wan" or "tiny" (models.wan_vae)
    sizes: tuple[str, ...]  # the official sizes "W*H"; others (multiples of 16) are allowed with a note
    frame_num: int = 81
    sample_steps: int = 50
    sample_shift: float = 5.0
    sample_guide_scale: float = 5.0
    fps: int = 16
    text_len: int = 512
    negative: str | None = None  # the negative prompt; None: the official one (see negative_prompt) ...
    negative_prefix: str = ""  # ... after this prefix (the official i2v config adds one)
    prompt: str = (  # the official example prompt of t2v tasks
        "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted "
        "stage."
    )
    weights: str = "diffusion_pytorch_model.safetensors"  # or the shard index of a sharded DiT
    # The baselines' official settings for this model (TeaCache4Wan2.1 / MagCache4Wan2.1 scripts).
    teacache: TeaCacheConfig = TeaCacheConfig()
    magcache: MagCacheConfig = field(default_factory=MagCacheConfig)
    calibration: str | None = None  # a JSON of easycache.calibrate: its coefficients and ratios as defaults
    clip_name: str | None = None  # image-to-video: the CLIP tower, "vit-h-14" or "tiny" (models.wan_clip)
    sample_shift_480p: float | None = None  # official i2v: shift 3.0 at 832*480 / 480*832 (5.0 otherwise)

    @property
    def i2v(self) -> bool:
        return self.clip_name is not None

    @property
    def dit(self) -> WanConfig | None:
        from models.wan import WAN_CONFIGS

        return WAN_CONFIGS[self.dit_name] if self.dit_name else None

    @property
    def t5(self) -> WanT5Config:
        from models.wan_t5 import UMT5_TINY, UMT5_XXL

        return {"umt5-xxl": UMT5_XXL, "tiny": UMT5_TINY}[self.t5_name]

    @property
    def vae(self) -> WanVAEConfig:
        from models.wan_vae import WAN_VAE_CONFIG, WAN_VAE_TINY

        return {"wan": WAN_VAE_CONFIG, "tiny": WAN_VAE_TINY}[self.vae_name]

    @property
    def clip(self) -> ClipVisionConfig | None:
        from models.wan_clip import CLIP_TINY, CLIP_VIT_H_14

        return {"vit-h-14": CLIP_VIT_H_14, "tiny": CLIP_TINY, None: None}[self.clip_name]

    @property
    def negative_prompt(self) -> str:
        """The default negative prompt: the task's own, else the official sample_neg_prompt (models.wan_t5,
        imported only when needed) after the prefix."""
        if self.negative is not None:
            return self.negative
        from models.wan_t5 import WAN_NEGATIVE_PROMPT

        return self.negative_prefix + WAN_NEGATIVE_PROMPT


_WAN_FILES = ["models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl/tokenizer_config.json"]
_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"  # = models.wan_clip.CLIP_FILE
_I2V_PROMPT = (  # the official example prompt of i2v-14B (for its examples/i2v_input.JPG)
    "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred "
    "feline gazes directly at the camera with a relaxed expression. Blurred beach scenery forms the "
    "background featuring crystal-clear waters, distant green hills, and a blue sky dotted with white "
    "clouds. The cat assumes a naturally relaxed posture, as if savoring the sea breeze and warm sunlight. "
    "A close-up shot highlights the feline's intricate details and the refreshing atmosphere of the seaside."
)
TASKS = {
    "t2v-1.3B": Task(
        "Wan-AI/Wan2.1-T2V-1.3B", "checkpoints/Wan2.1-T2V-1.3B", "t2v-1.3B", "umt5-xxl", "wan",
        sizes=("832*480", "480*832"),
    ),
    "t2v-14B": Task(
        "Wan-AI/Wan2.1-T2V-14B", "checkpoints/Wan2.1-T2V-14B", "t2v-14B", "umt5-xxl", "wan",
        sizes=("1280*720", "720*1280", "832*480", "480*832"),
        weights="diffusion_pytorch_model.safetensors.index.json",
        teacache=TeaCacheConfig(rel_l1_thresh=0.2, coefficients=COEFFICIENTS["wan-t2v-14B"]),
        magcache=MagCacheConfig(mag_ratios=MAG_RATIOS["wan-t2v-14B"]),
    ),
    # The embedded demo model (train_wan_tiny.py): same classes and file layout, toy sizes, runs on a CPU.
    "tiny": Task(
        None, "checkpoints/wan-tiny", None, "tiny", "tiny", sizes=("64*64",), frame_num=17,
        sample_shift=3.0, fps=8, text_len=16, negative="",
        prompt="a red circle moving right on a blue background",
        teacache=TeaCacheConfig(rel_l1_thresh=0.05), calibration="checkpoints/wan-tiny/calibration.json",
    ),
    # Image-to-video (official image2video.py): the 720P weights by default, the 480P ones at 480p sizes
    # (I2V_480P); --size is the pixel budget, the video keeps the image's aspect ratio.
    "i2v-14B": Task(
        "Wan-AI/Wan2.1-I2V-14B-720P", "checkpoints/Wan2.1-I2V-14B-720P", "i2v-14B-720P", "umt5-xxl", "wan",
        sizes=("1280*720", "720*1280", "832*480", "480*832"), sample_steps=40, negative_prefix="镜头晃动，",
        prompt=_I2V_PROMPT, weights="diffusion_pytorch_model.safetensors.index.json", clip_name="vit-h-14",
        sample_shift_480p=3.0,
    ),
    # The I2V demo model (train_wan_tiny_i2v.py): the tiny T2V model fine-tuned on first frames.
    "i2v-tiny": Task(
        None, "checkpoints/wan-i2v-tiny", None, "tiny", "tiny", sizes=("64*64",), frame_num=17,
        sample_shift=3.0, fps=8, text_len=16, negative="",
        prompt="a green square moving up on a black background", clip_name="tiny",
    ),
}  # fmt: skip
I2V_480P = dataclasses.replace(
    TASKS["i2v-14B"],
    repo_id="Wan-AI/Wan2.1-I2V-14B-480P",
    ckpt_dir="checkpoints/Wan2.1-I2V-14B-480P",
    dit_name="i2v-14B-480P",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = checks.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="t2v-1.3B")
    p.add_argument("--size", help="W*H, e.g. 832*480 (default: the task's first official size)")
    p.add_argument("--frame_num", type=int, help="frames, 4n+1 (default 81; tiny 17)")
    p.add_argument("--sample_steps", type=int, help="sampling steps (default 50)")
    p.add_argument("--sample_shift", type=float, help="flow shift (default 5.0; tiny 3.0)")
    p.add_argument("--sample_guide_scale", type=float, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--sample_solver", choices=["unipc", "euler"], default="unipc")
    p.add_argument("--prompt", help="the prompt (default: the task's example prompt)")
    p.add_argument("--image", help="i2v tasks: the first frame (any size; --size is its pixel budget)")
    p.add_argument("--negative_prompt", help="default: the official negative prompt (tiny: empty)")
    p.add_argument("--base_seed", type=int, default=-1, help="seed; -1 draws one (recorded in the report)")
    p.add_argument("--ckpt_dir", help="local checkpoint folder (default: the task's folder in checkpoints/)")
    p.add_argument(
        "--save_file", help="output .mp4 (default: outputs/wan_<task>_<cache>_<prompt>_<seed>.mp4)"
    )
    p.add_argument(
        "--offload_model",
        action="store_true",
        help="umT5 waits on the CPU except while it encodes; the DiT moves to the CPU while the VAE decodes",
    )
    p.add_argument("--t5_cpu", action="store_true", help="keep the umT5 encoder on the CPU")
    add_device_arg(p)
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="DiT dtype (default bf16 on CUDA, else fp32)"
    )
    g = p.add_argument_group("multi-GPU (under torchrun; ulysses_size x ring_size = number of processes)")
    g.add_argument("--ulysses_size", type=int, default=1, help="Ulysses degree (splits the heads)")
    g.add_argument("--ring_size", type=int, default=1, help="ring-attention degree")
    g.add_argument("--dit_fsdp", action="store_true", help="shard the DiT's weights over the ranks (FSDP2)")
    g.add_argument("--t5_fsdp", action="store_true", help="shard the umT5 encoder's weights over the ranks")
    add_cache_args(p, thresh=0.05, warmup=10)  # the paper's Wan2.1 setting
    add_speed_args(p)
    add_output_args(p)
    return parse_flags(p, argv)  # parse_args, with unknown --METHOD.FIELD named


def check_args(args: argparse.Namespace) -> tuple[Task, tuple[int, int], list[str]]:
    """Fill task defaults and refuse bad input before anything heavy is loaded: first every flag that needs
    no torch (a bad one answers at once), then those of the device (check_device_args imports torch)."""
    task, image_size = TASKS[args.task], None
    if task.i2v:
        image_size = check_image_args(args)
        if args.size in ("832*480", "480*832") and task.sample_shift_480p is not None:
            task = I2V_480P  # the official 480P checkpoint and shift 3.0, as generate.py
            args.sample_shift = task.sample_shift_480p if args.sample_shift is None else args.sample_shift
    elif args.image is not None:
        raise ValueError(
            f"--image is for the image-to-video tasks (i2v-14B, i2v-tiny), not {args.task}: drop --image or "
            "pick an i2v task"
        )
    for name in ("frame_num", "sample_steps", "sample_shift", "sample_guide_scale", "prompt"):
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
    teacache, magcache = task.teacache, task.magcache
    if task.calibration:  # the demo model's own fit (the published ones belong to the real models)
        coefficients = parse_value(TeaCacheConfig, "coefficients", task.calibration)
        teacache = replace(teacache, coefficients=coefficients)
        magcache = replace(magcache, mag_ratios=parse_value(MagCacheConfig, "mag_ratios", task.calibration))
    args.method_defaults = {"teacache": teacache, "magcache": magcache, **args.method_defaults}
    checks.check_finite(
        {"--sample_shift": args.sample_shift, "--sample_guide_scale": args.sample_guide_scale}
    )
    if args.sample_shift <= 0:
        raise ValueError(f"--sample_shift must be > 0 (the σ schedule's shift), got {args.sample_shift}")
    if args.base_seed != -1:
        checks.check_seed(args.base_seed, "--base_seed", count=args.num_seeds)
    check_launch(args)
    prompts = check_run_args(args, args.sample_steps)  # τ ≥ 0, R < steps, ... for every cache; prompts
    check_model_args(args, task, image_size)
    if args.base_seed == -1:
        args.base_seed = random.randint(0, 2**31 - 1)
    return task, (width, height), prompts


def check_image_args(args: argparse.Namespace) -> tuple[int, int]:
    """An i2v task needs a readable --image; checked (opened and decoded) before any model loads. Returns its
    (width, height)."""
    if args.image is None:
        raise ValueError(f"--task {args.task} animates an image: pass --image FILE (png, jpg, ...)")
    if os.path.isdir(args.image):
        raise IsADirectoryError(f"--image {args.image} is a folder, not an image file")
    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"--image {args.image}: no such file")
    from PIL import Image  # (light: no torch) decode the whole file, so a truncated one fails here

    try:
        with Image.open(args.image) as im:
            im.convert("RGB")
            size = im.size
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise checks.BadFile(
            f"--image {args.image} is not a readable image ({type(e).__name__}: {e})"
        ) from None
    if min(size) < 1:
        raise checks.BadFile(f"--image {args.image} is empty")
    return size


def check_launch(args: argparse.Namespace, num_heads: int | None = None) -> None:
    """The multi-GPU flags against the launch (torchrun's WORLD_SIZE, as the official generate.py), and,
    once the DiT's config is known, the Ulysses head split (models.parallel.check_layout)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # = models.parallel.launch_world_size(), without torch
    parallel = args.ulysses_size > 1 or args.ring_size > 1
    if world == 1 and (parallel or args.dit_fsdp or args.t5_fsdp):
        raise ValueError(
            "--ulysses_size/--ring_size/--dit_fsdp/--t5_fsdp need several processes: launch with "
            "torchrun --nproc_per_node=N sample_wan.py ... (ulysses_size x ring_size = N)"
        )
    if num_heads is None:  # the DiT's heads are not known yet: the world size only
        if parallel and args.ulysses_size * args.ring_size != world:
            pairs = ", ".join(f"{u}x{world // u}" for u in range(1, world + 1) if world % u == 0)
            raise ValueError(
                f"--ulysses_size {args.ulysses_size} x --ring_size {args.ring_size} must equal the world "
                f"size {world} (torchrun --nproc_per_node); ulysses x ring layouts for {world} ranks: "
                f"{pairs} (ulysses must also divide the DiT's heads)"
            )
    else:
        from models.parallel import check_layout

        check_layout(args.ulysses_size, args.ring_size, world if parallel else 1, num_heads)
    if args.t5_fsdp and args.t5_cpu:
        raise ValueError("--t5_fsdp shards the umT5 encoder over the GPUs; drop --t5_cpu (or --t5_fsdp)")
    if args.dit_fsdp and args.offload_model:
        raise ValueError("--offload_model moves the whole DiT; with --dit_fsdp each rank holds 1/N of it")


def check_model_args(args: argparse.Namespace, task: Task, image_size: tuple[int, int] | None = None) -> None:
    """What needs torch or models/ (imported here, after the flags above): the --device default, the official
    negative prompt, the --cfg_batch default, the --attention kernel installed and, for i2v, that the image
    (`image_size`, W x H) leaves whole DiT patches under the --size pixel budget."""
    from models.fast import check_speed_args, default_device

    args.device = args.device or default_device()
    if args.negative_prompt is None:
        args.negative_prompt = task.negative_prompt
    if image_size is not None:  # the grid encode_condition will use (official: the aspect ratio kept)
        from models.wan_i2v import latent_grid, max_area_of

        stride = task.vae.spatial_stride
        latent_grid(image_size[1], image_size[0], max_area_of(args.size), (stride, stride), (2, 2))
    if args.ulysses_size * args.ring_size > 1:  # the sequence-parallel kernel must exist for this dtype
        from models.parallel import check_parallel_attention

        check_parallel_attention(args.attention, args.device, dit_dtype(args))
    check_speed_args(args, args.device, dit_dtype(args))


def dit_dtype(args: argparse.Namespace) -> torch.dtype:
    import torch

    name = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class WanT2V:
    """The loaded components of one task and how to run them once (text-to-video, or image-to-video when the
    task has a CLIP tower)."""

    def __init__(self, task: Task, ckpt_dir: str, args: argparse.Namespace, launch: Launch | None = None):
        import torch
        import torch.distributed as dist

        from models.fast import compile_blocks
        from models.fsdp import shard_model
        from models.parallel import Launch, init_sequence_parallel
        from models.wan import load_wan
        from models.wan_clip import CLIP_FILE, WanClipEncoder
        from models.wan_i2v import load_image
        from models.wan_t5 import UMT5_XXL, WanTextEncoder
        from models.wan_vae import WAN_VAE_FILE, WanVAE

        self.launch = launch or Launch(0, 1, torch.device(args.device))
        self.task, self.args, self.device = task, args, self.launch.device
        dtype = dit_dtype(args)
        t5_device = "cpu" if args.t5_cpu or args.offload_model else self.device  # offload: moved to encode
        t5_dtype = torch.bfloat16 if task.t5 is UMT5_XXL else torch.float32  # official: bf16 umT5
        self.text_encoder = WanTextEncoder.from_checkpoint(
            ckpt_dir, config=task.t5, device=t5_device, dtype=t5_dtype, text_len=task.text_len
        )
        if args.t5_fsdp:
            shard_model(self.text_encoder.model, self.text_encoder.model.encoder.block)
        # --dit_fsdp: sharded while loading (FSDP2): each rank reads only its 1/N of every weight.
        self.dit = load_wan(
            ckpt_dir, config=task.dit, device=self.device, dtype=dtype, repo_id=task.repo_id,
            attn_backend=args.attention, fsdp=args.dit_fsdp,
        )  # fmt: skip
        self.sp = None  # sequence parallelism: every rank runs each DiT call on 1/N of the tokens
        if args.ulysses_size * args.ring_size > 1:
            self.sp = init_sequence_parallel(
                args.ulysses_size, args.ring_size, device=self.device, dtype=dtype
            )
        # Every rank must take every cache decision alike: rank 0's is broadcast (see StepCache).
        self.decision_group = dist.group.WORLD if self.launch.world_size > 1 else None
        if args.compile:  # the blocks only: the cache decision below stays eager
            compile_blocks(self.dit)
        self.vae = WanVAE.from_checkpoint(
            os.path.join(ckpt_dir, WAN_VAE_FILE), config=task.vae, device=self.device
        )
        self.clip = None
        if task.clip is not None:  # official: the CLIP tower in fp16 on the GPU
            clip_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            self.clip = WanClipEncoder.from_checkpoint(
                os.path.join(ckpt_dir, CLIP_FILE), config=task.clip, device=self.device, dtype=clip_dtype
            )
            self.image = load_image(args.image)  # [3, H, W] in [-1, 1]

    def parallel_report(self) -> dict:
        """The multi-GPU layout, for the report."""
        a = self.args
        return {
            "world_size": self.launch.world_size,
            "ulysses_size": a.ulysses_size,
            "ring_size": a.ring_size,
            "dit_fsdp": a.dit_fsdp,
            "t5_fsdp": a.t5_fsdp,
            "attention": self.sp.attn_type if self.sp else None,
        }

    def dit_grid(self, shape) -> tuple[int, int, int]:
        """The DiT's patch grid (f, h, w) for latents of `shape` [B, C, F, H, W]."""
        return tuple(s // p for s, p in zip(shape[2:], self.dit.config.patch_size))

    @no_grad
    def generate(self, prompt: str, seed: int, cache_cfg, *, num_steps: int | None = None) -> Generation:
        import torch
        from tqdm import tqdm

        from easycache.compare import Generation
        from easycache.video import to_uint8_frames
        from models.offload import Placement
        from models.solvers import FlowEuler, FlowUniPC, wan_sigmas
        from models.wan import flops_per_call
        from models.wan_i2v import encode_condition, max_area_of
        from models.wan_t5 import pad_context

        args, device, sp = self.args, self.device, self.sp
        sw, place = Stopwatch(device), Placement()
        t5_visits = args.offload_model and not args.t5_cpu  # official: umT5 goes to the device only to encode
        with sw.phase("end_to_end"):
            with sw.phase("text"):
                if t5_visits:
                    place.move("text", "t5", self.text_encoder.model, device)
                contexts = self.text_encoder([prompt, args.negative_prompt])
                if t5_visits:
                    place.move("text", "t5", self.text_encoder.model, "cpu")
                ctx, ctx_null = (pad_context([c]).to(device) for c in contexts)
                if args.cfg_batch:  # both padded to text_len (as the DiT pads each) so they stack: [2, T, D]
                    ctx_pair = pad_context(contexts, self.dit.config.text_len).to(device)
            width, height = (int(v) for v in args.size.split("*"))
            shape = self.vae.latent_shape(args.frame_num, height, width)  # (16, T, h, w)
            image_cond = {}  # image-to-video: the DiT's extra inputs, the same for both CFG branches
            if self.clip is not None:
                with sw.phase("image"):
                    area = max_area_of(args.size)
                    c = encode_condition(self.image, args.frame_num, area, self.vae, self.clip)
                shape, image_cond = c.latent_shape, {"clip_fea": c.clip_fea.to(device), "y": c.y.to(device)}
            g = torch.Generator(device).manual_seed(seed)
            latents = torch.randn(shape, generator=g, device=device, dtype=torch.float32)[
                None
            ]  # [1, 16, T, h, w]
            steps = num_steps or args.sample_steps
            sigmas = wan_sigmas(steps, args.sample_shift)
            solver = FlowUniPC(sigmas) if args.sample_solver == "unipc" else FlowEuler(sigmas)
            cost = flops_per_call(self.dit.config, self.dit_grid(latents.shape))  # for the work ratio
            kw = dict(timesteps=solver.timesteps.tolist(), cost=cost, decision_group=self.decision_group)
            cache, calls = make_cache(cache_cfg, steps, **kw), 0
            if not args.dit_fsdp:
                place.move("sampling", "dit", self.dit, device)
            quiet = args.quiet or not self.launch.is_main
            for i, t in enumerate(tqdm(solver.timesteps, desc="sampling", leave=False, disable=quiet)):
                t = t.to(device).expand(1)  # [1]
                # The cache measures the noisy latent alone (I2V: before the DiT concatenates y to it).
                if cache is None or cache.should_compute(i, latents):
                    # TeaCache, MagCache and PAB act inside the DiT through one hook per call (else None).
                    hc, hu = (cache.hook("cond"), cache.hook("uncond")) if cache is not None else (None, None)
                    one_call = args.cfg_batch and hc is None and hu is None  # hooks are per branch
                    with sw.phase("dit"):  # the CFG branches, named
                        if one_call:  # one batch-2 call on [x; x] with [cond; uncond], split back
                            pair = {k: torch.cat([c] * 2) for k, c in image_cond.items()}  # I2V: same image
                            cond, uncond = self.dit(
                                torch.cat([latents] * 2), t.expand(2), ctx_pair, **pair, sp=sp
                            ).chunk(2)
                            v = {"cond": cond, "uncond": uncond}
                        else:  # two calls, as the official generate.py
                            v = {
                                "cond": self.dit(latents, t, ctx, cache=hc, **image_cond, sp=sp),
                                "uncond": self.dit(latents, t, ctx_null, cache=hu, **image_cond, sp=sp),
                            }
                    checks.check_dit_output(v, i)  # NaN/inf: stop at this step, not at the VAE
                    calls += 1 if one_call else 2  # DiT calls (NFE): a batched call counts once
                    if cache is not None:
                        cache.update(latents, v, dit_seconds=sw.last("dit"))
                else:
                    v = cache.reuse(latents)  # EasyCache/static: v̂ = x_t + Δ_i for both branches, no DiT call
                noise_pred = v["uncond"] + args.sample_guide_scale * (v["cond"] - v["uncond"])
                latents = solver.step(noise_pred, i, latents)  # [1, 16, T, h, w] fp32
            if args.offload_model:  # free the device memory the VAE decode needs
                place.move("vae", "dit", self.dit, "cpu")
            with sw.phase("vae"):  # rank 0 alone decodes and writes, as the official multi-GPU run
                frames = to_uint8_frames(self.vae.decode(latents)) if self.launch.is_main else None
        stats = cache.stats if cache is not None else None
        trace = cache.trace if cache else None
        return Generation(
            frames, latents.cpu(), dict(sw.seconds), calls, stats, trace, {"placement": place.moves}
        )


def check_dit_header(ckpt_dir: str, task: Task) -> WanConfig:
    """The DiT's config.json, and its tensors' names and shapes (one file or every shard), read from the file
    headers before any weight is loaded; returns the config."""
    import torch

    from models.loading import check_shapes, checkpoint_shapes
    from models.wan import WanConfig, WanModel

    path = os.path.join(ckpt_dir, "config.json")
    try:
        config = task.dit or WanConfig.from_json(path)
    except (TypeError, ValueError, AttributeError) as e:
        raise checks.BadFile(f"{path} does not describe a Wan DiT: {e}") from None
    weights = os.path.join(ckpt_dir, task.weights)
    with torch.device("meta"):
        model = WanModel(config)
    check_shapes(model, checkpoint_shapes(weights), source=weights)
    return config


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # 1. parse (argparse exits 2 on a bad flag); nothing heavy is imported yet
    with checks.refuse_errors(checks.USAGE):  # 2. check the flags: exit 2, nothing loaded
        task, _, prompts = check_args(args)
        out = RunOutputs(
            args.save_file, args.report, fps=task.fps, lossless=args.lossless,
            name=lambda label, prompt, seed: f"wan_{args.task}_{label}_{slug(prompt)}_{seed}",
            prompts=prompts, seed=args.base_seed, label="compare" if args.compare else args.cache,
        )  # fmt: skip
    from easycache.compare import generate_and_report
    from models.loading import check_checkpoint_files, resolve_checkpoint
    from models.parallel import init_distributed

    with checks.refuse_errors(checks.BAD_FILE):  # 3. check the files: exit 1, nothing loaded
        files = [task.weights, *_WAN_FILES, *(["config.json"] if task.dit_name is None else [])]
        patterns = ["config.json", "diffusion_pytorch_model*", *_WAN_FILES[:2], "google/umt5-xxl/*"]
        if task.i2v:  # the CLIP file too (its xlm-roberta tokenizer is not needed)
            files, patterns = [*files, _CLIP_FILE], [*patterns, _CLIP_FILE]
        ckpt_dir = resolve_checkpoint(
            args.ckpt_dir, repo_id=task.repo_id, files=files, patterns=patterns, default_dir=task.ckpt_dir
        )
        check_checkpoint_files(ckpt_dir, files)  # headers: truncated, garbled, refused pickles
        dit = check_dit_header(ckpt_dir, task)
    with checks.refuse_errors(checks.USAGE):  # the parallel layout must fit the DiT's heads
        check_launch(args, dit.num_heads)
    launch = init_distributed(args.device)
    args.base_seed = launch.broadcast(args.base_seed)  # a seed drawn at random: rank 0's for all
    with checks.refuse_errors(checks.BAD_FILE):  # 4. load
        pipe = WanT2V(task, ckpt_dir, args, launch)
    report = {"script": "sample_wan.py", "args": vars(args), "environment": environment(pipe.device)}
    report["parallel"] = pipe.parallel_report()
    with checks.refuse_run_errors():  # 5. run
        generate_and_report(
            pipe.generate,
            prompts,
            args.base_seed,
            args,
            out,
            report,
            f"wan {args.task}",
            write=launch.is_main,
        )
    launch.close()


if __name__ == "__main__":
    checks.exit_cleanly_on_sigterm()  # a killed run removes its half-written files too
    main()
