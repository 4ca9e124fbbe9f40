"""Train the embedded demo model (`sample_wan.py --task tiny`) from a seed, on procedurally generated videos.

Stages (each resumable; run them in order, or `--stage all`):
  vae      a tiny Wan-VAE (diffusers' AutoencoderKLWan, which the official weights load into), cropped clips
  latents  encode a fixed data set of videos (17 frames, 64×64) and their captions once
  dit      a tiny WanModel with rectified flow (v = noise − x0, as Wan), CFG dropout, weight EMA
  decoder  fine-tune the VAE's decoder on whole clips of the DiT's shapes (L1, encoder frozen): sharp corners
  export   write checkpoints/wan-tiny/ in the official file layout, read by the loaders of the real weights
  probe    (not in "all") how far the DiT's x0 prediction follows each word of the caption: a two-minute
           signal during training, where the detector needs generated videos

The text encoder is a tiny umT5 with random weights (built from the seed, never trained) and a word-level
tokenizer over the caption grammar: it only has to give each word a distinct, stable embedding.

The shipped checkpoint is seven runs: a base run on the small shapes (this script's defaults), then fine-tunes
of its DiT, with the base VAE, on large shapes (radius 13-15 px instead of 8-10: outlines that differ by whole
DiT tokens) whose square grows from run to run: "large-v1" (about the circle's area), "large-v2" (half side
r, three cosine cycles), then "large" (half side 1.2 r). The DiT drew the first square round and half of the
second one bulging (checkpoints/README.md). The "large" run also fine-tunes the VAE's decoder on the large
shapes (stage decoder): the base VAE, trained on crops of small ones, rounded the squares' corners. The last
run, "large-inset", keeps the shapes 5 px further from the frame's edges across their motion: the DiT had
learned to place them as close to the edge as the data does, give or take a pixel, and drew some over it.

    python train_wan_tiny.py --stage vae,latents,dit --work_dir outputs/wan-tiny-small
    python train_wan_tiny.py --stage latents,dit --shapes large-v1 --init_from outputs/wan-tiny-small \
        --work_dir outputs/wan-tiny-large-v1 --dit_steps 4500 --dit_cycles 1
    python train_wan_tiny.py --stage latents,dit --shapes large-v2 --init_from outputs/wan-tiny-large-v1 \
        --work_dir outputs/wan-tiny-large-v2a --dit_steps 1500 --dit_cycles 1
    python train_wan_tiny.py --stage latents,dit --shapes large-v2 --init_from outputs/wan-tiny-large-v2a \
        --work_dir outputs/wan-tiny-large-v2b --dit_steps 1000 --dit_cycles 1 --dit_lr 2.5e-4
    python train_wan_tiny.py --stage latents,dit --shapes large-v2 --init_from outputs/wan-tiny-large-v2b \
        --work_dir outputs/wan-tiny-large-v2c --dit_steps 2000 --dit_cycles 1 --dit_lr 2.5e-4
    python train_wan_tiny.py --stage latents,dit,decoder --shapes large --init_from \
        outputs/wan-tiny-large-v2c --work_dir outputs/wan-tiny-large --dit_steps 1500 --dit_cycles 1
    python train_wan_tiny.py --stage latents,dit,export --shapes large-inset --init_from \
        outputs/wan-tiny-large --work_dir outputs/wan-tiny-large-inset --dit_steps 1500 --dit_cycles 1

Only the last run exports: export checks that the run's latent statistics are the ones
models.wan_vae.WAN_VAE_TINY holds, and those are the last data set's. The three large-v2 runs encode the same
data set: link the first one's latents.pt into the next work dirs to skip the ~4 min. On 2 CPU cores: VAE ~1.2
s/step (55 min for the 2,700 steps it runs), latents ~4 min, DiT ~1.1-1.3 s/step (3.4 h for the base run's 2
cosine cycles of 4,500 steps, 1.5 h for the large-v1 fine-tune, 1.6 h for the three large-v2 cycles, 41 min
for large, 30 min for large-inset), decoder ~1.6 s/step (33 min): ~9 h in all, so run it in the background;
every stage resumes. `--dit_fg_weight` (default 0: the shipped plain MSE) weights the loss on the shape's
latent pixels, an experiment that did not help (see checkpoints/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from models.solvers import shift_sigmas
from models.toy_videos import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    FRAMES,
    GEOMETRIES,
    SHAPES,
    SIZE,
    Caption,
    Geometry,
    all_captions,
    coverage,
    render,
)
from models.wan import WAN_CONFIGS, WEIGHTS, WanModel
from models.wan_t5 import UMT5_TINY, convert_umt5_to_official
from models.wan_vae import (
    WAN_VAE_FILE,
    WAN_VAE_TINY,
    WanVAEConfig,
    convert_diffusers_wan_vae_to_official,
    convert_official_wan_vae,
)

# Tiny Wan-VAE: 4× temporal and 4× spatial downsampling, 16 latent channels (64×64×17 -> 16×5×16×16); its
# latent mean/std (measured after training) live in models.wan_vae.WAN_VAE_TINY.
VAE_ARCH = dict(base_dim=16, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, True))
DIT_FILE = f"{WEIGHTS}.safetensors"  # the exported DiT, named as the official 1.3B's


def log(work_dir: str, name: str, record: dict) -> None:
    with open(os.path.join(work_dir, f"{name}_log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def video_batch(
    rng: np.random.Generator, captions: list, batch: int, frames: int, geometry: str = "small"
) -> torch.Tensor:
    """Random captions and seeds -> [B, 3, frames, H, W] in [-1, 1], a random window of each 17-frame clip."""
    out = []
    for _ in range(batch):
        cap = captions[rng.integers(len(captions))]
        video = render(cap, seed=int(rng.integers(2**31)), geometry=geometry)
        start = int(rng.integers(FRAMES - frames + 1))
        out.append(torch.from_numpy(video[start : start + frames]))
    v = torch.stack(out).float().div(127.5).sub(1.0)  # [B, F, H, W, 3]
    return v.permute(0, 4, 1, 2, 3).contiguous()  # [B, 3, F, H, W]


def save_state(path: str, **state) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def warm_cosine(step: int, steps: int, peak: float, warmup: int) -> float:
    """The lr at `step`: a linear warm-up over `warmup` steps times a cosine from `peak` to 0 at `steps`."""
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


# ----------------------------------------------------------------------------------------------------------
# Start from an earlier run (--init_from): fine-tune instead of training from the seed
# ----------------------------------------------------------------------------------------------------------
def init_from(args) -> None:
    """Seed --work_dir from --init_from: the work dir of an earlier run or an exported checkpoint.

    A work dir gives its `vae_state.pt` (model) and the EMA of its `dit_state.pt`; an exported checkpoint
    (official layout, e.g. checkpoints/wan-tiny) its `Wan2.1_VAE.pth` and
    `diffusion_pytorch_model.safetensors` (the EMA weights that export wrote): the same tensors. Written here:
    vae_state.pt as a finished VAE run (step --vae_stop, no optimiser: the vae stage has nothing left to do)
    and dit_state.pt as step 0 of a new DiT schedule, its model and EMA both the given DiT, with a fresh
    optimiser. A state file already in --work_dir is kept: a fine-tune resumes from its own checkpoints like
    any run.
    """
    from safetensors.torch import load_file

    src = args.init_from
    run_files = [os.path.join(src, f) for f in ("vae_state.pt", "dit_state.pt")]
    export_files = [os.path.join(src, f) for f in (WAN_VAE_FILE, DIT_FILE)]
    if all(map(os.path.isfile, run_files)):
        vae = vae_weights(src)  # with its fine-tuned decoder, as its export holds it
        dit = torch.load(run_files[1], weights_only=False)["ema"]
    elif all(map(os.path.isfile, export_files)):
        vae = convert_official_wan_vae(torch.load(export_files[0], weights_only=True))
        dit = load_file(export_files[1])
    else:
        raise FileNotFoundError(
            f"--init_from {src} is neither a work dir (vae_state.pt, dit_state.pt) nor an exported "
            f"checkpoint ({WAN_VAE_FILE}, {DIT_FILE})"
        )
    WanModel(WAN_CONFIGS["tiny"]).load_state_dict(dit)  # strict: fail here, not after the latents stage
    vae_path, dit_path = (os.path.join(args.work_dir, f) for f in ("vae_state.pt", "dit_state.pt"))
    if not os.path.exists(vae_path):
        save_state(vae_path, model=vae, step=args.vae_stop)
    if not os.path.exists(dit_path):
        save_state(dit_path, model=dit, ema=dit, step=0)


# ----------------------------------------------------------------------------------------------------------
# Stage 1: VAE
# ----------------------------------------------------------------------------------------------------------
def train_vae(args) -> None:
    from diffusers import AutoencoderKLWan

    path = os.path.join(args.work_dir, "vae_state.pt")
    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(
        **WanVAEConfig(**VAE_ARCH, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16).diffusers_kwargs()
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng, step = np.random.default_rng(args.seed), 0
    if os.path.exists(path):
        state = torch.load(path, weights_only=False)  # our own resume file
        vae.load_state_dict(state["model"])
        step = state["step"]
        if "opt" in state:  # absent in a state made by --init_from (a finished VAE, never resumed)
            opt.load_state_dict(state["opt"])
            rng.bit_generator.state = state["rng"]
            torch.set_rng_state(state["torch_rng"])
    captions = all_captions()
    stop = args.vae_stop  # the cosine schedule stays --vae_steps long either way
    bar = tqdm(range(step, stop), initial=step, total=args.vae_steps, desc="vae")
    for step in bar:
        # Short warm-up, then cosine decay; above ~5e-4 this architecture's training oscillates.
        lr = warm_cosine(step, args.vae_steps, args.vae_lr, warmup=100)
        for g in opt.param_groups:
            g["lr"] = lr
        # Short 9-frame windows first (half the cost), then whole 17-frame clips: the causal conv caches make
        # the VAE recurrent over its 4-frame chunks, and a VAE trained on 2 chunks drifts on the 3rd and 4th.
        # Random crops (the VAE is convolutional) of 32 px, the last 10% of steps 48 px for more context.
        x = video_batch(rng, captions, args.vae_batch, frames=9 if step < 0.55 * args.vae_steps else FRAMES)
        crop = args.vae_crop if step < 0.9 * args.vae_steps else 48
        top, left = (int(v) for v in rng.integers(SIZE - crop + 1, size=2))
        x = x[..., top : top + crop, left : left + crop]
        # A deterministic autoencoder: the official wrapper only ever uses the posterior mean, and sampling
        # (with the encoder's initial unit variance) would drown the latents in noise early in training.
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = 0.5 * (z**2).mean()  # the KL's mean term only: keeps the latents near unit scale for the DiT
        loss = mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))  # range [-1, 1] -> peak-to-peak 2
        bar.set_postfix(psnr=f"{psnr:.1f}", kl=f"{kl.item():.3g}")
        log(args.work_dir, "vae", {"step": step, "mse": mse.item(), "kl": kl.item(), "psnr": psnr, "lr": lr})
        if (step + 1) % args.save_every == 0 or step + 1 == stop:
            save_state(
                path,
                model=vae.state_dict(),
                opt=opt.state_dict(),
                rng=rng.bit_generator.state,
                step=step + 1,
                torch_rng=torch.get_rng_state(),
            )


# ------------------------------------------------------------------------------------------------------------
# Text encoder: a word-level tokenizer over the grammar and a tiny umT5 with seeded random weights
# ------------------------------------------------------------------------------------------------------------
def build_text_encoder(seed: int):
    """(tokenizer, UMT5EncoderModel): umT5's special ids (pad 0, eos 1, unk 2), one token per word."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

    words = sorted({w for cap in all_captions() for w in str(cap).split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16
    )
    if len(tokenizer) > UMT5_TINY.vocab_size:
        raise ValueError(f"the grammar needs {len(tokenizer)} tokens, UMT5_TINY has {UMT5_TINY.vocab_size}")
    torch.manual_seed(seed + 1)
    model = UMT5EncoderModel(UMT5_TINY.to_umt5_config()).eval().requires_grad_(False)
    return tokenizer, model


# ------------------------------------------------------------------------------------------------------------
# Stage 2: a fixed latent data set
# ------------------------------------------------------------------------------------------------------------
def load_vae(args, stats: dict | None = None):
    from diffusers import AutoencoderKLWan

    mean, std = (tuple(stats["mean"]), tuple(stats["std"])) if stats else ((0.0,) * 16, (1.0,) * 16)
    cfg = WanVAEConfig(**VAE_ARCH, latents_mean=mean, latents_std=std)
    vae = AutoencoderKLWan(**cfg.diffusers_kwargs())
    vae.load_state_dict(vae_weights(args.work_dir))
    return vae.eval().requires_grad_(False), cfg


def vae_weights(work_dir: str) -> dict:
    """The work dir's VAE: `vae_state.pt`, with the decoder of `decoder_state.pt` over it once the decoder
    stage has run."""
    state = dict(torch.load(os.path.join(work_dir, "vae_state.pt"), weights_only=False)["model"])
    path = os.path.join(work_dir, "decoder_state.pt")
    if os.path.exists(path):
        state.update(torch.load(path, weights_only=False)["model"])
    return state


@torch.no_grad()
def encode_videos(vae, captions: list, seeds: list[int], geometry: str = "small", batch: int = 16):
    """Posterior means [N, 16, 5, 16, 16] of the rendered videos (the official VAE never samples)."""
    out = []
    for i in tqdm(range(0, len(seeds), batch), desc="encode", leave=False):
        videos = [
            torch.from_numpy(render(c, s, geometry=geometry))
            for c, s in zip(captions[i : i + batch], seeds[i : i + batch])
        ]
        x = torch.stack(videos).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3)  # [b, 3, 17, 64, 64]
        out.append(vae.encode(x).latent_dist.mode())
    return torch.cat(out)


