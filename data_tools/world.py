"""world: procedural clips whose truth is known, so that video quality is a number computed from pixels.

`python -m data_tools world --out DIR --videos N --seed S` writes N clips `DIR/<id>.mp4` (H.264, yuv420p, square
pixels, 16 fps, no audio, 32x32, 17 frames = 1 + 4k for the Wan VAE), `DIR/captions.csv` (the `video,caption` CSV
that normalize reads) and `DIR/attributes.jsonl` (one row per clip: video, caption, shape, colour, direction, split
and the geometry it was drawn with). A clip: one object (circle, square or triangle; red, green, blue or yellow) on a
plain grey background, of a random size between a third and half of the frame, moving in a straight line (left,
right, up or down) at a constant random speed from a random start, never leaving the frame, no cut. The caption is a
template: "a red circle moves to the left". Eight (shape, colour, direction) combinations, chosen so that every
shape, colour and direction still appears in training, are drawn only in the `test` split: prompts that measure
generalization. The same seed gives the same bytes (x264 runs on one thread).

The clips enter the data flow as raw videos (probe, select, filter, normalize with `--format world`); the metrics
that read them back live in megatron_wan.eval.world; the palette, names and caption template both use are in
megatron_wan.eval.world_vocab.
"""

import csv
import io
import itertools
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_wan.eval.world_vocab import BACKGROUND, COLOURS, DIRECTIONS, FPS, FRAMES, SHAPES, SIZE, caption
from megatron_wan.files import atomic_path
from megatron_wan.video_io import encode_h264

OBJECT_SIDE = (11.0, 16.0)  # bounding-box side in pixels: a third to a half of the frame
SPEED = (0.45, 0.85)  # pixels per frame: 7 to 14 pixels over the clip
MARGIN = 1.0  # pixels kept free at the frame's edges
SUPERSAMPLE = 4  # sub-pixels per pixel side: smooth edges and sub-pixel motion
CRF = 10


def combinations() -> list[tuple[str, str, str]]:
    """Every (shape, colour, direction), in a fixed order."""
    return list(itertools.product(SHAPES, COLOURS, DIRECTIONS))


def held_out(shape: str, colour: str, direction: str) -> bool:
    """Whether a combination appears only in the `test` split: 8 of the 48, two (shape, direction) pairs per colour,
    so that every shape, colour and direction, and every pair of them, is still seen in training."""
    c = list(COLOURS).index(colour)
    return (SHAPES.index(shape), list(DIRECTIONS).index(direction)) in {(c % 3, c), ((c + 1) % 3, (c + 2) % 4)}


def shape_mask(shape: str, x0: float, y0: float, side: float, size: int = SIZE) -> np.ndarray:
    """Coverage (0..1) of each pixel of a `size` x `size` frame by `shape` whose bounding box starts at (x0, y0)
    with side `side` (pixels), by supersampling."""
    n = size * SUPERSAMPLE
    centres = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(centres - x0, centres - y0)  # relative to the box's top-left corner
    inside_box = (x >= 0) & (x <= side) & (y >= 0) & (y <= side)
    if shape == "circle":
        r = side / 2
        inside = (x - r) ** 2 + (y - r) ** 2 <= r * r
    elif shape == "square":
        inside = inside_box
    elif shape == "triangle":  # apex up, base at the bottom of the box
        inside = inside_box & (np.abs(x - side / 2) <= y / 2)
    else:
        raise ValueError(f"shape: expected one of {SHAPES}, found {shape!r}")
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(shape: str, colour: str, x0: float, y0: float, side: float, velocity: tuple[float, float],
           frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """The clip's RGB frames [frames, size, size, 3] uint8: the object at (x0, y0) + t * velocity in frame t."""
    background = np.array(BACKGROUND, np.float64)
    fill = np.array(COLOURS[colour], np.float64)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        cover = shape_mask(shape, x0 + t * velocity[0], y0 + t * velocity[1], side, size)[..., None]
        out[t] = np.round(background * (1 - cover) + fill * cover)
    return out


def draw(rng: np.random.Generator, shape: str, colour: str, direction: str, frames: int = FRAMES,
         size: int = SIZE) -> dict:
    """Random geometry of one clip of (shape, colour, direction) that stays inside the frame."""
    side = float(rng.uniform(*OBJECT_SIDE))
    speed = float(rng.uniform(*SPEED))
    dx, dy = DIRECTIONS[direction]
    travel = speed * (frames - 1)
    room = size - 2 * MARGIN - side  # where the box's corner may be on each axis

    def start(step: int) -> float:
        if step == 0:
            return MARGIN + float(rng.uniform(0, room))
        lo = MARGIN + (travel if step < 0 else 0)
        return float(rng.uniform(lo, lo + room - travel))

    x0, y0 = start(dx), start(dy)
    return {"side": side, "speed": speed, "x0": x0, "y0": y0, "velocity": [dx * speed, dy * speed]}


def clip_rows(videos: int, seed: int) -> list[dict]:
    """The attributes of `videos` clips: combinations dealt in shuffled rounds of all 48 (balanced), geometry drawn
    from one generator seeded by `seed`."""
    rng = np.random.default_rng(seed)
    combos, rows = [], []
    while len(combos) < videos:
        combos += [combinations()[i] for i in rng.permutation(len(combinations()))]
    for i, (shape, colour, direction) in enumerate(combos[:videos]):
        rows.append({"video": f"world_{seed}_{i:05d}.mp4", "caption": caption(shape, colour, direction),
                     "shape": shape, "colour": colour, "direction": direction,
                     "split": "test" if held_out(shape, colour, direction) else "train",
                     **draw(rng, shape, colour, direction), "frames": FRAMES, "size": SIZE, "fps": FPS,
                     "background": list(BACKGROUND)})
    return rows


def write_clip(path: Path, row: dict) -> None:
    """Render one attributes row into an MP4 at `path`, written whole or not at all."""
    frames = render(row["shape"], row["colour"], row["x0"], row["y0"], row["side"], row["velocity"], row["frames"],
                    row["size"])
    with atomic_path(path) as tmp:
        encode_h264(tmp, frames, row["fps"], CRF, "medium", threads=1)


def write_world(out, videos: int, seed: int) -> dict:
    """Write the world's clips, captions.csv and attributes.jsonl into `out`; returns a summary."""
    if videos < 1:
        raise ValueError(f"--videos: expected at least 1, found {videos}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = clip_rows(videos, seed)
    for row in tqdm(rows, desc="world", unit="clip"):
        write_clip(out / row["video"], row)
    captions = io.StringIO()
    writer = csv.writer(captions, lineterminator="\n")
    writer.writerows([("video", "caption"), *((r["video"], r["caption"]) for r in rows)])
    with atomic_path(out / "captions.csv") as tmp:
        tmp.write_text(captions.getvalue(), encoding="utf-8")
    with atomic_path(out / "attributes.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    splits = {s: sum(r["split"] == s for r in rows) for s in ("train", "test")}
    summary = {"videos": len(rows), **splits, "out": str(out), "seed": seed}
    print(f"world: {len(rows)} clips ({splits['train']} train, {splits['test']} test) in {out}")
    return summary


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--videos", type=int, required=True, help="how many clips")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes")


def run(args) -> dict:
    return write_world(args.out, args.videos, args.seed)
