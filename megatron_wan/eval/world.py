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
  object      `peak` = the median of the frames' largest dist, over the frames where it reaches 40 (the
              palette's contrast with the grey is 123..187); no object when none does. Per frame: the largest
              4-connected set of pixels with dist > peak / 2 (the half-contrast edge of a blurred object stays
              where the sharp edge was); `coverage` = clip(dist / peak, 0, 1) on that mask grown by one pixel, 0
              elsewhere.
  colour      the hue of the mean RGB of the object's core (its mask shrunk by one pixel) over all frames, against
              the palette's hues, nearest wins; none (wrong) when its channels are less than 30 apart (grey, white,
              black; the palette's are 160..195 apart). Hue does not change when a colour is mixed with grey (blur
              into the background, faded edges) or scaled (brightness).
  shape       from the coverage, medians over frames: `skew` = skewness of the row profile (coverage summed along
              each row): 0 for a circle or square, -2 sqrt(2) / 5 = -0.57 for the apex-up triangle; triangle when
              skew < -0.2. Otherwise `fill` = coverage sum / (width x height), width and height being the sums of
              the coverage's column and row maxima (circle pi/4, square 1): square when fill > 0.92, else circle.
              Blur keeps both: it conserves the coverage sum and the width and height so measured, and leaves
              the profile's third central moment unchanged.
  motion      the coverage-weighted centroid per frame; (vx, vy) = least-squares slope of the track (px/frame);
              direction = the sign of the larger component, none (wrong) when speed = |(vx, vy)| < 0.1;
              straightness = |last - first centroid| / the track's length (1 for a straight track).
  temporal    area_cv = std / mean of the object's area (its coverage sum) over frames (0 without an object);
              colour_std = RMS over channels of the std over frames of the core's mean RGB.
  artifacts   off_object_rms = RMS dist outside the object's mask grown by 2 pixels (a flat background is 0);
              sharpness = sum g^2 / sum g of the coverage steps g between neighbouring pixels near the object: the
              typical step across its edge, about 1 when sharp and 1 / (edge width) when blurred;
              grid_energy = RMS of the 8 x 8-periodic part of the background residual (frame - background outside
              the grown mask, averaged per position modulo 8 over blocks and frames): the Wan VAE's 8-pixel grid.
A clip with no object is wrong on colour, shape and direction; its other measures are taken as they come (its
area is 0). The set-level distance (`--reference`) is the energy distance between two sets of per-video feature
vectors (FEATURES: the core's mean RGB, area, fill, skew, vx, vy, straightness, area_cv, colour_std,
off_object_rms, sharpness, grid_energy), each feature standardized by the mean and std of both sets together.
"""

import json
import math
from pathlib import Path

import av
import numpy as np

from megatron_wan.eval.ranking import DECIMALS, rank_methods, report
from megatron_wan.eval.tables import number, read_records
from megatron_wan.eval.world_vocab import COLOURS, DIRECTIONS, SHAPES, parse_caption
from megatron_wan.files import atomic_path
from megatron_wan.video_io import read_rgb

MIN_CONTRAST = 40.0  # RGB distance from the background below which a clip has no object
MIN_CHROMA = 30.0  # max - min channel below which an object has no colour; the palette's is 160..195
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


def nearest_colour(rgb) -> str | None:
    """The palette colour whose hue is nearest (around the circle) to that of `rgb`; None for a colour without hue
    (its largest and smallest channels less than MIN_CHROMA apart: grey, white, black)."""
    if max(rgb) - min(rgb) < MIN_CHROMA:
        return None
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
    above; every mask is empty (and peak 0) when no frame has a pixel MIN_CONTRAST from the background."""
    frames = np.asarray(frames, np.float64)
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, 1:-1, 0], frames[:, 1:-1, -1]], axis=1)
    background = np.median(border.reshape(-1, 3), axis=0)
    dist = np.linalg.norm(frames - background, axis=-1)
    largest = dist.max(axis=(1, 2))
    if not (largest >= MIN_CONTRAST).any():
        return background, dist, np.zeros(dist.shape, bool), 0.0
    peak = float(np.median(largest[largest >= MIN_CONTRAST]))
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
    return float(fill), float((profile * (y - mean) ** 3).sum() / area / var ** 1.5) if var > 0 else 0.0


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
    near = _grow(masks)
    coverage = np.clip(dist / max(peak, MIN_CONTRAST), 0, 1) * near  # zero off the object
    area = coverage.sum(axis=(1, 2))
    outside = ~_grow(masks, 2)
    out = {"object_frames": float(present.mean()), "peak": peak,
           "area": float(area.mean()), "area_cv": float(area.std() / area.mean()) if area.any() else 0.0,
           "off_object_rms": float(np.sqrt((dist[outside] ** 2).mean())) if outside.any() else 0.0,
           "grid_energy": _grid_energy(frames - background, outside),
           "colour": None, "shape": None, "direction": None, "rgb": [0.0, 0.0, 0.0], "hue": None, "fill": 0.0,
           "skew": 0.0, "vx": 0.0, "vy": 0.0, "speed": 0.0, "straightness": 0.0, "colour_std": 0.0,
           "sharpness": _sharpness(coverage, near)}
    if not present.any():
        return out
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


