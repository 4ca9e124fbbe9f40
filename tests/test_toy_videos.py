"""The demo model's procedural data and the detector that grades generated videos."""

import numpy as np
import pytest

from models.toy_videos import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    GEOMETRIES,
    SHAPES,
    Caption,
    Geometry,
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
    assert abs(circle.sum() - square.sum()) < 0.1 * circle.sum()  # small: about the circle's area


def test_large_squares_grow_over_the_three_large_geometries():
    # The square's half side, in radii: "large" 1.2 (1.83x the circle's area, the data set of the shipped
    # DiT's last fine-tune), "large-v2" 1.0 (4 / pi = 1.27x) and "large-v1" 0.85 (about the circle's area),
    # the data sets of the recipe's earlier stages. Everything else about the video is the same.
    def cover(shape, geometry):
        return coverage(f"a red {shape} moving up on a gray background", 8, geometry=geometry)

    circle = cover("circle", "large")
    for geometry in ("large-v1", "large-v2"):
        assert np.array_equal(cover("circle", geometry), circle)
    square, v2, v1 = (cover("square", g) for g in ("large", "large-v2", "large-v1"))
    assert 1.75 < square.sum() / circle.sum() < 1.9  # 2.4^2 / pi = 1.83
    assert 1.22 < v2.sum() / circle.sum() < 1.32
    assert 0.7 < v1.sum() / circle.sum() < 0.98  # (2 * 0.85)^2 / pi = 0.92
    side = square[0].sum(1).max()  # widest row: the side, 2.4 r with r 13-15 px
    assert 31 < side < 38

    # Second moments (per-axis spread, in px^2): r^2 / 4 for the circle, (half side)^2 / 3 for a square.
    def spread(cover):
        f = cover[0]
        ys = np.arange(64)[:, None]
        return float((f * (ys - np.average(ys[:, 0], weights=f.sum(1))) ** 2).sum() / f.sum())

    assert spread(square) > 1.8 * spread(circle)
    assert spread(v2) > 1.25 * spread(circle)
    assert abs(spread(v1) - spread(circle)) < 0.06 * spread(circle)


def test_large_geometry_draws_the_same_path_with_a_bigger_shape():
    cap = "a blue triangle moving left on a black background"
    small, large = coverage(cap, seed=9), coverage(cap, seed=9, geometry="large")
    assert small.shape == large.shape == (17, 64, 64)
    # Radius 13-15 px against 8-10: about (14 / 9)^2 = 2.4x the area, and still whole inside every frame.
    assert 1.6 < large[0].sum() / small[0].sum() < 3.7
    for cover in (small, large):
        assert not cover[:, [0, -1], :].any() and not cover[:, :, [0, -1]].any()
    xs = [np.average(np.arange(64), weights=f.sum(0)) for f in large]
    assert xs[0] - xs[-1] > 0.2 * 64 - 1  # moves left, by at least the smallest travel (12.8 px)


def test_inset_keeps_the_path_off_the_edges_across_its_motion_and_nothing_else():
    # The same draws as "large" (so the same size, speed and start along the motion), moved 5 px further from
    # the edges across the motion: every shape of the grammar then keeps >= 7 px from them, where "large" lets
    # a triangle's apex come within 2 px (a DiT a pixel off then draws it over the edge, and it goes unread).
    def across_gap(cover, direction):
        ys, xs = np.nonzero((cover > 0.5).any(0))
        lo, hi = (ys.min(), ys.max()) if direction in ("left", "right") else (xs.min(), xs.max())
        return min(lo, 63 - hi)

    gaps = {"large": [], "large-inset": []}
    for cap in all_captions()[::5]:
        for seed in range(3):
            cover = {g: coverage(cap, seed, geometry=g) for g in gaps}
            for g in gaps:
                gaps[g].append(across_gap(cover[g], cap.direction))
            # Same shape, same motion: the inset only translates the path across it.
            assert abs(cover["large"].sum() - cover["large-inset"].sum()) < 1e-3 * cover["large"].sum()
            axis = 0 if cap.direction in ("left", "right") else 1  # summed over: leaves the along profile
            along = [[np.average(np.arange(64), weights=f.sum(axis)) for f in cover[g]] for g in gaps]
            np.testing.assert_allclose(along[0], along[1], atol=0.05)  # px, up to anti-aliasing
    assert min(gaps["large"]) <= 2 and min(gaps["large-inset"]) >= 7


def test_geometry_errors():
    with pytest.raises(ValueError, match="unknown geometry 'huge'"):
        render("a red circle moving right on a blue background", 0, geometry="huge")
    with pytest.raises(ValueError, match="leaves a 64-px frame"):
        Geometry(radius=(0.2, 0.3), travel=(0.2, 0.3)).validate(64)
    with pytest.raises(ValueError, match="ordered"):
        Geometry(radius=(0.2, 0.1), travel=(0.2, 0.3)).validate(64)
    with pytest.raises(ValueError, match="half side"):
        Geometry(radius=(0.1, 0.1), travel=(0.2, 0.3), square=1.5).validate(64)
    for inset in (-0.01, 0.2):
        with pytest.raises(ValueError, match="inset must be >= 0 and leave room"):
            Geometry(radius=(0.2, 0.24), travel=(0.2, 0.26), inset=inset).validate(64)
    for geometry in GEOMETRIES.values():
        geometry.validate(64)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_detector_reads_every_caption_of_the_grammar(geometry):
    wrong = []
    for i, cap in enumerate(all_captions()):
        got = detect(render(cap, seed=10_000 + i, geometry=geometry))
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
