"""Procedural caption -> video data for the embedded demo model (`--task tiny`), and a detector to grade it.

Every video shows one flat shape moving in a straight line over a flat background, described by a caption from
a small grammar: "a {colour} {shape} moving {direction} on a {background} background". A video is a pure
function of (caption, seed), so the data set, the training run and the tests are reproducible.

The detector reads a video back into (colour, shape, direction, background) with simple image statistics;
it is how the tests check that the trained model follows its prompts.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

COLOURS = {  # object colours, RGB
    "red": (220, 45, 45),
    "green": (50, 200, 70),
    "blue": (60, 110, 245),
    "yellow": (240, 215, 50),
    "white": (240, 240, 240),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (120, 120, 120),
    "blue": (25, 40, 120),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}  # (dx, dy) in image axes

FRAMES, SIZE = 17, 64  # 4n+1 frames for the Wan-VAE; the tiny VAE (4×4×4) makes 5×16×16 latents


def _margin(r: float) -> float:
    """How far (px) a shape's centre stays from the frame's edges (the triangle's apex reaches 1.4 r)."""
    return 1.45 * r + 1


@dataclass(frozen=True)
class Geometry:
    """How big the shape is and how far it moves, each a (low, high) range as a fraction of the frame size;
    `square`: the square's half side in units of r (the circle's radius, the triangle's scale); `inset`: room
    (a fraction of the frame size) the path keeps from the frame's edges across its motion, on top of the
    margin every shape keeps (1.45 r + 1 px from its centre)."""

    radius: tuple[float, float]
    travel: tuple[float, float]
    square: float = 0.85
    inset: float = 0.0

    def validate(self, size: int = SIZE) -> None:
        (r0, r1), (t0, t1) = self.radius, self.travel
        if not (0 < r0 <= r1 and 0 <= t0 <= t1):
            raise ValueError(f"radius and travel must be ordered (low, high) ranges > 0, got {self}")
        if not 0 < self.square <= 1.4:  # 1.4 r: the margin of _frames below
            raise ValueError(f"square must be a half side in (0, 1.4] radii, got {self.square}")
        margin = _margin(r1 * size)
        if size - 2 * margin - t1 * size < 0:
            raise ValueError(f"{self}: the largest shape on the longest travel leaves a {size}-px frame")
        if self.inset < 0 or size - 2 * (margin + self.inset * size) < 0:
            raise ValueError(f"{self}: the inset must be >= 0 and leave room beside the largest shape's path")


# "small" is the geometry of the VAE's training data and of the shipped DiT's base run: its objects are 2-2.5
# DiT tokens (8 px) across, and that DiT never tied their outline to the shape word (checkpoints/README.md).
# The large shapes make the outlines differ by whole tokens (a radius of 13-15 px, over a shorter travel so
# that the shape stays in the frame). "large-v1" keeps the small geometry's square (half side 0.85 r, about
# the circle's area): a DiT fine-tuned on it drew squares with round corners, the two shapes being nearly the
# same blob to second order (per-axis spread 0.24 r² and 0.25 r²). "large-v2" draws the square with half side
# r (27% more area than the circle, spread 0.33 r²): fine-tuned on it the DiT drew half of its squares, the
# rest still bulging. "large" makes it half side 1.2 r (1.83x the circle's area, spread 0.48 r²), which the
# DiT draws square far more often. In all three a shape comes within 1-5 px of the frame's edge (the margin
# was set for the triangle's apex), and a DiT a pixel or two off draws it over the edge, where the detector
# cannot read it; "large-inset" keeps the path 5 px (0.08 of the frame) further in across its motion, and a
# DiT fine-tuned on it no longer does. The shipped DiT was fine-tuned on the four in turn
# (checkpoints/README.md).
_LARGE = dict(radius=(0.2, 0.24), travel=(0.2, 0.26))  # radius 13-15 px, travel 13-17 px at 64 px
GEOMETRIES = {
    "small": Geometry(radius=(0.12, 0.16), travel=(0.3, 0.4)),  # radius 8-10 px, travel 19-26 px
    "large-v1": Geometry(**_LARGE, square=0.85),
    "large-v2": Geometry(**_LARGE, square=1.0),
    "large": Geometry(**_LARGE, square=1.2),
    "large-inset": Geometry(**_LARGE, square=1.2, inset=0.08),
}


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    direction: str
    background: str

    def __str__(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"

    @classmethod
    def parse(cls, text: str) -> Caption:
        words = text.lower().strip().rstrip(".").split()
        try:
            a, colour, shape, moving, direction, on, a2, background, bg_word = words
            ok = (a, moving, on, a2, bg_word) == ("a", "moving", "on", "a", "background")
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"not a caption of the grammar 'a <colour> <shape> moving <direction> on a "
                f"<background> background': {text!r}"
            )
        cap = cls(colour, shape, direction, background)
        cap.validate()
        return cap

    def validate(self) -> None:
        for value, options, name in (
            (self.colour, COLOURS, "colour"),
            (self.shape, SHAPES, "shape"),
            (self.direction, DIRECTIONS, "direction"),
            (self.background, BACKGROUNDS, "background"),
        ):
            if value not in options:
                raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(options)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background would be invisible")


def all_captions() -> list[Caption]:
    """Every valid caption of the grammar (the same colour for shape and background is excluded)."""
    caps = [Caption(*c) for c in itertools.product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)]
    return [c for c in caps if c.colour != c.background]


