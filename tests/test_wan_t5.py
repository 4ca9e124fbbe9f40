"""Wan2.1's umT5 text encoder: official-key conversion, parity with the official forward and with
transformers' UMT5EncoderModel, prompts end to end on a tiny official-layout checkpoint, cleaning, errors.

tests/data/wan_t5_keys.txt: `key<TAB>shape` of the official `T5Encoder` state dict, written by instantiating
    wan/modules/t5.py (Wan-Video/Wan2.1 @9737cba) on the meta device with the umt5_xxl() sizes
    (vocab 256384, dim 4096, dim_attn 4096, dim_ffn 10240, 64 heads, 24 layers, 32 buckets, shared_pos=False).
tests/data/wan_t5_golden.safetensors: the official forward on a tiny random config, recorded in a scratch dir
    outside the project with wan/modules/t5.py (default `device=torch.cuda.current_device()` set to "cpu"):
        torch.manual_seed(0)
        off = T5Encoder(vocab=48, dim=16, dim_attn=16, dim_ffn=24, num_heads=2, num_layers=2, num_buckets=32,
                        shared_pos=False).eval()
        every "norm" weight *= 1 + 0.3 * randn; every "pos_embedding" weight ~ N(0, 1)   (in that order)
        ids = randint(3, 48, (2, 150)); mask = ones; mask[1, 40:] = 0; ids[1, 40:] = 0   (150 > max_dist 128)
        saved: "official.<key>" = off.state_dict(), "input_ids" = ids, "attention_mask" = mask,
               "last_hidden_state" = off(ids, mask)
"""

