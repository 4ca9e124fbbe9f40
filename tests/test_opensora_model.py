"""STDiT3 (OpenSora v1.2) against golden outputs of the official code (tests/data/opensora/README.md), the
official key list, the loader on an official-layout checkpoint, and input checks."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import models.opensora as opensora
from models.attention import attention
from models.loading import load_strict
from models.opensora import STDIT3_CONFIGS, STDiT3, STDiT3Config, load_stdit3

DATA = Path(__file__).parent / "data"
TINY = STDiT3Config(
    depth=2, hidden_size=144, num_heads=2, mlp_ratio=0.5, caption_channels=32, model_max_length=12
)  # the configuration the golden outputs were recorded with
# The official hpcai-tech/OpenSora-STDiT-v3 config.json, verbatim (as on the Hub).
OFFICIAL_CONFIG = {
    "architectures": ["STDiT3"],
    "model_type": "STDiT3",
    "caption_channels": 4096,
    "class_dropout_prob": 0.1,
    "depth": 28,
    "drop_path": 0.0,
    "enable_flash_attn": False,
    "enable_layernorm_kernel": False,
    "enable_sequence_parallelism": False,
    "freeze_y_embedder": True,
    "hidden_size": 1152,
    "in_channels": 4,
    "input_size": [None, None, None],
    "input_sq_size": 512,
    "mlp_ratio": 4.0,
    "model_max_length": 300,
    "num_heads": 16,
    "only_train_temporal": False,
    "patch_size": [1, 2, 2],
    "pred_sigma": True,
    "qk_norm": True,
    "skip_y_embedder": False,
    "torch_dtype": "float32",
    "transformers_version": "4.36.2",
}
TINY_CONFIG = {
    **OFFICIAL_CONFIG,
    "depth": 2,
    "hidden_size": 144,
    "num_heads": 2,
    "mlp_ratio": 0.5,
    "caption_channels": 32,
    "model_max_length": 12,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These matmuls are tiny: a second thread gains nothing, and on a loaded shared 2-core machine each
    # OpenMP hand-off cost ~30 ms per op (a 20 ms forward took 1.5 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(DATA / "opensora" / "stdit3_tiny.safetensors")


def official_weights(golden) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in golden.items() if not k.startswith(("input.", "expected."))}


def inputs(golden, case: str) -> dict[str, torch.Tensor]:
    prefix = f"input.{case}."
    return {k[len(prefix) :]: v for k, v in golden.items() if k.startswith(prefix)}


def tiny_model(golden, dtype=torch.float32) -> STDiT3:
    with torch.device("meta"):
        model = STDiT3(TINY)
    return load_strict(model, {k: v.to(dtype) for k, v in official_weights(golden).items()}).eval()


def run(model: STDiT3, x, timestep, y, mask, fps, height, width) -> torch.Tensor:
    with torch.no_grad():
        return model(x, timestep, y, mask, fps, height, width)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


# ---- numerics against the official code ----


@pytest.mark.parametrize("case", ["a", "b"])
def test_fp32_matches_official(golden, case):
    out = run(tiny_model(golden), **inputs(golden, case))
    assert out.dtype == torch.float32 and out.shape == golden[f"expected.{case}.fp32"].shape
    assert rel_err(out, golden[f"expected.{case}.fp32"]) <= 1e-4


@pytest.mark.parametrize("case", ["a", "b"])
def test_bf16_matches_official(golden, case):
    # bf16 outputs differ by the attention kernel (SDPA here, upstream's math path in the golden run):
    # measured 8.8e-3 at most, about 2 bf16 ulps. Missing the timestep's bf16 rounding alone would give 0.23.
    out = run(tiny_model(golden, torch.bfloat16), **inputs(golden, case))
    assert out.dtype == torch.float32
    assert rel_err(out, golden[f"expected.{case}.bf16"].float()) <= 2e-2


def upstream_attention(q, k, v, *, k_lens=None, mask=None, scale=None, backend="auto"):
    """The attention arithmetic of the golden run: self-attention by upstream's math path (scale, q·kᵀ in the
    input dtype, fp32 softmax, cast back), cross-attention as one packed block-diagonal SDPA call. `backend`
    (the model's --attention choice) is ignored: this emulates one fixed kernel."""
    if k_lens is None:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, Nh, L, Dh]
        probs = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).float().softmax(-1).to(q.dtype)
        return (probs @ v).transpose(1, 2)
    b, n = q.shape[:2]
    keep = torch.arange(k.shape[1])[None] < k_lens[:, None]  # [B, L]
    owner = torch.arange(b)[:, None].expand_as(keep)[keep]  # sample of every packed key
    block = torch.arange(b).repeat_interleave(n)[:, None] == owner[None]  # [B*N, sum L]
    out = F.scaled_dot_product_attention(
        q.reshape(1, b * n, *q.shape[2:]).transpose(1, 2),
        k[keep][None].transpose(1, 2),
        v[keep][None].transpose(1, 2),
        attn_mask=block,
    )
    return out.transpose(1, 2).reshape(q.shape)


