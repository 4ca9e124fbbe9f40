"""Fine-tune the demo model for image-to-video (`sample_wan.py --task i2v-tiny`) from the shipped T2V model.

Stages (each resumable; run them in order, or `--stage all`):
  data     render a fixed set of videos (the T2V model's last data set, models.toy_videos "large-inset"),
           and encode each: the video latent (the target), its I2V condition `y` (first-frame mask + the VAE
           latent of [first frame, 16 zero frames]) and the CLIP tokens of the first frame, with the shipped
           VAE and a tiny random CLIP tower (models.wan_clip.CLIP_TINY, seed --seed) in the official layout
  dit      the I2V DiT (models.wan.WAN_CONFIGS["i2v-tiny"]: in_dim 36, the CLIP branch) initialised as the
           T2V DiT: its weights, the 20 new input channels of patch_embedding zero and v_img zero, so that at
           step 0 it is exactly the T2V model; then rectified flow as train_wan_tiny.py (v = noise - x0, the
           same σ distribution), text dropout for CFG (the image is kept: both official CFG branches see it)
  export   write checkpoints/wan-i2v-tiny/ in the official I2V layout (DiT, CLIP, and the T2V demo's VAE,
           umT5 and tokenizer copied byte for byte)

    python train_wan_tiny_i2v.py --stage all --work_dir outputs/wan-i2v-tiny

Single-threaded by default (--threads 1: the machine is shared); every stage resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from models.solvers import shift_sigmas
from models.toy_videos import FRAMES, SIZE, all_captions, render
from models.wan import WAN_CONFIGS, WEIGHTS, WanModel
from models.wan_clip import CLIP_FILE, CLIP_TINY, WanClipEncoder, convert_clip_visual_to_official
from models.wan_i2v import encode_condition, resize_image
from models.wan_t5 import UMT5_TINY, WanTextEncoder, pad_context
from models.wan_vae import WAN_VAE_FILE, WAN_VAE_TINY, WanVAE
from train_wan_tiny import dit_update, load_dit_state, log, save_dit_state, save_state, warm_cosine

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
DIT_FILE = f"{WEIGHTS}.safetensors"
GEOMETRY = "large-inset"  # the shipped T2V DiT's last fine-tuning data


def make_clip(args) -> str:
    """The tiny random CLIP tower in the official file layout (visual keys only), made once per work dir."""
    path = os.path.join(args.work_dir, CLIP_FILE)
    if not os.path.exists(path):
        from transformers import CLIPVisionModel

        torch.manual_seed(args.seed)
        model = CLIPVisionModel(CLIP_TINY.to_transformers())
        state = convert_clip_visual_to_official(model.state_dict(), CLIP_TINY)
        torch.save({k: v.contiguous() for k, v in state.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


@torch.no_grad()
def make_data(args) -> None:
    path = os.path.join(args.work_dir, "i2v_data.pt")
    if os.path.exists(path):
        return
    vae = WanVAE.from_checkpoint(os.path.join(args.t2v_dir, WAN_VAE_FILE), config=WAN_VAE_TINY)
    clip = WanClipEncoder.from_checkpoint(make_clip(args), config=CLIP_TINY)
    text = WanTextEncoder.from_checkpoint(args.t2v_dir, config=UMT5_TINY, dtype=torch.float32, text_len=16)
    caps = all_captions()
    # The contexts as the sample script makes them; the last row is the empty negative prompt (CFG's null).
    context = torch.cat([pad_context([c], 16) for c in text([*(str(c) for c in caps), ""])])  # [C+1, 16, 64]
    index = [(c, k) for c in range(len(caps)) for k in range(args.videos_per_caption)]
    seeds = [1_000_000 + 1000 * c + k for c, k in index]  # the T2V training seeds; tests render below 1e6
    z, ys, clips = [], [], []
    for i in tqdm(range(0, len(index), args.batch), desc="data"):
        batch = zip(index[i : i + args.batch], seeds[i:])
        videos = [render(caps[c], s, geometry=GEOMETRY) for (c, _), s in batch]
        video = torch.from_numpy(np.stack(videos)).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3)
        z.append(vae.encode(video).half())  # [b, 16, 5, 16, 16] the targets
        # encode_condition (what sample_wan.py runs) batched: the frame is already SIZE x SIZE, so the
        # official resize keeps the grid; the first video is checked against the unbatched call below.
        first = torch.stack([resize_image(f, SIZE, SIZE) for f in video[:, :, 0]])  # [b, 3, 64, 64]
        cond = torch.cat([first[:, :, None], first.new_zeros(len(first), 3, FRAMES - 1, SIZE, SIZE)], 2)
        ys.append(vae.encode(cond, check_range=False).half())  # [b, 16, 5, 16, 16]
        clips.append(clip(video[:, :, 0]).half())  # [b, 257, 64]
    ref = encode_condition(video[0, :, 0], FRAMES, SIZE * SIZE, vae, clip)
    err = max(
        (ref.y[0, 4:] - ys[-1][0].float()).abs().max(), (ref.clip_fea[0] - clips[-1][0].float()).abs().max()
    )
    if err > 1e-2:  # fp16 storage and batched kernels: a few 1e-3 at most
        raise RuntimeError(f"the batched condition differs from encode_condition by {err}")
    z, ys, clips = torch.cat(z), torch.cat(ys), torch.cat(clips)
    save_state(
        path,
        latents=z,
        y_latents=ys,
        clip_fea=clips,
        mask=ref.y[0, :4].clone(),  # [4, 5, 16, 16], the same for every video
        caption=torch.tensor([c for c, _ in index]),
        context=context,
        geometry=GEOMETRY,
    )


def init_i2v_from_t2v(t2v: dict, seed: int) -> dict:
    """The I2V DiT's state dict that computes exactly the T2V DiT `t2v`: the new input channels of
    patch_embedding (the 20 of y) and v_img zero, so the CLIP attention adds zero; the rest of the new
    parameters (img_emb, k_img, norm_k_img) initialised as the official init_weights would."""
    torch.manual_seed(seed)
    model = WanModel(WAN_CONFIGS["i2v-tiny"])
    state = model.state_dict()
    for k, v in t2v.items():
        if k == "patch_embedding.weight":  # [D, 16, 1, 2, 2] -> [D, 36, 1, 2, 2]
            new = v.new_zeros(v.shape[0], state[k].shape[1] - v.shape[1], *v.shape[2:])
            state[k] = torch.cat([v, new], dim=1)
        else:
            state[k] = v
    for k in state:
        if k in t2v:
            continue
        if ".v_img." in k:
            state[k] = torch.zeros_like(state[k])
        elif k.endswith(".bias") and ("k_img" in k or "img_emb.proj.1" in k or "img_emb.proj.3" in k):
            state[k] = torch.zeros_like(state[k])
        elif k.endswith(".weight") and state[k].ndim == 2:
            state[k] = torch.nn.init.xavier_uniform_(torch.empty_like(state[k]))
    return state


def train_dit(args) -> None:
    from safetensors.torch import load_file

    data = torch.load(os.path.join(args.work_dir, "i2v_data.pt"), weights_only=False)
    names = ("latents", "y_latents", "clip_fea", "caption", "context")
    z, yl, clip, caption, context = (data[k] for k in names)
    mask = data["mask"][None]  # [1, 4, 5, 16, 16]
    null = len(context) - 1
    path = os.path.join(args.work_dir, "dit_state.pt")
    model = WanModel(WAN_CONFIGS["i2v-tiny"])
    ema = WanModel(WAN_CONFIGS["i2v-tiny"]).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen, step = torch.Generator().manual_seed(args.seed + 4), 0
    if os.path.exists(path):
        step = load_dit_state(path, model, ema, opt, gen)
    else:
        init = init_i2v_from_t2v(load_file(os.path.join(args.t2v_dir, DIT_FILE)), args.seed)
        model.load_state_dict(init)
        ema.load_state_dict(init)
    bar = tqdm(range(step, args.dit_steps), initial=step, total=args.dit_steps, desc="dit")
    for step in bar:
        lr = warm_cosine(step, args.dit_steps, args.dit_lr, warmup=args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(z), (args.dit_batch,), generator=gen)
        x0 = z[idx].float()  # [B, 16, 5, 16, 16]
        y = torch.cat([mask.expand(len(idx), -1, -1, -1, -1), yl[idx].float()], dim=1)  # [B, 20, 5, 16, 16]
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.rand(len(idx), generator=gen, dtype=torch.float64)
        sigma = shift_sigmas(u, args.dit_shift).float()  # as train_wan_tiny.py: where the sampler goes
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        drop = torch.rand(len(idx), generator=gen) < args.cfg_dropout  # the text only, as the null branch
        ctx = context[torch.where(drop, null, caption[idx])]  # [B, 16, 64]
        pred = model(x_t, sigma * 1000, ctx, clip_fea=clip[idx].float(), y=y)
        err = (pred - (noise - x0)) ** 2  # [B, 16, 5, 16, 16]
        # --first_weight > 1 weighs latent frame 0 (the given image) more, for the first-frame PSNR
        weight = torch.ones(1, 1, err.shape[2], 1, 1)
        weight[:, :, 0] = args.first_weight
        loss = (err * weight).mean() / weight.mean()
        dit_update(model, ema, opt, loss, step, args.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log(args.work_dir, "dit", {"step": step, "loss": loss.item(), "lr": lr, "t": time.time()})
        if (step + 1) % args.save_every == 0 or step + 1 == args.dit_steps:
            save_dit_state(path, model, ema, opt, gen, step + 1)


def export(args) -> None:
    from safetensors.torch import save_file

    out = args.out_dir
    state = torch.load(os.path.join(args.work_dir, "dit_state.pt"), weights_only=False)
    os.makedirs(os.path.join(out, "google", "umt5-xxl"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state["ema"].items()}, os.path.join(out, DIT_FILE))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"_class_name": "WanModel", **dataclasses.asdict(WAN_CONFIGS["i2v-tiny"])}, f, indent=2)
    shutil.copyfile(make_clip(args), os.path.join(out, CLIP_FILE))
    tokenizer = ("google/umt5-xxl/tokenizer.json", "google/umt5-xxl/tokenizer_config.json")
    for name in (WAN_VAE_FILE, T5_FILE, *tokenizer):
        shutil.copyfile(os.path.join(args.t2v_dir, name), os.path.join(out, name))
    print(f"exported step {state['step']} to {out}")


STAGES = {"data": make_data, "dit": train_dit, "export": export}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", help=f"all or a comma list of {', '.join(STAGES)}")
    p.add_argument("--work_dir", default="outputs/wan-i2v-tiny")
    p.add_argument("--t2v_dir", default="checkpoints/wan-tiny", help="the T2V demo checkpoint to start from")
    p.add_argument("--out_dir", default="checkpoints/wan-i2v-tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save_every", type=int, default=50)
    p.add_argument("--videos_per_caption", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="videos per VAE call of the data stage")
    p.add_argument("--dit_steps", type=int, default=300)
    p.add_argument("--dit_batch", type=int, default=8)
    p.add_argument("--dit_lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=30, help="linear lr warm-up steps")
    p.add_argument("--dit_shift", type=float, default=3.0, help="flow shift of the training σ (sampler: 3)")
    p.add_argument("--first_weight", type=float, default=1.0, help="loss weight of latent frame 0")
    p.add_argument("--cfg_dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.995)
    args = p.parse_args()
    stages = list(STAGES) if args.stage == "all" else args.stage.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from all, {', '.join(STAGES)}")
    os.makedirs(args.work_dir, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    for name in STAGES:
        if name in stages:
            STAGES[name](args)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
