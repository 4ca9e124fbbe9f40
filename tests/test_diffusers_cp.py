"""easycache.diffusers under diffusers' context parallelism (Ulysses, 2 ranks, gloo, CPU).

The hook sits on the transformer, outside the split/gather of diffusers' context-parallel plan, so it sees
the whole latent and the whole output on every rank; each rank then decides on the same tensors, and rank 0's
decision is broadcast anyway (a rank that skipped while another computes would hang in the attention's
all-to-all).
"""

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers")

from easycache import EasyCacheConfig  # noqa: E402
from easycache.diffusers import apply_easycache, get_easycache, remove_easycache  # noqa: E402
from tests.test_diffusers_hook import PROMPT, SIZE, TEXT_LEN, wan_components  # noqa: E402

STEPS, CONFIG = 16, EasyCacheConfig(thresh=0.05, warmup=4)


def sample(pipe) -> torch.Tensor:
    out = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), max_sequence_length=TEXT_LEN, output_type="latent",
               **SIZE)  # fmt: skip
    return out.frames


def hooked_run(pipe, config: EasyCacheConfig) -> dict:
    apply_easycache(pipe.transformer, config, num_inference_steps=STEPS)
    try:
        latents = sample(pipe)
        cache = get_easycache(pipe.transformer)
    finally:
        remove_easycache(pipe.transformer)
    return {"latents": latents, "trace": cache.trace, "shape": tuple(cache._shape)}


def _worker(rank: int, world: int, root: str):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=world)
    from diffusers import ContextParallelConfig, WanPipeline

    # TEST-ONLY STAND-IN (not monkeypatching project code): diffusers 0.42.1 picks its device as
    # `rank % torch.accelerator.device_count()`, which is 0 with a CPU-only torch (spec/parallel.md).
    torch.accelerator.device_count = lambda: 1
    pipe = WanPipeline(**wan_components(Path(root) / f"rank{rank}"))  # same seeds: the same weights
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    same = hooked_run(pipe, CONFIG)
    # Rank 1 with a threshold that would skip almost everything: it must follow rank 0 (else: a hang).
    other = hooked_run(pipe, CONFIG if rank == 0 else EasyCacheConfig(thresh=10.0, warmup=4))
    torch.save({"same": same, "other": other}, os.path.join(root, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_context_parallel_ranks_see_full_tensors_and_agree(tmp_path):
    from diffusers import WanPipeline

    pipe = WanPipeline(**wan_components(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    want = hooked_run(pipe, CONFIG)
    assert any(not r["compute"] for r in want["trace"])
    with tempfile.TemporaryDirectory() as root:
        mp.spawn(_worker, args=(2, root), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    decisions = [r["compute"] for r in want["trace"]]
    for res in ranks:
        assert res["same"]["shape"] == want["shape"] == tuple(want["latents"].shape)  # the full latent
        assert [r["compute"] for r in res["same"]["trace"]] == decisions
        # Ulysses moves whole heads between ranks, so each head's attention is the single-process one;
        # measured bit-identical here, the tolerance only covers a different all-to-all reduction order.
        torch.testing.assert_close(res["same"]["latents"], want["latents"], rtol=1e-5, atol=1e-6)
    rank0, rank1 = (res["other"]["trace"] for res in ranks)
    assert [r["compute"] for r in rank1] == [r["compute"] for r in rank0] == decisions
    # rank 1 decided otherwise and followed rank 0 (StepCache's decision broadcast: "rank0_compute"/"_reuse")
    assert any(r["reason"] in ("rank0_compute", "rank0_reuse") for r in rank1)
