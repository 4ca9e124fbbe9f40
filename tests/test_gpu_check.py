"""benchmarks/gpu_check.py and its analytic FLOP counts (the MFU denominator)."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu_check
from benchmarks.flops import hunyuan_forward_flops, opensora_forward_flops, wan_forward_flops
from models.hunyuan import HunyuanVideoConfig, HunyuanVideoModel, guidance_input
from models.opensora import STDiT3, STDiT3Config
from models.wan import WanConfig, WanModel


def counted(model, *args, **kwargs) -> int:
    """torch's own count of the matrix products of one forward. The math SDPA kernel is forced because the
    fused CPU kernel has no FLOP formula in torch.utils.flop_counter (it would count attention as 0)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_wan_flops_equal_torch_flop_counter(model_type):
    i2v = model_type == "i2v"
    cfg = WanConfig(model_type=model_type, in_dim=36 if i2v else 16, text_len=8, dim=32, ffn_dim=64,
                    text_dim=16, num_heads=2, num_layers=2, freq_dim=32)  # fmt: skip
    x, ctx = torch.randn(2, 16, 3, 4, 6), torch.randn(2, 5, 16)
    extra = dict(clip_fea=torch.randn(2, 257, 1280), y=torch.randn(2, 20, 3, 4, 6)) if i2v else {}
    flops = wan_forward_flops(cfg, (3, 4, 6), batch=2)
    assert sum(flops.values()) == counted(WanModel(cfg).eval(), x, torch.tensor([500.0] * 2), ctx, **extra)
    # attention grows with the square of the tokens, the rest linearly
    double = wan_forward_flops(cfg, (6, 4, 6), batch=2)
    assert double["self-attn scores+values"] == 4 * flops["self-attn scores+values"]
    assert double["ffn"] == 2 * flops["ffn"]


def test_hunyuan_flops_equal_torch_flop_counter():
    cfg = HunyuanVideoConfig(in_channels=4, out_channels=4, hidden_size=32, heads_num=2,
                             mm_double_blocks_depth=2, mm_single_blocks_depth=3, rope_dim_list=(4, 6, 6),
                             text_states_dim=16, text_states_dim_2=8, guidance_embed=True)  # fmt: skip
    b = 2
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * b)  # padded text keys are masked but still computed
    args = (torch.randn(b, 4, 3, 4, 6), torch.tensor([500.0] * b), torch.randn(b, 6, 16), mask,
            torch.randn(b, 8), guidance_input(6.0, b, dtype=torch.float32))  # fmt: skip
    flops = hunyuan_forward_flops(cfg, (3, 4, 6), text_len=6, batch=b)
    assert sum(flops.values()) == counted(HunyuanVideoModel(cfg).eval(), *args)


def test_opensora_flops_equal_torch_flop_counter():
    cfg = STDiT3Config(
        hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0, caption_channels=16, model_max_length=6
    )
    b, one = (
        2,
        torch.tensor([64.0]),
    )  # the CFG pair; fps and sizes once for the pair, as the script passes them
    args = (torch.randn(b, 4, 3, 4, 5), torch.tensor([500.0] * b), torch.randn(b, 1, 6, 16),
            torch.tensor([[1, 1, 1, 1, 0, 0]]), torch.tensor([24.0]), one, one)  # fmt: skip
    flops = opensora_forward_flops(cfg, (3, 4, 5), batch=b)  # W 5 is padded to 6: a 3x2x3 patch grid
    assert sum(flops.values()) == counted(STDiT3(cfg).eval(), *args)


def test_real_size_counts_are_plausible():
    """Wan2.1-1.3B at 832x480x81: 32,760 tokens; ~2 x 1.3e9 x 32,760 FLOPs of weights plus attention."""
    from models.wan import WAN_CONFIGS

    flops = wan_forward_flops(WAN_CONFIGS["t2v-1.3B"], (21, 60, 104))
    assert 250e12 < sum(flops.values()) < 300e12
    assert flops["self-attn scores+values"] == 4 * 32760**2 * 1536 * 30


