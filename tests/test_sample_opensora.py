"""sample_opensora.py end to end on tiny random checkpoints written in the official file layouts.

The DiT and T5 sizes come from their config.json, as in the real repos. The VAE's architecture is fixed by the
official code, so the tests hand main() a tiny one (`vae_config=TINY_VAE`); its weights still load strictly
from an official-layout model.safetensors.
"""

import json
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

import sample_opensora
from easycache import EasyCacheConfig
from easycache.video import read_video
from models.opensora import STDiT3, STDiT3Config
from models.opensora_vae import SDXL_VAE_CONFIG, OpenSoraVAE, OpenSoraVAEConfig, TemporalVAEConfig
from models.solvers import opensora_timesteps
from tests.checks import assert_identical_comparison

PROMPT = "a cat walks on the beach"
STEPS = 8
TINY_VAE = OpenSoraVAEConfig(  # the official layout with fewer channels; one 2x spatial downsample
    vae_2d={**SDXL_VAE_CONFIG, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16], "layers_per_block": 1,
            "norm_num_groups": 4},
    vae_temporal=TemporalVAEConfig(filters=4, num_res_blocks=1, num_groups=2),
)  # fmt: skip
DIT_CONFIG = {  # hpcai-tech/OpenSora-STDiT-v3 config.json with tiny sizes (T5 d_model 32, 48 tokens)
    "architectures": ["STDiT3"], "model_type": "STDiT3", "caption_channels": 32, "class_dropout_prob": 0.1,
    "depth": 2, "drop_path": 0.0, "enable_flash_attn": False, "enable_layernorm_kernel": False,
    "enable_sequence_parallelism": False, "freeze_y_embedder": True, "hidden_size": 32, "in_channels": 4,
    "input_size": [None, None, None], "input_sq_size": 512, "mlp_ratio": 2.0, "model_max_length": 48,
    "num_heads": 2, "only_train_temporal": False, "patch_size": [1, 2, 2], "pred_sigma": True,
    "qk_norm": True, "skip_y_embedder": False, "torch_dtype": "float32", "transformers_version": "4.36.2",
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny ops gain nothing from a second thread, and OpenMP hand-offs are slow on a busy shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Three folders named and filled like the three Hub repos, with random weights."""
    root = tmp_path_factory.mktemp("opensora-tiny-random")
    dit, vae, t5 = (root / name for name in ("OpenSora-STDiT-v3", "OpenSora-VAE-v1.2", "t5-v1_1-xxl"))
    for d in (dit, vae, t5):
        d.mkdir()
    torch.manual_seed(0)
    (dit / "config.json").write_text(json.dumps(DIT_CONFIG))
    save_file(STDiT3(STDiT3Config.from_dict(DIT_CONFIG)).state_dict(), str(dit / "model.safetensors"))
    (vae / "config.json").write_text(json.dumps({"model_type": "VideoAutoencoderPipeline"}))  # not read
    save_file(OpenSoraVAE(TINY_VAE).state_dict(), str(vae / "model.safetensors"))
    # DeepFloyd/t5-v1_1-xxl: config.json, model-0000{1,2}-of-00002.safetensors + index, spiece.model, configs
    corpus = root / "corpus.txt"
    corpus.write_text(f"{PROMPT} aesthetic score: 6.5.\na red car drives through a city at night\n" * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(t5 / "spiece"), vocab_size=30,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)  # fmt: skip
    os.remove(t5 / "spiece.vocab")
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (t5 / "special_tokens_map.json").write_text(json.dumps(special))
    (t5 / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, **special})
    )
    config = T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu")  # fmt: skip
    T5EncoderModel(config).save_pretrained(str(t5), max_shard_size="60KB")
    assert sorted(p.name for p in t5.glob("model-*")) == [
        f"model-0000{i}-of-00002.safetensors" for i in (1, 2)
    ]
    return {"ckpt_path": str(dit), "vae_path": str(vae), "t5_path": str(t5)}


def flags(ckpt) -> list[str]:
    paths = [x for flag, path in ckpt.items() for x in (f"--{flag.replace('_', '-')}", path)]
    return [*paths, "--image-size", "16", "24", "--num-frames", "17", "--num-sampling-steps", str(STEPS),
            "--warmup", "2", "--seed", "3", "--quiet", "--prompt", PROMPT]  # fmt: skip


def run(ckpt, out_dir, *extra) -> dict:
    sample_opensora.main(
        [*flags(ckpt), "--save-dir", str(out_dir), "--sample-name", "v", *extra], vae_config=TINY_VAE
    )
    return json.loads((out_dir / "v.json").read_text())


@pytest.fixture(scope="module")
def pipe(ckpt):
    args = sample_opensora.parse_args(flags(ckpt))
    sample_opensora.check_args(args, TINY_VAE)
    return sample_opensora.OpenSoraT2V(ckpt, args, TINY_VAE)


def test_writes_a_video_and_a_report(ckpt, tmp_path):
    report = run(ckpt, tmp_path, "--thresh", "10", "--lossless")
    frames = read_video(str(tmp_path / "v.mp4"))
    assert frames.shape == (17, 16, 24, 3) and read_video(str(tmp_path / "v.mkv")).shape == frames.shape
    assert report["script"] == "sample_opensora.py" and report["seed"] == 3 and report["prompt"] == PROMPT
    assert report["args"]["num_frames"] == 17 and report["args"]["image_size"] == [16, 24]
    assert len(report["trace"]) == STEPS and report["trace"][0]["reason"] == "warmup"
    stats = report["cache"]
    assert stats["computed_steps"] == [0, 1, STEPS - 1] and stats["num_skipped"] == STEPS - 3
    assert report["dit_calls"] == stats["num_computed"]  # one batched cond+uncond call per computed step
    assert report["seconds"]["dit"] > 0 and report["seconds"]["end_to_end"] >= report["seconds"]["dit"]
    assert sum(r["dit_seconds"] or 0 for r in report["trace"]) == pytest.approx(report["seconds"]["dit"])
    assert sorted(os.listdir(tmp_path)) == ["v.json", "v.mkv", "v.mp4"]


def test_thresh_zero_is_bit_identical_to_no_cache(pipe):
    base = pipe.generate(PROMPT, 5, None)
    zero = pipe.generate(PROMPT, 5, EasyCacheConfig(thresh=0.0, warmup=2))
    assert torch.equal(base.latents, zero.latents) and np.array_equal(base.frames, zero.frames)
    assert zero.cache_stats["num_skipped"] == 0 and base.dit_calls == zero.dit_calls == STEPS
    assert torch.equal(base.latents, pipe.generate(PROMPT, 5, None).latents)  # no state leaks between runs
    assert not torch.equal(base.latents, pipe.generate(PROMPT, 6, None).latents)  # the seed matters


def test_skipped_steps_reuse_each_cfg_half_with_its_own_delta(pipe):
    calls = []  # (inputs, output) of every DiT call
    hook = pipe.dit.register_forward_hook(
        lambda m, a, out: calls.append(([x.clone() for x in a], out.clone()))
    )
    try:
        gen = pipe.generate(PROMPT, 5, EasyCacheConfig(thresh=10.0, warmup=2))
    finally:
        hook.remove()
    computed = gen.cache_stats["computed_steps"]
    assert computed == [0, 1, STEPS - 1] and len(calls) == gen.dit_calls == 3
    # One batched call: [z; z] at [t; t] with [y; y_null], the conditional mask once, the scalar conditions.
    x, t, y, mask, fps, height, width = calls[0][0]
    assert x.shape[0] == 2 and torch.equal(x[0], x[1]) and torch.equal(t[0], t[1])
    assert torch.equal(y[1, 0], pipe.dit.y_embedder.y_embedding) and not torch.equal(y[0], y[1])
    assert mask.shape == (1, 48) and 0 < int(mask.sum()) < 48  # the null caption is cut to this length
    assert (fps.tolist(), height.tolist(), width.tolist()) == ([24.0], [16.0], [24.0])
    # Replay by hand: computed steps take the recorded output; on a skipped step each half is x_t + its own
    # Δ = v − x of the last computed step. Had the script reused one Δ for both halves, the guided velocity of
    # every skipped step would be off by (1 − s)(Δ_uncond − Δ_cond), which is not small here (last line).
    _, dts = opensora_timesteps(STEPS, height=16, width=24, num_frames=17)
    z, recorded = x[:1], iter(calls)
    for i in range(STEPS):
        if i in computed:
            (x_in, *_), pred = next(recorded)
            assert torch.equal(x_in[:1], z)  # the script reached the same x_t
            cond, uncond = pred[:1, :4], pred[1:, :4]  # the velocity channels of each half
            delta = {"cond": cond - z, "uncond": uncond - z}
        else:
            cond, uncond = z + delta["cond"], z + delta["uncond"]
        z = z + (uncond + 7.0 * (cond - uncond)) * dts[i]  # guidance, then the RF Euler step
    assert torch.equal(gen.latents, z)
    assert (delta["cond"] - delta["uncond"]).abs().max() > 1e-3


def test_compare_mode_with_thresh_zero(ckpt, tmp_path):
    report = run(ckpt, tmp_path, "--compare", "--thresh", "0", "--no-lpips")
    assert_identical_comparison(report, nfe=STEPS)


def test_two_seconds_alias_gives_51_frames(ckpt, tmp_path):
    report = run(ckpt, tmp_path, "--num-frames", "2s", "--num-sampling-steps", "2", "--cache", "none")
    assert report["args"]["num_frames"] == 51 and report["dit_calls"] == 2 and report["cache"] is None
    assert read_video(str(tmp_path / "v.mp4")).shape == (51, 16, 24, 3)


def test_prompt_list_with_static_cache(ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"# two captions\na red car drives through a city at night\n\n{PROMPT}\n")
    report = run(ckpt, tmp_path, "--prompts", str(prompts), "--cache", "static", "--interval", "2")
    assert [r["prompt"] for r in report["runs"]] == ["a red car drives through a city at night", PROMPT]
    assert all(r["cache"]["method"] == "static" and r["cache"]["num_skipped"] > 0 for r in report["runs"])
    assert os.path.isfile(tmp_path / "v_0.mp4") and os.path.isfile(tmp_path / "v_1.mp4")


def test_official_sizes_and_aliases():
    def resolved(*argv):
        args = sample_opensora.parse_args(list(argv))
        sample_opensora.check_args(args, OpenSoraVAEConfig())
        return args.num_frames, args.image_size

    assert resolved() == (51, [240, 426])  # the official defaults: 2s, 240p, 9:16 (H:W)
    assert resolved("--num-frames", "4s", "--resolution", "720p") == (102, [720, 1280])
    assert resolved("--resolution", "480p", "--aspect-ratio", "16:9") == (51, [854, 480])
    assert resolved("--num-frames", "1", "--resolution", "144p", "--aspect-ratio", "1:1") == (1, [192, 192])
    assert resolved("--image-size", "100", "200", "--num-frames", "20") == (20, [100, 200])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num-frames", "10"], ">= 17"),
        (["--num-frames", "0"], ">= 17"),
        (["--num-frames", "3s"], "2s, 4s"),
        (["--image-size", "1", "24"], ">= 2"),
        (["--num-sampling-steps", "0"], "num-sampling-steps"),
        (["--thresh", "-1"], "thresh"),
        (["--warmup", str(STEPS)], "warmup"),
        (["--prompts", "missing.txt"], "not found"),
    ],
)
def test_bad_input_fails_before_loading(ckpt, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        run(ckpt, tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--resolution", "1080p"), ("--aspect-ratio", "5:4")])
def test_unknown_resolution_or_aspect_ratio(flag, value, capsys):
    with pytest.raises(SystemExit):
        sample_opensora.parse_args([flag, value])
    assert f"invalid choice: '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("part,name", [("vae_path", "model.safetensors"), ("t5_path", "spiece.model")])
def test_missing_files_are_named(ckpt, tmp_path, part, name):
    broken = {**ckpt, part: str(tmp_path / "part")}
    shutil.copytree(ckpt[part], broken[part])
    os.remove(os.path.join(broken[part], name))
    with pytest.raises(SystemExit, match=rf"lacks {name}; fetch them with: hf download \S+ {name} "):
        run(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_attention_sdpa_is_the_default_bit_for_bit_and_compile_wraps_the_blocks(ckpt, pipe):
    """--attention sdpa runs the kernel that the default (auto) runs on the CPU, so the generation is the same
    bits; --compile compiles every spatial and temporal block and nothing else (the loop stays eager)."""

    def load(*extra):
        args = sample_opensora.parse_args([*flags(ckpt), *extra])
        sample_opensora.check_args(args, TINY_VAE)
        return sample_opensora.OpenSoraT2V(ckpt, args, TINY_VAE)

    def backends(p):
        return {m.attn_backend for m in p.dit.modules() if hasattr(m, "attn_backend")}

    sdpa, fast = load("--attention", "sdpa"), load("--attention", "sdpa", "--compile")
    assert backends(sdpa) == backends(fast) == {"sdpa"} and backends(pipe) == {"auto"}
    compiled = [m for m in fast.dit.modules() if m._compiled_call_impl is not None]  # nn.Module.compile
    assert compiled == [*fast.dit.spatial_blocks, *fast.dit.temporal_blocks]
    assert not [m for m in sdpa.dit.modules() if m._compiled_call_impl is not None]
    cache = EasyCacheConfig(thresh=0.2, warmup=2)
    ours, ref = sdpa.generate(PROMPT, 5, cache), pipe.generate(PROMPT, 5, cache)
    assert torch.equal(ours.latents, ref.latents)
    assert ours.cache_stats["computed_steps"] == ref.cache_stats["computed_steps"]
    assert 0 < ours.cache_stats["num_skipped"] < STEPS - 2  # computed and skipped steps both compared


def test_an_attention_kernel_that_cannot_run_is_refused_before_loading(ckpt, tmp_path):
    from models.attention import flash_attn_module

    if flash_attn_module() is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(SystemExit, match="error: --attention flash needs flash-attn"):
        run(ckpt, tmp_path / "out", "--attention", "flash")
    assert not (tmp_path / "out").exists()
