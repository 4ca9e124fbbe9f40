"""The GPU speed path on the CPU: attention backends, per-block torch.compile without recompilation."""

import argparse

import pytest
import torch
from torch._dynamo.utils import counters

from easycache import EasyCache, EasyCacheConfig
from models.attention import BACKENDS, attention, check_backend, flash_attn_module, sage_attn_module
from models.fast import cfg_batch_default, check_speed_args, compile_blocks
from models.hunyuan import HunyuanVideoConfig, HunyuanVideoModel, guidance_input
from models.opensora import STDiT3, STDiT3Config
from models.wan import WanConfig, WanModel

WAN = WanConfig(text_len=8, dim=32, ffn_dim=64, text_dim=16, num_heads=2, num_layers=3, freq_dim=32)
HUNYUAN = HunyuanVideoConfig(
    in_channels=4, out_channels=4, hidden_size=32, heads_num=2, mm_double_blocks_depth=2,
    mm_single_blocks_depth=2, rope_dim_list=(4, 6, 6), text_states_dim=16, text_states_dim_2=8,
    guidance_embed=True,
)  # fmt: skip
OPENSORA = STDiT3Config(
    hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0, caption_channels=16, model_max_length=6
)


def wan_inputs(batch: int = 1):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 16, 2, 4, 4, generator=g), torch.randn(batch, 5, 16, generator=g)


# --------------------------------------------------------------------------------------------------------
# Attention backends
# --------------------------------------------------------------------------------------------------------


def test_sdpa_backend_is_the_cpu_default():
    """On the CPU `auto` is SDPA, so both give the same bits, with and without a key-length mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 2, 8, generator=g) for _ in range(3))
    lens = torch.tensor([7, 4])
    for kw in ({}, {"k_lens": lens}):
        assert torch.equal(attention(q, k, v, backend="auto", **kw), attention(q, k, v, backend="sdpa", **kw))
    # keys past k_lens are ignored: changing them changes nothing
    k2 = k.clone()
    k2[1, 4:] = 100.0
    assert torch.equal(attention(q, k, v, k_lens=lens)[1], attention(q, k2, v, k_lens=lens)[1])


def test_models_take_the_backend_explicitly():
    torch.manual_seed(0)
    ref = WanModel(WAN)
    ours = WanModel(WAN, attn_backend="sdpa")
    ours.load_state_dict(ref.state_dict())
    backends = {m.attn_backend for m in ours.modules() if hasattr(m, "attn_backend")}
    assert backends == {"sdpa"} and len([m for m in ours.modules() if hasattr(m, "attn_backend")]) == 6
    x, ctx = wan_inputs()
    t = torch.tensor([500.0])
    assert torch.equal(ours(x, t, ctx), ref(x, t, ctx))  # sdpa is what auto runs on the CPU
    hy = HunyuanVideoModel(HUNYUAN, attn_backend="sdpa")
    assert {m.attn_backend for m in hy.modules() if hasattr(m, "attn_backend")} == {"sdpa"}
    # OpenSora: the self- and cross-attention of every spatial and temporal block
    torch.manual_seed(0)
    ref = STDiT3(OPENSORA).eval()
    ours = STDiT3(OPENSORA, attn_backend="sdpa").eval()
    ours.load_state_dict(ref.state_dict())
    backends = [m.attn_backend for m in ours.modules() if hasattr(m, "attn_backend")]
    assert set(backends) == {"sdpa"} and len(backends) == 2 * 2 * OPENSORA.depth
    x = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # auto is SDPA on the CPU: the same kernels by construction, so the same bits
        assert torch.equal(
            opensora_call(ours, x[:1], torch.tensor(700.0)), opensora_call(ref, x[:1], torch.tensor(700.0))
        )


@pytest.mark.parametrize("backend", ["flash", "sage"])
def test_a_backend_that_cannot_run_is_refused(backend):
    installed = (flash_attn_module if backend == "flash" else sage_attn_module)() is not None
    # Not installed here (CPU torch): a clear error naming the package; installed: CUDA only.
    with pytest.raises(ValueError, match="not installed" if not installed else "CUDA"):
        check_backend(backend, "cpu", torch.float32)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=backend):
        attention(q, q, q, backend=backend)
    with pytest.raises(ValueError, match="one of"):
        attention(q, q, q, backend="xformers")
    assert set(BACKENDS) == {"auto", "sdpa", "flash", "sage"}


def test_speed_args_resolve_the_cfg_batch_default():
    assert cfg_batch_default("cpu") is False and cfg_batch_default("cuda") is True
    args = argparse.Namespace(cfg_batch=None, attention="sdpa")
    check_speed_args(args, "cpu", torch.float32)
    assert args.cfg_batch is False
    args = argparse.Namespace(cfg_batch=True, attention="auto")  # an explicit choice is kept
    check_speed_args(args, "cpu", torch.float32)
    assert args.cfg_batch is True


def test_sample_script_refuses_an_uninstalled_backend_before_loading(tmp_path, capsys):
    import sample_wan

    if flash_attn_module() is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(SystemExit, match="error: --attention flash needs flash-attn"):
        sample_wan.main(["--task", "tiny", "--attention", "flash", "--save_file", str(tmp_path / "x.mp4")])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# torch.compile of the blocks
# --------------------------------------------------------------------------------------------------------


def sample(model, call, steps: int, cache: EasyCache | None, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """A flow-Euler loop with the cache decision outside the model, as the sample scripts run it."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    computed = []
    for i in range(steps):
        if cache is None or cache.should_compute(i, x):
            v = call(model, x, sigmas[i] * 1000)
            computed.append(i)
            if cache is not None:
                cache.update(x, v)
        else:
            v = cache.reuse(x)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x, computed


