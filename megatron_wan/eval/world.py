"""world: the procedural world's videos (data_tools world) scored from their decoded RGB frames, with no learned model.

    python -m megatron_wan.eval world --videos DIR --attributes FILE --out OUT [--reference ATTRS]
    python -m megatron_wan.eval world --group NAME DIR FILE [--group ...] --out OUT [--reference ATTRS]

FILE lists the videos: the world's attributes.jsonl (`video` under DIR, `caption`, `shape`, `colour`, `direction`),
normalize's manifest.jsonl (`path`, `prompt`), the sampler's prompts.json (file name -> prompt), or any CSV / JSONL
with a video (`video` / `path`) and a caption (`caption` / `prompt`); a relative path is under DIR (default: FILE's
folder); shape, colour and direction missing from a row are read from its caption. One group writes
OUT/scores.jsonl (a row per video) and OUT/summary.json (means and accuracies); several groups write
OUT/NAME/{scores.jsonl,summary.json} and rank the groups into the paper's points and Total_Score
(OUT/ranking.md, OUT/ranking.csv). A missing or unreadable video, or a row without a world caption, is listed in
summary.json's `rejects` with its reason and the run goes on; accuracies are over the scored videos.

The rules, per clip of T frames:
  background  the median RGB of the frames' 1-pixel border; `dist` = RGB distance of each pixel from it.
  object      `peak` = median over frames of the frame's largest dist; no object when peak < 40 (the palette's
              contrast with the grey is 123..187). Per frame: the largest 4-connected set of pixels with
              dist > peak / 2 (the half-contrast edge of a blurred object stays where the sharp edge was);
              `coverage` = clip(dist / peak, 0, 1).
  colour      the hue of the mean RGB of the object's core (its mask shrunk by one pixel) over all frames, against
              the palette's hues, nearest wins. Hue does not change when a colour is mixed with grey (blur into the
              background, faded edges) or scaled (brightness).
  shape       from the coverage on the mask grown by one pixel, medians over frames: `skew` = skewness of the
              row profile (coverage summed along each row): 0 for a circle or square, -2 sqrt(2) / 5 = -0.57 for
              the apex-up triangle; triangle when skew < -0.2. Otherwise `fill` = coverage sum / (width x
              height), width and height being the sums of the column and row maxima (circle pi/4, square 1):
              square when fill > 0.92, else circle. Blur keeps both: it conserves the coverage sum and the width
              and height so measured, and leaves the profile's third central moment unchanged.
  motion      the coverage-weighted centroid per frame; (vx, vy) = least-squares slope of the track (px/frame);
              direction = the sign of the larger component, none (wrong) when speed = |(vx, vy)| < 0.1;
              straightness = |last - first centroid| / the track's length (1 for a straight track).
  temporal    area_cv = std / mean of the mask's area over frames (0 for frames without an object);
              colour_std = RMS over channels of the std over frames of the core's mean RGB.
  artifacts   off_object_rms = RMS dist outside the object's mask grown by 2 pixels (a flat background is 0);
              sharpness = sum g^2 / sum g of the coverage steps g between neighbouring pixels near the object: the
              typical step across its edge, about 1 when sharp and 1 / (edge width) when blurred;
              grid_energy = RMS of the 8 x 8-periodic part of the background residual (frame - background outside
              the grown mask, averaged per position modulo 8 over blocks and frames): the Wan VAE's 8-pixel grid.
A clip with no object is wrong on colour, shape and direction; its other measures are taken as they come (its
area is 0). The set-level distance (`--reference`) is the energy distance between two sets of per-video feature
vectors (FEATURES), each feature standardized by the mean and std of both sets together.
"""

import json
import math
from pathlib import Path

import numpy as np

from megatron_wan.eval.ranking import DECIMALS, rank_methods, report
from megatron_wan.eval.tables import number, read_records
from megatron_wan.eval.world_vocab import COLOURS, DIRECTIONS, SHAPES, parse_caption
from megatron_wan.files import atomic_path

MIN_CONTRAST = 40.0  # RGB distance from the background below which a clip has no object
TRIANGLE_SKEW = -0.2  # row-profile skewness: 0 for a circle or square, -2 sqrt(2) / 5 = -0.57 for the triangle
SQUARE_FILL = 0.92  # between pi/4 (circle) and 1 (square)
MIN_SPEED = 0.1  # px/frame; the world's objects move 0.45..0.85
GRID = 8  # the Wan VAE's spatial stride
FEATURES = ("red", "green", "blue", "area", "fill", "skew", "vx", "vy", "straightness", "area_cv", "colour_std",
            "off_object_rms", "sharpness", "grid_energy")  # the per-video vector of the set-level distance
