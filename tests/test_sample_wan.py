"""sample_wan.py end to end on a tiny random checkpoint written in the official file layout."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file
from transformers import UMT5EncoderModel

import sample_wan
from easycache import EasyCacheConfig
from easycache.video import read_video
from models.wan import WAN_CONFIGS, WanModel
from models.wan_t5 import UMT5_TINY, convert_umt5_to_official
from models.wan_vae import WAN_VAE_FILE, WAN_VAE_TINY, convert_diffusers_wan_vae_to_official
from tests.checks import assert_identical_comparison
from train_wan_tiny import build_text_encoder

PROMPT = "a red circle moving right on a blue background"


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """config.json + diffusion_pytorch_model.safetensors, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/,
    Wan2.1_VAE.pth: the official file names, with random weights in the tiny task's shapes."""
    d = tmp_path_factory.mktemp("wan-tiny-random")
    torch.manual_seed(0)
    dit = WanModel(WAN_CONFIGS["tiny"])
    save_file(dit.state_dict(), str(d / "diffusion_pytorch_model.safetensors"))
    cfg = {
        "_class_name": "WanModel",
        **dataclasses.asdict(WAN_CONFIGS["tiny"]),
    }  # as train_wan_tiny.py writes it
    (d / "config.json").write_text(json.dumps(cfg))
    tokenizer, _ = build_text_encoder(seed=0)
    tokenizer.save_pretrained(str(d / "google" / "umt5-xxl"))
    t5 = UMT5EncoderModel(UMT5_TINY.to_umt5_config())
    torch.save(convert_umt5_to_official(t5.state_dict(), UMT5_TINY), d / "models_t5_umt5-xxl-enc-bf16.pth")
    vae = AutoencoderKLWan(**WAN_VAE_TINY.diffusers_kwargs())
    torch.save(convert_diffusers_wan_vae_to_official(vae.state_dict()), d / WAN_VAE_FILE)
    return d


def run(ckpt_dir, out, *extra):
    argv = ["--task", "tiny", "--ckpt_dir", str(ckpt_dir), "--sample_steps", "8", "--warmup", "2",
            "--base_seed", "3", "--save_file", str(out), "--quiet", "--prompt", PROMPT, *extra]  # fmt: skip
    sample_wan.main(argv)
    return json.loads(out.with_suffix(".json").read_text())


def test_writes_a_video_and_a_report(ckpt_dir, tmp_path):
    report = run(ckpt_dir, tmp_path / "v.mp4", "--thresh", "1.0", "--lossless")
    frames = read_video(str(tmp_path / "v.mp4"))
    assert frames.shape == (17, 64, 64, 3)
    assert np.array_equal(read_video(str(tmp_path / "v.mkv")).shape, frames.shape)
    assert report["args"]["task"] == "tiny" and report["seed"] == 3 and report["prompt"] == PROMPT
    assert len(report["trace"]) == 8 and report["trace"][0]["reason"] == "warmup"
    stats = report["cache"]
    assert stats["num_computed"] + stats["num_skipped"] == 8 and stats["num_skipped"] > 0
    assert report["dit_calls"] == 2 * stats["num_computed"]  # two CFG branches per computed step
    assert report["seconds"]["dit"] > 0 and report["seconds"]["end_to_end"] >= report["seconds"]["dit"]
    assert sum(r["dit_seconds"] or 0 for r in report["trace"]) == pytest.approx(report["seconds"]["dit"])
    assert sorted(os.listdir(tmp_path)) == ["v.json", "v.mkv", "v.mp4"]


def test_thresh_zero_is_bit_identical_to_no_cache(ckpt_dir, tmp_path):
    args = sample_wan.parse_args(["--task", "tiny", "--sample_steps", "8", "--warmup", "2", "--quiet"])
    sample_wan.check_args(args)
    pipe = sample_wan.WanT2V(sample_wan.TASKS["tiny"], str(ckpt_dir), args)
    base = pipe.generate(PROMPT, 5, None)
    zero = pipe.generate(PROMPT, 5, EasyCacheConfig(thresh=0.0, warmup=2))
    skip = pipe.generate(PROMPT, 5, EasyCacheConfig(thresh=10.0, warmup=2))
    assert torch.equal(base.latents, zero.latents) and np.array_equal(base.frames, zero.frames)
    assert zero.cache_stats["num_skipped"] == 0 and base.dit_calls == zero.dit_calls == 16
    assert skip.cache_stats["num_skipped"] > 0 and not torch.equal(base.latents, skip.latents)
    again = pipe.generate(PROMPT, 5, None)
    assert torch.equal(base.latents, again.latents)  # no state leaks between generations


def test_compare_mode_with_thresh_zero(ckpt_dir, tmp_path):
    report = run(ckpt_dir, tmp_path / "c.mp4", "--compare", "--thresh", "0", "--no-lpips")
    assert_identical_comparison(report, nfe=16)


def test_prompt_list_writes_one_video_per_prompt(ckpt_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# two captions\na green square moving up on a black background\n\n" + PROMPT + "\n")
    report = run(ckpt_dir, tmp_path / "m.mp4", "--prompts", str(prompts))
    assert [r["prompt"] for r in report["runs"]] == ["a green square moving up on a black background", PROMPT]
    assert os.path.isfile(tmp_path / "m_0.mp4") and os.path.isfile(tmp_path / "m_1.mp4")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--frame_num", "16"], r"4n\+1"),
        (["--size", "60*64"], "multiples of 16"),
        (["--size", "64x64"], "width\\*height"),
        (["--thresh", "-1"], "thresh"),
        (["--warmup", "8"], "warmup"),
        (["--prompts", "missing.txt"], "not found"),
    ],
)
def test_bad_input_fails_before_loading(ckpt_dir, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit, match=message):
        run(ckpt_dir, tmp_path / "bad.mp4", *extra)
    assert os.listdir(tmp_path) == []