def wan_call(model, x, t):
    _, ctx = wan_inputs()
    return model(x, t.expand(1), ctx)


def hunyuan_call(model, x, t):
    g = torch.Generator().manual_seed(2)
    states, pooled = torch.randn(1, 6, 16, generator=g), torch.randn(1, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    return model(x, t.expand(1), states, mask, pooled, guidance_input(6.0, 1, dtype=torch.float32))


def opensora_call(model, x, t):
    """One batched CFG call as sample_opensora.py makes it ([z; z] with [y; y_null], the prompt's mask once)
    and the guided velocity [1, 4, T, H, W]."""
    g = torch.Generator().manual_seed(2)
    y = torch.randn(1, 1, 6, 16, generator=g)
    y = torch.cat([y, model.y_embedder.y_embedding[None, None]])  # [2, 1, L, Dc]: cond, null caption
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    fps, size = torch.tensor([24.0]), torch.tensor([64.0])  # once for the pair, as the script passes them
    pred = model(torch.cat([x, x]), t.expand(2), y, mask, fps, size, size)[:, :4]  # velocity, not sigma
    return pred[1:] + 7.0 * (pred[:1] - pred[1:])


FAMILIES = {  # model, call, latent channels
    "wan": (lambda: WanModel(WAN), wan_call, 16),
    "hunyuan": (lambda: HunyuanVideoModel(HUNYUAN), hunyuan_call, 4),
    "opensora": (lambda: STDiT3(OPENSORA), opensora_call, 4),
}


@pytest.mark.parametrize(
    "family,graphs", [("wan", 1), ("hunyuan", 2), ("opensora", 2)]
)  # one graph per block kind: Wan's blocks; HunyuanVideo's double and single blocks; OpenSora's spatial
# and temporal blocks (one class, two graphs: dynamo guards on the block's `temporal` flag)
def test_blocks_compile_once_for_the_whole_run(family, graphs):
    """Every block of a kind shares one compiled graph, and nothing recompiles across steps, across computed
    and skipped steps, or across a second generation: the compiled-graph count stays at its first-step value.
    aot_eager traces exactly what inductor would get (the dynamo frames and guards are the same) in a tenth
    of the time; test_inductor_compile_matches_eager runs the real backend."""
    torch.manual_seed(0)
    build, call, channels = FAMILIES[family]
    model = build().eval()
    x = torch.randn(1, channels, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager, eager_steps = sample(model, call, 8, EasyCache(EasyCacheConfig(thresh=0.3, warmup=2), 8), x)
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(model, backend="aot_eager")
        call(model, x, torch.tensor(999.0))  # the first call compiles
        assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
        first = dict(counters["stats"])
        for _ in range(2):  # two whole generations, each with computed and skipped steps
            out, steps = sample(model, call, 8, EasyCache(EasyCacheConfig(thresh=0.3, warmup=2), 8), x)
            assert steps == eager_steps and 2 < len(steps) < 8
        assert dict(counters["stats"]) == first  # no new frame compiled, no recompilation
        assert not counters["recompiles"]
    # aot_eager runs the same aten ops as eager, possibly decomposed: fp32 rounding only.
    assert ((out - eager).norm() / eager.norm()).item() < 1e-5


def test_compile_blocks_needs_a_block_list():
    with pytest.raises(ValueError, match="no block list"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    """The default backend (inductor, C++ on the CPU): the blocks compile once, stay compiled across
    EasyCache's computed and skipped steps, and match eager to fp32 rounding (inductor fuses and reorders
    elementwise work; Wan's complex128 RoPE falls back to eager kernels: inductor has no complex codegen)."""
    torch.manual_seed(0)
    model = WanModel(WAN).eval()
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager, eager_steps = sample(
            model, wan_call, 6, EasyCache(EasyCacheConfig(thresh=0.3, warmup=2), 6), x
        )
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(model)
        out, steps = sample(model, wan_call, 6, EasyCache(EasyCacheConfig(thresh=0.3, warmup=2), 6), x)
    assert steps == eager_steps and counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert ((out - eager).norm() / eager.norm()).item() < 1e-5


# --------------------------------------------------------------------------------------------------------
# Offload record
# --------------------------------------------------------------------------------------------------------


def test_placement_records_the_device_read_back():
    from models.offload import Placement, module_device

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    place = Placement()
    place.move("vae", "dit", model, "cpu")
    assert place.moves == [{"phase": "vae", "component": "dit", "device": "cpu"}]
    split = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match="spread over"):
        module_device(split)


def test_pab_under_compile_decides_outside_the_graph():
    """PAB decides per attention inside each block: its decision runs eagerly (torch.compiler.disable), the
    block graph breaks around the attention, and nothing recompiles across steps (traced, the step-dependent
    branch would recompile every block at every step until dynamo gives up)."""
    from easycache.pab import PAB, PABConfig

    torch.manual_seed(0)
    model = WanModel(WAN).eval()
    x, ctx = wan_inputs()
    steps, ts = 6, torch.linspace(999, 1, 6)

    def run():
        cache = PAB(PABConfig(), steps, timesteps=ts.tolist())
        outs = []
        for i in range(steps):
            assert cache.should_compute(i, x)
            v = model(x, ts[i : i + 1], ctx, cache=cache.hook("cond"))
            cache.update(x, {"cond": v})
            outs.append(v)
        return torch.stack(outs), cache.stats["attention"]

    with torch.no_grad():
        eager, eager_counts = run()
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(model, backend="aot_eager")
        run()
        first = dict(counters["stats"])
        out, counts = run()
    assert counts == eager_counts and counts["spatial"]["broadcast"] > 0  # the same broadcasts
    assert dict(counters["stats"]) == first and not counters["recompiles"]
    assert first["unique_graphs"] <= 4  # the block's pieces around its PAB calls, once
    assert ((out - eager).norm() / eager.norm()).item() < 1e-5  # aot_eager: fp32 rounding at most
