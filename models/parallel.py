"""Sequence parallelism for the DiTs: Ulysses and ring attention (yunchang), and the helpers around them.

The official Wan2.1 and HunyuanVideo code reaches yunchang through xDiT (`xFuserLongContextAttention`
subclasses yunchang's `LongContextAttention`) and takes the sequence-parallel group, rank, world size and
all-gather from xDiT too. xDiT does not import without a GPU and its releases do not match PyPI yunchang, so
the few helpers it provides are written here; the attention itself is yunchang's `LongContextAttention`.

Layout: every rank holds 1/P of the video tokens (P = ulysses_size · ring_size = world size). In attention,
Ulysses exchanges heads for tokens (all-to-all within groups of `ulysses_size` consecutive ranks: each rank
then holds every token of that group for heads/U heads), and ring attention passes key/value blocks around
groups of `ring_size` ranks, merging partial softmaxes through their log-sum-exp. Nothing else in a DiT
block mixes tokens, so the blocks run on the local tokens unchanged.

Shapes: q, k, v [B, L/P, N, Dh] (local tokens, all heads) -> [B, L/P, N, Dh]; joint (text) tokens
[B, T, N, Dh] are the same on every rank.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# yunchang's kernels by name; "torch_math" is accepted only to be refused clearly under ring attention.
ATTN_TYPES = ("fa", "fa3", "torch_flash", "torch_math")


def valid_layouts(world_size: int, num_heads: int) -> list[tuple[int, int]]:
    """(ulysses_size, ring_size) pairs that fit `world_size` ranks and a model with `num_heads` heads."""
    return [
        (u, world_size // u) for u in range(1, world_size + 1) if not world_size % u and not num_heads % u
    ]


def check_layout(ulysses_size: int, ring_size: int, world_size: int, num_heads: int) -> None:
    """Refuse a sequence-parallel layout that cannot run, naming those that can (before any model loads)."""
    valid = ", ".join(f"{u}x{r}" for u, r in valid_layouts(world_size, num_heads))
    hint = f"valid ulysses x ring layouts for {world_size} rank(s) and {num_heads} heads: {valid}"
    if ulysses_size < 1 or ring_size < 1:
        raise ValueError(f"ulysses and ring sizes must be >= 1, got {ulysses_size} and {ring_size}")
    if ulysses_size * ring_size != world_size:
        raise ValueError(
            f"ulysses size {ulysses_size} x ring size {ring_size} must equal the world size {world_size} "
            f"(torchrun --nproc_per_node); {hint}"
        )
    if num_heads % ulysses_size:
        raise ValueError(
            f"Ulysses splits the {num_heads} attention heads over {ulysses_size} ranks, which does not "
            f"divide them; use ring attention for the rest: {hint}"
        )


@functools.cache
def register_cpu_flash_attention() -> torch.library.Library:
    """Give `aten::_scaled_dot_product_flash_attention` a CPU kernel (yunchang's "torch_flash" calls it for
    the per-block output *and* log-sum-exp that ring attention merges). torch has the same computation for
    CPU under another name, `_scaled_dot_product_flash_attention_for_cpu`; this registers it. Called once at
    set-up (cached: the registration lives as long as the process); never at import."""
    lib = torch.library.Library("aten", "IMPL")

    def flash_cpu(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, scale=scale
        )  # [B, N, Lq, Dh], [B, N, Lq] fp32
        empty = query.new_empty(0, dtype=torch.int64)
        # The remaining outputs only matter to the CUDA backward (varlen offsets, rng state, debug mask).
        return out, lse, empty, empty, query.shape[2], key.shape[2], empty, empty, query.new_empty(0)

    lib.impl("_scaled_dot_product_flash_attention", flash_cpu, "CPU")
    return lib


def default_attn_type(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attn ("fa") on CUDA when installed, else torch's flash kernel (a CPU one is registered)."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            if dtype == torch.float32:
                raise ValueError(
                    "sequence parallelism on CUDA without flash-attn needs bf16 or fp16 (torch's flash "
                    "kernel); install flash-attn or pick a half-precision dtype"
                ) from None
            return "torch_flash"
        return "fa"
    return "torch_flash"


def check_parallel_attention(attention: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse, before anything loads, what a sequence-parallel run could not honour: under Ulysses/ring the
    self-attention runs yunchang's kernel (default_attn_type), so `--attention sage` would only reach the
    cross-attention; and CUDA without flash-attn needs a half dtype (default_attn_type raises)."""
    if attention == "sage":
        raise ValueError(
            "--attention sage cannot run sequence-parallel self-attention (yunchang runs flash-attn or "
            "torch's flash kernel there); drop --attention or use auto/flash"
        )
    default_attn_type(torch.device(device), dtype)


