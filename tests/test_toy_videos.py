"""The demo model's procedural data and the detector that grades generated videos."""

import numpy as np
import pytest

from models.toy_videos import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    Caption,
    all_captions,
    coverage,
    detect,
    render,
)


def test_grammar_and_parsing():
    caps = all_captions()
    assert len(caps) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) * len(BACKGROUNDS) - len(SHAPES) * 4
    cap = Caption.parse("A red circle moving right on a blue background.")
    assert cap == Caption("red", "circle", "right", "blue")
    assert str(cap) == "a red circle moving right on a blue background"


@pytest.mark.parametrize(
    "text,match",
    [
        ("a red circle", "not a caption"),
        ("a pink circle moving right on a blue background", "unknown colour"),
        ("a red hexagon moving right on a blue background", "unknown shape"),
        ("a red circle moving sideways on a blue background", "unknown direction"),
        ("a blue circle moving right on a blue background", "invisible"),
    ],
)
def test_bad_captions_are_rejected(text, match):
    with pytest.raises(ValueError, match=match):
        Caption.parse(text)


def test_render_is_deterministic_and_moves():
    a = render("a green square moving down on a black background", seed=3)
    b = render("a green square moving down on a black background", seed=3)
    c = render("a green square moving down on a black background", seed=4)
    assert a.shape == (17, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[-1])


def test_coverage_is_what_render_paints():
    # The training's loss weights (train_wan_tiny.latent_masks) come from coverage(): it must be the very
    # shape render() draws, frame by frame, and nothing of the background.
    for cap in all_captions()[::11]:
        video, cover = render(cap, seed=5).astype(np.float32), coverage(cap, seed=5)
        assert cover.shape == video.shape[:3] and cover.min() == 0 and cover.max() == 1
        bg, fg = (
            np.array(p[k], np.float32) for p, k in ((BACKGROUNDS, cap.background), (COLOURS, cap.colour))
        )
        assert np.array_equal(np.round(bg * (1 - cover[..., None]) + fg * cover[..., None]), video)
    # Same seed, another shape: same place and size, different outline.
    circle = coverage("a red circle moving up on a gray background", seed=8)
    square = coverage("a red square moving up on a gray background", seed=8)
    assert not np.array_equal(circle, square)
    assert abs(circle.sum() - square.sum()) < 0.1 * circle.sum()  # "about the circle's area"


def test_detector_reads_every_caption_of_the_grammar():
    wrong = []
    for i, cap in enumerate(all_captions()):
        got = detect(render(cap, seed=10_000 + i))
        want = {
            "colour": cap.colour,
            "shape": cap.shape,
            "direction": cap.direction,
            "background": cap.background,
        }
        if got != want:
            wrong.append((str(cap), got))
    assert not wrong, wrong[:5]


def test_detector_on_an_empty_video():
    video = np.full((17, 64, 64, 3), 120, np.uint8)
    assert detect(video) == {"background": "gray", "colour": None, "shape": None, "direction": None}
