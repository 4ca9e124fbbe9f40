"""easycache.diffusers on tiny random diffusers pipelines (CPU, fp32, offline: tokenizer trained here).

What must hold: τ = 0 is bit-identical to the unhooked pipeline (every step computes, so the hook only
passes the calls through); the hook's decisions and reused outputs are exactly those of `EasyCache` fed the
same trajectory (same process, same tensors: bit-exact by construction); the default τ runs the transformer
fewer times; remove_easycache gives the unhooked pipeline back; cond-only, I2V, two experts and HunyuanVideo
(one branch) number the steps right.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel  # noqa: E402

from easycache import EasyCache, EasyCacheConfig  # noqa: E402
from easycache.diffusers import apply_easycache, get_easycache, remove_easycache  # noqa: E402
from models.wan import WanConfig  # noqa: E402
from models.wan_t5 import UMT5_TINY  # noqa: E402
from models.wan_vae import WAN_VAE_TINY  # noqa: E402

CORPUS = ["a red circle moving right on a blue background", "a green square moving up"]
PROMPT = CORPUS[0]
TEXT_LEN = 16
SIZE = dict(height=32, width=32, num_frames=5)


def tiny_tokenizer(tmp_path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with T5's special ids (<pad> 0, </s> 1, <unk> 2), EOS appended; no hub."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(tmp_path / "tokenizer"))  # saved and read back, as a pipeline would
    return PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tokenizer"))


def tiny_transformer(seed: int, in_dim: int = 16) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    cfg = WanConfig(text_len=TEXT_LEN, in_dim=in_dim, dim=32, ffn_dim=64, text_dim=UMT5_TINY.dim, num_heads=2,
                    num_layers=2)  # fmt: skip
    model = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    with torch.no_grad():
        # A random DiT's output jumps from step to step (k ≈ 5, ε ≈ 0.2 > τ: nothing would ever be skipped);
        # a trained one changes smoothly along the trajectory. Give this one a smooth output: a fixed part
        # (the head's bias) plus a small input-dependent one.
        model.proj_out.weight.mul_(0.2)
        model.proj_out.bias.normal_(0.0, 1.0)
    return model


def wan_components(tmp_path, *, in_dim: int = 16, experts: int = 1) -> dict:
    torch.manual_seed(0)
    parts = dict(
        tokenizer=tiny_tokenizer(tmp_path),
        text_encoder=UMT5EncoderModel(UMT5_TINY.to_umt5_config()).eval(),
        vae=AutoencoderKLWan(**WAN_VAE_TINY.diffusers_kwargs()).eval(),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
        transformer=tiny_transformer(1, in_dim),
    )
    if experts == 2:
        parts.update(transformer_2=tiny_transformer(2, in_dim), boundary_ratio=0.5)
    return parts


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return WanPipeline(**wan_components(tmp_path_factory.mktemp("wan"))).to("cpu")


def run(pipe, steps: int, *, seed: int = 0, guidance_scale: float = 5.0, **kw) -> np.ndarray:
    out = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(seed), max_sequence_length=TEXT_LEN, output_type="np",
               **SIZE, **kw)  # fmt: skip
    return out.frames[0]


class Calls:
    """Counts the transformer's real forward passes (a torch hook on its first layer, below the cache)."""

    def __init__(self, module):
        self.n = 0
        first = getattr(module, "patch_embedding", module)  # a Wan transformer, or the layer itself
        self._h = first.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.n += 1

    def close(self):
        self._h.remove()


def test_thresh_zero_is_bit_identical_and_remove_restores(wan):
    base = run(wan, 8)
    calls = Calls(wan.transformer)
    apply_easycache(wan.transformer, EasyCacheConfig(thresh=0.0, warmup=0), num_inference_steps=8)
    try:
        cached = run(wan, 8)
        stats = get_easycache(wan.transformer).stats
    finally:
        remove_easycache(wan.transformer)
        calls.close()
    assert np.array_equal(cached, base)  # every step computed: the hook passed the calls through untouched
    assert calls.n == 16 and stats["num_computed"] == 8  # two branches, one decision per step
    assert np.array_equal(run(wan, 8), base)  # removed: the unhooked pipeline again


