"""Wan2.1 I2V image encoder: open-clip XLM-RoBERTa ViT-H/14's visual tower, as transformers' CLIPVisionModel.

The official `wan/modules/clip.py` runs `CLIPModel.visual`: the image in [-1, 1] resized to 224x224 (torch
bicubic, no crop), mapped to [0, 1], normalised with the OpenAI CLIP mean/std, then the ViT's patch and
position embeddings, `pre_norm` and the first 31 of its 32 blocks (`use_31_block=True`): [B, 257, 1280], the
penultimate block's tokens, no final norm. That is exactly transformers' `CLIPVisionModel` with 31 layers
(its `last_hidden_state` has no post-norm), which diffusers' `WanImageToVideoPipeline` reads as
`hidden_states[-2]` of the 32-layer model. The official checkpoint
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` holds the whole CLIP (`visual.*`, `textual.*`,
`log_scale`); only the `visual.*` keys of the 31 blocks used are read.

Shape letters: B batch, P 257 tokens (1 class + 16x16 patches), D width (1280).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.loading import load_file_state_dict, load_strict

CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
# OpenAI CLIP normalisation (the official `_clip` transforms for every non-SigLIP model)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipVisionConfig:
    """The official `clip_xlm_roberta_vit_h_14` arguments of the visual tower (field names as upstream)."""

    image_size: int = 224
    patch_size: int = 14
    vision_dim: int = 1280
    vision_mlp_ratio: int = 4
    vision_heads: int = 16
    vision_layers: int = 32
    activation: str = "gelu"  # exact GELU (not open-clip's quick_gelu default)
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.vision_dim % self.vision_heads:
            raise ValueError(f"vision_dim {self.vision_dim} must be divisible by vision_heads")
        if self.vision_layers < 2:
            raise ValueError("vision_layers must be >= 2 (the features are the penultimate block's)")
        if self.activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"activation must be gelu or quick_gelu, got {self.activation!r}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_transformers(self, num_layers: int | None = None):
        """transformers' `CLIPVisionConfig` of the same tower (`num_layers` blocks; default all)."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.vision_dim,
            intermediate_size=self.vision_dim * self.vision_mlp_ratio,
            num_hidden_layers=num_layers or self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=self.activation,
            layer_norm_eps=self.norm_eps,
        )


CLIP_VIT_H_14 = ClipVisionConfig()
# The I2V demo model's image tower (checkpoints/wan-i2v-tiny): the same 224-px, 14-px-patch layout (257
# tokens) at 64 wide and 2 blocks, random weights (seed 0). The DiT reads the first frame's content from y;
# the CLIP tokens only have to be a fixed function of the image.
CLIP_TINY = ClipVisionConfig(vision_dim=64, vision_heads=2, vision_layers=2)


#####  official <-> transformers key names  #####

_TOP = {  # official visual.* -> CLIPVisionModel (vision_model.*)
    "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "visual.cls_embedding": "embeddings.class_embedding",
    "visual.pos_embedding": "embeddings.position_embedding.weight",
    "visual.pre_norm.weight": "pre_layrnorm.weight",
    "visual.pre_norm.bias": "pre_layrnorm.bias",
    "visual.post_norm.weight": "post_layernorm.weight",
    "visual.post_norm.bias": "post_layernorm.bias",
}
_BLOCK = {  # visual.transformer.{i}.<official> -> vision_model.encoder.layers.{i}.<transformers>
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
_UNUSED = ("visual.head",)  # the contrastive projection: not on the path to the penultimate block


def official_visual_shapes(config: ClipVisionConfig = CLIP_VIT_H_14) -> dict[str, tuple[int, ...]]:
    """Every `visual.*` key of the official checkpoint and its shape."""
    d, p, m = config.vision_dim, config.patch_size, config.vision_dim * config.vision_mlp_ratio
    shapes = {
        "visual.patch_embedding.weight": (d, 3, p, p),  # no bias: pre_norm=True upstream
        "visual.cls_embedding": (1, 1, d),
        "visual.pos_embedding": (1, config.num_tokens, d),
        "visual.pre_norm.weight": (d,),
        "visual.pre_norm.bias": (d,),
        "visual.post_norm.weight": (d,),
        "visual.post_norm.bias": (d,),
        "visual.head": (d, 1024 if config == CLIP_VIT_H_14 else d),
    }
    for i in range(config.vision_layers):
        b = f"visual.transformer.{i}"
        for n in ("norm1", "norm2"):
            shapes |= {f"{b}.{n}.weight": (d,), f"{b}.{n}.bias": (d,)}
        shapes |= {f"{b}.attn.to_qkv.weight": (3 * d, d), f"{b}.attn.to_qkv.bias": (3 * d,)}
        shapes |= {f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,)}
        shapes |= {f"{b}.mlp.0.weight": (m, d), f"{b}.mlp.0.bias": (m,)}
        shapes |= {f"{b}.mlp.2.weight": (d, m), f"{b}.mlp.2.bias": (d,)}
    return shapes


