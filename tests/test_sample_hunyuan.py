"""sample_hunyuan.py end to end on a tiny random checkpoint written in the official file layouts."""

import json
import os
import re
import shutil

import av
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

import sample_hunyuan
from easycache import EasyCacheConfig
from easycache.video import read_video
from models.hunyuan import CKPT_FILE, HunyuanVideoConfig, convert_diffusers_to_official
from models.hunyuan_text import CROP_START_VIDEO, PROMPT_TEMPLATE_ENCODE_VIDEO
from tests.checks import assert_identical_comparison

PROMPT = "a red circle moving right on a blue background"
OTHER = "a green square moving up on a black background"
# A tiny DiT that fits the tiny parts below: LLM hidden 32, CLIP hidden 24, 4 latent channels.
TINY = dict(in_channels=4, out_channels=4, hidden_size=64, heads_num=2, mm_double_blocks_depth=1,
            mm_single_blocks_depth=1, rope_dim_list=[8, 12, 12], text_states_dim=32, text_states_dim_2=24,
            guidance_embed=True)  # fmt: skip
# Llama-3's pre-tokenizer: a word-level vocabulary over it splits the official template into the official
# 95 tokens (BOS + 94), so the script runs with the real crop_start check.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLM_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def word_tokenizer(
    pre, specials: list[str], texts: list[str], template: str, **tokens
) -> PreTrainedTokenizerFast:
    """One token per pre-tokenizer piece of `texts` (others -> <unk>), special tokens kept whole."""
    split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")
    words = {w for text in texts for part in split.split(text) if part not in specials
             for w, _ in pre.pre_tokenize_str(part)}  # fmt: skip
    tok = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate([*specials, "<unk>", *sorted(words)])}, "<unk>")
    )
    tok.pre_tokenizer = pre
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials[:2]]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **tokens)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy 2-core machine OpenMP's waiting for it
    made each generation 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_base(tmp_path_factory):
    """<root>/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt ({"module": state_dict}) and the
    diffusers folders text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, vae/: random tiny weights. The
    DiT is a diffusers model (kept in transformer/, as in the community repo) converted to official names."""
    root = tmp_path_factory.mktemp("hunyuan-tiny-random")
    torch.manual_seed(0)
    ref = HunyuanVideoTransformer3DModel(**HunyuanVideoConfig(**TINY).diffusers_kwargs())
    with torch.no_grad():  # several parameters start at zero: make every one count
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.5))
    ref.save_pretrained(root / "transformer")
    (root / CKPT_FILE).parent.mkdir(parents=True)
    official = convert_diffusers_to_official(ref.state_dict(), HunyuanVideoConfig(**TINY))
    torch.save({"module": official}, root / CKPT_FILE)
    texts = [PROMPT_TEMPLATE_ENCODE_VIDEO.format(p) for p in (PROMPT, OTHER, sample_hunyuan.NEGATIVE_PROMPT)]
    llm_tok = word_tokenizer(
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), LLM_SPECIALS, texts, "<|begin_of_text|> $A",
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
    )  # fmt: skip
    llm_tok.save_pretrained(root / "tokenizer")
    clip_specials = ["<|startoftext|>", "<|endoftext|>"]
    clip_tok = word_tokenizer(
        pre_tokenizers.WhitespaceSplit(), clip_specials, texts, "<|startoftext|> $A <|endoftext|>",
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )  # fmt: skip
    clip_tok.save_pretrained(root / "tokenizer_2")
    LlamaModel(LlamaConfig(vocab_size=len(llm_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
               ).save_pretrained(root / "text_encoder")  # fmt: skip
    clip_config = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=24, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                 bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                                 pad_token_id=clip_tok.pad_token_id)  # fmt: skip
    CLIPTextModel(clip_config).save_pretrained(root / "text_encoder_2")
    AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4
    ).save_pretrained(root / "vae")
    (root / "dit_config.json").write_text(json.dumps(TINY))
    return root


def argv(model_base, *extra):
    return ["--model-base", str(model_base), "--dit-config", str(model_base / "dit_config.json"),
            "--video-size", "32", "32", "--video-length", "5", "--infer-steps", "6", "--warmup", "2",
            "--seed", "3", "--flow-reverse", "--quiet", "--prompt", PROMPT, *extra]  # fmt: skip


def run(model_base, out, *extra):
    sample_hunyuan.main(argv(model_base, "--save-path", str(out), *extra))
    return json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def pipe(model_base):
    """The loaded pipeline, shared by the tests that call generate() directly."""
    args = sample_hunyuan.parse_args(argv(model_base))
    _, dit_config, _ = sample_hunyuan.check_args(args)
    base = str(model_base)
    return sample_hunyuan.HunyuanT2V(str(model_base / CKPT_FILE), base, dit_config, args)