def test_default_thresh_skips_and_decisions_equal_easycache(wan):
    steps, config = 25, EasyCacheConfig()  # the paper's Wan setting: τ 0.05, R 10
    base = run(wan, steps)
    seen = []  # (x, branch, output) of every transformer call, as the pipeline sees them
    ctx = wan.transformer._diffusers_hook  # noqa: F841 (registry exists once apply_easycache ran)

    def record(module, args, kwargs, output):
        seen.append((kwargs["hidden_states"].clone(), output[0].clone()))

    apply_easycache(wan.transformer, config, num_inference_steps=steps)
    calls = Calls(wan.transformer)
    handle = wan.transformer.register_forward_hook(record, with_kwargs=True)  # outside the cache: all calls
    try:
        cached = run(wan, steps)
        cache = get_easycache(wan.transformer)
    finally:
        handle.remove()
        calls.close()
        remove_easycache(wan.transformer)
    assert len(seen) == 2 * steps
    assert cache.stats["num_skipped"] > 0 and calls.n < 2 * steps  # fewer transformer calls
    assert calls.n == 2 * cache.stats["num_computed"]
    # The same trajectory fed to a fresh EasyCache by hand, as sample_wan.py's loop does.
    ref = EasyCache(config, steps)
    for i in range(steps):
        (x, v_cond), (x_u, v_uncond) = seen[2 * i], seen[2 * i + 1]
        assert torch.equal(x, x_u)
        if ref.should_compute(i, x):
            ref.update(x, {"cond": v_cond, "uncond": v_uncond})
        else:
            v = ref.reuse(x)
            assert torch.equal(v["cond"], v_cond) and torch.equal(v["uncond"], v_uncond)
    assert [r["compute"] for r in ref.trace] == [r["compute"] for r in cache.trace]
    assert ref.stats["computed_steps"] == cache.stats["computed_steps"]
    # Close to the uncached video; and a second run starts afresh (no state leaks between runs).
    assert np.abs(cached - base).max() < 0.5
    apply_easycache(wan.transformer, config, num_inference_steps=steps)
    try:
        again = run(wan, steps)
        run(wan, steps)
        assert get_easycache(wan.transformer).stats["computed_steps"] == cache.stats["computed_steps"]
    finally:
        remove_easycache(wan.transformer)
    assert np.array_equal(again, cached)


def test_cond_only_counts_one_call_per_step(wan):
    steps = 14
    apply_easycache(wan.transformer, EasyCacheConfig(thresh=0.05, warmup=4), num_inference_steps=steps)
    calls = Calls(wan.transformer)
    try:
        run(wan, steps, guidance_scale=1.0)  # no CFG: one call per step
        cache = get_easycache(wan.transformer)
    finally:
        calls.close()
        remove_easycache(wan.transformer)
    assert [r["step"] for r in cache.trace] == list(range(steps))
    assert calls.n == cache.stats["num_computed"] < steps


def test_bad_use_is_refused(wan):
    with pytest.raises(ValueError, match="warmup"):
        apply_easycache(wan.transformer, EasyCacheConfig(warmup=10), num_inference_steps=10)
    apply_easycache(wan.transformer, EasyCacheConfig(warmup=2), num_inference_steps=6)
    try:
        with pytest.raises(ValueError, match="already applied"):
            apply_easycache(wan.transformer, EasyCacheConfig(), num_inference_steps=20)
        with pytest.raises(ValueError, match="runs 5 steps"):
            run(wan, 5)  # WanPipeline tells its step count: a mismatch is an error, not a silent cache
    finally:
        remove_easycache(wan.transformer)
    with pytest.raises(ValueError, match="no EasyCache"):
        get_easycache(wan.transformer)
    # Called by hand: a branch that was not part of the run's computed steps is refused, not guessed.
    t = wan.transformer
    inputs = dict(
        hidden_states=torch.randn(1, 16, 2, 4, 4), encoder_hidden_states=torch.randn(1, TEXT_LEN, 64)
    )
    apply_easycache(t, EasyCacheConfig(warmup=1), num_inference_steps=4)
    try:
        for step, name in enumerate(["cond", "cond", "other"]):
            with t.cache_context(name), torch.no_grad():
                if name == "other":
                    with pytest.raises(RuntimeError, match="branch 'other' appeared at step 2"):
                        t(timestep=torch.tensor([900 - 100 * step]), **inputs)
                else:
                    t(timestep=torch.tensor([900 - 100 * step]), **inputs)
    finally:
        remove_easycache(t)