def convert_official_clip_visual(
    state_dict: dict[str, Tensor], config: ClipVisionConfig = CLIP_VIT_H_14, *, num_layers: int | None = None
) -> dict[str, Tensor]:
    """Official CLIP state dict (whole model) -> CLIPVisionModel state dict of its first `num_layers` blocks
    (default all). Non-visual keys (textual.*, log_scale) are skipped; a missing, unknown or mis-shaped
    visual key is an error that lists them. to_qkv is split into q/k/v (rows q, then k, then v, as the
    official `view(b, s, 3, n, d)`)."""
    num_layers = num_layers or config.vision_layers
    expected = official_visual_shapes(config)
    visual = {k: v for k, v in state_dict.items() if k.startswith("visual.")}
    missing = sorted(set(expected) - set(visual))
    unknown = sorted(set(visual) - set(expected))
    wrong = sorted(k for k in set(expected) & set(visual) if tuple(visual[k].shape) != expected[k])
    if missing or unknown or wrong:
        shapes = [(k, tuple(visual[k].shape), expected[k]) for k in wrong[:8]]
        raise ValueError(
            "not the official open-clip ViT-H/14 visual tower"
            + (f"; missing: {missing[:8]}" if missing else "")
            + (f"; unknown: {unknown[:8]}" if unknown else "")
            + (f"; wrong shapes: {shapes}" if wrong else "")
        )
    out = {}
    for key, value in visual.items():
        if key in _UNUSED:
            continue
        if key in _TOP:
            new = _TOP[key]
            out[new] = value.reshape(-1) if key == "visual.cls_embedding" else value
            if key == "visual.pos_embedding":
                out[new] = value[0]  # [P, D]
            continue
        i, rest = re.match(r"visual\.transformer\.(\d+)\.(.+)$", key).groups()
        if int(i) >= num_layers:
            continue
        prefix = f"encoder.layers.{i}"
        if rest.startswith("attn.to_qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}.self_attn.{name}.{kind}"] = part
            continue
        module, kind = rest.rsplit(".", 1)
        out[f"{prefix}.{_BLOCK[module]}.{kind}"] = value
    return out


def convert_clip_visual_to_official(
    state_dict: dict[str, Tensor], config: ClipVisionConfig
) -> dict[str, Tensor]:
    """A full CLIPVisionModel state dict -> the official `visual.*` keys (the demo's export and the tests'
    tiny checkpoints). `visual.head` is not in CLIPVisionModel: it is written as zeros (never read)."""
    inverse = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out, qkv = {}, {}
    for key, value in state_dict.items():
        if key == "embeddings.position_ids":
            continue
        if key in inverse:
            new = inverse[key]
            out[new] = value.reshape(1, 1, -1) if new == "visual.cls_embedding" else value
            if new == "visual.pos_embedding":
                out[new] = value[None]
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:
            raise ValueError(f"not a CLIPVisionModel key: {key}")
        i, module, kind = m.groups()
        if module.startswith("self_attn.") and module != "self_attn.out_proj":
            qkv[(i, module.split(".")[1], kind)] = value
            continue
        out[f"visual.transformer.{i}.{block[module]}.{kind}"] = value
    for i in {k[0] for k in qkv}:
        for kind in ("weight", "bias"):
            out[f"visual.transformer.{i}.attn.to_qkv.{kind}"] = torch.cat(
                [qkv[(i, n, kind)] for n in ("q_proj", "k_proj", "v_proj")]
            )
    out["visual.head"] = torch.zeros(official_visual_shapes(config)["visual.head"])
    return out


#####  the encoder: official preprocessing + the penultimate block  #####


def clip_preprocess(image: Tensor, size: int = 224) -> Tensor:
    """image [B, 3, H, W] in [-1, 1] -> CLIP pixel values [B, 3, size, size], as the official
    CLIPModel.visual: torch bicubic resize to a square (no crop, align_corners=False), x * 0.5 + 0.5, then
    (x - mean) / std."""
    x = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x.mul(0.5).add(0.5)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class WanClipEncoder:
    """The official `CLIPModel.visual(videos)` of Wan2.1 I2V: image [B, 3, H, W] in [-1, 1] -> [B, 257, D]."""

    def __init__(self, config: ClipVisionConfig = CLIP_VIT_H_14):
        from transformers import CLIPVisionModel

        self.config = config
        # Only the blocks the features pass through: the 32nd block, post-norm and head are never run.
        self.model = CLIPVisionModel(config.to_transformers(config.vision_layers - 1)).eval()
        self.model.requires_grad_(False)

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        config: ClipVisionConfig = CLIP_VIT_H_14,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> WanClipEncoder:
        """Load the visual tower from the official `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`
        (read with torch.load(weights_only=True)); the official run keeps it in fp16 on the GPU."""
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory; pass the CLIP file itself, e.g. {path}/{CLIP_FILE}")
        state = load_file_state_dict(path)
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
        converted = convert_official_clip_visual(state, config, num_layers=config.vision_layers - 1)
        del state
        with torch.device("meta"):
            enc = cls(config)
        converted = {k: v.to(dtype) for k, v in converted.items()}
        # transformers' position_ids: a non-persistent buffer (not in the file), still on meta: fill it.
        enc.model.embeddings.register_buffer(
            "position_ids", torch.arange(config.num_tokens)[None], persistent=False
        )
        load_strict(enc.model, converted, source=path)
        enc.model.to(device)
        return enc

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, image: Tensor) -> Tensor:
        """image [B, 3, H, W] in [-1, 1] (any size) -> penultimate-block tokens [B, 257, D] fp32."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"the CLIP encoder takes images [B, 3, H, W], got {tuple(image.shape)}")
        p = next(self.model.parameters())
        pixels = clip_preprocess(image.to(p.device), self.config.image_size).to(p.dtype)  # [B, 3, 224, 224]
        return self.model(pixel_values=pixels).last_hidden_state.float()  # [B, P, D]