def truth_of(row: dict) -> dict:
    """{'shape', 'colour', 'direction'} a row asks for: its own fields, the missing ones read from its caption
    (`caption` or `prompt`); a ValueError names a value outside the vocabulary or a missing caption."""
    truth = {k: row[k] for k in ("shape", "colour", "direction") if row.get(k) is not None}
    if len(truth) < 3:
        text = row.get("caption") or row.get("prompt")
        if not text:
            raise ValueError("no shape/colour/direction and no caption or prompt to read them from")
        truth = {**parse_caption(text), **truth}
    for key, allowed in (("shape", SHAPES), ("colour", COLOURS), ("direction", DIRECTIONS)):
        if truth[key] not in allowed:
            raise ValueError(f"{key}: expected one of {list(allowed)}, found {truth[key]!r}")
    return truth


def score_frames(frames, truth: dict) -> dict:
    """One clip's scores: `truth` (shape, colour, direction), what `measure` found (`measured_shape`, ...), whether
    each matches (`shape_ok`, ...) and the other measures."""
    found = measure(frames)
    row = dict(truth)
    for key in ACCURACIES:
        row[f"measured_{key}"] = found.pop(key)
        row[f"{key}_ok"] = row[f"measured_{key}"] == truth[key]
    return {**row, **found}