def test_writes_a_video_and_a_report(model_base, tmp_path):
    report = run(model_base, tmp_path / "v.mp4", "--thresh", "1.0", "--lossless", "--use-cpu-offload")
    frames = read_video(str(tmp_path / "v.mp4"))
    assert frames.shape == (5, 32, 32, 3) and read_video(str(tmp_path / "v.mkv")).shape == frames.shape
    with av.open(str(tmp_path / "v.mp4")) as container:
        assert container.streams.video[0].average_rate == 24  # the official output fps
    assert report["args"]["video_size"] == [32, 32] and report["seed"] == 3 and report["prompt"] == PROMPT
    assert report["args"]["thresh"] == 1.0 and len(report["trace"]) == 6
    assert [r["reason"] for r in report["trace"][:2]] == ["warmup", "warmup"]
    stats = report["cache"]
    assert stats["num_computed"] + stats["num_skipped"] == 6 and stats["num_skipped"] > 0
    assert report["dit_calls"] == stats["num_computed"]  # guidance-distilled: one DiT call per computed step
    assert report["seconds"]["dit"] > 0 and report["seconds"]["end_to_end"] >= report["seconds"]["dit"]
    assert sorted(os.listdir(tmp_path)) == ["v.json", "v.mkv", "v.mp4"]


def test_defaults_follow_the_official_and_the_authors():
    args = sample_hunyuan.parse_args([])
    sample_hunyuan.check_args(args)
    assert args.video_size == (720, 1280) and args.video_length == 129 and args.infer_steps == 50
    assert args.flow_shift == 7.0 and args.embedded_cfg_scale == 6.0 and args.cfg_scale == 1.0
    assert (args.thresh, args.warmup, args.cache) == (0.025, 5, "easycache")  # EasyCache4HunyuanVideo
    assert 0 <= args.seed <= 1_000_000 and args.neg_prompt == sample_hunyuan.NEGATIVE_PROMPT
    square = sample_hunyuan.parse_args(["--video-size", "960"])
    sample_hunyuan.check_args(square)
    assert square.video_size == (960, 960)


def test_thresh_zero_is_bit_identical_to_no_cache(pipe):
    base = pipe.generate(PROMPT, 5, None)
    zero = pipe.generate(PROMPT, 5, EasyCacheConfig(thresh=0.0, warmup=2))
    skip = pipe.generate(PROMPT, 5, EasyCacheConfig(thresh=10.0, warmup=2))
    assert torch.equal(base.latents, zero.latents) and np.array_equal(base.frames, zero.frames)
    assert zero.cache_stats["num_skipped"] == 0 and base.dit_calls == zero.dit_calls == 6
    assert skip.cache_stats["num_skipped"] > 0 and skip.dit_calls < 6
    assert not torch.equal(base.latents, skip.latents)
    again = pipe.generate(PROMPT, 5, None)
    assert torch.equal(base.latents, again.latents)  # no state leaks between generations


def test_true_cfg_runs_two_named_branches(pipe):
    plain = pipe.generate(PROMPT, 5, None)
    pipe.args.cfg_scale = 3.0
    try:
        assert list(pipe.encode(PROMPT)) == ["cond", "uncond"]
        base = pipe.generate(PROMPT, 5, None)
        zero = pipe.generate(PROMPT, 5, EasyCacheConfig(thresh=0.0, warmup=2))
        skip = pipe.generate(PROMPT, 5, EasyCacheConfig(thresh=10.0, warmup=2))
    finally:
        pipe.args.cfg_scale = 1.0
    assert base.dit_calls == zero.dit_calls == 12 and torch.equal(base.latents, zero.latents)
    assert skip.dit_calls == 2 * skip.cache_stats["num_computed"] < 12
    assert not torch.equal(base.latents, plain.latents)  # the negative branch changed the result


def test_compare_mode_with_thresh_zero(model_base, tmp_path):
    report = run(model_base, tmp_path / "c.mp4", "--compare", "--thresh", "0", "--no-lpips")
    assert_identical_comparison(report, nfe=6)


