"""Wan2.1's text encoder: the umT5-XXL encoder of `models_t5_umt5-xxl-enc-bf16.pth`, run as transformers'
`UMT5EncoderModel`, plus the official prompt cleaning and the trim to each prompt's true token count.

The official file holds the state dict of the repo's own `T5Encoder` (wan/modules/t5.py). Its maths is that of
`UMT5EncoderModel`, so we rename the keys at load time instead of keeping a second T5:
    - RMSNorm (no mean, no bias, eps 1e-6) computed in fp32, cast back to bf16 before the weight multiply
    - attention scores NOT scaled by head_dim^-0.5; a learned relative position bias in EVERY layer
      (umT5's `shared_pos=False`; 32 buckets, 16 per direction, log-spaced up to distance 128)
    - FFN fc2(fc1(x) * gelu_tanh(gate(x))): transformers' "gated-gelu" = wi_1 * gelu_new(wi_0)
    - unscaled token embedding; a final RMSNorm after the last block
The key table is `_TOP_KEYS` / `_BLOCK_KEYS`; tests/test_wan_t5.py proves parity with the official forward.

Letters in shape comments:
    B  prompts in a batch        L  padded token count (text_len, 512)
    Li true token count of prompt i (incl. EOS)        D  model width (dim, 4096)
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass

import ftfy
import torch
from torch import Tensor
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from models.loading import load_file_state_dict, load_strict, require_files

WAN_T5_REPO = "Wan-AI/Wan2.1-T2V-1.3B"  # every Wan2.1 repo ships the same T5 file and tokenizer folder

# `sample_neg_prompt` of wan/configs/shared_config.py: used when no negative prompt is given.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class WanT5Config:
    """umT5 encoder sizes under the official names (`umt5_xxl()` / `T5Encoder` in wan/modules/t5.py)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096  # num_heads * head_dim (64 * 64)
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32  # relative-position buckets, half per direction (the encoder is bidirectional)
    max_dist: int = 128  # T5RelativeEmbedding's default: distances >= 128 share the last bucket
    eps: float = 1e-6  # T5LayerNorm's default

    def __post_init__(self):
        sizes = {k: getattr(self, k) for k in ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads")}
        sizes |= {"num_layers": self.num_layers, "num_buckets": self.num_buckets, "max_dist": self.max_dist}
        bad = [f"{k}={v}" for k, v in sizes.items() if not isinstance(v, int) or v <= 0]
        if bad:
            raise ValueError(f"WanT5Config sizes must be positive integers: {', '.join(bad)}")
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn={self.dim_attn} must be a multiple of num_heads={self.num_heads}")

    def to_umt5_config(self) -> UMT5Config:
        """The transformers config of the same encoder."""
        return UMT5Config(
            vocab_size=self.vocab_size,
            d_model=self.dim,
            d_kv=self.dim_attn // self.num_heads,
            d_ff=self.dim_ffn,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_dist,
            layer_norm_epsilon=self.eps,
            feed_forward_proj="gated-gelu",  # -> dense_act_fn "gelu_new", the official tanh GELU
            pad_token_id=0,
            eos_token_id=1,
            # eager = the official op order (scores + bias + mask, softmax, @ v); SDPA would fuse the
            # [B, H, L, L] bias into a kernel with its own rounding in bf16.
            attn_implementation="eager",
        )


UMT5_XXL = WanT5Config()
# The embedded demo model's encoder (train_wan_tiny.py): same architecture, random weights from a seed, and a
# word-level tokenizer over its caption grammar (checkpoints/wan-tiny/google/umt5-xxl/).
UMT5_TINY = WanT5Config(vocab_size=32, dim=64, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=2)

# Official key -> transformers key. The FFN's `gate` (GELU branch) is wi_0, its linear branch `fc1` is wi_1.
_TOP_KEYS = {
    "token_embedding.weight": "encoder.embed_tokens.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_BLOCK_KEYS = {  # blocks.{i}.<official> -> encoder.block.{i}.<transformers>
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def official_t5_shapes(config: WanT5Config = UMT5_XXL) -> dict[str, tuple[int, ...]]:
    """Every key of the official `T5Encoder` state dict with its shape, in the official order."""
    c = config
    block = {
        "norm1.weight": (c.dim,),
        "attn.q.weight": (c.dim_attn, c.dim),
        "attn.k.weight": (c.dim_attn, c.dim),
        "attn.v.weight": (c.dim_attn, c.dim),
        "attn.o.weight": (c.dim, c.dim_attn),
        "norm2.weight": (c.dim,),
        "ffn.gate.0.weight": (c.dim_ffn, c.dim),
        "ffn.fc1.weight": (c.dim_ffn, c.dim),
        "ffn.fc2.weight": (c.dim, c.dim_ffn),
        "pos_embedding.embedding.weight": (c.num_buckets, c.num_heads),
    }
    shapes = {"token_embedding.weight": (c.vocab_size, c.dim)}
    for i in range(c.num_layers):
        shapes |= {f"blocks.{i}.{k}": s for k, s in block.items()}
    shapes["norm.weight"] = (c.dim,)
    return shapes


def _check_keys(state_dict: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key."""
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{source} should hold a state dict (name -> tensor), found {type(state_dict).__name__}"
        )
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    shapes = [
        f"{k}: {tuple(v.shape)}, expected {expected[k]}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    groups = {"missing": missing, "unexpected": unexpected, "mis-shaped": shapes}
    problems = [
        f"{len(items)} {title} keys: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
        for title, items in groups.items()
        if items
    ]
    if problems:
        raise ValueError(f"{source} is not a Wan umT5 encoder of this config:\n  " + "\n  ".join(problems))


def convert_official_umt5(
    state_dict: dict[str, Tensor], config: WanT5Config = UMT5_XXL, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """Official `T5Encoder` keys -> `UMT5EncoderModel` keys, after checking every key and shape."""
    _check_keys(state_dict, official_t5_shapes(config), source)
    out = {}
    for key, tensor in state_dict.items():
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = tensor
        else:
            _, i, rest = key.split(".", 2)  # blocks.{i}.{rest}
            out[f"encoder.block.{i}.{_BLOCK_KEYS[rest]}"] = tensor
    out["shared.weight"] = out["encoder.embed_tokens.weight"]  # transformers ties the two; same tensor
    return out


def convert_umt5_to_official(
    state_dict: dict[str, Tensor], config: WanT5Config = UMT5_XXL
) -> dict[str, Tensor]:
    """The inverse of `convert_official_umt5` (tests use it to write official-layout files)."""
    top = {v: k for k, v in _TOP_KEYS.items()}
    block = {v: k for k, v in _BLOCK_KEYS.items()}
    state_dict = dict(state_dict)
    shared = state_dict.pop("shared.weight", None)
    if shared is not None and not torch.equal(shared, state_dict.get("encoder.embed_tokens.weight", shared)):
        raise ValueError(
            "shared.weight and encoder.embed_tokens.weight differ; the official file has one embedding"
        )
    out = {}
    for key, tensor in state_dict.items():
        parts = key.split(".", 3)  # encoder.block.{i}.{rest}
        if key in top:
            out[top[key]] = tensor
        elif len(parts) == 4 and parts[:2] == ["encoder", "block"] and parts[3] in block:
            out[f"blocks.{parts[2]}.{block[parts[3]]}"] = tensor
        else:
            raise ValueError(f"{key} has no official umT5 counterpart")
    expected = official_t5_shapes(config)
    _check_keys(out, expected, "converted state dict")
    return {k: out[k] for k in expected}  # the official file's key order


def load_umt5_encoder(
    path: str,
    config: WanT5Config = UMT5_XXL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> UMT5EncoderModel:
    """The official `models_t5_umt5-xxl-enc-bf16.pth` as an eval-mode `UMT5EncoderModel` on device/dtype."""
    state_dict = convert_official_umt5(load_file_state_dict(path), config, source=path)
    with torch.device("meta"):  # no 11 GB random init; the loaded tensors are assigned in place
        model = UMT5EncoderModel(config.to_umt5_config())
    load_strict(model, state_dict, source=path)
    # assign=True gave the two embedding modules separate Parameters; re-tie so .to() makes one copy, not two
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def clean_prompt(text: str) -> str:
    """The official cleaning: `whitespace_clean(basic_clean(text))` of wan/modules/tokenizers.py (the encoder
    uses clean="whitespace"): fix mojibake, undo HTML escaping twice, collapse whitespace runs, strip."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    # The official code uses the `regex` module; its \s differs from re's only on U+001C..U+001F, which
    # ftfy.fix_text has already removed (and html.unescape never produces).
    return re.sub(r"\s+", " ", text).strip()


def pad_context(contexts: list[Tensor], length: int | None = None) -> Tensor:
    """Zero-pad per-prompt contexts [Li, D] into one batch [B, length, D] (length defaults to the longest)."""
    if not contexts or any(u.ndim != 2 or u.shape[1] != contexts[0].shape[1] for u in contexts):
        raise ValueError(
            f"pad_context needs a non-empty list of [Li, D] tensors, got {[tuple(u.shape) for u in contexts]}"
        )
    longest = max(u.shape[0] for u in contexts)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a context has {longest} tokens, more than length={length}; raise length")
    padded = [torch.cat([u, u.new_zeros(length - u.shape[0], u.shape[1])]) for u in contexts]  # B x [L, D]
    return torch.stack(padded)  # [B, L, D]


class WanTextEncoder:
    """Prompts -> per-prompt umT5 hidden states [Li, D], exactly as the official `T5EncoderModel.__call__`."""

    def __init__(self, tokenizer, model: UMT5EncoderModel, text_len: int = 512):
        if text_len <= 0:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.tokenizer, self.model, self.text_len = tokenizer, model, text_len

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str,
        *,
        config: WanT5Config = UMT5_XXL,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        text_len: int = 512,
        tokenizer_subdir: str = "google/umt5-xxl",
        weights: str = "models_t5_umt5-xxl-enc-bf16.pth",
    ) -> WanTextEncoder:
        """Tokenizer from <ckpt_dir>/<tokenizer_subdir>, encoder from <ckpt_dir>/<weights> (official layout).
        `device="cpu"` keeps the encoder off the GPU (the official `--t5_cpu`)."""
        tokenizer_dir = os.path.join(ckpt_dir, tokenizer_subdir)
        require_files(
            ckpt_dir, [weights, os.path.join(tokenizer_subdir, "tokenizer_config.json")], repo_id=WAN_T5_REPO
        )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if len(tokenizer) > config.vocab_size:
            raise ValueError(
                f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens, "
                f"the encoder only {config.vocab_size}"
            )
        model = load_umt5_encoder(os.path.join(ckpt_dir, weights), config, device=device, dtype=dtype)
        return cls(tokenizer, model, text_len)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> list[Tensor]:
        """One [Li, D] tensor per prompt: the final hidden states of its Li real tokens (EOS included)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(
                "WanTextEncoder takes a non-empty list of prompt strings, e.g. encoder([prompt])"
            )
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,  # appends EOS, which stays part of the context
            return_tensors="pt",
        )
        device = self.model.device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)  # [B, L], [B, L]
        seq_lens = mask.gt(0).sum(dim=1)  # [B]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        return [u[:n] for u, n in zip(hidden, seq_lens.tolist())]  # B x [Li, D]