def latent_masks(captions: list, seeds: list[int], geometry: str = "small") -> torch.Tensor:
    """Where the shape is, on the latent grid: bool [N, 1, 5, 16, 16], one latent pixel wider all round.

    The Wan-VAE's causal time axis: latent frame 0 holds frame 0, latent frame k frames 4k-3 .. 4k; a latent
    pixel counts if the shape covers any of its 4×4 pixels in any of its frames. The ring of one more latent
    pixel (4 px) holds the outline's neighbourhood, where a circle, a square and a triangle differ.
    """
    cover = np.stack([coverage(c, s, geometry=geometry) for c, s in zip(captions, seeds)])
    cover = torch.from_numpy(cover)  # [N, 17, 64, 64]
    time = torch.cat([cover[:, :1], cover[:, 1:].unflatten(1, (-1, 4)).amax(2)], dim=1)  # [N, 5, 64, 64]
    grid = torch.nn.functional.max_pool2d(time, 4)  # [N, 5, 16, 16]
    ring = torch.nn.functional.max_pool2d(grid, 3, stride=1, padding=1)
    return (ring > 0)[:, None]


def make_latents(args) -> None:
    path = os.path.join(args.work_dir, "latents.pt")
    if os.path.exists(path):
        check_geometry(torch.load(path, weights_only=False), path, args.shapes)
        return
    vae, _ = load_vae(args)
    caps = all_captions()
    rng = np.random.default_rng(args.seed + 2)
    # Latent statistics for the normalisation the official VAE wrapper applies (z - mean) / std per channel.
    probe_caps = [caps[i] for i in rng.integers(len(caps), size=512)]
    probe = encode_videos(vae, probe_caps, list(range(512)), args.shapes)
    # Rounded to 4 decimals like the official table, so the code constant below can hold them exactly.
    stats = {k: [round(v, 4) for v in f(probe, dim=(0, 2, 3, 4)).tolist()] for k, f in
             (("mean", torch.mean), ("std", torch.std))}  # fmt: skip
    mean, std = (torch.tensor(stats[k]).view(1, -1, 1, 1, 1) for k in ("mean", "std"))
    index = [(c, k) for c in range(len(caps)) for k in range(args.videos_per_caption)]
    seeds = [1_000_000 + 1000 * c + k for c, k in index]  # disjoint from the seeds the tests render
    z = encode_videos(vae, [caps[c] for c, _ in index], seeds, args.shapes)
    masks = latent_masks([caps[c] for c, _ in index], seeds, args.shapes)
    tokenizer, t5 = build_text_encoder(args.seed)
    texts = [str(c) for c in caps] + [""]  # the last row: the empty negative prompt (CFG's null branch)
    tokens = tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
    hidden = t5(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    context = hidden * tokens.attention_mask[..., None]  # zero rows past each length, as pad_context
    save_state(
        path,
        latents=((z - mean) / std).half(),
        caption=torch.tensor([c for c, _ in index]),
        masks=masks,
        context=context,
        stats=stats,
        geometry=args.shapes,
        geometry_spec=dataclasses.asdict(GEOMETRIES[args.shapes]),
    )


def same_geometry(spec: dict, now: dict) -> bool:
    """Whether a recorded `geometry_spec` is the geometry `now`, reading fields added to `Geometry` since it
    was recorded (such as `inset`) at their defaults, which is what the data was made with."""
    return dataclasses.asdict(Geometry(**spec)) == now


def check_geometry(data: dict, path: str, shapes: str) -> None:
    """A data set is made once per work dir: asking for other shapes than it holds is an error, not a reuse.
    The name is checked, and the geometry it stood for when the file was written (`geometry_spec`), since a
    name can change meaning: "large" drew squares of half side 0.85 r, then r, now 1.2 r. (Files made before
    `--shapes` existed hold the "small" geometry; files made before the spec was recorded hold none, which
    is only ambiguous for "large".)"""
    held = data.get("geometry", "small")
    if held != shapes:
        raise ValueError(
            f"{path} holds the {held!r} shapes, not the {shapes!r} asked for by --shapes: use another "
            f"--work_dir (link its vae_state.pt) or --shapes {held}"
        )
    spec, now = data.get("geometry_spec"), dataclasses.asdict(GEOMETRIES[shapes])
    if (spec is None and held == "large") or (spec is not None and not same_geometry(spec, now)):
        raise ValueError(
            f"{path} holds {held!r} shapes made as {spec or 'an older geometry (no spec recorded)'}, but "
            f"GEOMETRIES[{held!r}] is now {now}: make the data set again in another --work_dir (link its "
            "vae_state.pt)"
        )


# ------------------------------------------------------------------------------------------------------------
# Stage 3: the DiT
# ------------------------------------------------------------------------------------------------------------
def init_wan(model: WanModel) -> None:
    """The official WanModel.init_weights: Xavier linears, N(0, 0.02) embeddings, a zero output layer."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            torch.nn.init.zeros_(m.bias)
    torch.nn.init.xavier_uniform_(model.patch_embedding.weight.flatten(1))
    for m in [*model.text_embedding.modules(), *model.time_embedding.modules()]:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    torch.nn.init.zeros_(model.head.head.weight)


def dit_lr(step: int, args) -> float:
    """Cosine with warm restarts (SGDR): `--dit_cycles` cycles of `--dit_steps` steps, each with a 500-step
    warm-up and a peak `--dit_lr_decay` times the last one's. Colour is learned in the first cycle; motion
    only in the anneal of a second, lower one (56% -> 94%; shape did not move, see checkpoints/README.md)."""
    cycle, t = divmod(step, args.dit_steps)
    return warm_cosine(t, args.dit_steps, args.dit_lr * args.dit_lr_decay**cycle, warmup=500)


def dit_shift(step: int, args) -> float:
    """The flow shift of the training σ at `step`: `--dit_shift` gives one per cycle (the last repeats)."""
    shifts = args.dit_shift
    return shifts[min(step // args.dit_steps, len(shifts) - 1)]


def parse_shifts(text: str) -> list[float]:
    """`--dit_shift`: "3" or "3,3,1.5" (one per cycle); every shift must be finite and > 0."""
    try:
        shifts = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 < v < math.inf for v in shifts):  # inf would make every training σ NaN
        raise argparse.ArgumentTypeError(f"every shift must be finite and > 0, got {text!r}")
    return shifts


def flow_loss(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None, fg_weight: float):
    """MSE on v = noise − x0, each latent pixel weighted 1 + fg_weight where the shape is (`latent_masks`).

    The shape is a small part of each frame (~6% of the pixels) and what tells a circle from a square or a
    triangle a thin band along its outline: under the plain MSE (fg_weight 0, the shipped recipe) the DiT
    learned colour, background and motion but drew one blob for every shape. This weighting is the experiment
    against that; 500-step fine-tunes at weight 4 and 10 did not change it (checkpoints/README.md).
    Normalised by the mean weight, so the loss stays on the plain MSE's scale.
    """
    err = (pred - target) ** 2  # [B, 16, F, H, W]
    if masks is None or not fg_weight:
        return err.mean()
    weight = 1.0 + fg_weight * masks.float()  # [B, 1, F, H, W]
    return (weight * err).mean() / weight.mean()


def dit_update(
    model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, loss, step: int, ema_max: float
):
    """One optimiser step (gradients clipped to norm 1), then the weight EMA with a short ramp (the shared
    inner step of the T2V and I2V DiT runs)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    decay = min(ema_max, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def save_dit_state(
    path: str, model: torch.nn.Module, ema: torch.nn.Module, opt, gen: torch.Generator, step: int
) -> None:
    """What a DiT run resumes from: weights, EMA, optimiser, the data generator and the next step."""
    save_state(
        path,
        model=model.state_dict(),
        ema=ema.state_dict(),
        opt=opt.state_dict(),
        gen=gen.get_state(),
        step=step,
    )


def load_dit_state(path: str, model: torch.nn.Module, ema: torch.nn.Module, opt, gen: torch.Generator) -> int:
    """Resume a DiT run from `save_dit_state`'s file; returns the step to continue from."""
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    if "opt" in state:  # absent at step 0 of a fine-tune made by --init_from
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
    return state["step"]


def train_dit(args) -> None:
    data = torch.load(os.path.join(args.work_dir, "latents.pt"), weights_only=False)
    check_geometry(data, os.path.join(args.work_dir, "latents.pt"), args.shapes)
    z, caption, context = data["latents"].float(), data["caption"], data["context"]
    if args.dit_fg_weight and "masks" not in data:
        raise ValueError(
            f"{args.work_dir}/latents.pt has no shape masks (made before --dit_fg_weight): delete it and run "
            "--stage latents again, or pass --dit_fg_weight 0"
        )
    masks = data["masks"] if args.dit_fg_weight else None  # the plain MSE never reads them
    null = len(context) - 1
    path = os.path.join(args.work_dir, "dit_state.pt")
    torch.manual_seed(args.seed + 3)
    model = WanModel(WAN_CONFIGS["tiny"])
    init_wan(model)
    ema = WanModel(WAN_CONFIGS["tiny"]).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen, step = torch.Generator().manual_seed(args.seed + 4), 0
    if os.path.exists(path):
        step = load_dit_state(path, model, ema, opt, gen)
    total = args.dit_steps * args.dit_cycles
    bar = tqdm(range(step, total), initial=step, total=total, desc="dit")
    for step in bar:
        lr = dit_lr(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(z), (args.dit_batch,), generator=gen)
        x0 = z[idx]  # [B, 16, 5, 16, 16]
        noise = torch.randn(x0.shape, generator=gen)
        # σ where the sampler goes: uniform u through the same shift as the tiny task's sampler
        # (sample_shift 3 puts half the steps above σ 0.75). A logit-normal σ (SD3) centred on 0.5 trains the
        # high-noise steps that decide colour, shape and motion ~10× too rarely: the layout came out wrong.
        # A later cycle may take a smaller shift (`--dit_shift 3,3,1.5`: 26% of σ below 0.35, not 15%) to
        # train more of the low-noise steps that draw outlines. Tried for a third cycle: no better shapes
        # (their loss from σ 0.35 on was the VAE's, not the DiT's; see checkpoints/README.md).
        u = torch.rand(len(idx), generator=gen, dtype=torch.float64)
        sigma = shift_sigmas(u, dit_shift(step, args)).float()
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise  # the straight path Wan samples along
        drop = torch.rand(len(idx), generator=gen) < args.cfg_dropout  # learn the unconditional branch too
        ctx = context[torch.where(drop, null, caption[idx])]  # [B, 16, 64]
        pred = model(x_t, sigma * 1000, ctx)
        loss = flow_loss(pred, noise - x0, None if masks is None else masks[idx], args.dit_fg_weight)
        dit_update(model, ema, opt, loss, step, args.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log(args.work_dir, "dit", {"step": step, "loss": loss.item(), "lr": lr})
        if (step + 1) % args.save_every == 0 or step + 1 == total:
            save_dit_state(path, model, ema, opt, gen, step + 1)


# ------------------------------------------------------------------------------------------------------------
# Probe: does the DiT take each attribute from the caption? (a two-minute signal, no sampling, no detector)
# ------------------------------------------------------------------------------------------------------------
PROBE_CAPTIONS = (  # one base caption per colour, shape, direction and background
    Caption("red", "circle", "right", "blue"),
    Caption("white", "square", "up", "black"),
    Caption("yellow", "triangle", "left", "gray"),
    Caption("green", "circle", "down", "blue"),
)
PROBE_OPTIONS = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS, "background": BACKGROUNDS}


def swap_word(cap: Caption, attribute: str) -> Caption:
    """`cap` with `attribute` changed to the next option of the grammar that gives a valid caption."""
    options = list(PROBE_OPTIONS[attribute])
    start = options.index(getattr(cap, attribute))
    for k in range(1, len(options)):
        other = dataclasses.replace(cap, **{attribute: options[(start + k) % len(options)]})
        if other.colour != other.background:
            return other
    raise ValueError(f"no other valid {attribute} for {cap}")


@torch.no_grad()
def steering(dit, z_a, z_b, ctx_a, ctx_b, ctx_null, noise, sigma: float, guide: float) -> torch.Tensor:
    """Cosine between the change of the DiT's x0 prediction when the caption goes from a to b and the true
    change z_b − z_a, both from the same noisy latent of a (x_t = (1 − σ) z_a + σ noise): one per video [B].

    1 when the DiT moves x0 exactly along the data's change for that word, ~0 when it ignores the word (the
    shape word of the base run's small-shape checkpoint: 0.11 at σ 0.5, against 0.75 for colour and 0.89 for
    background). The x0 are CFG predictions (v = u + g (c − u), x0 = x_t − σ v, as the sampler uses them).
    Read it for words that keep the object where it is (colour, shape, background): for the same seed a
    new direction moves the whole path, which x_t already fixes, so a DiT that follows directions (94% by
    the detector) still scores ~0.17 there.
    """
    x_t = (1 - sigma) * z_a + sigma * noise  # [B, 16, F, H, W]
    t = torch.full((len(z_a),), sigma * 1000.0)
    uncond = dit(x_t, t, ctx_null)
    x0 = [x_t - sigma * (uncond + guide * (dit(x_t, t, c) - uncond)) for c in (ctx_a, ctx_b)]
    pred, true = (x0[1] - x0[0]).flatten(1), (z_b - z_a).flatten(1)
    return torch.nn.functional.cosine_similarity(pred, true, dim=1, eps=1e-12)


def probe(args) -> dict:
    """Mean `steering` per attribute and σ of the EMA DiT in --work_dir, on PROBE_CAPTIONS × 3 seeds."""
    for name, stage in (("latents.pt", "latents"), ("vae_state.pt", "vae"), ("dit_state.pt", "dit")):
        if not os.path.exists(os.path.join(args.work_dir, name)):
            raise FileNotFoundError(f"--stage probe needs {args.work_dir}/{name}: run --stage {stage} first")
    data = torch.load(os.path.join(args.work_dir, "latents.pt"), weights_only=False)
    check_geometry(data, os.path.join(args.work_dir, "latents.pt"), args.shapes)
    state = torch.load(os.path.join(args.work_dir, "dit_state.pt"), weights_only=False)
    dit = WanModel(WAN_CONFIGS["tiny"]).eval().requires_grad_(False)
    dit.load_state_dict(state["ema"])
    vae, _ = load_vae(args)
    mean, std = (torch.tensor(data["stats"][k]).view(1, -1, 1, 1, 1) for k in ("mean", "std"))
    row = {str(c): i for i, c in enumerate(all_captions())}
    seeds = [11, 22, 33]  # render seeds outside the training set's (which start at 1,000,000)
    result = {"step": state["step"]}
    for attribute in PROBE_OPTIONS:
        pairs = [(c, swap_word(c, attribute), s) for c in PROBE_CAPTIONS for s in seeds]
        z_a, z_b = (
            (encode_videos(vae, [p[k] for p in pairs], [p[2] for p in pairs], args.shapes) - mean) / std
            for k in (0, 1)
        )
        ctx_a, ctx_b = (data["context"][[row[str(p[k])] for p in pairs]] for k in (0, 1))
        null = data["context"][[-1] * len(pairs)]
        noise = torch.randn(z_a.shape, generator=torch.Generator().manual_seed(args.seed))
        for sigma in (0.3, 0.5, 0.7, 0.9):
            cos = steering(dit, z_a, z_b, ctx_a, ctx_b, null, noise, sigma, args.probe_guide)
            result[f"{attribute}@{sigma}"] = round(cos.mean().item(), 3)
    log(args.work_dir, "probe", result)
    print(f"step {result['step']}: steering cosine (x0 change vs true change, CFG {args.probe_guide})")
    for attribute in PROBE_OPTIONS:
        print(
            f"  {attribute:10s}"
            + "".join(f"  σ {s}: {result[f'{attribute}@{s}']:6.3f}" for s in (0.3, 0.5, 0.7, 0.9))
        )
    return result


# ------------------------------------------------------------------------------------------------------------
# Stage 4: the VAE's decoder, fine-tuned on the DiT's shapes
# ------------------------------------------------------------------------------------------------------------
def train_decoder(args) -> None:
    """Fine-tune the decoder (post_quant_conv + decoder) on whole clips of --shapes, the encoder frozen.

    The VAE stage trains on 32-48 px crops of small shapes with an MSE: it rounds the corners of the large
    squares (their fill of the bounding box drops from 1 to 0.91-0.97), and the DiT's squares lose the rest of
    the way to a circle. The encoder (and quant_conv) stay as they are, so latents.pt, its statistics and the
    DiT trained on them stay valid; only the map from latents back to pixels sharpens. An L1 loss, since an
    MSE is content to blur the few pixels of a corner. Written to `decoder_state.pt`, which load_vae (and so
    export, probe and --init_from) puts over vae_state.pt's decoder.
    """
    path = os.path.join(args.work_dir, "decoder_state.pt")
    spec = dataclasses.asdict(GEOMETRIES[args.shapes])
    vae, _ = load_vae(args)  # with the decoder of decoder_state.pt when resuming
    trained = {**dict(vae.post_quant_conv.named_parameters(prefix="post_quant_conv")),
               **dict(vae.decoder.named_parameters(prefix="decoder"))}  # fmt: skip
    for p in trained.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained.values(), lr=args.dec_lr, weight_decay=0.0)
    rng, step = np.random.default_rng([args.seed, 4]), 0  # a stream of its own, apart from the VAE's
    if os.path.exists(path):
        state = torch.load(path, weights_only=False)
        if not same_geometry(state["geometry_spec"], spec):
            raise ValueError(
                f"{path} fine-tunes the decoder on {state['geometry_spec']}, not the --shapes {args.shapes} "
                f"asked for ({spec}): use another --work_dir (link its vae_state.pt) or its --shapes"
            )
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]  # the only randomness here: which videos
        step = state["step"]
    captions = all_captions()
    bar = tqdm(range(step, args.dec_steps), initial=step, total=args.dec_steps, desc="decoder")
    for step in bar:
        lr = warm_cosine(step, args.dec_steps, args.dec_lr, warmup=50)
        for g in opt.param_groups:
            g["lr"] = lr
        x = video_batch(rng, captions, args.dec_batch, FRAMES, args.shapes)  # [B, 3, 17, 64, 64]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()  # [B, 16, 5, 16, 16], the latents the DiT learned
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
        opt.step()
        psnr = 10 * math.log10(4.0 / max(torch.nn.functional.mse_loss(recon.detach(), x).item(), 1e-10))
        bar.set_postfix(l1=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        log(args.work_dir, "decoder", {"step": step, "l1": loss.item(), "psnr": psnr, "lr": lr})
        if (step + 1) % args.save_every == 0 or step + 1 == args.dec_steps:
            save_state(
                path,
                model={k: v.detach().clone() for k, v in trained.items()},
                opt=opt.state_dict(),
                rng=rng.bit_generator.state,
                step=step + 1,
                geometry_spec=spec,
            )


# ------------------------------------------------------------------------------------------------------------
# Stage 5: export in the official layout
# ------------------------------------------------------------------------------------------------------------
def export(args) -> None:
    from safetensors.torch import save_file

    out = args.out_dir
    # Check before writing anything: a refused export must leave the checkpoint in --out_dir as it was.
    stats = torch.load(os.path.join(args.work_dir, "latents.pt"), weights_only=False)["stats"]
    vae, vae_cfg = load_vae(args, stats)
    if vae_cfg != WAN_VAE_TINY:  # the sample script builds the VAE from this constant, as for the real one
        raise ValueError(
            "set models.wan_vae.WAN_VAE_TINY's statistics to the measured ones, then export again (they now "
            "hold the last fine-tune's, --shapes large: the earlier runs of the shipped recipe stop "
            "before export):\n"
            f"    latents_mean={vae_cfg.latents_mean},\n    latents_std={vae_cfg.latents_std},"
        )
    os.makedirs(os.path.join(out, "google", "umt5-xxl"), exist_ok=True)
    dit = torch.load(os.path.join(args.work_dir, "dit_state.pt"), weights_only=False)["ema"]
    save_file({k: v.contiguous() for k, v in dit.items()}, os.path.join(out, DIT_FILE))
    cfg = dataclasses.asdict(WAN_CONFIGS["tiny"])
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"_class_name": "WanModel", **cfg}, f, indent=2)
    torch.save(convert_diffusers_wan_vae_to_official(vae.state_dict()), os.path.join(out, WAN_VAE_FILE))
    tokenizer, t5 = build_text_encoder(args.seed)
    tokenizer.save_pretrained(os.path.join(out, "google", "umt5-xxl"))
    t5_state = convert_umt5_to_official(t5.state_dict(), UMT5_TINY)
    torch.save(
        t5_state, os.path.join(out, "models_t5_umt5-xxl-enc-bf16.pth")
    )  # the official name (fp32 inside)


