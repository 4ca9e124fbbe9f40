"""Video files: mp4 for people (H.264, yuv420p: lossy), a lossless variant for measuring, and reading back.

Frames are uint8 numpy arrays [F, H, W, 3] (RGB). Writing goes to a temporary file that is renamed into
place at the end, so an interrupted run never leaves a half-written video behind.
"""

from __future__ import annotations

import os

import numpy as np
import torch

LOSSLESS_SUFFIX = ".mkv"  # FFV1 in Matroska: bit-exact RGB, readable by decord, PyAV and imageio


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] or [1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], rounded to the nearest level."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected one video, got a batch of {video.shape[0]}")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, F, H, W], got shape {tuple(video.shape)}")
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, F, H, W]
    return frames.permute(1, 2, 3, 0).cpu().numpy()  # [F, H, W, 3]


def write_video(path: str, frames: np.ndarray, fps: float, *, lossless: bool | None = None) -> str:
    """Write uint8 frames [F, H, W, 3]. `lossless` defaults to the file suffix: .mkv is lossless (FFV1),
    .mp4 is H.264 yuv420p at high quality (what players expect; lossy, so never measure on it)."""
    import imageio.v2 as imageio

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    suffix = os.path.splitext(path)[1].lower()
    if lossless is None:
        lossless = suffix == LOSSLESS_SUFFIX
    if lossless and suffix != LOSSLESS_SUFFIX:
        raise ValueError(
            f"lossless videos are written as {LOSSLESS_SUFFIX} (FFV1), not {suffix or 'no suffix'}"
        )
    if not lossless and suffix != ".mp4":
        raise ValueError(f"videos for viewing are written as .mp4, not {suffix or 'no suffix'}")
    if not lossless and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise ValueError(f"yuv420p needs an even height and width, got {frames.shape[1]}×{frames.shape[2]}")
    if lossless:
        # bitexact: no random segment UID or muxing date, so the same frames give the same file bytes
        options = dict(
            codec="ffv1", pixelformat="bgr0", output_params=["-fflags", "+bitexact", "-flags:v", "+bitexact"]
        )
    else:
        options = dict(codec="libx264", pixelformat="yuv420p", quality=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # x.mp4 is written as x.partial.mp4 (ffmpeg picks the container from the suffix) and renamed at the end;
    # an exception, Ctrl-C or SIGTERM (the sample scripts turn it into an exit) removes it in `finally`.
    tmp = f"{path[: -len(suffix)]}.partial{suffix}"
    try:
        imageio.mimwrite(tmp, list(frames), fps=fps, macro_block_size=1, ffmpeg_log_level="error", **options)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_video(path: str) -> np.ndarray:
    """All frames of a video file as uint8 [F, H, W, 3]: decord when installed, else PyAV (same frames)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path}")
    try:
        import decord
    except ImportError:
        decord = None
    if decord is not None:
        return decord.VideoReader(path).get_batch(range(len(decord.VideoReader(path)))).asnumpy()
    import av

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"no video frames in {path}")
    return np.stack(frames)
