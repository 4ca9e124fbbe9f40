"""Image-to-video: the official conditioning, parity with diffusers' WanImageToVideoPipeline, and
sample_wan.py --task i2v-* end to end on tiny random checkpoints in the official file layout."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

import sample_wan
from easycache.video import read_video
from models.wan import WanConfig, convert_diffusers_to_official
from models.wan_clip import CLIP_FILE, CLIP_MEAN, CLIP_STD, CLIP_TINY, convert_clip_visual_to_official
from models.wan_i2v import first_frame_mask, latent_grid, load_image
from models.wan_t5 import UMT5_TINY, convert_umt5_to_official, pad_context
from models.wan_vae import WAN_VAE_FILE, WAN_VAE_TINY, WanVAE, convert_diffusers_wan_vae_to_official
from train_wan_tiny import build_text_encoder

PROMPT = "a green square moving up on a black background"
# A 224x224 image is at once the CLIP tower's input size and, under a 224*224 pixel budget, the video's size:
# then neither diffusers' PIL resizes nor the official torch resizes change it, and the two pipelines see the
# same pixels (other sizes are resized differently: PIL Lanczos / CLIP crop vs the official torch bicubic).
SIZE = 224
CLIP = CLIP_TINY  # the i2v-tiny task's tower layout, random weights
# text_len 512: diffusers' i2v attention hard-codes 512 text tokens to split the image tokens off the context
DIT = WanConfig(model_type="i2v", in_dim=36, image_dim=64, text_len=512, dim=32, ffn_dim=64, text_dim=64,
                num_heads=2, num_layers=2)  # fmt: skip
LATENT = (1, 16, 2, SIZE // 4, SIZE // 4)  # 5 frames, the tiny VAE's stride 4


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Random diffusers/transformers components and the same weights in the official layout (a ckpt dir)."""
    d = tmp_path_factory.mktemp("wan-i2v-random")
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**DIT.diffusers_kwargs()).eval()
    # diffusers initialises some parameters at 0 or 1 (norms, zero-init heads): randomise all, so that every
    # weight of the conditioning path shows in the output
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] == DIT.dim else 0.0))
    save_file(
        convert_diffusers_to_official(transformer.state_dict()),
        str(d / "diffusion_pytorch_model.safetensors"),
    )
    (d / "config.json").write_text(json.dumps({"_class_name": "WanModel", **dataclasses.asdict(DIT)}))
    tokenizer, _ = build_text_encoder(seed=0)
    tokenizer.save_pretrained(str(d / "google" / "umt5-xxl"))
    t5 = UMT5EncoderModel(UMT5_TINY.to_umt5_config())
    torch.save(convert_umt5_to_official(t5.state_dict(), UMT5_TINY), d / "models_t5_umt5-xxl-enc-bf16.pth")
    vae = AutoencoderKLWan(**WAN_VAE_TINY.diffusers_kwargs()).eval()
    torch.save(convert_diffusers_wan_vae_to_official(vae.state_dict()), d / WAN_VAE_FILE)
    clip = CLIPVisionModel(CLIP.to_transformers()).eval()
    torch.save(convert_clip_visual_to_official(clip.state_dict(), CLIP), d / CLIP_FILE)
    rgb = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "first.png")
    return dict(dir=d, transformer=transformer, vae=vae, clip=clip)


def our_pipeline(parts, *extra):
    args = sample_wan.parse_args(["--task", "i2v-tiny", "--image", str(parts["dir"] / "first.png"), "--size",
                                  f"{SIZE}*{SIZE}", "--frame_num", "5", "--quiet", *extra])  # fmt: skip
    task, _, _ = sample_wan.check_args(args)
    return sample_wan.WanT2V(task, str(parts["dir"]), args)


def diffusers_pipeline(parts):
    processor = CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size=SIZE, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=parts["vae"], scheduler=_FlowUniPC(),
        image_processor=processor, image_encoder=parts["clip"], transformer=parts["transformer"],
    )  # fmt: skip


class _FlowUniPC(UniPCMultistepScheduler):
    """diffusers' UniPC on the official Wan σ grid (it shifts the σ's it is given; see test_solvers.py)."""

    def __init__(self):
        super().__init__(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)

    def set_timesteps(self, num_inference_steps, device=None, **kw):
        sigma_max = float(np.float32(0.999))
        super().set_timesteps(sigmas=np.linspace(sigma_max, 0, num_inference_steps + 1)[:-1], device=device)