ACCURACIES = ("colour", "shape", "direction")
MEANS = ("object_frames", "speed", "straightness", "area_cv", "colour_std", "off_object_rms", "sharpness",
         "grid_energy")
# Ranked dimensions (higher is better): summary key -> sign; lower-is-better measures enter negated.
RANKED = {"colour_accuracy": 1, "shape_accuracy": 1, "direction_accuracy": 1, "straightness": 1, "area_cv": -1,
          "colour_std": -1, "off_object_rms": -1, "sharpness": 1, "grid_energy": -1, "distance": -1}


def hue(rgb) -> float:
    """HSV hue of an RGB triple in degrees [0, 360); 0 for a grey."""
    r, g, b = (float(v) for v in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    if hi == lo:
        return 0.0
    if hi == r:
        h = (g - b) / (hi - lo)
    elif hi == g:
        h = 2 + (b - r) / (hi - lo)
    else:
        h = 4 + (r - g) / (hi - lo)
    return 60.0 * h % 360.0


def nearest_colour(rgb) -> str:
    """The palette colour whose hue is nearest (around the circle) to that of `rgb`."""
    h = hue(rgb)
    return min(COLOURS, key=lambda name: abs((hue(COLOURS[name]) - h + 180) % 360 - 180))


def _grow(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """`mask` [..., H, W] grown by `steps` pixels (8-neighbourhood)."""
    for _ in range(steps):
        padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
        h, w = mask.shape[-2:]
        mask = np.logical_or.reduce([padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)])
    return mask


def _shrink(mask: np.ndarray) -> np.ndarray:
    """`mask` [..., H, W] shrunk by one pixel (8-neighbourhood)."""
    return ~_grow(~mask)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected set of a 2-D boolean mask (the first on a tie); empty for an empty mask."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:  # every pixel takes the largest label among itself and its 4 neighbours in the mask
        p = np.pad(labels, 1)
        spread = np.where(mask, np.maximum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]), 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax() if counts.any() else mask & False


