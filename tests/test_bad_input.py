"""Every bad input of the README's "Bad input" table: one `error:` line, exit 2 (a flag to change) or 1 (a bad
file), before any model loads where the input can be checked without one, and nothing written."""

import importlib.util
import json
import os
import re
import shutil
import signal
import struct
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sample_hunyuan
import sample_opensora
import sample_wan
from easycache import checks
from easycache.report import RunOutputs, slug
from easycache.video import write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "checkpoints", "wan-tiny")
DIT = "diffusion_pytorch_model.safetensors"


def refused(main, argv, capsys) -> tuple[int, str]:
    """Run a script's main() to its refusal: (exit status, the error line), checking it is one line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return e.value.code, err[0]


@pytest.fixture
def tiny_copy(tmp_path):
    """A copy of the demo model to damage."""
    return shutil.copytree(TINY, tmp_path / "ckpt")


def wan(tmp_path, *extra):
    return ["--task", "tiny", "--sample_steps", "4", "--warmup", "1", "--base_seed", "1", "--quiet",
            "--save_file", str(tmp_path / "out" / "v.mp4"), *extra]  # fmt: skip


# ---- flags: exit 2, checked before anything loads ----------------------------------------------------

WAN_USAGE = [
    (["--sample_guide_scale", "nan"], "--sample_guide_scale must be a finite number"),
    (["--sample_shift", "-1"], "--sample_shift must be > 0"),
    (["--sample_shift", "inf"], "finite"),
    (["--base_seed", "99999999999999999999999"], "--base_seed must be in 0..9223372036854775807"),
    (["--base_seed", "-7"], "--base_seed must be in"),
    (["--thresh", "nan"], "thresh"),
    # cache methods: a field out of range, not a number, unknown; a bad --sweep; --cfg_batch with a hook
    (["--cache", "teacache", "--teacache.rel_l1_thresh", "-1"], "rel_l1_thresh must be a finite number >= 0"),
    (["--cache", "teacache", "--teacache.rel_l1_thresh", "nan"], "rel_l1_thresh must be a finite number"),
    (["--cache", "magcache", "--magcache.magcache_K", "two"], "MagCacheConfig.magcache_K takes a int"),
    (["--teacache.bogus", "1"], "TeaCacheConfig has no field 'bogus' (fields: rel_l1_thresh,"),
    (["--compare", "--sweep", "teacache.rel_l1_thresh"], "expected METHOD.FIELD=v1,v2"),
    (["--compare", "--sweep", "fastcache.x=1"], "unknown method 'fastcache'"),
    (["--compare", "--sweep", "pab.spatial_range=0"], "spatial_range must be an int >= 1"),
    (["--cache", "teacache", "--cfg_batch"], "teacache acts inside the DiT with one hook per CFG branch"),
    (["--cache", "pab", "--cfg_batch"], "drop --cfg_batch"),
    (["--compare", "--sweep", "magcache.magcache_K=1,2", "--cfg_batch"], "magcache acts inside the DiT"),
    (["--attention", "sage"], "--attention sage needs sageattention"),
    # image inputs: with a text-to-video task, or an i2v task without one
    (["--image", "cat.png"], "--image is for the image-to-video tasks"),
    (["--task", "i2v-tiny"], "--task i2v-tiny animates an image: pass --image FILE"),
    # multi-GPU layouts outside torchrun
    (["--ulysses_size", "2"], "need several processes: launch with torchrun"),
    (["--dit_fsdp"], "need several processes"),
]


@pytest.mark.parametrize("extra, message", WAN_USAGE)
def test_wan_bad_flags(tmp_path, capsys, extra, message):
    status, line = refused(sample_wan.main, wan(tmp_path, *extra), capsys)
    assert status == 2 and message in line
    assert not (tmp_path / "out").exists()


def test_cfg_batch_left_to_its_default_still_runs_hooked_caches(tmp_path):
    # Nothing asked: the default (auto) may make two calls for teacache/magcache/pab without a word.
    args = sample_wan.parse_args(wan(tmp_path, "--cache", "teacache"))
    sample_wan.check_args(args)
    assert args.cfg_batch is False  # resolved for the CPU


def _png(path, size=(8, 8)):
    from PIL import Image

    Image.new("RGB", size, (200, 30, 30)).save(path)
    return str(path)


def test_bad_image_files(tmp_path, capsys):
    i2v = ["--task", "i2v-tiny"]
    good = _png(tmp_path / "ok.png")
    (tmp_path / "text.png").write_text("not an image")
    cut = tmp_path / "cut.png"
    cut.write_bytes(open(good, "rb").read()[:40])
    cases = [
        (str(tmp_path / "missing.png"), 1, "missing.png: no such file"),
        (str(tmp_path / "text.png"), 1, "is not a readable image (UnidentifiedImageError"),
        (str(cut), 1, "is not a readable image"),
        (str(tmp_path), 1, "is a folder, not an image file"),
        (_png(tmp_path / "line.png", (200, 1)), 2, "leaves no whole DiT patch"),  # too elongated for 64*64
    ]
    for image, code, message in cases:
        status, line = refused(sample_wan.main, wan(tmp_path, *i2v, "--image", image), capsys)
        assert status == code and message in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "calibration file not found"),
        ("{ not json", "is not a calibration file with a teacache.coefficients entry"),
        ('{"magcache": {}}', "is not a calibration file with a teacache.coefficients entry"),
        ('{"teacache": {"coefficients": ["a", 1]}}', "must be a non-empty list of finite numbers"),
        ('{"teacache": {"coefficients": []}}', "must be a non-empty list of finite numbers"),
    ],
)
def test_bad_calibration_files(tmp_path, capsys, content, message):
    path = tmp_path / "calib.json"
    if content is not None:
        path.write_text(content)
    flags = ["--cache", "teacache", "--teacache.coefficients", str(path)]
    status, line = refused(sample_wan.main, wan(tmp_path, *flags), capsys)
    assert status == 1 and message in line, line
    magcache = ["--cache", "magcache", "--magcache.mag_ratios", str(path)]
    status, line = refused(sample_wan.main, wan(tmp_path, *magcache), capsys)
    assert status == 1 and "calib" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "world, extra, message",
    [
        (
            "2",
            ["--ulysses_size", "3"],
            "--ulysses_size 3 x --ring_size 1 must equal the world size 2",
        ),
        ("2", ["--ring_size", "2", "--attention", "sage"], "--attention sage cannot run sequence-parallel"),
    ],  # more rows (heads that Ulysses cannot split, FSDP with offload): tests/test_sample_wan_parallel.py
)
def test_bad_multi_gpu_layouts(tmp_path, capsys, monkeypatch, world, extra, message):
    # As under torchrun (its WORLD_SIZE); every refusal comes before the process group is created.
    monkeypatch.setenv("WORLD_SIZE", world)
    status, line = refused(sample_wan.main, wan(tmp_path, "--ckpt_dir", TINY, *extra), capsys)
    assert status == 2 and message in line, line
    assert not (tmp_path / "out").exists()


def test_bad_hunyuan_layouts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--video-size", "64", "--video-length", "5"]
    status, line = refused(sample_hunyuan.main, [*base, "--ulysses-degree", "2"], capsys)
    assert status == 2 and "need several processes" in line
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, line = refused(sample_hunyuan.main, [*base, "--ulysses-degree", "3"], capsys)
    assert status == 2 and "must equal the world size 2" in line
    assert os.listdir(tmp_path) == []


def test_sequence_parallel_on_cuda_without_flash_attn_needs_a_half_dtype():
    from models.parallel import check_parallel_attention

    pytest.importorskip("yunchang")
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: fp32 sequence parallelism runs it")
    with pytest.raises(ValueError, match="needs bf16 or fp16"):
        check_parallel_attention("auto", "cuda", torch.float32)  # no GPU needed: decided before any kernel
    check_parallel_attention("auto", "cuda", torch.bfloat16)


def test_outputs_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = [
        (["--save_file", str(tmp_path / "file" / "v.mp4")], "is a file, not a folder"),
        (["--save_file", "/proc/easycache/v.mp4"], "cannot write in /proc"),
        (["--report", str(tmp_path / "file" / "r.json")], "--report"),
        (["--save_file", str(tmp_path / "v.avi")], "written as .mp4"),
        (["--save_file", str(tmp_path)], "written as .mp4"),
    ]
    for extra, message in cases:
        argv = [a for a in wan(tmp_path) if a not in ("--save_file", str(tmp_path / "out" / "v.mp4"))]
        status, line = refused(sample_wan.main, argv + extra, capsys)
        assert status == 2 and message in line, line
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--embedded-cfg-scale", "nan"], "--embedded-cfg-scale must be a finite number"),
        (["--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
        (["--flow-shift", "-1"], "--flow-shift must be > 0"),
        (["--seed", "-5"], "--seed must be in"),
        (["--save-path", "x.avi"], "videos are written as .mp4"),
        (["--cache", "magcache", "--cfg-batch"], "magcache acts inside the DiT"),
        (["--magcache.magcache_thresh", "inf", "--cache", "magcache"], "magcache_thresh must be a finite"),
    ],
)
def test_hunyuan_bad_flags(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    status, line = refused(sample_hunyuan.main, ["--video-size", "64", "--video-length", "5", *extra], capsys)
    assert status == 2 and message in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
        (["--aes", "nan"], "--aes must be a finite number"),
        (["--sample-name", "../../x"], "--sample-name must be a file name"),
        (["--seed", "18446744073709551616"], "--seed must be in"),
        (["--cache", "pab", "--pab.spatial_range", "0"], "PABConfig.spatial_range must be an int >= 1"),
        (["--cfg_batch"], "unrecognized arguments: --cfg_batch"),  # OpenSora batches CFG always
    ],
)
def test_opensora_bad_flags(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    status, line = refused(sample_opensora.main, extra, capsys)
    assert status == 2 and message in line
    assert os.listdir(tmp_path) == []


# ---- files: exit 1, before any model loads -----------------------------------------------------------


def test_every_missing_repository_is_named_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here; the Hub is offline in tests (conftest)
    status, line = refused(sample_opensora.main, [], capsys)
    assert status == 1 and "3 checkpoints are missing" in line
    for repo in ("hpcai-tech/OpenSora-STDiT-v3", "hpcai-tech/OpenSora-VAE-v1.2", "DeepFloyd/t5-v1_1-xxl"):
        assert f"hf download {repo}" in line
    status, line = refused(sample_hunyuan.main, ["--video-size", "64", "--video-length", "5"], capsys)
    assert status == 1 and "2 checkpoints are missing" in line
    assert "tencent/HunyuanVideo" in line and "hunyuanvideo-community/HunyuanVideo" in line


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage_config(path):
    path.write_text("{ this is not json")


def _config_out_of_range(path):
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "num_layers": -1}))


def _mis_shaped(path):
    sd = load_file(str(path))
    sd["head.head.bias"] = torch.zeros(7)
    save_file(sd, str(path))


class _RunsCode:  # a pickle of this needs a global outside torch's allow-list
    pass


def _refused_pickle(path):
    torch.save({"weights": _RunsCode()}, path)


@pytest.mark.parametrize(
    "file, damage, message",
    [
        (DIT, _truncate, "is truncated"),
        ("config.json", _garbage_config, "is not valid JSON"),
        ("config.json", _config_out_of_range, "does not describe a Wan DiT"),
        (DIT, _mis_shaped, "shape mismatches: head.head.bias: (7,)"),
        ("Wan2.1_VAE.pth", _refused_pickle, "torch.load(weights_only=True) refuses"),
        ("models_t5_umt5-xxl-enc-bf16.pth", _truncate, "truncated or not a torch checkpoint"),
    ],
)
def test_damaged_checkpoints_fail_before_loading(tiny_copy, tmp_path, capsys, file, damage, message):
    damage(tiny_copy / file)
    status, line = refused(sample_wan.main, wan(tmp_path, "--ckpt_dir", str(tiny_copy)), capsys)
    assert status == 1 and message in line, line
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_caught_at_the_step_where_they_appear(tiny_copy, tmp_path, capsys):
    sd = load_file(str(tiny_copy / DIT))
    sd["head.head.bias"] = torch.full_like(sd["head.head.bias"], float("nan"))
    save_file(sd, str(tiny_copy / DIT))
    status, line = refused(sample_wan.main, wan(tmp_path, "--ckpt_dir", str(tiny_copy)), capsys)
    assert status == 1 and "NaN or inf at sampling step 0" in line
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_headers_are_read_without_loading(tmp_path):
    from models.loading import safetensors_header

    save_file({"w": torch.zeros(2, 3)}, str(tmp_path / "a.safetensors"))
    assert safetensors_header(str(tmp_path / "a.safetensors")) == {"w": ("F32", (2, 3))}
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match="truncated"):
        safetensors_header(str(tmp_path / "b.safetensors"))


def test_sharded_wan_dit_shapes_are_checked_from_the_headers(tiny_copy):
    # The 14B layout: shards + diffusion_pytorch_model.safetensors.index.json (each shard's header read).
    import dataclasses

    sd = load_file(str(tiny_copy / DIT))
    os.remove(tiny_copy / DIT)
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}  # fmt: skip
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(tiny_copy / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tiny_copy / f"{DIT}.index.json").write_text(json.dumps(index))
    task = dataclasses.replace(sample_wan.TASKS["tiny"], weights=f"{DIT}.index.json")
    assert sample_wan.check_dit_header(str(tiny_copy), task).num_heads == 2  # well-formed: passes
    second = "diffusion_pytorch_model-00002-of-00002.safetensors"
    part = load_file(str(tiny_copy / second))
    part[keys[1]] = torch.zeros(3, 5)
    save_file(part, str(tiny_copy / second))
    with pytest.raises(ValueError, match=rf"shape mismatches: {re.escape(keys[1])}: \(3, 5\)"):
        sample_wan.check_dit_header(str(tiny_copy), task)


def test_hunyuan_dit_shapes_are_checked_before_loading(tmp_path):
    from models.hunyuan import HunyuanVideoConfig, HunyuanVideoModel

    config = HunyuanVideoConfig(in_channels=4, out_channels=4, hidden_size=64, heads_num=2,
                                mm_double_blocks_depth=1, mm_single_blocks_depth=1, rope_dim_list=[8, 12, 12],
                                text_states_dim=32, text_states_dim_2=24, guidance_embed=True)  # fmt: skip
    sd = HunyuanVideoModel(config).state_dict()
    path = str(tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"module": sd}, path)  # the official DeepSpeed layout
    sample_hunyuan.check_dit_header(path, config)  # well-formed: passes
    with pytest.raises(ValueError, match="missing keys: single_blocks.1."):  # a config of another depth
        sample_hunyuan.check_dit_header(path, dataclasses_replace(config, mm_single_blocks_depth=2))
    sd["final_layer.linear.bias"] = torch.zeros(3)
    torch.save({"module": sd}, path)
    with pytest.raises(ValueError, match=r"final_layer.linear.bias: \(3,\)"):
        sample_hunyuan.check_dit_header(path, config)


def test_opensora_dit_shapes_are_checked_before_loading(tmp_path):
    from models.opensora import STDiT3, STDiT3Config

    config = {"caption_channels": 32, "depth": 2, "hidden_size": 32, "in_channels": 4, "mlp_ratio": 2.0,
              "model_max_length": 48, "num_heads": 2, "patch_size": [1, 2, 2]}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    sd = STDiT3(STDiT3Config.from_json(str(tmp_path / "config.json"))).state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"))
    sample_opensora.check_dit_header(str(tmp_path))  # well-formed: passes
    sd["final_layer.linear.weight"] = torch.zeros(2, 2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"final_layer.linear.weight: \(2, 2\)"):
        sample_opensora.check_dit_header(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_heads": 3}))
    with pytest.raises(checks.BadFile, match="does not describe an STDiT3"):
        sample_opensora.check_dit_header(str(tmp_path))


# ---- outputs: names, and nothing half-written --------------------------------------------------------


class _Gen:
    frames = np.zeros((1, 8, 8, 3), np.uint8)
    trace = None


def test_compare_videos_are_named_per_prompt_and_cache(tmp_path):
    prompts = ["a red circle", "a blue square"]
    out = RunOutputs(
        None, None, fps=8, lossless=False, folder=str(tmp_path), prompts=prompts, seed=3, label="compare",
        name=lambda label, prompt, seed: f"wan_tiny_{label}_{slug(prompt)}_{seed}",
    )  # fmt: skip
    for index, prompt in enumerate(prompts):
        for label in ("static n=2", "easycache τ=0.1"):
            out.save_pair(_Gen(), _Gen(), {"run_index": index, "prompt": prompt, "seed": 3, "label": label})
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"wan_tiny_{label}_{p}_3.mp4"
        for p in ("a_blue_square", "a_red_circle")
        for label in ("baseline", "easycache_0.1", "static_n_2")
    )
    assert out.report == str(tmp_path / "wan_tiny_compare_a_red_circle_3.json")


def test_an_interrupted_encode_leaves_no_file(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    seen = []

    def interrupted(path, *args, **kwargs):
        seen.append(os.path.basename(path))
        open(path, "wb").write(b"half a video")
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM through exit_cleanly_on_sigterm

    monkeypatch.setattr(imageio, "mimwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_video(str(tmp_path / "x.mp4"), _Gen.frames, 8)
    assert seen == ["x.partial.mp4"] and os.listdir(tmp_path) == []


# A process that encodes a long mp4 (400 frames of noise: seconds of libx264 work on any CPU here).
_ENCODE = """
import sys
import numpy as np
from easycache import checks
from easycache.video import write_video