@dataclass
class SequenceParallel:
    """One sequence-parallel layout over all ranks: how tokens are split, gathered and attended.

    Build it with `init_sequence_parallel` after `dist.init_process_group`. `text_lens` is set per forward
    (`with_text_lens`) by models that join text tokens to the attention (HunyuanVideo)."""

    ulysses_size: int
    ring_size: int
    attn_type: str
    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None  # None: the default (world) group
    text_lens: tuple[int, ...] | None = None  # valid text tokens per sample, for joint_attention
    _attn: torch.nn.Module | None = dataclasses.field(default=None, repr=False)

    # --------------------------------------------------------------------------------------------------
    # Tokens: split, pad, gather
    # --------------------------------------------------------------------------------------------------
    def split(self, x: Tensor, dim: int) -> Tensor:
        """This rank's 1/P of `x` along `dim`, which must divide evenly (contiguous chunks in rank order)."""
        if x.shape[dim] % self.world_size:
            raise ValueError(f"cannot split {x.shape[dim]} evenly over {self.world_size} ranks")
        # A copy with its own packed strides, not a view into the whole: torch.compile guards on strides, so
        # a view would give the first compiled block a second graph (--compile). Same values, same maths.
        return x.chunk(self.world_size, dim=dim)[self.rank].clone(memory_format=torch.contiguous_format)

    def padded_length(self, length: int) -> int:
        """`length` rounded up to a multiple of P, as the official Wan pads its token sequence."""
        return -(-length // self.world_size) * self.world_size

    def gather(self, x: Tensor, dim: int) -> Tensor:
        """Concatenate every rank's `x` along `dim` in rank order; the result is identical on every rank."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def with_text_lens(self, text_lens: Tensor) -> SequenceParallel:
        """A copy that knows the valid text length of every sample (one host sync per forward, not per
        block)."""
        return dataclasses.replace(self, text_lens=tuple(int(n) for n in text_lens.tolist()))

    # --------------------------------------------------------------------------------------------------
    # Attention
    # --------------------------------------------------------------------------------------------------
    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Softmax attention of the local queries over the keys of *all* ranks: [B, L/P, N, Dh] each."""
        return self._attn(q, k, v)  # [B, L/P, N, Dh]

    def joint_attention(
        self, q: Tensor, k: Tensor, v: Tensor, jq: Tensor, jk: Tensor, jv: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Attention over [all image tokens; valid text tokens] for the local image queries `q` [B, N/P, A,
        d] and every text query `jq` [B, T, A, d] (text replicated on every rank), as xDiT's
        joint_strategy="rear" that the official HunyuanVideo uses. Returns ([B, N/P, A, d], [B, T, A, d]).

        The image part goes through Ulysses and ring attention; the text keys are added once, by merging
        the attention to them (heads of this Ulysses rank) with the ring result through the log-sum-exp
        (the merge ring attention itself does). Padded text keys (beyond `text_lens`) are left out, as the
        single-process model's key lengths do.
        """
        from yunchang.comm.all_to_all import SeqAllToAll4D
        from yunchang.kernels import select_flash_attn_impl
        from yunchang.ring.utils import update_out_and_lse

        if self.attn_type == "torch_math":  # its zero log-sum-exp would weigh the text wrongly
            raise ValueError("joint (text) attention needs a kernel with a log-sum-exp, not torch_math")
        attn, n_local = self._attn, q.shape[1]
        ulysses = attn.ulysses_pg
        q_all = torch.cat([q, jq], dim=1)  # [B, N/P + T, A, d] "rear": text queries after the image ones
        # Ulysses: [B, S, A, d] -> [B, U·S, A/U, d] (tokens of the group's ranks, this rank's heads)
        q_u, k_u, v_u = (SeqAllToAll4D.apply(ulysses, t, 2, 1, False) for t in (q_all, k, v))
        out, lse, _ = attn.ring_attn_fn(
            q_u, k_u, v_u, return_attn_probs=True, group=attn.ring_pg, attn_type=attn.attn_type
        )  # [B, U·S, A/U, d], [B, A/U, U·S]
        heads = q_u.shape[2]
        u_rank = dist.get_rank(ulysses)
        jk, jv = (t[:, :, u_rank * heads : (u_rank + 1) * heads] for t in (jk, jv))  # [B, T, A/U, d]
        kernel = select_flash_attn_impl(attn.attn_type, stage="fwd-only")
        merged = []
        for b, n_text in enumerate(self.text_lens or (jk.shape[1],) * jk.shape[0]):
            block_out, block_lse = kernel(
                q_u[b : b + 1], jk[b : b + 1, :n_text], jv[b : b + 1, :n_text], causal=False
            )  # [1, U·S, A/U, d], [1, A/U, U·S]
            o, _ = update_out_and_lse(
                out[b : b + 1].float(),
                lse[b : b + 1].float().transpose(1, 2).unsqueeze(-1),
                block_out,
                block_lse,
            )  # running lse as [1, U·S, A/U, 1], as yunchang's ring keeps it
            merged.append(o.to(q.dtype))
        out = SeqAllToAll4D.apply(ulysses, torch.cat(merged), 1, 2, False)  # [B, N/P + T, A, d]
        return out[:, :n_local], out[:, n_local:]


def init_sequence_parallel(
    ulysses_size: int,
    ring_size: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_type: str | None = None,
) -> SequenceParallel:
    """Set up Ulysses x ring groups over all ranks (after `dist.init_process_group`, on every rank).

    Args:
        ulysses_size, ring_size: their product must be the world size (the official flags' rule).
        device, dtype: pick the attention kernel (see default_attn_type) unless `attn_type` is given.
        attn_type: one of ATTN_TYPES. "torch_math" is refused with ring_size > 1: yunchang's math path
            returns a zero log-sum-exp, so the ring merge is silently wrong.
    """
    import yunchang
    from yunchang import LongContextAttention
    from yunchang.kernels import AttnType

    if not dist.is_initialized():
        raise RuntimeError("init_sequence_parallel needs torch.distributed initialised (run under torchrun)")
    rank, world = dist.get_rank(), dist.get_world_size()
    if ulysses_size * ring_size != world:
        raise ValueError(f"ulysses {ulysses_size} x ring {ring_size} != world size {world}")
    attn_type = attn_type or default_attn_type(device, dtype)
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
    if attn_type == "torch_math" and ring_size > 1:
        raise ValueError(
            "ring attention cannot use yunchang's torch_math kernel: it returns no log-sum-exp, so the ring "
            "merge is wrong without an error; use torch_flash (CPU) or fa/fa3 (CUDA)"
        )
    if attn_type == "torch_flash" and device.type == "cpu":
        register_cpu_flash_attention()
    # yunchang keeps its groups in a module-level singleton that LongContextAttention reads when built.
    yunchang.set_seq_parallel_pg(ulysses_size, ring_size, rank, world)
    # LongContextAttention, not yunchang's UlyssesAttention: the latter runs a ring over the whole world
    # after its all-to-all with torch kernels (wrong results).
    attn = LongContextAttention(ring_impl_type="basic", attn_type=AttnType.from_string(attn_type))
    return SequenceParallel(ulysses_size, ring_size, attn_type, rank, world, _attn=attn)


# ---------------------------------------------------------------------------------------------------------
# Launching under torchrun
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch (world_size 1 without torchrun)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, writes the video and the report."""
        return self.rank == 0

    def broadcast(self, value):
        """Rank 0's value of a small picklable object (e.g. a seed drawn at random), on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def launch_world_size() -> int:
    """The world size torchrun announces in the environment (1 when not launched by torchrun); readable
    before any process group exists, so that bad layouts are refused before anything loads."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: str) -> Launch:
    """Join the torchrun process group (NCCL on CUDA, one GPU per local rank; gloo on the CPU)."""
    world = launch_world_size()
    if world == 1:
        return Launch(0, 1, torch.device(device))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Launch(dist.get_rank(), dist.get_world_size(), dev)