def object_masks(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(background RGB [3], dist [T, H, W], masks [T, H, W] bool, peak) of RGB frames [T, H, W, 3] by the rules
    above; every mask is empty when peak < MIN_CONTRAST."""
    frames = np.asarray(frames, np.float64)
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, 1:-1, 0], frames[:, 1:-1, -1]], axis=1)
    background = np.median(border.reshape(-1, 3), axis=0)
    dist = np.linalg.norm(frames - background, axis=-1)
    peak = float(np.median(dist.max(axis=(1, 2))))
    if peak < MIN_CONTRAST:
        return background, dist, np.zeros(dist.shape, bool), peak
    masks = np.stack([largest_component(d > peak / 2) for d in dist])
    return background, dist, masks, peak


def shape_measures(coverage: np.ndarray) -> tuple[float, float]:
    """(fill, skew) of one frame's object coverage [H, W] (zero off the object): its area / (its width x its
    height), width and height being the sums of the coverage's column and row maxima; and the skewness of its row
    profile (the coverage summed along each row)."""
    area = coverage.sum()
    fill = area / (coverage.max(axis=0).sum() * coverage.max(axis=1).sum())
    profile, y = coverage.sum(axis=1), np.arange(coverage.shape[0])
    mean = (profile * y).sum() / area
    var = (profile * (y - mean) ** 2).sum() / area
    return float(fill), float((profile * (y - mean) ** 3).sum() / area / var ** 1.5)


def classify_shape(fill: float, skew: float) -> str:
    """triangle when `skew` < TRIANGLE_SKEW, else square when `fill` > SQUARE_FILL, else circle."""
    return "triangle" if skew < TRIANGLE_SKEW else "square" if fill > SQUARE_FILL else "circle"


def direction_of(vx: float, vy: float) -> str | None:
    """The direction of a velocity (px/frame, image y down): the sign of its larger component; None below
    MIN_SPEED."""
    if math.hypot(vx, vy) < MIN_SPEED:
        return None
    step = (int(np.sign(vx)), 0) if abs(vx) >= abs(vy) else (0, int(np.sign(vy)))
    return next(name for name, d in DIRECTIONS.items() if d == step)


def _sharpness(coverage: np.ndarray, near: np.ndarray) -> float:
    """sum g^2 / sum g of the steps g of `coverage` [T, H, W] between horizontal and vertical neighbours both in
    `near`; 0 when there are none."""
    gx = np.abs(np.diff(coverage, axis=-1))[near[..., 1:] & near[..., :-1]]
    gy = np.abs(np.diff(coverage, axis=-2))[near[..., 1:, :] & near[..., :-1, :]]
    g = np.concatenate([gx, gy])
    return float((g ** 2).sum() / g.sum()) if g.sum() > 0 else 0.0


def _grid_energy(residual: np.ndarray, outside: np.ndarray) -> float:
    """RMS of the GRID x GRID-periodic part of `residual` [T, H, W, 3] over the pixels `outside` [T, H, W]: the mean
    per (row, column) modulo GRID, less its overall mean, per channel."""
    t, h, w, _ = residual.shape
    hb, wb = h // GRID * GRID, w // GRID * GRID
    r = residual[:, :hb, :wb].reshape(t, hb // GRID, GRID, wb // GRID, GRID, 3)
    m = outside[:, :hb, :wb].reshape(t, hb // GRID, GRID, wb // GRID, GRID, 1)
    count = m.sum(axis=(0, 1, 3))
    if (count == 0).any():
        return 0.0
    tile = (r * m).sum(axis=(0, 1, 3)) / count  # [GRID, GRID, 3]
    return float(np.sqrt(((tile - tile.mean(axis=(0, 1))) ** 2).mean()))


def measure(frames) -> dict:
    """The rules' measures of one clip's RGB frames [T, H, W, 3]: predicted `colour`, `shape`, `direction` (None
    without an object or, for direction, without motion) and the numbers they come from."""
    frames = np.asarray(frames, np.float64)
    background, dist, masks, peak = object_masks(frames)
    present = masks.any(axis=(1, 2))
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    outside = ~_grow(masks, 2)
    out = {"object_frames": float(present.mean()), "peak": peak,
           "area": float(area.mean()), "area_cv": float(area.std() / area.mean()) if area.any() else 0.0,
           "off_object_rms": float(np.sqrt((dist[outside] ** 2).mean())) if outside.any() else 0.0,
           "grid_energy": _grid_energy(frames - background, outside),
           "colour": None, "shape": None, "direction": None, "rgb": [0.0, 0.0, 0.0], "hue": None, "fill": 0.0,
           "skew": 0.0, "vx": 0.0, "vy": 0.0, "speed": 0.0, "straightness": 0.0, "colour_std": 0.0, "sharpness": 0.0}
    if not present.any():
        return out
    coverage = np.clip(dist / peak, 0, 1)
    near = _grow(masks)
    out["sharpness"] = _sharpness(coverage, near)
    coverage = coverage * near
    shown = np.flatnonzero(present)
    cores = [_shrink(masks[t]) if _shrink(masks[t]).any() else masks[t] for t in shown]
    colours = np.stack([frames[t][core].mean(axis=0) for t, core in zip(shown, cores)])
    rgb = np.concatenate([frames[t][core] for t, core in zip(shown, cores)]).mean(axis=0)
    fill, skew = np.median([shape_measures(coverage[t]) for t in shown], axis=0)
    out.update(rgb=[float(v) for v in rgb], hue=hue(rgb), colour=nearest_colour(rgb), fill=float(fill),
               skew=float(skew), shape=classify_shape(fill, skew),
               colour_std=float(np.sqrt(colours.var(axis=0).mean())))
    if len(shown) < 2:
        return out
    ys, xs = np.mgrid[:frames.shape[1], :frames.shape[2]]
    track = np.stack([[(coverage[t] * xs).sum(), (coverage[t] * ys).sum()] / coverage[t].sum() for t in shown])
    (vx, vy), _ = np.polyfit(shown, track, 1)  # slope and intercept per coordinate
    length = np.linalg.norm(np.diff(track, axis=0), axis=1).sum()
    out.update(vx=float(vx), vy=float(vy), speed=float(math.hypot(vx, vy)), direction=direction_of(vx, vy),
               straightness=float(np.linalg.norm(track[-1] - track[0]) / length) if length > 0 else 0.0)
    return out
