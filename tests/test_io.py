"""Video files, the JSON report and checkpoint resolution (offline)."""

import json
import os

import numpy as np
import pytest
import torch

from easycache import EasyCache, EasyCacheConfig, StaticCache, StaticCacheConfig
from easycache.report import Stopwatch, describe_cache, write_json
from easycache.video import read_video, to_uint8_frames, write_video
from models.loading import resolve_checkpoint
from models.toy_videos import render


def test_lossless_roundtrip_is_bit_exact(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (5, 24, 40, 3), dtype=np.uint8)
    path = write_video(str(tmp_path / "a.mkv"), noise, fps=16)
    assert np.array_equal(read_video(path), noise)
    assert os.listdir(tmp_path) == ["a.mkv"]  # no temporary file left behind


def test_mp4_is_playable_and_close(tmp_path):
    video = render("a white square moving left on a black background", 0)
    path = write_video(str(tmp_path / "a.mp4"), video, fps=16)
    back = read_video(path)
    assert back.shape == video.shape
    mse = np.mean((back.astype(np.float64) - video) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30


def test_video_errors(tmp_path):
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(str(tmp_path / "a.mp4"), frames.astype(np.float32), fps=8)
    with pytest.raises(ValueError, match=".mp4"):
        write_video(str(tmp_path / "a.avi"), frames, fps=8)
    with pytest.raises(ValueError, match="even"):
        write_video(str(tmp_path / "a.mp4"), np.zeros((3, 7, 8, 3), np.uint8), fps=8)
    with pytest.raises(FileNotFoundError):
        read_video(str(tmp_path / "missing.mp4"))
    assert os.listdir(tmp_path) == []


def test_to_uint8_frames():
    v = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 1, 1)
    frames = to_uint8_frames(v)
    assert frames.shape == (4, 1, 1, 3) and frames[:, 0, 0, 0].tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError, match="one video"):
        to_uint8_frames(torch.zeros(2, 3, 1, 2, 2))


def test_write_json_refuses_nan_and_leaves_nothing(tmp_path):
    path = str(tmp_path / "r.json")
    write_json(path, {"a": 1.5})
    assert json.load(open(path)) == {"a": 1.5}
    with pytest.raises(ValueError):
        write_json(str(tmp_path / "bad.json"), {"a": float("nan")})
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_stopwatch_accumulates():
    sw = Stopwatch()
    for _ in range(2):
        with sw.phase("dit"):
            sum(range(1000))
    assert sw["dit"] >= sw.last("dit") > 0 and sw["vae"] == 0.0


def test_describe_cache_names_each_mode():
    x = torch.zeros(1, 2)
    labels = []
    for cache in (
        EasyCache(EasyCacheConfig(thresh=0.0, warmup=0), 3),  # what --cache analyze builds
        EasyCache(EasyCacheConfig(thresh=0.05, warmup=1), 3),
        StaticCache(StaticCacheConfig(interval=2, warmup=1), 3),
    ):
        for _ in range(3):
            if cache.should_compute(len(cache.trace), x):
                cache.update(x, {"cond": x + 1})
            else:
                cache.reuse(x)
        labels.append(describe_cache(cache.stats))
    assert labels[0].startswith("easycache τ=0 R=0 (--cache analyze") and "computed 3/3" in labels[0]
    assert labels[1].startswith("easycache τ=0.05 R=1:")
    assert labels[2].startswith("static n=2 R=1:")
    assert describe_cache(None) == "no cache"


def test_resolve_checkpoint_offline(tmp_path):
    (tmp_path / "have").mkdir()
    (tmp_path / "have" / "a.bin").write_bytes(b"x")
    assert resolve_checkpoint(
        str(tmp_path / "have"), repo_id="org/repo", files=["a.bin"], patterns=["a.bin"], default_dir="unused"
    ) == str(tmp_path / "have")
    with pytest.raises(FileNotFoundError, match="hf download org/repo"):
        resolve_checkpoint(
            str(tmp_path / "have"),
            repo_id="org/repo",
            files=["b.bin"],
            patterns=["b.bin"],
            default_dir="unused",
        )
    target = tmp_path / "dl"
    with pytest.raises(FileNotFoundError, match=r"(?s)downloading them failed.*hf download org/repo"):
        resolve_checkpoint(
            None, repo_id="org/repo", files=["b.bin"], patterns=["b.bin"], default_dir=str(target)
        )
    assert not target.exists() or not any(target.rglob("b.bin"))
