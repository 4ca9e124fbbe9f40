"""Every bad input of the README's "Bad input" table: one `error:` line, exit 2 (a flag to change) or 1 (a bad
file), before any model loads where the input can be checked without one, and nothing written."""

import json
import os
import shutil
import signal
import struct

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
]


@pytest.mark.parametrize("extra, message", WAN_USAGE)
def test_wan_bad_flags(tmp_path, capsys, extra, message):
    status, line = refused(sample_wan.main, wan(tmp_path, *extra), capsys)
    assert status == 2 and message in line
    assert not (tmp_path / "out").exists()


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
    # The scripts and easycache.cli repeat a few names so that parsing and checking import no torch.
    from easycache import cli
    from easycache.cache import K_UPDATES
    from models.opensora import HUB_REPO
    from models.opensora_text import DEFAULT_AES, T5_REPO_ID
    from models.opensora_vae import REPO_ID
    from models.wan_vae import WAN_VAE_FILE

    assert cli.K_UPDATES == K_UPDATES and sample_wan.WAN_VAE_FILE == WAN_VAE_FILE
    assert [repo for repo, *_ in sample_opensora.CHECKPOINTS.values()] == [HUB_REPO, REPO_ID, T5_REPO_ID]
    assert sample_opensora.parse_args([]).aes == DEFAULT_AES
