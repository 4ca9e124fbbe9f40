"""OpenSora 1.2 text glue: caption cleaning against the official outputs, score appending, and the T5 encoder
wrapper on a tiny random T5 with a tiny tokenizer saved in the official (transformers) directory layout."""

import json
import os
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from models import opensora_text
from models.opensora_text import (
    OpenSoraTextEncoder,
    append_scores,
    clean_caption,
    html_to_text,
    prepare_prompts,
    text_preprocessing,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "opensora", "caption_cleaning.json")
MAX_LEN = 24  # model_max_length of the tiny setup (300 officially)


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN) as f:
        return json.load(f)


def test_clean_caption_matches_official(golden):
    for case in golden["cases"]:
        assert clean_caption(case["caption"]) == case["clean_caption"], case["caption"]
        assert text_preprocessing(case["caption"]) == case["text_preprocessing"], case["caption"]


def test_html_to_text_matches_beautifulsoup(golden):
    for case in golden["html"]:
        assert html_to_text(case["markup"]) == case["text"], case["markup"]


def test_append_scores():
    assert append_scores("A cat.", 6.5) == "A cat. aesthetic score: 6.5."
    assert append_scores("A cat.", 6) == "A cat. aesthetic score: 6.0."
    assert append_scores("A cat.", None) == "A cat."
    assert (
        append_scores("A cat. aesthetic score: 5.0.", 6.5) == "A cat. aesthetic score: 5.0."
    )  # already scored


def test_prepare_prompts_appends_then_cleans_twice(golden):
    twice = [c for c in golden["cases"] if c["clean_caption"] != c["text_preprocessing"]]
    assert twice, "the golden data needs a caption that a second cleaning pass changes"
    for case in twice:
        assert prepare_prompts([case["caption"]], aes=None) == [case["text_preprocessing"]]
    # the score is appended before cleaning, so it is lower-cased and cleaned with the prompt
    assert prepare_prompts(["A <b>CAT</b>!"]) == ["a cat! aesthetic score: 6.5."]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """config.json + model.safetensors + tokenizer files, as save_pretrained writes them (the DeepFloyd repo
    layout differs only in holding spiece.model and .bin shards)."""
    path = str(tmp_path_factory.mktemp("t5"))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["a cat walks on the beach aesthetic score: 6.5.", "a red car drives through a city at night"]
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )  # as T5
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    config = T5Config(  # T5 v1.1: gated GELU feed-forward
        vocab_size=320, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
    )
    T5EncoderModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder(t5_dir):
    return OpenSoraTextEncoder.from_pretrained(t5_dir, device="cpu", model_max_length=MAX_LEN)


def test_encoder_outputs_y_and_mask_of_the_cleaned_prompts(t5_dir, encoder):
    prompts = ["A CAT walks on the beach", "a red car"]
    y, mask = encoder.encode(prompts)
    assert y.shape == (2, 1, MAX_LEN, 32) and mask.shape == (2, MAX_LEN)
    assert y.dtype == torch.float32 and mask.dtype == torch.int64
    # reference: the tokenizer and T5 run directly on the prepared (scored, cleaned) text
    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    model = T5EncoderModel.from_pretrained(t5_dir).eval()
    texts = [text_preprocessing(p + " aesthetic score: 6.5.") for p in prompts]
    assert texts[0] == "a cat walks on the beach aesthetic score: 6.5."
    ref = tokenizer(texts, max_length=MAX_LEN, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(mask, ref["attention_mask"])
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert (
        mask.sum(1).tolist() == lengths and lengths[0] != lengths[1]
    )  # real tokens incl. </s>, then padding
    with torch.no_grad():
        expected = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
    torch.testing.assert_close(y[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_encoder_aes_none_and_truncation(encoder):
    _, with_score = encoder.encode(["a cat"])
    _, without = encoder.encode(["a cat"], aes=None)
    assert int(with_score.sum()) > int(without.sum())
    y, mask = encoder.encode(["a cat walks on the beach " * 20])
    assert y.shape[2] == MAX_LEN and bool(mask.all())  # cut to model_max_length, no padding left
    ids = encoder.tokenizer(
        prepare_prompts(["a cat walks on the beach " * 20]), max_length=MAX_LEN, truncation=True
    )
    assert ids["input_ids"][0][-1] == encoder.tokenizer.eos_token_id  # </s> survives truncation


def test_encoder_rejects_bad_input(encoder):
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode("a cat")
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode([])


def test_missing_t5_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="DeepFloyd/t5-v1_1-xxl"):
        OpenSoraTextEncoder.from_pretrained(str(tmp_path / "nowhere"), device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks the weights .* a tokenizer"):
        OpenSoraTextEncoder.from_pretrained(str(tmp_path), device="cpu")


def test_spiece_only_tokenizer_without_protobuf_is_reported(tmp_path, monkeypatch):
    for name in (
        "config.json",
        "model.safetensors",
        "spiece.model",
    ):  # the DeepFloyd layout: no tokenizer.json
        (tmp_path / name).write_text("")
    monkeypatch.setattr(opensora_text, "_has_protobuf", lambda: False)
    with pytest.raises(ImportError, match="pip install protobuf"):
        OpenSoraTextEncoder.from_pretrained(str(tmp_path), device="cpu")


def test_sentencepiece_tokenizer_layout(t5_dir, tmp_path):
    """The real repo's tokenizer files (spiece.model + tokenizer_config.json naming T5Tokenizer): ids are the
    SentencePiece ids plus </s>. transformers 5 needs protobuf to read them."""
    pytest.importorskip("google.protobuf")
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "a cat walks on the beach aesthetic score: 6.5.\na red car drives through a city\n" * 20
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "spiece"),
        vocab_size=30,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>"}
        )
    )
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(t5_dir, name), tmp_path / name)
    encoder = OpenSoraTextEncoder.from_pretrained(str(tmp_path), device="cpu", model_max_length=MAX_LEN)
    _, mask = encoder.encode(["a cat"])
    expected = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model")).encode(
        "a cat aesthetic score: 6.5."
    ) + [1]
    ids = encoder.tokenizer(["a cat aesthetic score: 6.5."])["input_ids"][0]
    assert ids == expected and int(mask.sum()) == len(expected)
