"""An official-layout Wan2.1 checkpoint as a diffusers `WanPipeline` (DiT, VAE, umT5, tokenizer, scheduler).

    python -m models.wan_diffusers --task tiny --out outputs/wan-tiny-diffusers

writes a folder that `WanPipeline.from_pretrained` reads. Every weight goes through the project's own
converters, so the folder holds the same tensors the sample script runs: the DiT by
`models.wan.convert_official_to_diffusers`, the VAE by `models.wan_vae.convert_official_wan_vae` (the class
`WanVAE` already runs), the umT5 encoder by `models.wan_t5.convert_official_umt5`.

Scheduler. diffusers' Wan repos ship `UniPCMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=...)`, whose `set_timesteps(N)` starts at σ = 1; the official
FlowUniPCMultistepScheduler (and `models.solvers.FlowUniPC`) starts at σ_max = 0.999 of its training table.
The σ's differ by up to 0.003 and some int timesteps by one. `WanOfficialUniPCScheduler` is that scheduler
with the official σ's, for reproducing `sample_wan.py` through the pipeline; the folder written to disk keeps
the stock class, which any diffusers installation loads.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from transformers import AutoTokenizer

from models.loading import load_strict
from models.wan import WanConfig, convert_official_to_diffusers, load_wan
from models.wan_t5 import UMT5_XXL, WanT5Config, load_umt5_encoder
from models.wan_vae import WAN_VAE_CONFIG, WAN_VAE_FILE, WanVAE, WanVAEConfig

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"


class WanOfficialUniPCScheduler(UniPCMultistepScheduler):
    """diffusers' UniPC with the official Wan2.1 σ's: linspace(σ_max = 0.999, 0, N + 1)[:-1], then shifted."""

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **kwargs):
        if kwargs.get("sigmas") is not None or num_inference_steps is None:
            return super().set_timesteps(num_inference_steps, device=device, **kwargs)
        # The official reads σ_max back from its float32 training table (0.999 -> 0.99900001287...); diffusers
        # applies flow_shift to the σ's it is given (tests/test_solvers.py checks this gives FlowUniPC's).
        sigma_max = float(np.float32(0.999))
        sigmas = np.linspace(sigma_max, 0, num_inference_steps + 1)[:-1]
        return super().set_timesteps(device=device, sigmas=sigmas, **kwargs)


def wan_scheduler(shift: float, *, official: bool = True) -> UniPCMultistepScheduler:
    """The UniPC scheduler of diffusers' Wan repos (flow prediction, flow σ's shifted by `shift`)."""
    cls = WanOfficialUniPCScheduler if official else UniPCMultistepScheduler
    return cls(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000
    )


def load_wan_transformer(ckpt_dir: str, config: WanConfig | None = None) -> WanTransformer3DModel:
    """The official DiT of `ckpt_dir` (config.json + safetensors) as a diffusers `WanTransformer3DModel`."""
    model = load_wan(ckpt_dir, config=config)  # strict, official names
    config = model.config
    state = convert_official_to_diffusers(model.state_dict(), config)
    with torch.device("meta"):  # no random init of weights that are overwritten at once
        transformer = WanTransformer3DModel(**config.diffusers_kwargs())
    # The RoPE tables are computed buffers, not weights: build them for real.
    c = transformer.config
    transformer.rope = WanRotaryPosEmbed(c.attention_head_dim, c.patch_size, c.rope_max_seq_len)
    return load_strict(transformer, state, source=ckpt_dir).eval()


def wan_pipeline_from_official(
    ckpt_dir: str,
    *,
    dit: WanConfig | None = None,
    t5: WanT5Config = UMT5_XXL,
    vae: WanVAEConfig = WAN_VAE_CONFIG,
    shift: float = 5.0,
    official_schedule: bool = True,
    dtype: torch.dtype = torch.float32,
) -> WanPipeline:
    """Build a `WanPipeline` from an official-layout Wan2.1 T2V folder.

    Args:
        ckpt_dir: config.json, diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth,
            models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (the official layout).
        dit, t5, vae: the architectures (dit None: read config.json); the demo model: None, UMT5_TINY,
            WAN_VAE_TINY.
        shift: the sampling shift (flow_shift).
        official_schedule: the official σ's (WanOfficialUniPCScheduler) instead of diffusers' stock ones.
        dtype: the DiT's and the umT5's dtype (the VAE stays fp32, as the official code runs it).
    """
    transformer = load_wan_transformer(ckpt_dir, dit)
    if transformer.config.in_channels != transformer.config.out_channels:
        raise ValueError(f"{ckpt_dir} holds an image-to-video DiT; this builds the text-to-video WanPipeline")
    text_encoder = load_umt5_encoder(os.path.join(ckpt_dir, T5_FILE), t5, dtype=dtype)
    vae_model = WanVAE.from_checkpoint(os.path.join(ckpt_dir, WAN_VAE_FILE), config=vae).model
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ckpt_dir, TOKENIZER_DIR))
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae_model,
        transformer=_cast(transformer, dtype),
        scheduler=wan_scheduler(shift, official=official_schedule),
    )


def _cast(transformer: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Cast to dtype except the modules diffusers keeps in fp32 (its `_keep_in_fp32_modules`: the time
    embedding, modulation tables and norms, the official fp32 islands)."""
    keep = set(transformer._keep_in_fp32_modules or [])
    for name, param in transformer.named_parameters():
        if not keep.intersection(name.split(".")):
            param.data = param.data.to(dtype)
    return transformer


def main(argv: list[str] | None = None) -> None:
    from sample_wan import TASKS  # the task presets (architectures, shift) of the sample script

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["t2v-1.3B", "t2v-14B", "tiny"], default="tiny")
    p.add_argument("--ckpt_dir", help="official-layout folder (default: the task's folder in checkpoints/)")
    p.add_argument("--out", required=True, help="folder to write the diffusers pipeline to")
    args = p.parse_args(argv)
    task = TASKS[args.task]
    ckpt_dir = args.ckpt_dir or task.ckpt_dir
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"error: --out {args.out} exists and is not empty; choose a new folder")
    try:
        pipe = wan_pipeline_from_official(
            ckpt_dir, dit=task.dit, t5=task.t5, vae=task.vae, shift=task.sample_shift, official_schedule=False
        )
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    pipe.save_pretrained(args.out)
    print(f"wrote {args.out} (WanPipeline; the stock UniPC scheduler, flow_shift {task.sample_shift})")


if __name__ == "__main__":
    main()