def test_missing_or_corrupt_files(ckpt_dir, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, broken)
    os.remove(broken / WAN_VAE_FILE)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=WAN_VAE_FILE):
        run(broken, out / "x.mp4")
    shutil.copy(ckpt_dir / WAN_VAE_FILE, broken / WAN_VAE_FILE)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        run(broken, out / "x.mp4")
    assert not out.exists()


def test_unknown_task_is_rejected(capsys):
    with pytest.raises(SystemExit):
        sample_wan.parse_args(["--task", "t2v-7B"])
    assert "invalid choice" in capsys.readouterr().err


def test_compare_sweep_shares_one_baseline(ckpt_dir, tmp_path):
    report = run(ckpt_dir, tmp_path / "s.mp4", "--compare", "--sweep-thresh", "0,10", "--sweep-interval", "3",
                 "--no-lpips")  # fmt: skip
    result = report["comparison"]
    assert [r["label"] for r in result["rows"]] == ["easycache τ=0.0", "easycache τ=10.0", "static n=3"]
    assert result["rows"][0]["psnr_global"] == "inf" and result["rows"][0]["nfe_ratio"] == 1.0
    assert result["rows"][1]["nfe_ratio"] > 1.0 and result["rows"][2]["cache_stats"]["method"] == "static"
    assert result["rows"][2]["cache_stats"]["computed_steps"] == [0, 1, 2, 5, 7]  # R=2, every 3rd, the last
    assert set(result["means"]) == {"easycache τ=0.0", "easycache τ=10.0", "static n=3"}
    baselines = {r["outputs"]["baseline"]["video"] for r in result["rows"]}
    assert len(baselines) == 1  # the baseline ran (and was written) once for all three caches
    assert sorted(os.listdir(tmp_path)) == ["s.json", "s_0_baseline.mp4", "s_0_easycache_0.0.mp4",
                                            "s_0_easycache_10.0.mp4", "s_0_static_n_3.mp4"]  # fmt: skip


def test_batched_cfg_equals_two_calls(ckpt_dir):
    """--cfg_batch: one batch-2 DiT call on [x; x] with [cond; uncond] contexts (both padded to text_len, as
    the DiT pads each), split back into the named branches before the cache, gives the two-call loop's result
    (fp32; the batch-2 GEMMs may sum in another order, so ≤ 1e-5 relative, not bitwise)."""
    runs = {}
    for flag in ("--no-cfg_batch", "--cfg_batch"):
        args = sample_wan.parse_args(
            ["--task", "tiny", "--sample_steps", "8", "--warmup", "2", "--quiet", flag]
        )
        sample_wan.check_args(args)
        pipe = sample_wan.WanT2V(sample_wan.TASKS["tiny"], str(ckpt_dir), args)
        runs[flag] = pipe.generate(PROMPT, 5, EasyCacheConfig(thresh=1.0, warmup=2))
    two, one = runs["--no-cfg_batch"], runs["--cfg_batch"]
    assert [r["compute"] for r in one.trace] == [r["compute"] for r in two.trace]  # same decisions
    computed = one.cache_stats["num_computed"]
    assert 0 < computed < 8 and one.dit_calls == computed and two.dit_calls == 2 * computed
    assert ((one.latents - two.latents).norm() / two.latents.norm()).item() <= 1e-5


def test_cfg_batch_defaults_off_on_the_cpu():
    args = sample_wan.parse_args(["--task", "tiny", "--device", "cpu"])
    sample_wan.check_args(args)
    assert args.cfg_batch is False and args.attention == "auto" and not args.compile


@pytest.mark.parametrize(
    "flags,moves",
    [
        ([], [("sampling", "dit")]),
        # the official --offload_model: umT5 visits the device only to encode, the DiT leaves for the decode
        (["--offload_model"], [("text", "t5"), ("text", "t5"), ("sampling", "dit"), ("vae", "dit")]),
        (["--offload_model", "--t5_cpu"], [("sampling", "dit"), ("vae", "dit")]),  # umT5 never moves
    ],
)
def test_offload_moves(ckpt_dir, flags, moves):
    """The moves of each offload setting, in order, as the pipeline records them (each entry reads back the
    device of the moved parameters). On this CPU-only machine every move lands on the CPU; on a GPU the same
    sequence alternates between cuda and cpu."""
    args = sample_wan.parse_args(
        ["--task", "tiny", "--sample_steps", "2", "--warmup", "1", "--quiet", *flags]
    )
    sample_wan.check_args(args)
    pipe = sample_wan.WanT2V(sample_wan.TASKS["tiny"], str(ckpt_dir), args)
    gen = pipe.generate(PROMPT, 5, None)
    record = gen.extra["placement"]
    assert [(m["phase"], m["component"]) for m in record] == moves
    assert all(m["device"] == "cpu" for m in record)
    assert {p.device.type for p in pipe.text_encoder.model.parameters()} == {"cpu"}  # the encoder ends on CPU