def _shape_mask(
    shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray, square: float
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (in pixels) to the shape's outline; `square` is
    the square's half side in radii (`Geometry.square`)."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        sdf = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        sdf = np.maximum(np.abs(dx), np.abs(dy)) - square * r
    else:  # an upright equilateral triangle (apex up; image y points down) with inradius 0.7 r
        edges = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]  # outward edge normals
        sdf = np.max([nx * dx + ny * dy for nx, ny in edges], axis=0) - 0.7 * r
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _geometry(name: str, size: int) -> Geometry:
    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}; choose one of {sorted(GEOMETRIES)}")
    geo = GEOMETRIES[name]
    geo.validate(size)
    return geo


def _frames(cap: Caption, seed: int, frames: int, size: int, geo: Geometry):
    """Yield each frame's (cx, cy, r) and the pixel grid: the path every video of (caption, seed) follows."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(*geo.radius) * size
    travel = rng.uniform(*geo.travel) * size
    dx, dy = DIRECTIONS[cap.direction]
    margin = _margin(r)
    # Along the motion axis the shape starts so that it stays in the frame; across it, anywhere `inset` lets.
    along0 = rng.uniform(margin, size - margin - travel)
    across = rng.uniform(margin + geo.inset * size, size - margin - geo.inset * size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for f in range(frames):
        along = along0 + travel * f / (frames - 1)
        pos = along if (dx + dy) > 0 else size - along  # left/up run from the far side
        cx, cy = (pos, across) if dx else (across, pos)
        yield cx, cy, r, yy, xx


def _parse(caption: Caption | str) -> Caption:
    cap = Caption.parse(caption) if isinstance(caption, str) else caption
    cap.validate()
    return cap


def render(
    caption: Caption | str, seed: int, frames: int = FRAMES, size: int = SIZE, geometry: str = "small"
) -> np.ndarray:
    """The video of `caption` for `seed`: uint8 [frames, size, size, 3] (position, size, speed vary within
    `GEOMETRIES[geometry]`)."""
    cap = _parse(caption)
    bg = np.array(BACKGROUNDS[cap.background], np.float32)
    fg = np.array(COLOURS[cap.colour], np.float32)
    cover = coverage(cap, seed, frames, size, geometry)[..., None]  # [F, H, W, 1]
    return np.round(bg * (1 - cover) + fg * cover).astype(np.uint8)


def coverage(
    caption: Caption | str, seed: int, frames: int = FRAMES, size: int = SIZE, geometry: str = "small"
) -> np.ndarray:
    """How much of each pixel of `render(caption, seed, ...)` the shape covers: float32 [F, H, W], 0..1."""
    cap = _parse(caption)
    geo = _geometry(geometry, size)
    return np.stack(
        [
            _shape_mask(cap.shape, cx, cy, r, yy, xx, geo.square)
            for cx, cy, r, yy, xx in _frames(cap, seed, frames, size, geo)
        ]
    )


# ----------------------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------------------
def _nearest(rgb: np.ndarray, palette: dict[str, tuple]) -> str:
    names = list(palette)
    dist = [np.sum((rgb - np.array(palette[n], np.float32)) ** 2) for n in names]
    return names[int(np.argmin(dist))]


def detect(video: np.ndarray) -> dict[str, str | None]:
    """Read (colour, shape, direction, background) back from a uint8 [F, H, W, 3] video.

    Background: the median colour of the border pixels. Foreground: pixels far from it. Colour: the mean of
    the clearly-foreground pixels. Direction: displacement of the foreground centroid from the first to the
    last frames. Shape: how much of its bounding box the shape fills (square ~1, circle ~π/4, triangle ~1/2).
    Entries are None when no foreground is found.
    """
    v = video.astype(np.float32)
    border = np.concatenate([v[:, 0], v[:, -1], v[:, :, 0], v[:, :, -1]], axis=1).reshape(-1, 3)
    bg = np.median(border, axis=0)
    dist = np.sqrt(((v - bg) ** 2).sum(-1))  # [F, H, W]
    fg = dist > 40.0
    out: dict[str, str | None] = {
        "background": _nearest(bg, BACKGROUNDS),
        "colour": None,
        "shape": None,
        "direction": None,
    }
    if fg.sum() < 10:
        return out
    core = dist > 0.7 * dist.max()
    out["colour"] = _nearest(v[core].mean(0), COLOURS)
    centroids, fills = [], []
    for f in range(v.shape[0]):
        ys, xs = np.nonzero(fg[f])
        if len(xs) < 10:
            continue
        centroids.append((xs.mean(), ys.mean()))
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        touches = xs.min() == 0 or ys.min() == 0 or xs.max() == v.shape[2] - 1 or ys.max() == v.shape[1] - 1
        if not touches:  # a shape cut by the border would look square
            fills.append(len(xs) / box)
    if len(centroids) >= 2:
        k = max(1, len(centroids) // 4)
        (x0, y0), (x1, y1) = np.mean(centroids[:k], 0), np.mean(centroids[-k:], 0)
        if abs(x1 - x0) >= abs(y1 - y0):
            out["direction"] = "right" if x1 > x0 else "left"
        else:
            out["direction"] = "down" if y1 > y0 else "up"
    if fills:
        fill = float(np.median(fills))
        out["shape"] = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    return out
