"""The I2V image encoder: official open-clip visual keys -> transformers' CLIPVisionModel, random weights."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel

from models.wan_clip import (
    CLIP_FILE,
    CLIP_TINY,
    CLIP_VIT_H_14,
    ClipVisionConfig,
    WanClipEncoder,
    clip_preprocess,
    convert_clip_visual_to_official,
    convert_official_clip_visual,
    official_visual_shapes,
)

# Small, but every structural choice of ViT-H/14: class token, pre-norm, no patch bias, exact GELU, 3 blocks.
CFG = ClipVisionConfig(image_size=28, patch_size=14, vision_dim=32, vision_heads=2, vision_layers=3)


def random_official(config: ClipVisionConfig, seed: int = 0) -> dict:
    """Random tensors under every official key: the visual tower and, as in the real file, textual keys."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * 0.2 for k, s in official_visual_shapes(config).items()}
    for k in state:
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or "_norm.weight" in k:
            state[k] = 1 + state[k]
    state["textual.token_embedding.weight"] = torch.randn(10, 8, generator=g)  # never read
    state["log_scale"] = torch.tensor(4.6)
    return state


def official_forward(state: dict, config: ClipVisionConfig, pixels: torch.Tensor) -> torch.Tensor:
    """The official `VisionTransformer.forward(x, use_31_block=True)` (wan/modules/clip.py), written from its
    state dict: patch conv (no bias), class token, + positions, pre_norm, all blocks but the last."""
    d, n = config.vision_dim, config.vision_heads
    ln = lambda x, p: F.layer_norm(x, (d,), state[f"{p}.weight"], state[f"{p}.bias"], config.norm_eps)  # noqa: E731
    x = F.conv2d(pixels, state["visual.patch_embedding.weight"], stride=config.patch_size)
    x = x.flatten(2).transpose(1, 2)  # [B, 256, D]
    x = (
        torch.cat([state["visual.cls_embedding"].expand(len(x), -1, -1), x], dim=1)
        + state["visual.pos_embedding"]
    )
    x = ln(x, "visual.pre_norm")
    for i in range(config.vision_layers - 1):
        p = f"visual.transformer.{i}"
        h = F.linear(ln(x, f"{p}.norm1"), state[f"{p}.attn.to_qkv.weight"], state[f"{p}.attn.to_qkv.bias"])
        q, k, v = h.view(*x.shape[:2], 3, n, d // n).unbind(2)  # [B, P, N, Dh] each
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + F.linear(
            a.transpose(1, 2).reshape(x.shape), state[f"{p}.attn.proj.weight"], state[f"{p}.attn.proj.bias"]
        )
        h = F.gelu(F.linear(ln(x, f"{p}.norm2"), state[f"{p}.mlp.0.weight"], state[f"{p}.mlp.0.bias"]))
        x = x + F.linear(h, state[f"{p}.mlp.2.weight"], state[f"{p}.mlp.2.bias"])
    return x


def test_official_layout_loads_and_matches_the_official_forward(tmp_path):
    state = random_official(CFG)
    torch.save(state, tmp_path / CLIP_FILE)
    enc = WanClipEncoder.from_checkpoint(str(tmp_path / CLIP_FILE), config=CFG)
    image = torch.rand(2, 3, 40, 56) * 2 - 1  # any size: the encoder resizes to 28x28 itself
    out = enc(image)
    assert out.shape == (2, CFG.num_tokens, 32)
    ref = official_forward(state, CFG, clip_preprocess(image, CFG.image_size))
    # fp32, the same math in another order (fused SDPA vs split heads): 1e-5 of the activations' scale
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_features_are_hidden_states_minus_two_of_the_full_clip_vision_model():
    """diffusers' WanImageToVideoPipeline reads `image_encoder(...).hidden_states[-2]` of the whole tower."""
    torch.manual_seed(0)
    full = CLIPVisionModel(CFG.to_transformers()).eval()
    official = convert_clip_visual_to_official(full.state_dict(), CFG)
    assert set(official) == set(official_visual_shapes(CFG))
    enc = WanClipEncoder(CFG)
    enc.model.load_state_dict(convert_official_clip_visual(official, CFG, num_layers=CFG.vision_layers - 1))
    pixels = clip_preprocess(torch.rand(1, 3, 28, 28) * 2 - 1, CFG.image_size)
    with torch.no_grad():
        ref = full(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        out = enc.model(pixel_values=pixels).last_hidden_state
    assert torch.equal(out, ref)  # the same modules on the same input: identical by construction


def test_preprocess_is_the_official_resize_and_normalisation():
    image = torch.rand(1, 3, 30, 50) * 2 - 1
    out = clip_preprocess(image, 224)
    x = F.interpolate(image, size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x - mean) / std, rtol=0, atol=1e-6)


def test_vit_h_shapes_are_the_official_ones():
    shapes = official_visual_shapes(CLIP_VIT_H_14)
    assert shapes["visual.pos_embedding"] == (1, 257, 1280) and shapes["visual.patch_embedding.weight"] == (
        1280, 3, 14, 14,
    )  # fmt: skip
    assert shapes["visual.transformer.31.mlp.0.weight"] == (5120, 1280) and shapes["visual.head"] == (
        1280,
        1024,
    )
    assert CLIP_TINY.num_tokens == 257  # the demo tower keeps the 257-token layout


@pytest.mark.parametrize("damage", ["missing", "shape", "unknown"])
def test_bad_checkpoint_is_refused_with_the_keys(tmp_path, damage):
    state = random_official(CFG)
    if damage == "missing":
        del state["visual.transformer.1.mlp.0.bias"]
    elif damage == "shape":
        state["visual.pos_embedding"] = torch.zeros(1, 9, 32)
    else:
        state["visual.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / CLIP_FILE)
    with pytest.raises(ValueError, match="mlp.0.bias|pos_embedding|visual.extra"):
        WanClipEncoder.from_checkpoint(str(tmp_path / CLIP_FILE), config=CFG)
