"""The procedural world's vocabulary, shared by its generator (data_tools.world) and its metrics
(megatron_wan.eval.world): frame size and timing, the background, the palette, shapes, directions and the caption
template with its inverse."""

import re

SIZE = 32  # pixels, square
FRAMES = 17  # 1 + 4k: 5 latent frames in the Wan VAE
FPS = 16
BACKGROUND = (100, 100, 100)
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 235), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), image y grows down
PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
WORDS = ("a", "moves", "to", "the", *COLOURS, *SHAPES, *DIRECTIONS)  # every word of every caption
_CAPTION = re.compile(rf"^a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moves "
                      rf"({'|'.join(PHRASES.values())})$")


def caption(shape: str, colour: str, direction: str) -> str:
    """The template caption of a clip: 'a red circle moves to the left'."""
    return f"a {colour} {shape} moves {PHRASES[direction]}"


def parse_caption(text: str) -> dict:
    """{'shape', 'colour', 'direction'} of a template caption; a ValueError names a caption that is not one."""
    m = _CAPTION.match(text.strip().lower())
    if not m:
        raise ValueError(f"not a world caption ('a COLOUR SHAPE moves DIRECTION'): {text!r}")
    direction = next(d for d, phrase in PHRASES.items() if phrase == m[3])
    return {"shape": m[2], "colour": m[1], "direction": direction}