def test_small_run_writes_json_and_markdown(tmp_path):
    """The CPU smoke mode end to end (one model, no compile, one timed call: seconds, not a timing test)."""
    out = tmp_path / "gc"
    argv = ["--small", "--models", "wan", "--no-compile", "--warmup", "1", "--reps", "1", "--out", str(out)]
    result = gpu_check.main(argv)
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["environment"]["small"] and saved["environment"]["peak_tflops"] is None
    (case,) = saved["cases"]
    assert case["tokens"] == 320 and case["rel_diff_vs_diffusers"] < 1e-4  # the same weights, fp32
    labels = [r["label"] for r in case["rows"]]
    assert labels == ["diffusers (SDPA)", "ours (SDPA)", "ours (sdpa) --cfg_batch"]  # auto is SDPA on CPU
    assert [r["batch"] for r in case["rows"]] == [1, 1, 2] and case["rows"][2]["flops"] == 2 * case["rows"][
        1
    ]["flops"]
    assert all(r["median_s"] > 0 and r["cpu_s"] > 0 for r in case["rows"])
    assert case["summary"]["compile_speedup"] is None and case["summary"]["decision_over_dit_call"] > 0
    assert case["summary"]["attention_rel_diff_vs_sdpa"] is None  # the rows ran on SDPA itself
    assert case["cache"]["skipped_step_s"] >= case["cache"]["decision_s"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "| Wan tiny (demo) 64x64x17 | ours (sdpa) --cfg_batch | 2 |" in table and result == saved
    assert 0 < case["seconds"] <= saved["environment"]["total_seconds"]  # the duration is reported


def small_opensora_argv(out) -> list[str]:
    """The quickest OpenSora-only check: small size, eager, one warm-up and one timed repetition."""
    return [
        "--small",
        "--models",
        "opensora",
        "--no-compile",
        "--warmup",
        "1",
        "--reps",
        "1",
        "--out",
        str(out),
    ]


def test_small_opensora_run_has_ours_only(tmp_path):
    """OpenSora 1.2 has no diffusers class and always batches its CFG pair: ours, batch 2, with the cache
    costs against that one call."""
    out = tmp_path / "gc"
    (case,) = gpu_check.main(small_opensora_argv(out))["cases"]
    assert case["tokens"] == 5 * 8 * 8 and case["rel_diff_vs_diffusers"] is None
    assert [(r["label"], r["batch"]) for r in case["rows"]] == [("ours (sdpa) (batched CFG, as always)", 2)]
    s = case["summary"]
    assert (
        s["ours_over_diffusers_time"] is None
        and s["cfg_batch_speedup"] is None
        and s["compile_speedup"] is None
    )
    assert 0 < s["decision_over_dit_call"] and 0 < s["skipped_over_computed_step"] < 1
    assert "| OpenSora small 128x128x17 | n/a | n/a | n/a | n/a |" in (out / "gpu_check.md").read_text()


def test_another_attention_kernel_is_compared_with_sdpa(tmp_path, monkeypatch):
    """With --attention flash or sage (CUDA only) ours is rebuilt on that kernel and its output compared with
    SDPA's on the same inputs. On the CPU "auto" stands in for it: it runs SDPA, so the difference is 0."""
    monkeypatch.setattr(gpu_check, "resolve_backend", lambda *args: "auto")
    out = tmp_path / "gc"
    (case,) = gpu_check.main(small_opensora_argv(out))["cases"]
    assert case["summary"]["attention_rel_diff_vs_sdpa"] == 0.0 and case["rows"][0]["attention"] == "auto"
    assert "| 0.00e+00 |" in (out / "gpu_check.md").read_text()


def test_a_spent_budget_leaves_compiled_rows_and_models_out_with_a_note(tmp_path):
    """--budget-min: a compiled row whose estimated time (60 s per block kind before any was measured) would
    overrun the budget is left out, and so is a model once the budget is spent; both are named."""
    out = tmp_path / "gc"
    argv = ["--small", "--models", "wan,opensora", "--budget-min", "0.01", "--warmup", "1", "--reps", "1",
            "--out", str(out)]  # fmt: skip
    result = gpu_check.main(argv)
    (case,) = result["cases"]  # Wan ran (models run in a fixed order); the budget (0.6 s) was spent after it
    assert case["family"] == "wan" and not any(r["compiled"] for r in case["rows"]) and len(case["rows"]) == 3
    assert case["summary"]["compile_speedup"] is None and case["summary"]["compile_cfg_batch_speedup"] is None
    assert [n.split(":")[0] for n in case["skipped"]] == [
        "ours --compile (B=1)",
        "ours --compile --cfg_batch (B=2)",
    ]
    assert result["environment"]["skipped"] == [
        "OpenSora small 128x128x17: the 0.01-minute budget (--budget-min) was spent"
    ]
    assert "Left out to stay within the time budget: OpenSora small" in (out / "gpu_check.md").read_text()


def test_bad_flags_and_a_missing_gpu_fail_early(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="error: no CUDA device"):
            gpu_check.main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: --models"):
        gpu_check.main(["--small", "--models", "ltx", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: --budget-min"):
        gpu_check.main(["--small", "--budget-min", "-1", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