def kernel_fingerprint() -> dict[str, torch.Tensor]:
    """The CPU kernels that the bf16 forward runs, on fixed inputs of the tiny model's sizes: bf16 linear,
    Conv3d and matmul, fp32 softmax, bf16 layer norm, the fp32 RMSNorm pieces, GELU(tanh), SiLU, sin/cos/exp
    and a masked SDPA. Equal outputs mean the arithmetic of the machine that recorded the golden run."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)

    x, w, b = rand(2, 8, 144), rand(432, 144), rand(432)
    q, k, v = rand(2, 2, 12, 72), rand(2, 2, 12, 72), rand(2, 2, 12, 72)
    x32 = rand(2, 8, 72, dtype=torch.float32)
    mask = torch.arange(12)[None] < torch.tensor([7, 12])[:, None]  # [2, 12]
    return {
        "linear": F.linear(x, w, b),
        "conv3d": F.conv3d(rand(2, 4, 3, 6, 8), rand(144, 4, 1, 2, 2), rand(144), stride=(1, 2, 2)),
        "matmul": (q * 72**-0.5) @ k.transpose(-2, -1),
        "softmax": (q @ k.transpose(-2, -1)).float().softmax(-1),
        "probs_v": (q @ k.transpose(-2, -1)).float().softmax(-1).to(q.dtype) @ v,
        "layer_norm": F.layer_norm(x, (144,), eps=1e-6),
        "rms": x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6),
        "gelu": F.gelu(x, approximate="tanh"),
        "silu": F.silu(x),
        "sincos": torch.cat([x32.sin(), x32.cos(), x32.to(torch.bfloat16).sin().float(), x32.exp()]),
        "sdpa": F.scaled_dot_product_attention(q, k, v, mask[:, None, None]),
    }


def same_kernels_as_golden_run() -> bool:
    recorded = load_file(DATA / "opensora" / "kernels_bf16.safetensors")
    now = kernel_fingerprint()
    return recorded.keys() == now.keys() and all(torch.equal(now[k], recorded[k]) for k in recorded)


@pytest.mark.parametrize("case", ["a", "b"])
def test_bf16_roundings_bitwise_with_upstream_attention(golden, case, monkeypatch):
    # With the attention kernels of the golden run, every other bf16 rounding (timestep, fps, pixel size,
    # pos-emb frequencies, RoPE angles, RMSNorm, modulation order) must reproduce upstream bit for bit. One
    # misplaced rounding (e.g. RoPE in fp32) leaves only ~25% of the elements equal.
    # Bit-exactness holds only on the CPU kernels of the golden run (an AMD EPYC, AVX2): other kernels round
    # differently, and then even a correct model matches only 28-29% of the elements (measured with
    # ATEN_CPU_CAPABILITY=default here and on an Intel Xeon), no more than a wrong one (25-26%), and its
    # error (6e-3) equals a wrong one's too. So elsewhere this check cannot tell right from wrong and is
    # skipped; test_bf16_matches_official still holds every CPU to the kernel-independent tolerance.
    if not same_kernels_as_golden_run():
        pytest.skip("this CPU's kernels round differently from the golden run's; bitwise check not possible")
    monkeypatch.setattr(opensora, "attention", upstream_attention)
    out = run(tiny_model(golden, torch.bfloat16), **inputs(golden, case))
    assert (out == golden[f"expected.{case}.bf16"].float()).float().mean() >= 0.9


def test_bf16_model_rounds_conditioning_scalars(golden):
    base = inputs(golden, "a")
    rounded = {**base, "timestep": torch.tensor([984.0, 312.0]), "width": torch.tensor([428.0, 428.0])}
    bf16 = tiny_model(golden, torch.bfloat16)
    assert torch.equal(run(bf16, **base), run(bf16, **rounded))  # 985.96 -> 984, 312.7 -> 312, 427 -> 428
    fp32 = tiny_model(golden)
    assert not torch.allclose(run(fp32, **base), run(fp32, **rounded))  # fp32 weights: no rounding


def test_upstream_attention_emulation_matches_models_attention():
    # Guards the emulation above: in fp32 both paths are the same maths.
    q, k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8)
    k_lens = torch.tensor([3, 4])
    torch.testing.assert_close(upstream_attention(q, k, v), attention(q, k, v))
    torch.testing.assert_close(upstream_attention(q, k, v, k_lens=k_lens), attention(q, k, v, k_lens=k_lens))


# ---- text masks, CFG layout, odd sizes ----


def test_padded_text_tokens_do_not_change_the_output(golden):
    model, kw = tiny_model(golden), inputs(golden, "a")
    y = kw["y"].clone()
    y[0, :, 7:] = 100.0  # sample 0 has 7 valid tokens
    torch.testing.assert_close(run(model, **{**kw, "y": y}), run(model, **kw), rtol=0, atol=1e-6)
    y[0, :, 6] = 100.0  # a valid token does change it
    assert not torch.allclose(run(model, **{**kw, "y": y}), run(model, **kw))


def test_cfg_half_batch_conditioning_is_repeated(golden):
    model, kw = tiny_model(golden), inputs(golden, "b")
    full = {**kw, **{k: kw[k].repeat(2, *[1] * (kw[k].ndim - 1)) for k in ("mask", "fps", "height", "width")}}
    assert full["mask"].shape == (2, 12)
    # Not bitwise: the fps MLP runs on 1 row instead of 2, which changes the matmul blocking.
    torch.testing.assert_close(run(model, **kw), run(model, **full), rtol=1e-5, atol=1e-5)


def test_odd_sizes_and_a_single_frame(golden):
    model, kw = tiny_model(golden), inputs(golden, "a")
    x = torch.randn(2, 4, 1, 3, 5)
    out = run(model, **{**kw, "x": x})
    assert out.shape == (2, 8, 1, 3, 5) and torch.isfinite(out).all()


# ---- key names, configs, loading ----


def test_xl2_keys_match_official():
    with torch.device("meta"):
        model = STDiT3(STDIT3_CONFIGS["STDiT3-XL/2"])
    ours = [f"{k} {json.dumps(list(v.shape))}" for k, v in model.state_dict().items()]
    official = (DATA / "opensora_keys.txt").read_text().splitlines()
    assert len(official) == 973
    assert ours == official  # same names, shapes and order (rope.freqs and y_embedder.y_embedding included)


def test_3b_preset_shapes():
    with torch.device("meta"):
        sd = STDiT3(STDIT3_CONFIGS["STDiT3-3B/2"]).state_dict()
    assert len(sd) == 973
    assert sd["spatial_blocks.27.attn.qkv.weight"].shape == (3 * 1872, 1872)
    assert sd["temporal_blocks.0.attn.q_norm.weight"].shape == (72,) and sd["rope.freqs"].shape == (36,)


def test_rope_freqs_built_as_upstream(golden):
    # The model built on CPU computes the same frequencies as the official RotaryEmbedding(dim=72), to the
    # last fp32 bit on the golden run's CPU; other CPUs' pow kernels may differ by one ulp (measured 8.6e-8
    # relative with ATEN_CPU_CAPABILITY=default), while a wrong formula (theta, dim or exponent) is off by
    # far more than 1e-6.
    torch.testing.assert_close(STDiT3(TINY).rope.freqs, golden["rope.freqs"], rtol=1e-6, atol=0)


def test_config_from_official_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OFFICIAL_CONFIG))
    assert STDiT3Config.from_json(str(path)) == STDIT3_CONFIGS["STDiT3-XL/2"]
    with pytest.raises(ValueError, match="unknown STDiT3 config keys"):
        STDiT3Config.from_dict({**OFFICIAL_CONFIG, "hidden_dim": 3})
    with pytest.raises(ValueError, match="skip_y_embedder"):
        STDiT3Config.from_dict({**OFFICIAL_CONFIG, "skip_y_embedder": True})
    with pytest.raises(ValueError, match="model_type"):
        STDiT3Config.from_dict({**OFFICIAL_CONFIG, "model_type": "STDiT2"})
    with pytest.raises(ValueError, match="num_heads"):
        STDiT3Config(hidden_size=1152, num_heads=10)


def write_checkpoint(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    save_file(state_dict, path / "model.safetensors")
    return path


def test_loader_reads_official_layout(golden, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", official_weights(golden))
    model = load_stdit3(str(ckpt), device="cpu", dtype=torch.float32)
    assert model.config == TINY
    out = run(model, **inputs(golden, "b"))
    assert rel_err(out, golden["expected.b.fp32"]) <= 1e-4
    bf16 = load_stdit3(str(ckpt), device="cpu", dtype=torch.bfloat16)
    assert {t.dtype for t in bf16.state_dict().values()} == {torch.bfloat16}  # rope.freqs, y_embedding too


def test_loader_errors(golden, tmp_path):
    with pytest.raises(FileNotFoundError, match="hpcai-tech/OpenSora-STDiT-v3"):
        load_stdit3(str(tmp_path), device="cpu", dtype=torch.float32)
    sd = official_weights(golden)
    missing = {k: v for k, v in sd.items() if k != "rope.freqs"}
    with pytest.raises(ValueError, match="missing keys.*rope.freqs"):
        load_stdit3(str(write_checkpoint(tmp_path / "missing", missing)), device="cpu", dtype=torch.float32)
    extra = {**sd, "pos_embed.inv_freq": torch.zeros(36)}
    with pytest.raises(ValueError, match="unexpected keys.*pos_embed.inv_freq"):
        load_stdit3(str(write_checkpoint(tmp_path / "extra", extra)), device="cpu", dtype=torch.float32)
    wrong = {**sd, "y_embedder.y_embedding": torch.zeros(300, 32)}
    with pytest.raises(ValueError, match="shape mismatches.*y_embedder.y_embedding"):
        load_stdit3(str(write_checkpoint(tmp_path / "wrong", wrong)), device="cpu", dtype=torch.float32)


# ---- bad input ----


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(2, 3, 3, 6, 7)}, "x must be"),
        ({"timestep": torch.tensor([500.0])}, "timestep must be"),
        ({"y": torch.randn(2, 1, 12, 16)}, "y must be"),
        ({"fps": torch.tensor([24.0, 24.0, 24.0])}, "fps must be"),
        ({"mask": torch.ones(3, 12, dtype=torch.long)}, "mask must be"),
        ({"mask": torch.tensor([[0] + [1] * 11, [1] * 12])}, "ones then zeros"),
        ({"mask": torch.tensor([[0] * 12, [1] * 12])}, "at least one"),
    ],
)
def test_bad_inputs_raise(golden, change, message):
    model = tiny_model(golden)
    with pytest.raises(ValueError, match=message):
        run(model, **{**inputs(golden, "a"), **change})