import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from models.wan_t5 import (
    UMT5_XXL,
    WAN_NEGATIVE_PROMPT,
    WanT5Config,
    WanTextEncoder,
    clean_prompt,
    convert_official_umt5,
    convert_umt5_to_official,
    load_umt5_encoder,
    official_t5_shapes,
    pad_context,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
WEIGHTS = "models_t5_umt5-xxl-enc-bf16.pth"
GOLDEN_CONFIG = WanT5Config(vocab_size=48, dim=16, dim_attn=16, dim_ffn=24, num_heads=2, num_layers=2)
TINY = WanT5Config(
    vocab_size=32, dim=16, dim_attn=24, dim_ffn=20, num_heads=3, num_layers=2
)  # dim_attn != dim
CORPUS = ["a cat walks on the grass", "a dog runs & jumps over the red fence"]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_reference_umt5(config: WanT5Config) -> UMT5EncoderModel:
    """A random transformers UMT5 encoder, configured by hand (not through WanT5Config.to_umt5_config)."""
    ref = UMT5EncoderModel(
        UMT5Config(
            vocab_size=config.vocab_size,
            d_model=config.dim,
            d_kv=config.dim_attn // config.num_heads,
            d_ff=config.dim_ffn,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
        )
    ).eval()
    with torch.no_grad():  # norms start at 1 and would hide a norm mix-up; make them and the biases distinct
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
            if "relative_attention_bias" in name:
                p.normal_(0, 1.0)
    return ref


def write_tokenizer(path: str) -> None:
    """A word-level tokenizer trained on CORPUS: T5's special ids (<pad> 0, </s> 1, <unk> 2), EOS appended."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """The official layout: <dir>/models_t5_umt5-xxl-enc-bf16.pth + <dir>/google/umt5-xxl/ (tokenizer)."""
    root = tmp_path_factory.mktemp("wan_ckpt")
    write_tokenizer(str(root / "google" / "umt5-xxl"))
    torch.manual_seed(1)
    torch.save(convert_umt5_to_official(tiny_reference_umt5(TINY).state_dict(), TINY), root / WEIGHTS)
    return str(root)


@pytest.fixture(scope="module")
def encoder(ckpt_dir):
    return WanTextEncoder.from_checkpoint(ckpt_dir, config=TINY, dtype=torch.float32, text_len=16)


# ---------------------------------------------------------------- keys and conversion


def test_official_key_list_and_shapes():
    with open(os.path.join(DATA, "wan_t5_keys.txt")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    official = {k: tuple(int(d) for d in s.split(",")) for k, s in rows}
    assert len(official) == 242
    assert list(official.items()) == list(official_t5_shapes(UMT5_XXL).items())


def test_full_size_conversion_matches_umt5_on_meta():
    meta = {k: torch.empty(s, device="meta", dtype=torch.bfloat16) for k, s in official_t5_shapes().items()}
    converted = convert_official_umt5(meta)
    hf_config = UMT5_XXL.to_umt5_config()
    assert (hf_config.d_kv, hf_config.dense_act_fn, hf_config.is_gated_act) == (64, "gelu_new", True)
    with torch.device("meta"):
        model = UMT5EncoderModel(hf_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert converted["shared.weight"] is converted["encoder.embed_tokens.weight"]


def test_conversion_round_trip():
    torch.manual_seed(0)
    hf = tiny_reference_umt5(TINY).state_dict()
    official = convert_umt5_to_official(hf, TINY)
    assert list(official) == list(official_t5_shapes(TINY))
    back = convert_official_umt5(official, TINY)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    # the FFN's GELU branch is official `gate`, its linear branch `fc1`
    assert torch.equal(
        official["blocks.1.ffn.gate.0.weight"], hf["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    )
    assert torch.equal(
        official["blocks.1.ffn.fc1.weight"], hf["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    )


# ---------------------------------------------------------------- numerics


def test_matches_official_t5_forward_golden(tmp_path):
    golden = load_file(os.path.join(DATA, "wan_t5_golden.safetensors"))
    weights = {k.removeprefix("official."): v for k, v in golden.items() if k.startswith("official.")}
    torch.save(weights, tmp_path / WEIGHTS)
    model = load_umt5_encoder(str(tmp_path / WEIGHTS), GOLDEN_CONFIG, dtype=torch.float32)
    assert not model.training and model.shared.weight is model.encoder.embed_tokens.weight
    with torch.no_grad():
        out = model(input_ids=golden["input_ids"], attention_mask=golden["attention_mask"]).last_hidden_state
    assert out.shape == (2, 150, 16)
    assert rel_err(out, golden["last_hidden_state"]) <= 1e-5
    assert rel_err(out[1, :40], golden["last_hidden_state"][1, :40]) <= 1e-5  # the rows the encoder keeps


def test_matches_reference_umt5(tmp_path):
    ref = tiny_reference_umt5(TINY)
    torch.save(convert_umt5_to_official(ref.state_dict(), TINY), tmp_path / WEIGHTS)
    model = load_umt5_encoder(str(tmp_path / WEIGHTS), TINY, dtype=torch.float32)
    ids = torch.randint(3, TINY.vocab_size, (2, 140))  # 140 > max_dist 128
    mask = torch.ones_like(ids)
    mask[0, 25:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_err(got[0, :25], want[0, :25]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5


# ---------------------------------------------------------------- prompts end to end


def test_trimmed_lengths_are_true_token_counts(encoder):
    prompts = ["a cat walks", "a dog runs on the red grass", "a"]
    contexts = encoder(prompts)
    assert [tuple(u.shape) for u in contexts] == [(len(p.split()) + 1, TINY.dim) for p in prompts]  # + EOS
    long = " ".join(["a cat"] * 20)  # 40 words: truncated to text_len, EOS kept
    assert encoder([long])[0].shape == (16, TINY.dim)


def test_padding_and_batching_leave_valid_rows_unchanged(encoder):
    prompt, other = "a dog jumps over the fence", "a cat walks on the grass a dog runs"
    alone = encoder([prompt])[0]
    longer_pad = WanTextEncoder(encoder.tokenizer, encoder.model, text_len=40)([prompt])[0]
    batched = encoder([other, prompt])[1]
    assert alone.shape == (7, TINY.dim)
    assert rel_err(longer_pad, alone) <= 1e-5 and rel_err(batched, alone) <= 1e-5
    assert rel_err(encoder([other])[0][:7], alone) > 1e-2  # while a different prompt does change them


def test_prompts_are_cleaned_before_tokenising(encoder):
    messy, clean = encoder(["  a &amp;amp;\n\tdog  "])[0], encoder(["a & dog"])[0]
    assert messy.shape == (4, TINY.dim) and torch.equal(messy, clean)


def test_pad_context(encoder):
    contexts = encoder(["a cat", "a dog runs on the grass"])
    batch = pad_context(contexts)
    assert batch.shape == (2, 7, TINY.dim)
    assert (
        torch.equal(batch[0, :3], contexts[0])
        and not batch[0, 3:].any()
        and torch.equal(batch[1], contexts[1])
    )
    assert pad_context(contexts, length=512).shape == (2, 512, TINY.dim)
    with pytest.raises(ValueError, match="raise length"):
        pad_context(contexts, length=5)
    with pytest.raises(ValueError, match="non-empty"):
        pad_context([])


# ---------------------------------------------------------------- cleaning


@pytest.mark.parametrize(
    "text, want",
    [
        ("&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &quot;x&quot;", '<b>bold</b> "x"'),  # HTML escaped twice
        ("cafÃ© crÃ¨me", "café crème"),  # UTF-8 read as Latin-1 (mojibake), fixed by ftfy
        ("  a\t\n  cat \u3000 walks\r\n", "a cat walks"),  # whitespace runs (incl. ideographic space)
        ("a\x1c b", "a b"),  # ftfy drops this control char (the official `regex` \s would not match it)
        ("“quoted” ＦＵＬＬ", '"quoted" FULL'),  # ftfy uncurls quotes and narrows full-width Latin
    ],
)
def test_clean_prompt(text, want):
    assert clean_prompt(text) == want


def test_negative_prompt_is_the_official_string():
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and WAN_NEGATIVE_PROMPT.endswith(
        "背景人很多，倒着走"
    )
    assert len(WAN_NEGATIVE_PROMPT) == 137
    # ftfy turns the full-width commas into ASCII ones: the official encoder sees "色调艳丽,过曝,..."
    assert clean_prompt(WAN_NEGATIVE_PROMPT) == WAN_NEGATIVE_PROMPT.replace("，", ",")


# ---------------------------------------------------------------- errors


def test_missing_files(tmp_path, ckpt_dir):
    write_tokenizer(str(tmp_path / "google" / "umt5-xxl"))
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        WanTextEncoder.from_checkpoint(str(tmp_path), config=TINY)
    os.rename(tmp_path / "google", tmp_path / "elsewhere")
    os.symlink(os.path.join(ckpt_dir, WEIGHTS), tmp_path / WEIGHTS)
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl"):
        WanTextEncoder.from_checkpoint(str(tmp_path), config=TINY)


def test_corrupt_or_wrong_checkpoints(tmp_path, ckpt_dir):
    path = str(tmp_path / WEIGHTS)
    with open(path, "wb") as f:
        f.write(b"not a torch pickle" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        load_umt5_encoder(path, TINY)
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="should hold a state dict"):
        load_umt5_encoder(path, TINY)
    good = torch.load(os.path.join(ckpt_dir, WEIGHTS), weights_only=True)
    renamed = dict(good)
    renamed["blocks.0.attn.query.weight"] = renamed.pop("blocks.0.attn.q.weight")
    torch.save(renamed, path)
    with pytest.raises(
        ValueError, match=r"1 missing keys: blocks.0.attn.q.weight\n.*blocks.0.attn.query.weight"
    ):
        load_umt5_encoder(path, TINY)
    with pytest.raises(
        ValueError, match=r"mis-shaped keys: token_embedding.weight: \(32, 16\), expected \(64, 16\)"
    ):
        convert_official_umt5(good, replace(TINY, vocab_size=64))


def test_bad_config_and_inputs(ckpt_dir, encoder):
    with pytest.raises(ValueError, match="multiple of num_heads"):
        WanT5Config(dim_attn=100, num_heads=3)
    with pytest.raises(ValueError, match="positive"):
        WanT5Config(num_layers=0)
    with pytest.raises(ValueError, match="tokens, the encoder only 8"):
        WanTextEncoder.from_checkpoint(ckpt_dir, config=replace(TINY, vocab_size=8))
    for bad in ("a cat", []):
        with pytest.raises(ValueError, match="non-empty list of prompt strings"):
            encoder(bad)