@pytest.mark.parametrize("experts", [1, 2])
def test_image_to_video_and_two_experts(tmp_path, experts):
    """Wan I2V (Wan2.2-A14B layout: 16 noise + 4 mask + 16 image channels, no CLIP; two experts split at
    boundary_ratio). The I2V pipeline passes no step index: steps come from the call pattern."""
    from PIL import Image

    pipe = WanImageToVideoPipeline(**wan_components(tmp_path, in_dim=36, experts=experts))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    steps, config = 16, EasyCacheConfig(thresh=0.2, warmup=3)
    experts_ = [pipe.transformer] + ([pipe.transformer_2] if experts == 2 else [])
    base = run(pipe, steps, image=image)
    apply_easycache(pipe.transformer, config, num_inference_steps=steps)
    if experts == 2:
        apply_easycache(
            pipe.transformer_2, config, num_inference_steps=steps, share_steps_with=pipe.transformer
        )
    calls = [Calls(t) for t in experts_]
    try:
        cached = run(pipe, steps, image=image)
        traces = [get_easycache(t).trace for t in experts_]
    finally:
        for c in calls:
            c.close()
        for t in experts_:
            remove_easycache(t)
    decided = [r["step"] for tr in traces for r in tr]
    assert decided == list(range(steps))  # every step decided once, by the expert that ran it
    assert sum(c.n for c in calls) == 2 * sum(r["compute"] for tr in traces for r in tr) < 2 * steps
    if experts == 2:
        first = traces[1][0]  # transformer_2 takes over at the boundary: no Δ of its own yet, it computes
        assert first["step"] > config.warmup and first["compute"] and first["reason"] == "no_k"
        assert traces[1][1]["compute"]  # and needs a second computed step for its own k
    assert traces[-1][-1]["reason"] == "last_step"
    assert np.abs(cached - base).max() < 0.5
    with pytest.raises(ValueError, match="no EasyCache"):
        apply_easycache(pipe.transformer, config, num_inference_steps=steps, share_steps_with=pipe.vae)


#####  the project's converter: official layout -> diffusers, and the demo model through WanPipeline  #####


def test_dit_converter_round_trip():
    from models.wan import WanModel, convert_diffusers_to_official, convert_official_to_diffusers

    for model_type, in_dim in (("t2v", 16), ("i2v", 36)):
        cfg = WanConfig(model_type=model_type, in_dim=in_dim, text_len=TEXT_LEN, dim=32, ffn_dim=64,
                        text_dim=16, num_heads=2, num_layers=2)  # fmt: skip
        official = WanModel(cfg).state_dict()
        converted = convert_official_to_diffusers(official, cfg)
        reference = WanTransformer3DModel(**cfg.diffusers_kwargs()).state_dict()
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in reference.items()}
        back = convert_diffusers_to_official(converted)
        assert back.keys() == official.keys() and all(back[k] is official[k] for k in official)
    with pytest.raises(ValueError, match="unknown keys"):
        convert_official_to_diffusers({**official, "extra.weight": torch.zeros(1)}, cfg)


def test_official_schedule_matches_flow_unipc():
    from models.solvers import FlowUniPC, wan_sigmas
    from models.wan_diffusers import wan_scheduler

    for steps, shift in ((50, 3.0), (25, 5.0)):
        scheduler = wan_scheduler(shift)
        scheduler.set_timesteps(steps)
        solver = FlowUniPC(wan_sigmas(steps, shift))
        assert torch.equal(scheduler.timesteps, solver.timesteps)
        assert torch.equal(scheduler.sigmas, solver.sigmas)