def test_save_path_is_a_folder_and_prompt_lists(model_base, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"# two captions\n{OTHER}\n\n{PROMPT}\n")
    sample_hunyuan.main(argv(model_base, "--save-path", str(tmp_path / "out"), "--prompts", str(prompts)))
    stem = "hunyuan_t2v-720p_easycache_a_green_square_moving_up_on_a_black_back_3"  # official: a folder
    assert sorted(os.listdir(tmp_path / "out")) == [f"{stem}.json", f"{stem}_0.mp4", f"{stem}_1.mp4"]
    report = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
    assert [r["prompt"] for r in report["runs"]] == [OTHER, PROMPT]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--video-length", "8"], r"4n\+1"),
        (["--video-size", "40", "48"], "multiples of 16"),
        (["--video-size", "32", "32", "32"], "H W"),
        (["--cfg-scale", "0.5"], "cfg-scale"),
        (["--thresh", "-1"], "thresh"),
        (["--warmup", "6"], "warmup"),
        (["--prompts", "missing.txt"], "not found"),
        (["--dit-weight", "missing.pt"], "dit-weight"),
        (["--model-base", "missing"], "model-base"),
    ],
)
def test_bad_input_fails_before_loading(model_base, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        run(model_base, tmp_path / "bad.mp4", *extra)
    assert os.listdir(tmp_path) == []


def test_missing_files_and_parts_that_do_not_fit(model_base, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(model_base, broken)
    out = tmp_path / "out"
    shutil.rmtree(broken / "vae")
    with pytest.raises(SystemExit, match="vae/diffusion_pytorch_model.safetensors.*hunyuanvideo-community"):
        run(broken, out / "x.mp4")
    shutil.copytree(model_base / "vae", broken / "vae")
    os.remove(broken / CKPT_FILE)
    with pytest.raises(SystemExit, match="mp_rank_00_model_states.pt.*tencent/HunyuanVideo"):
        run(broken, out / "x.mp4")
    shutil.copy(model_base / CKPT_FILE, broken / CKPT_FILE)
    (broken / "dit_config.json").write_text(json.dumps({**TINY, "text_states_dim": 16}))
    with pytest.raises(SystemExit, match="hidden_size=32 does not fit the DiT's text_states_dim=16"):
        run(broken, out / "x.mp4")
    (broken / "dit_config.json").write_text(json.dumps({**TINY, "depth": 3}))
    with pytest.raises(SystemExit, match="depth"):
        run(broken, out / "x.mp4")
    assert not out.exists()


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_loop_matches_the_diffusers_pipeline(model_base, pipe, cfg_scale):
    """The whole sampling chain (text encoding with the template crop, noise, shifted σ's, embedded guidance,
    true CFG, Euler steps) equals diffusers' HunyuanVideoPipeline on the same weights."""
    assert pipe.text_encoders.crop_start == CROP_START_VIDEO  # the tiny tokenizer passes the real check
    te = pipe.text_encoders
    reference = HunyuanVideoPipeline(
        text_encoder=te.llm, tokenizer=te.tokenizer, vae=pipe.vae.vae,
        transformer=HunyuanVideoTransformer3DModel.from_pretrained(model_base / "transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=te.clip, tokenizer_2=te.tokenizer_2,
    )  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    pipe.args.cfg_scale = cfg_scale
    try:
        ours = pipe.generate(PROMPT, 5, None).latents
    finally:
        pipe.args.cfg_scale = 1.0
    expected = reference(
        PROMPT, negative_prompt=sample_hunyuan.NEGATIVE_PROMPT, height=32, width=32, num_frames=5,
        num_inference_steps=6, true_cfg_scale=cfg_scale, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(5), output_type="latent",
    ).frames  # fmt: skip
    assert ours.shape == expected.shape == (1, 4, 2, 4, 4)
    assert ((ours - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_batched_true_cfg_equals_two_calls(pipe):
    """--cfg-batch: one batch-2 DiT call per computed step, split back into the named branches before the
    cache, gives the two-call loop's result (fp32; the batch-2 GEMMs may sum in another order: ≤ 1e-5)."""
    pipe.args.cfg_scale = 3.0
    try:
        runs = {}
        for batched in (False, True):
            pipe.args.cfg_batch = batched
            runs[batched] = pipe.generate(PROMPT, 5, EasyCacheConfig(thresh=1.0, warmup=2))
    finally:
        pipe.args.cfg_scale, pipe.args.cfg_batch = 1.0, None
    two, one = runs[False], runs[True]
    assert [r["compute"] for r in one.trace] == [r["compute"] for r in two.trace]  # same decisions
    computed = one.cache_stats["num_computed"]
    assert 0 < computed < 6 and one.dit_calls == computed and two.dit_calls == 2 * computed  # batched: 1
    assert ((one.latents - two.latents).norm() / two.latents.norm()).item() <= 1e-5
