"""Sequence parallelism on 2 CPU ranks (gloo): Ulysses and ring attention, and the sharded DiTs, against one
process. Every rank computes the single-process reference itself (same process, same weights), so the
comparison is between the parallel and the plain path of the same code on the same machine."""

import copy
import dataclasses
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from benchmarks.loader_memory import write_checkpoint
from models.attention import attention
from models.fsdp import shard_model, sharded_fraction
from models.hunyuan import HunyuanVideoModel
from models.parallel import check_layout, init_sequence_parallel, register_cpu_flash_attention, valid_layouts
from models.wan import WanConfig, WanModel, cast_wan, load_wan
from tests.test_hunyuan_model import TINY as HUNYUAN_TINY
from tests.test_hunyuan_model import randomize_, tiny_inputs

WAN_T2V = WanConfig(text_len=8, dim=64, ffn_dim=128, text_dim=32, num_heads=4, num_layers=2)
WAN_I2V = dataclasses.replace(WAN_T2V, model_type="i2v", in_dim=8, out_dim=4)
LAYOUTS = {"ulysses": (2, 1), "ring": (1, 2)}


def spawn(worker, world: int, *args) -> list[dict]:
    """Run `worker(rank, world, init_file, out_dir, *args)` on `world` gloo ranks; their saved results."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), tmp, *args), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def init_gloo(rank: int, world: int, init_file: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def _worker(rank, world, init_file, out_dir, layout, ckpt):
    init_gloo(rank, world, init_file)
    sp = init_sequence_parallel(*layout, device=torch.device("cpu"), dtype=torch.float32)
    res = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Plain attention: 24 tokens, 4 heads.
        q, k, v = (torch.randn(2, 24, 4, 16, generator=g) for _ in range(3))
        out = sp.gather(sp.attention(*(sp.split(t, 1) for t in (q, k, v))), dim=1)
        res["attention"] = float((out - attention(q, k, v)).abs().max())
        # HunyuanVideo's joint "rear" attention: text queries on every rank, padded text keys left out.
        jq, jk, jv = (torch.randn(2, 6, 4, 16, generator=g) for _ in range(3))
        lens = torch.tensor([6, 3])
        ref = attention(torch.cat([q, jq], 1), torch.cat([k, jk], 1), torch.cat([v, jv], 1), k_lens=24 + lens)
        img, txt = sp.with_text_lens(lens).joint_attention(*(sp.split(t, 1) for t in (q, k, v)), jq, jk, jv)
        res["joint_image"] = float((sp.gather(img, dim=1) - ref[:, :24]).abs().max())
        res["joint_text"] = float((txt - ref[:, 24:]).abs().max())

        torch.manual_seed(1)
        wan = WanModel(WAN_T2V).eval()
        x, t, ctx = torch.randn(1, 16, 3, 8, 6), torch.tensor([700.0]), torch.randn(1, 5, 32)  # 36 tokens
        res["wan_t2v_out"] = wan(x, t, ctx, sp=sp)
        res["wan_t2v"] = _relative(res["wan_t2v_out"], wan(x, t, ctx))

        # FSDP2, alone and under the same sequence parallelism: each rank holds half of the weights.
        half = cast_wan(copy.deepcopy(wan), torch.bfloat16)  # bf16 with fp32 islands: two groups per block
        want = half(x, t, ctx)
        res["fsdp_bf16_equal"] = torch.equal(shard_model(half, half.blocks)(x, t, ctx), want)
        shard_model(wan, wan.blocks)
        res["fsdp_fraction"] = sharded_fraction(wan)
        res["fsdp_sp_equal"] = torch.equal(wan(x, t, ctx, sp=sp), res["wan_t2v_out"])

        i2v = WanModel(WAN_I2V).eval()
        x, y, clip = torch.randn(1, 4, 3, 8, 6), torch.randn(1, 4, 3, 8, 6), torch.randn(1, 5, 1280)
        res["wan_i2v"] = _relative(i2v(x, t, ctx, clip, y, sp=sp), i2v(x, t, ctx, clip, y))

        hy = HunyuanVideoModel(HUNYUAN_TINY).eval()
        randomize_(hy)
        inputs = tiny_inputs()  # batch 2, text lengths 7 and 4 of 7
        res["hunyuan"] = _relative(hy(*inputs, sp=sp), hy(*inputs))

        # --dit_fsdp's loader: sharded on the meta device, then each rank copies only its rows of every
        # tensor from the six-shard official layout (the cast happens in that copy).
        x, ctx = torch.randn(1, 16, 3, 8, 6), torch.randn(1, 5, 32)
        for dtype in (torch.float32, torch.bfloat16):
            whole = load_wan(ckpt, dtype=dtype)  # every rank the whole model: the reference
            sharded = load_wan(ckpt, dtype=dtype, fsdp=True)
            name = f"load_{str(dtype).split('.')[-1]}"
            res[f"{name}_fraction"] = sharded_fraction(sharded)
            res[f"{name}_dtensors"] = all(isinstance(p, DTensor) for p in sharded.parameters())
            full = {k: v.full_tensor() for k, v in sharded.state_dict().items()}
            res[f"{name}_weights"] = full.keys() == whole.state_dict().keys() and all(
                full[k].dtype == v.dtype and torch.equal(full[k], v) for k, v in whole.state_dict().items()
            )
            res[f"{name}_forward"] = torch.equal(sharded(x, t, ctx, sp=sp), whole(x, t, ctx, sp=sp))
            res[f"{name}_fraction_after"] = sharded_fraction(sharded)  # the root resharded too
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=list(LAYOUTS))
def results(request, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("wan_six_shards")
    write_checkpoint(str(ckpt), WAN_T2V)  # random fp32 weights in six shards + index, as the 14B ships
    return spawn(_worker, 2, LAYOUTS[request.param], str(ckpt))


def test_attention_equals_one_process(results):
    # fp32: the parallel path only reorders the softmax sums (ring: two blocks merged through their
    # log-sum-exp); a few ulps of the O(1) outputs. Measured here: <= 5e-7.
    for r in results:
        assert r["attention"] <= 1e-6
        assert r["joint_image"] <= 1e-6 and r["joint_text"] <= 1e-6


def test_sharded_dits_equal_unsharded(results):
    # Relative L2 over the whole output; the blocks compound the attention's ulp-level reordering.
    for r in results:
        assert r["wan_t2v"] <= 1e-5 and r["wan_i2v"] <= 1e-5 and r["hunyuan"] <= 1e-5
    # The gathered output is the same tensor on every rank: the cache's statistics agree by construction.
    assert torch.equal(results[0]["wan_t2v_out"], results[1]["wan_t2v_out"])


def test_fsdp_holds_half_the_weights_and_equals_unsharded(results):
    # FSDP2 only moves whole parameters around (all-gather of dim-0 chunks): bitwise, by construction.
    for r in results:
        assert r["fsdp_bf16_equal"] and r["fsdp_sp_equal"]
        assert 0.45 < r["fsdp_fraction"] <= 0.55  # 1/2, up to the padding of odd first dimensions


def test_fsdp_load_reads_each_ranks_half_and_equals_the_whole_load(results):
    for r in results:
        for name in ("load_float32", "load_bfloat16"):
            # Each rank's rows are the unsharded load's rows, cast element by element: bitwise by
            # construction; the forward all-gathers exactly those weights, same kernels: bitwise too.
            assert r[f"{name}_weights"] and r[f"{name}_forward"] and r[f"{name}_dtensors"], name
            assert 0.45 < r[f"{name}_fraction"] <= 0.55  # 1/2, up to odd first dimensions
            assert r[f"{name}_fraction_after"] == r[f"{name}_fraction"]  # still 1/2 after a forward


def test_layouts_are_checked_with_the_valid_ones_named():
    assert valid_layouts(8, 12) == [(1, 8), (2, 4), (4, 2)]
    check_layout(2, 4, 8, 12)
    with pytest.raises(ValueError, match="must equal the world size 4.*1x4, 2x2, 4x1"):
        check_layout(2, 1, 4, 12)
    with pytest.raises(ValueError, match="12 attention heads over 8.*1x8, 2x4, 4x2"):
        check_layout(8, 1, 8, 12)


def test_cpu_flash_kernel_returns_output_and_logsumexp():
    register_cpu_flash_attention()
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 8**0.5, dim=-1))


def test_sharded_safetensors_are_cast_tensor_by_tensor(tmp_path):
    from safetensors.torch import save_file

    from models.loading import load_sharded_safetensors

    state = {f"w{i}": torch.randn(3, 2) for i in range(5)}
    weight_map = {}
    for i, keys in enumerate((["w0", "w1"], ["w2"], ["w3", "w4"])):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: state[k] for k in keys}, str(tmp_path / name))
        weight_map.update(dict.fromkeys(keys, name))
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    seen = []
    loaded = load_sharded_safetensors(str(tmp_path), cast=lambda k, t: seen.append(k) or t.to(torch.bfloat16))
    assert sorted(seen) == sorted(state)  # every tensor once, cast as it was read
    assert all(
        loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], state[k].bfloat16()) for k in state
    )