@pytest.mark.slow
def test_demo_model_through_wan_pipeline_matches_sample_wan():
    """checkpoints/wan-tiny converted by the project's converter -> WanPipeline + the hook: the same computed
    steps and the same video (PSNR >= 40 dB) as `sample_wan.py --task tiny` with EasyCache on, same seed."""
    import sample_wan
    from easycache.metrics import psnr_global
    from models.wan_diffusers import wan_pipeline_from_official
    from tests.test_wan_tiny import CKPT

    args = sample_wan.parse_args(["--task", "tiny", "--quiet"])
    task, _, _ = sample_wan.check_args(args)
    config, seed = EasyCacheConfig(), 42  # the paper's setting, 50 steps: the script's defaults
    ours = sample_wan.WanT2V(task, CKPT, args).generate(task.prompt, seed, config)
    pipe = wan_pipeline_from_official(CKPT, t5=task.t5, vae=task.vae, shift=task.sample_shift)
    pipe.set_progress_bar_config(disable=True)
    apply_easycache(pipe.transformer, config, num_inference_steps=args.sample_steps)
    calls = Calls(pipe.transformer)
    frames = pipe(prompt=task.prompt, negative_prompt=args.negative_prompt, height=64, width=64,
                  num_frames=args.frame_num, num_inference_steps=args.sample_steps,
                  guidance_scale=args.sample_guide_scale, generator=torch.Generator().manual_seed(seed),
                  max_sequence_length=task.text_len, output_type="np").frames[0]  # fmt: skip
    cache = get_easycache(pipe.transformer)
    assert cache.stats["computed_steps"] == ours.cache_stats["computed_steps"]
    assert cache.stats["num_skipped"] >= 20 and calls.n == ours.dit_calls  # 23 of 50 computed (measured)
    video = (frames * 255).round().astype(np.uint8)  # the pipeline's [0, 1] floats -> 8-bit, as the script
    # Same weights, same schedule, two implementations of each component (diffusers' WanTransformer3DModel vs
    # models.wan, in fp32): measured 95 dB on this machine; 40 dB is the bar and leaves room for
    # other CPUs' kernels.
    assert psnr_global(video, ours.frames) >= 40.0


@pytest.mark.parametrize("true_cfg", [False, True])
def test_hunyuan_video_pipeline(true_cfg):
    """HunyuanVideoPipeline: embedded guidance, one transformer call (one branch) per step; with true CFG
    (negative embeddings, true_cfg_scale > 1) a cond and an uncond call. Text embeddings are given directly
    (the tiny pipeline has no LLaVA/CLIP text towers; the hook never sees them anyway)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    from models.hunyuan import HunyuanVideoConfig

    torch.manual_seed(0)
    cfg = HunyuanVideoConfig(in_channels=4, out_channels=4, hidden_size=32, heads_num=2,
                             rope_dim_list=[4, 6, 6], mm_double_blocks_depth=1, mm_single_blocks_depth=1,
                             text_states_dim=16, text_states_dim_2=8, guidance_embed=True)  # fmt: skip
    transformer = HunyuanVideoTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    with torch.no_grad():  # a smooth output, as in tiny_transformer
        transformer.proj_out.weight.mul_(0.2)
        transformer.proj_out.bias.normal_(0.0, 1.0)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4).eval()  # fmt: skip
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    text = dict(prompt_embeds=torch.randn(1, 6, 16), pooled_prompt_embeds=torch.randn(1, 8),
                prompt_attention_mask=torch.ones(1, 6, dtype=torch.long))  # fmt: skip
    if true_cfg:
        text.update(
            negative_prompt_embeds=torch.randn(1, 6, 16),
            negative_pooled_prompt_embeds=torch.randn(1, 8),
            negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
            true_cfg_scale=3.0,
        )
    steps, branches = 14, 1 + true_cfg

    def run_h():
        out = pipe(**text, height=32, width=32, num_frames=5, num_inference_steps=steps, guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
        return out.frames[0]

    base = run_h()
    apply_easycache(transformer, EasyCacheConfig(thresh=0.025, warmup=5), num_inference_steps=steps)
    calls = Calls(transformer.x_embedder)
    try:
        cached = run_h()
        cache = get_easycache(transformer)
    finally:
        calls.close()
        remove_easycache(transformer)
    assert [r["step"] for r in cache.trace] == list(range(steps))
    assert calls.n == branches * cache.stats["num_computed"] < branches * steps
    assert np.abs(cached - base).max() < 0.5
    apply_easycache(transformer, EasyCacheConfig(thresh=0.0, warmup=0), num_inference_steps=steps)
    try:
        assert np.array_equal(run_h(), base)  # τ = 0: the unhooked pipeline, bit for bit
        steps -= 2  # this pipeline does not announce its step count: a shorter run is caught at its end
        with pytest.warns(UserWarning, match="stopped after step 11 of the 14"):
            run_h()
    finally:
        remove_easycache(transformer)