checks.exit_cleanly_on_sigterm()  # as the sample scripts' __main__
frames = np.random.default_rng(0).integers(0, 256, (400, 128, 128, 3), dtype=np.uint8)
write_video(sys.argv[1], frames, 8)
"""


def test_sigterm_during_the_mp4_encode_leaves_no_file(tmp_path):
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", _ENCODE, str(tmp_path / "x.mp4")], env=env, cwd=ROOT)
    partial, deadline = tmp_path / "x.partial.mp4", time.monotonic() + 120
    while not partial.exists():  # ffmpeg has opened its output: the encode is under way
        assert proc.poll() is None and time.monotonic() < deadline, "the encode never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM  # killed mid-encode, not finished
    time.sleep(0.5)  # ffmpeg (a child of the killed process) is gone or writes to an unlinked file
    assert os.listdir(tmp_path) == []


def test_sigterm_unwinds_so_cleanup_runs():
    before = signal.getsignal(signal.SIGTERM)
    try:
        checks.exit_cleanly_on_sigterm()
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, before)


def test_constants_repeated_for_light_imports_match_their_source():
    # The scripts repeat a few names of models/ so that parsing and checking import no torch.
    from models import hunyuan, hunyuan_text
    from models.attention import BACKENDS
    from models.flags import BACKENDS as FLAG_BACKENDS
    from models.opensora import HUB_REPO
    from models.opensora_text import DEFAULT_AES, T5_REPO_ID
    from models.opensora_vae import REPO_ID
    from models.wan_clip import CLIP_FILE
    from models.wan_vae import WAN_VAE_FILE

    assert BACKENDS is FLAG_BACKENDS
    assert sample_wan._WAN_FILES[1] == WAN_VAE_FILE and sample_wan._CLIP_FILE == CLIP_FILE
    assert (sample_hunyuan.CKPT_FILE, sample_hunyuan.DIT_REPO) == (hunyuan.CKPT_FILE, hunyuan.HUB_REPO)
    assert sample_hunyuan.PARTS_REPO == hunyuan_text.HUB_REPO
    assert [repo for repo, *_ in sample_opensora.CHECKPOINTS.values()] == [HUB_REPO, REPO_ID, T5_REPO_ID]
    assert sample_opensora.parse_args([]).aes == DEFAULT_AES
