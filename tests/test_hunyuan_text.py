"""HunyuanVideo text encoders on tiny random Llama / CLIP models and tiny trained tokenizers, saved in the
diffusers layout of hunyuanvideo-community/HunyuanVideo and loaded through the real loader."""

import os

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from models.hunyuan_text import (
    PROMPT_TEMPLATE_ENCODE_VIDEO,
    TEXT_LEN,
    HunyuanTextEncoders,
    template_crop_start,
)

PROMPTS = ["A red fox jumps over a lazy dog in the snow.", "waves"]
LLM_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def _bpe(specials: list[str], template: str) -> Tokenizer:
    """A byte-level BPE whose pre-tokenizer keeps newline runs whole (like Llama-3's), so the template's
    closing newlines are split the same way with or without a prompt after them."""
    tok = Tokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(r"[\r\n]+| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+"), "isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([PROMPT_TEMPLATE_ENCODE_VIDEO, *PROMPTS] * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials[:2]]
    )
    return tok


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan_text")
    llm_tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(LLM_SPECIALS, "<|begin_of_text|> $A"),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    llm_tok.save_pretrained(root / "tokenizer")
    clip_tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(CLIP_SPECIALS, "<|startoftext|> $A <|endoftext|>"),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    clip_tok.save_pretrained(root / "tokenizer_2")
    LlamaModel(
        LlamaConfig(
            vocab_size=len(llm_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    ).save_pretrained(root / "text_encoder")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,  # not 2, so pooling looks for the EOS id as in the real model
            pad_token_id=clip_tok.pad_token_id,
        )
    ).save_pretrained(root / "text_encoder_2")
    return root


@pytest.fixture(scope="module")
def encoders(root):
    return HunyuanTextEncoders.from_pretrained(str(root), device="cpu", dtype=torch.float32, crop_start=None)


@pytest.fixture(scope="module")
def encoded(encoders):
    return encoders(PROMPTS)


def test_crop_removes_exactly_the_template(encoders):
    tok = encoders.tokenizer
    crop = template_crop_start(tok)
    assert encoders.crop_start == crop
    ids = tok(PROMPT_TEMPLATE_ENCODE_VIDEO.format(PROMPTS[0])).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:crop]).endswith("<|start_header_id|>user<|end_header_id|>\n\n")
    assert tok.decode(ids[crop:]) == PROMPTS[0] + "<|eot_id|>"


def test_llm_states_are_layer_l_minus_3_cropped(encoders, encoded):
    states, mask, pooled = encoded
    assert states.shape == (2, TEXT_LEN, 32) and mask.shape == (2, TEXT_LEN) and pooled.shape == (2, 24)

    # Independent reference: the output of decoder layer L-3 (no final norm), caught with a hook.
    tok, llm, crop = encoders.tokenizer, encoders.llm, encoders.crop_start
    tokens = tok(
        [PROMPT_TEMPLATE_ENCODE_VIDEO.format(p) for p in PROMPTS],
        max_length=TEXT_LEN + crop,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    caught = []
    hook = llm.layers[-3].register_forward_hook(
        lambda m, i, o: caught.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        llm(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    hook.remove()
    torch.testing.assert_close(states, caught[0][:, crop:], rtol=0, atol=0)

    # The mask covers the prompt and its closing <|eot_id|>, then right padding.
    for b, prompt in enumerate(PROMPTS):
        n = len(tok(prompt, add_special_tokens=False).input_ids) + 1
        assert mask[b].tolist() == [1] * n + [0] * (TEXT_LEN - n)
        # Padding does not change the valid rows: encode the unpadded sequence alone.
        alone = tok(PROMPT_TEMPLATE_ENCODE_VIDEO.format(prompt), return_tensors="pt").input_ids
        with torch.no_grad():
            ref = llm(input_ids=alone, output_hidden_states=True).hidden_states[-3][0, crop:]
        torch.testing.assert_close(states[b, :n], ref, rtol=1e-5, atol=1e-5)


def test_clip_is_the_pooled_eos_state(encoders, encoded):
    pooled = encoded[2]
    tokens = encoders.tokenizer_2(
        PROMPTS, max_length=77, padding="max_length", truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = encoders.clip(
            input_ids=tokens.input_ids
        )  # diffusers passes no mask: same result (causal model)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=1e-5, atol=1e-6)
    eos = (tokens.input_ids == encoders.tokenizer_2.eos_token_id).int().argmax(1)  # first EOS
    torch.testing.assert_close(pooled, out.last_hidden_state[torch.arange(2), eos], rtol=1e-5, atol=1e-6)


def test_long_prompt_is_truncated_to_256_rows(encoders):
    states, mask = encoders.encode_llm([" ".join(["fox"] * 400)])
    assert states.shape == (1, TEXT_LEN, 32) and int(mask.sum()) == TEXT_LEN


def test_bad_prompts_and_crop_start(root, encoders):
    with pytest.raises(ValueError, match="list of strings"):
        encoders("a single string")
    with pytest.raises(ValueError, match="crop_start"):
        HunyuanTextEncoders.from_pretrained(
            str(root), device="cpu", dtype=torch.float32, crop_start=encoders.crop_start + 1
        )


def test_missing_folders_name_the_repo(root, tmp_path):
    os.symlink(root / "tokenizer", tmp_path / "tokenizer")
    os.symlink(root / "text_encoder", tmp_path / "text_encoder")
    with pytest.raises(
        FileNotFoundError, match=r"text_encoder_2/.*tokenizer_2/.*hunyuanvideo-community/HunyuanVideo"
    ):
        HunyuanTextEncoders.from_pretrained(str(tmp_path), device="cpu")