def test_latent_grid_is_the_official_rounding():
    # a 16:9 image under the 480p budget: floor(sqrt(399360 * 9/16) / 8) = 59 -> 58 (whole 2x2 patches)
    assert latent_grid(720, 1280, 832 * 480, (8, 8), (2, 2)) == (58, 104)
    # an 832x480 image itself: sqrt(399360 * (480/832)) is 479.99999... in floats, floored to 59 -> 58 rows
    # (464 px), as in the official code, which computes the same float expression
    assert latent_grid(480, 832, 832 * 480, (8, 8), (2, 2)) == (58, 104)
    assert latent_grid(1280, 720, 1280 * 720, (8, 8), (2, 2)) == (160, 90)
    assert latent_grid(64, 64, 64 * 64, (4, 4), (2, 2)) == (16, 16)
    with pytest.raises(ValueError, match="no whole DiT patch"):
        latent_grid(4000, 10, 64 * 64, (4, 4), (2, 2))


def test_mask_is_diffusers_first_frame_mask():
    mask = first_frame_mask(81, 3, 5)  # [4, 21, 3, 5]
    assert mask.shape == (4, 21, 3, 5)
    assert torch.equal(mask[:, 0], torch.ones(4, 3, 5)) and not mask[:, 1:].any()


def test_conditioning_equals_diffusers(parts):
    pipe, ref = our_pipeline(parts), diffusers_pipeline(parts)
    image = Image.open(parts["dir"] / "first.png").convert("RGB")
    from models.wan_i2v import encode_condition

    cond = encode_condition(pipe.image, 5, SIZE * SIZE, pipe.vae, pipe.clip)
    cpu = torch.device("cpu")
    with torch.no_grad():
        clip_ref = ref.encode_image(image, cpu)  # [1, 257, 64]
        pixels = ref.video_processor.preprocess(image, height=SIZE, width=SIZE)  # [1, 3, H, W] in [-1, 1]
        _, y_ref = ref.prepare_latents(
            pixels, 1, 16, SIZE, SIZE, 5, torch.float32, cpu, None, torch.randn(LATENT)
        )
    # the resized image: PIL's 8-bit decode mapped to [-1, 1] in two orders of the same float ops
    torch.testing.assert_close(cond.image, pixels[0], rtol=0, atol=1e-6)
    # CLIP: diffusers rescales x/255 and normalises; the official path maps to [-1, 1] and back first (1 ulp)
    torch.testing.assert_close(cond.clip_fea, clip_ref, rtol=1e-5, atol=1e-5)
    assert cond.y.shape == y_ref.shape == (1, 20, *LATENT[2:])
    torch.testing.assert_close(cond.y, y_ref, rtol=1e-5, atol=1e-5)  # same VAE, pixels equal to 1e-6


