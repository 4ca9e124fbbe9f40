"""HunyuanVideo DiT: parity with diffusers on random weights, official keys, text masking, strict loading."""

import copy
import dataclasses
import math
import os

import pytest
import torch

from models.hunyuan import (
    HUNYUAN_CONFIGS,
    HunyuanVideoConfig,
    HunyuanVideoModel,
    convert_diffusers_to_official,
    guidance_input,
    load_hunyuan,
)

KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "hunyuan_keys.txt")
# head_dim 128 so that the real RoPE split 16/56/56 applies; two of every block kind.
TINY = HunyuanVideoConfig(
    in_channels=4,
    out_channels=4,
    hidden_size=256,
    heads_num=2,
    mm_double_blocks_depth=2,
    mm_single_blocks_depth=2,
    text_states_dim=32,
    text_states_dim_2=16,
    guidance_embed=True,
)


def randomize_(model: torch.nn.Module) -> None:
    """Every parameter random (several are zero-initialised), matrices scaled by 1/sqrt(fan_in)."""
    with torch.no_grad():
        for p in model.parameters():
            scale = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.5
            p.copy_(torch.randn_like(p) * scale)


def tiny_inputs(batch=2, length=7, valid=(7, 4)):
    x = torch.randn(batch, 4, 3, 8, 8)  # patch grid 3 x 4 x 4 = 48 image tokens
    t = torch.tensor([900.0, 250.5])[:batch]
    text_states = torch.randn(batch, length, 32)
    text_mask = (torch.arange(length)[None] < torch.tensor(valid)[:, None]).long()
    return x, t, text_states, text_mask, torch.randn(batch, 16), guidance_input(6.0, batch)