STAGES = {
    "vae": train_vae,
    "latents": make_latents,
    "dit": train_dit,
    "decoder": train_decoder,
    "export": export,
    "probe": probe,
}
ALL_STAGES = [name for name in STAGES if name != "probe"]  # `--stage all`: the pipeline, without the probe


def parse_stages(text: str) -> list[str]:
    """`--stage`: "all" (vae, latents, dit, decoder, export), one stage or a comma list, run in the order of
    STAGES."""
    names = ALL_STAGES if text == "all" else text.split(",")
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; choose from all, {', '.join(STAGES)}")
    return [n for n in STAGES if n in names]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--stage",
        type=parse_stages,
        default="all",
        help=f"one of {', '.join(STAGES)}, a comma list of them (run in that order), or all "
        f"({','.join(ALL_STAGES)})",
    )
    p.add_argument("--work_dir", default="outputs/wan-tiny-train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_every", type=int, default=100)
    p.add_argument("--vae_steps", type=int, default=4000)
    p.add_argument("--vae_stop", type=int, default=2700, help="stop the VAE here (shipped: 2700)")
    p.add_argument("--vae_batch", type=int, default=8)
    p.add_argument("--vae_lr", type=float, default=3e-4)
    p.add_argument(
        "--vae_crop", type=int, default=32, help="crop size for the first 90%% of the VAE steps (then 48)"
    )
    p.add_argument("--vae_kl", type=float, default=1e-4, help="weight of the latent L2 (KL mean) term")
    p.add_argument("--dec_steps", type=int, default=1200, help="decoder fine-tune steps (stage decoder)")
    p.add_argument("--dec_batch", type=int, default=4)
    p.add_argument("--dec_lr", type=float, default=2e-4)
    p.add_argument(
        "--shapes",
        choices=sorted(GEOMETRIES),
        default="small",
        help="geometry of the DiT's videos (models.toy_videos.GEOMETRIES; shipped: the base run small, then "
        "large-v1, then large-v2, then large, then large-inset) and of the decoder fine-tune (shipped: "
        "large); the vae stage always trains on small ones",
    )
    p.add_argument("--videos_per_caption", type=int, default=32)
    p.add_argument("--dit_steps", type=int, default=4500)
    p.add_argument("--dit_cycles", type=int, default=2, help="cosine cycles of --dit_steps each (restarts)")
    p.add_argument("--dit_lr_decay", type=float, default=0.5, help="peak lr of each cycle vs the last one")
    p.add_argument("--dit_batch", type=int, default=32)
    p.add_argument("--dit_lr", type=float, default=5e-4)
    p.add_argument(
        "--dit_shift",
        type=parse_shifts,
        default=[3.0],
        help="flow shift of the training σ (sampler: 3); a comma list gives one per cycle, the last repeats",
    )
    p.add_argument(
        "--dit_fg_weight", type=float, default=0.0, help="extra loss weight on the shape's latent pixels"
    )
    p.add_argument("--cfg_dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument(
        "--init_from",
        default=None,
        help="the work dir of an earlier run, or an exported checkpoint (checkpoints/wan-tiny), to fine-tune:"
        " its VAE counts as trained, its (EMA) DiT starts a new --dit_steps schedule",
    )
    p.add_argument("--out_dir", default="checkpoints/wan-tiny")
    p.add_argument("--probe_guide", type=float, default=5.0, help="CFG scale of --stage probe (sampler: 5)")
    args = p.parse_args()
    if not 0 < args.vae_stop <= args.vae_steps:
        p.error(f"--vae_stop must be in 1..--vae_steps ({args.vae_steps}), got {args.vae_stop}")
    if args.dit_cycles < 1 or args.dit_steps < 1:
        p.error(f"--dit_cycles and --dit_steps must be >= 1, got {args.dit_cycles} and {args.dit_steps}")
    if not 0 <= args.dit_fg_weight < math.inf:
        p.error(f"--dit_fg_weight must be finite and >= 0, got {args.dit_fg_weight}")
    if len(args.dit_shift) > args.dit_cycles:
        p.error(f"--dit_shift lists {len(args.dit_shift)} shifts for {args.dit_cycles} --dit_cycles")
    os.makedirs(args.work_dir, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    if args.init_from:
        init_from(args)
    for stage in args.stage:  # in the order of STAGES
        STAGES[stage](args)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