def test_one_denoising_step_equals_diffusers(parts):
    """One step of the whole pipeline, CFG 5, from the same noise: text, CLIP and y conditioning, the DiT with
    its image branch, guidance and the solver step."""
    pipe, ref = our_pipeline(parts, "--cache", "none"), diffusers_pipeline(parts)
    seed = 7
    ctx, null = (pad_context([c], 512) for c in pipe.text_encoder([PROMPT, ""]))  # as our DiT pads it
    out = pipe.generate(PROMPT, seed, None, num_steps=1)
    noise = torch.randn(LATENT, generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        latents = ref(
            image=Image.open(parts["dir"] / "first.png").convert("RGB"), prompt_embeds=ctx,
            negative_prompt_embeds=null,
            height=SIZE, width=SIZE, num_frames=5, num_inference_steps=1, guidance_scale=5.0, latents=noise,
            output_type="latent",
        ).frames  # fmt: skip
    rel = (out.latents - latents).norm() / latents.norm()
    assert rel < 1e-4, rel  # fp32; the DiT alone matches diffusers to ~1e-6 (test_wan_model.py)


def run(parts, out, *extra):
    argv = ["--task", "i2v-tiny", "--ckpt_dir", str(parts["dir"]), "--image", str(parts["dir"] / "first.png"),
            "--size", f"{SIZE}*{SIZE}", "--frame_num", "5", "--sample_steps", "8", "--warmup", "2",
            "--base_seed", "3", "--save_file", str(out), "--quiet", "--prompt", PROMPT, *extra]  # fmt: skip
    sample_wan.main(argv)
    return json.loads(out.with_suffix(".json").read_text())


def test_writes_a_video_and_a_report(parts, tmp_path):
    report = run(parts, tmp_path / "v.mp4", "--thresh", "1.0")
    assert read_video(str(tmp_path / "v.mp4")).shape == (5, SIZE, SIZE, 3)
    assert report["args"]["image"] == str(parts["dir"] / "first.png") and report["args"]["task"] == "i2v-tiny"
    stats = report["cache"]
    assert stats["num_computed"] + stats["num_skipped"] == 8 and stats["num_skipped"] > 0
    assert report["dit_calls"] == 2 * stats["num_computed"]
    assert report["seconds"]["image"] > 0  # the conditioning is its own phase
    assert sorted(os.listdir(tmp_path)) == ["v.json", "v.mp4"]


def test_thresh_zero_is_bit_identical_to_no_cache(parts, tmp_path):
    """τ = 0 computes every step through the same loop: the cache branch reads the latent, never y."""
    run(parts, tmp_path / "a.mp4", "--cache", "none", "--lossless")
    report = run(parts, tmp_path / "b.mp4", "--thresh", "0", "--warmup", "0", "--lossless")
    assert report["cache"]["num_skipped"] == 0
    assert np.array_equal(read_video(str(tmp_path / "a.mkv")), read_video(str(tmp_path / "b.mkv")))


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "pass --image FILE"),
        (["--image", "nowhere.png"], "no such file"),
        (["--image", "__file__"], "not a readable image"),
    ],
)
def test_bad_image_fails_before_loading(tmp_path, extra, message):
    extra = [__file__ if e == "__file__" else e for e in extra]
    out = tmp_path / "out" / "x.mp4"
    with pytest.raises(SystemExit, match=message):  # the CLI's one "error: ..." line
        sample_wan.main(
            ["--task", "i2v-tiny", "--ckpt_dir", "nowhere", "--quiet", "--save_file", str(out), *extra]
        )
    assert not out.parent.exists()


def test_image_with_a_t2v_task_is_refused():
    with pytest.raises(SystemExit, match="--image is for the image-to-video tasks"):
        sample_wan.main(["--task", "tiny", "--image", __file__, "--quiet"])


def test_i2v_14b_defaults_follow_the_official_generate_py(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    for size, shift, repo in (("1280*720", 5.0, "720P"), ("832*480", 3.0, "480P"), ("480*832", 3.0, "480P")):
        args = sample_wan.parse_args(["--task", "i2v-14B", "--image", str(img), "--size", size])
        task, _, _ = sample_wan.check_args(args)
        assert (args.sample_steps, args.sample_shift, args.sample_guide_scale, args.frame_num) == (
            40,
            shift,
            5.0,
            81,
        )
        assert task.repo_id == f"Wan-AI/Wan2.1-I2V-14B-{repo}" and task.negative_prompt.startswith(
            "镜头晃动，"
        )
        assert (args.thresh, args.warmup) == (0.05, 10)  # the authors' I2V setting
    args = sample_wan.parse_args(
        ["--task", "i2v-14B", "--image", str(img), "--size", "832*480", "--sample_shift", "4"]
    )
    sample_wan.check_args(args)
    assert args.sample_shift == 4.0  # an explicit shift wins


def test_load_image_is_the_official_to_tensor(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img = load_image(str(tmp_path / "a.png"))
    assert img.shape == (3, 5, 7)
    torch.testing.assert_close(
        img, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 * 2 - 1, rtol=0, atol=1e-6
    )


def test_vae_encode_of_the_condition_matches_wanvae(parts):
    """encode_condition encodes [frame, zeros] with WanVAE's normalisation (check_range off only)."""
    vae = WanVAE(WAN_VAE_TINY)
    vae.model.load_state_dict(parts["vae"].state_dict())
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert torch.equal(vae.encode(video), vae.encode(video, check_range=False))