@pytest.fixture(scope="module")
def models():
    """A tiny diffusers model with random weights, and ours loaded from its converted weights."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    ref = HunyuanVideoTransformer3DModel(**TINY.diffusers_kwargs()).eval()
    randomize_(ref)
    ours = HunyuanVideoModel(TINY).eval()
    ours.load_state_dict(convert_diffusers_to_official(ref.state_dict(), TINY), strict=True)
    return ref, ours


def test_matches_diffusers_with_masked_text(models):
    ref, ours = models
    x, t, txt, mask, pooled, g = tiny_inputs()
    with torch.no_grad():
        expected = ref(x, t, txt, mask, pooled, guidance=g, return_dict=False)[0]
        out = ours(x, t, txt, mask, pooled, g)
    assert out.shape == x.shape
    assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-4


def test_padded_text_never_reaches_the_output(models):
    _, ours = models
    x, t, txt, mask, pooled, g = tiny_inputs()
    changed_pad, changed_valid = txt.clone(), txt.clone()
    changed_pad[1, 4:] = 100 * torch.randn(3, 32)  # sample 1 has 4 valid tokens
    changed_valid[1, 3] += 1.0
    with torch.no_grad():
        out = ours(x, t, txt, mask, pooled, g)
        assert torch.equal(ours(x, t, changed_pad, mask, pooled, g), out)
        moved = ours(x, t, changed_valid, mask, pooled, g)
    assert torch.equal(moved[0], out[0]) and not torch.allclose(moved[1], out[1])


def test_guidance_embedding_is_used_and_required(models):
    _, ours = models
    x, t, txt, mask, pooled, g = tiny_inputs()
    assert guidance_input(6.0, 2).tolist() == [6016.0, 6016.0]  # the official bf16 rounding of 6000
    with torch.no_grad():
        assert not torch.allclose(ours(x, t, txt, mask, pooled, g), ours(x, t, txt, mask, pooled, g / 2))
    with pytest.raises(ValueError, match="guidance"):
        ours(x, t, txt, mask, pooled)


def test_bf16_weights_with_fp16_text_features(models):
    """The official dtypes: bf16 weights, fp16 LLM/CLIP features, fp32 latents -> bf16 velocity near fp32."""
    _, ours = models
    x, t, txt, mask, pooled, g = tiny_inputs()
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.no_grad():
        expected = ours(x, t, txt.half().float(), mask, pooled.half().float(), g)
        out = ours_bf16(x, t, txt.half(), mask, pooled.half(), g)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - expected).norm() / expected.norm()).item() < 0.05


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(text_mask=a["text_mask"].flip(1)), "valid tokens first"),  # left padding
        (lambda a: a["text_mask"][1].zero_(), "valid tokens first"),  # no valid token: NaN mean officially
        (lambda a: a.update(x=a["x"][:, :3]), r"\[B, 4, T, H, W\]"),
        (lambda a: a.update(x=a["x"][..., :7]), "multiples of patch_size"),
        (lambda a: a.update(text_states_2=a["text_states_2"][:, :8]), "text_states_2"),
    ],
)
def test_bad_inputs_raise(models, change, message):
    _, ours = models
    args = dict(zip(["x", "t", "text_states", "text_mask", "text_states_2", "guidance"], tiny_inputs()))
    change(args)
    with pytest.raises(ValueError, match=message):
        ours(**args)


def test_config_validation():
    with pytest.raises(ValueError, match="sum to head_dim"):
        HunyuanVideoConfig(hidden_size=256, heads_num=2, rope_dim_list=(16, 48, 48))
    with pytest.raises(ValueError, match="divisible"):
        HunyuanVideoConfig(hidden_size=250, heads_num=3)
    with pytest.raises(ValueError, match="mlp_act_type"):
        HunyuanVideoConfig(mlp_act_type="swish")
    assert HunyuanVideoConfig(patch_size=[1, 2, 2]).patch_size == (1, 2, 2)


def expected_keys() -> list[str]:
    with open(KEYS_FILE) as f:
        return f.read().splitlines()


def key_lines(state_dict) -> list[str]:
    return [" ".join([k, *map(str, v.shape)]) for k, v in state_dict.items()]


def test_full_size_keys_and_shapes_equal_the_official_list():
    with torch.device("meta"):
        model = HunyuanVideoModel(HUNYUAN_CONFIGS["t2v-720p"])
    assert key_lines(model.state_dict()) == expected_keys()  # 856 keys, official order
    assert sum(p.numel() for p in model.parameters()) == 12_821_012_544


def test_full_size_conversion_inverts_diffusers_converter():
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    with torch.device("meta"):
        diffusers_sd = HunyuanVideoTransformer3DModel().state_dict()
    official = convert_diffusers_to_official(diffusers_sd, HUNYUAN_CONFIGS["t2v-720p"])
    assert sorted(key_lines(official)) == sorted(expected_keys())
    back = convert_hunyuan_video_transformer_to_diffusers(dict(official))
    assert sorted(key_lines(back)) == sorted(key_lines(diffusers_sd))


def test_conversion_swaps_final_modulation_and_rejects_bad_input(models):
    ref, _ = models
    sd = ref.state_dict()
    official = convert_diffusers_to_official(sd, TINY)
    scale, shift = sd["norm_out.linear.weight"].chunk(2)
    assert torch.equal(official["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    with pytest.raises(ValueError, match="no official name"):
        convert_diffusers_to_official({**sd, "foo.weight": torch.zeros(1)}, TINY)
    partial = {k: v for k, v in sd.items() if k != "transformer_blocks.0.attn.to_k.weight"}
    with pytest.raises(ValueError, match="missing diffusers parts"):
        convert_diffusers_to_official(partial, TINY)
    with pytest.raises(ValueError, match="mis-shaped"):
        convert_diffusers_to_official(sd, dataclasses.replace(TINY, text_states_dim=64))


# ---------------------------------------------------------------------------------------------------------
# The loader on tiny checkpoints in the official file layout.


def write_checkpoint(tmp_path, payload) -> str:
    folder = tmp_path / "hunyuan-video-t2v-720p" / "transformers"
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / "mp_rank_00_model_states.pt")
    torch.save(payload, path)
    return path


def test_loader_reads_the_official_layout(models, tmp_path):
    _, ours = models
    path = write_checkpoint(tmp_path, {"module": ours.state_dict()})
    loaded = load_hunyuan(path, config=TINY, dtype=torch.float32)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    # The weights arrive bit for bit (exact by construction: loading copies, never computes).
    want = ours.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    # The outputs only to fp32 rounding: the loaded tensors live in a memory-mapped file, whose alignment
    # can make the CPU's BLAS pick other kernels than for the in-memory copy (measured 2.4e-6 on an Intel
    # Xeon, 0 on an AMD EPYC). 1e-5 of the output's scale is ~100 fp32 ulps yet far below any wrong weight.
    x, t, txt, mask, pooled, g = tiny_inputs()
    with torch.no_grad():
        out, ref = loaded(x, t, txt, mask, pooled, g), ours(x, t, txt, mask, pooled, g)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    default = load_hunyuan(write_checkpoint(tmp_path, ours.state_dict()), config=TINY)  # bare state dict
    assert {p.dtype for p in default.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda sd: sd.pop("final_layer.linear.bias"), ValueError, "missing keys.*final_layer.linear.bias"),
        (lambda sd: sd.update(extra=torch.zeros(1)), ValueError, "unexpected keys.*extra"),
        (lambda sd: sd.update({"img_in.proj.bias": torch.zeros(3)}), ValueError, "shape mismatches"),
    ],
)
def test_loader_is_strict(models, tmp_path, edit, error, message):
    sd = dict(models[1].state_dict())
    edit(sd)
    with pytest.raises(error, match=message):
        load_hunyuan(write_checkpoint(tmp_path, {"module": sd}), config=TINY)


def test_loader_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download tencent/HunyuanVideo"):
        load_hunyuan(str(tmp_path / "mp_rank_00_model_states.pt"), config=TINY)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_hunyuan(str(tmp_path), config=TINY)  # a directory, not the file
    path = write_checkpoint(tmp_path, {})
    with open(path, "wb") as f:
        f.write(b"this is not a torch checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_hunyuan(path, config=TINY)
    with pytest.raises(ValueError, match="no 'module' entry"):
        load_hunyuan(write_checkpoint(tmp_path, {"ema": {"w": torch.zeros(1)}, "step": 3}), config=TINY)
    fp8 = {"module": {"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}}
    with pytest.raises(ValueError, match="8-bit"):
        load_hunyuan(write_checkpoint(tmp_path, fp8), config=TINY)