def read_rows(path) -> list[dict]:
    """The rows of a video list: CSV or JSONL records, or a JSON object of file name -> prompt (the sampler's
    prompts.json); each row gets `where` (FILE:LINE or FILE:NAME) for messages."""
    path = Path(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected an object of video file -> prompt")
        return [{"video": name, "prompt": prompt, "where": f"{path}:{name}"} for name, prompt in data.items()]
    return [{**record, "where": where} for where, record in read_records(path)]


def score_videos(rows, videos_dir) -> tuple[list[dict], list[dict]]:
    """(scores, rejects) of the videos `rows` name (`video` or `path`, relative to `videos_dir` unless absolute):
    a scores row per readable video (`video` as named, its `caption` if any, then score_frames'), a rejects row
    (`video`, `where`, `reason`) per row without a video, a world caption or a decodable file."""
    scores, rejects = [], []
    for row in rows:
        name = row.get("video") or row.get("path")
        try:
            if not name:
                raise ValueError("names no video (`video` or `path`)")
            truth = truth_of(row)
            path = Path(videos_dir) / name
            if not path.is_file():
                raise ValueError(f"{path}: no such file")
            try:
                frames = read_rgb(path)
            except (OSError, av.FFmpegError) as e:
                raise ValueError(f"{path}: not a readable video ({e})") from None
            caption = row.get("caption") or row.get("prompt")
            scores.append({"video": name, **({"caption": caption} if caption else {}), **score_frames(frames, truth)})
        except ValueError as e:
            rejects.append({"video": name, "where": row.get("where"), "reason": str(e)})
    return scores, rejects


def summarize(scores: list[dict], rejects: list[dict] = ()) -> dict:
    """Counts, accuracies (`colour_accuracy`, `shape_accuracy`, `direction_accuracy`, `accuracy`: all three right)
    and means of MEANS over scored videos (None without any), and the rejects."""
    def mean(values):
        values = list(values)
        return float(np.mean(values)) if values else None

    summary = {"videos": len(scores), "rejected": len(rejects)}
    for key in ACCURACIES:
        summary[f"{key}_accuracy"] = mean(s[f"{key}_ok"] for s in scores)
    summary["accuracy"] = mean(all(s[f"{key}_ok"] for key in ACCURACIES) for s in scores)
    summary.update({key: mean(s[key] for s in scores) for key in MEANS})
    summary["rejects"] = list(rejects)
    return summary


def features(scores: list[dict]) -> np.ndarray:
    """The FEATURES vectors [videos, len(FEATURES)] of scores rows (`rgb` gives red, green, blue)."""
    return np.array([[*s["rgb"], *(s[k] for k in FEATURES[3:])] for s in scores], np.float64).reshape(-1, len(FEATURES))


def set_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Energy distance 2 E|a - b| - E|a - a'| - E|b - b'| (Euclidean, over all pairs) between two sets of feature
    vectors [n, d] and [m, d], each feature standardized by the mean and std of both sets together (a constant
    feature is left unscaled); 0 for identical sets, larger as they differ."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not len(a) or not len(b):
        raise ValueError(f"set distance: needs videos in both sets (found {len(a)} and {len(b)})")
    both = np.concatenate([a, b])
    std = both.std(axis=0)
    centre, scale = both.mean(axis=0), np.where(std > 0, std, 1.0)
    a, b = (a - centre) / scale, (b - centre) / scale

    def mean_dist(x, y):
        return float(np.linalg.norm(x[:, None] - y[None], axis=-1).mean())

    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def ranking_values(summaries: dict) -> dict:
    """group -> dimension -> value, higher is better: the RANKED keys every summary has a number for, the
    lower-is-better ones negated (named `-KEY`)."""
    if not summaries:
        raise ValueError("no groups to rank")
    for name, s in summaries.items():
        if not s["videos"]:
            raise ValueError(f"group {name!r}: no scored videos to rank ({s['rejected']} rejected)")
    keys = [k for k in RANKED if all(s.get(k) is not None for s in summaries.values())]
    return {name: {k if RANKED[k] > 0 else f"-{k}": RANKED[k] * number(s[k], f"group {name!r}, {k}") for k in keys}
            for name, s in summaries.items()}


def rank_groups(summaries: dict, decimals: int = DECIMALS) -> dict:
    """group -> dimension -> the paper's ranking points, plus Total_Score, from group -> summary (ranking.py: per
    dimension n groups get n..1 points, ties share the block's highest)."""
    return rank_methods(ranking_values(summaries), decimals)


def _write_jsonl(path: Path, rows) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def reference_features(attributes, videos_dir=None, split: str = "test") -> np.ndarray:
    """The FEATURES of the real clips an attributes file lists (`split` rows; "all": every row), from `videos_dir`
    (default: the file's folder); an error when none can be scored."""
    rows = [r for r in read_rows(attributes) if split == "all" or r.get("split") == split]
    scores, rejects = score_videos(rows, videos_dir or Path(attributes).parent)
    if not scores:
        raise ValueError(f"{attributes}: no scorable reference videos in split {split!r} "
                         f"({len(rows)} rows, {len(rejects)} rejected)")
    return features(scores)


def add_arguments(parser):
    parser.description = __doc__
    parser.add_argument("--videos", type=Path, help="folder of the videos FILE names (default: FILE's folder)")
    parser.add_argument("--attributes", type=Path, metavar="FILE",
                        help="the video list: attributes.jsonl, manifest.jsonl, prompts.json, or a CSV / JSONL")
    parser.add_argument("--group", nargs=3, action="append", metavar=("NAME", "DIR", "FILE"),
                        help="a group of videos to score and rank (repeat; instead of --videos/--attributes)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--reference", type=Path, metavar="ATTRS",
                        help="the real clips' attributes.jsonl: adds each group's set-level `distance` to them")
    parser.add_argument("--reference-videos", type=Path, help="the real clips' folder (default: ATTRS's folder)")
    parser.add_argument("--reference-split", default="test", help="the reference rows' split ('all': every row)")
    parser.add_argument("--decimals", type=int, default=DECIMALS, help="printed precision; ties are judged at it")


def run(args):
    if bool(args.group) == bool(args.attributes) or (args.group and args.videos):
        raise ValueError("give --attributes FILE [--videos DIR] (one group) or --group NAME DIR FILE (repeated)")
    groups = {name: (Path(folder), Path(file)) for name, folder, file in args.group or []}
    if args.group and len(groups) < len(args.group):
        raise ValueError(f"--group: a name appears twice ({[g[0] for g in args.group]})")
    if args.attributes:
        groups = {"videos": (args.videos or args.attributes.parent, args.attributes)}
    reference = (reference_features(args.reference, args.reference_videos, args.reference_split)
                 if args.reference else None)
    summaries = {}
    for name, (folder, file) in groups.items():
        out = args.out / name if args.group else args.out
        out.mkdir(parents=True, exist_ok=True)
        scores, rejects = score_videos(read_rows(file), folder)
        summary = summarize(scores, rejects)
        if reference is not None:
            summary["distance"] = set_distance(features(scores), reference) if scores else None
        _write_jsonl(out / "scores.jsonl", scores)
        _write_json(out / "summary.json", summary)
        summaries[name] = summary
        shown = ", ".join(f"{k} {summary[k]:.4f}" for k in ("accuracy", *(f"{a}_accuracy" for a in ACCURACIES),
                                                               "distance") if summary.get(k) is not None)
        print(f"world {name}: {len(scores)} videos scored, {len(rejects)} rejected -> {out}: {shown}")
    if args.group:
        print(report(ranking_values(summaries), args.out / "ranking", decimals=args.decimals), end="")
        return rank_groups(summaries, args.decimals)
    return summaries["videos"]
