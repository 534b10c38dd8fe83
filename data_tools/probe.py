"""probe: metadata of every input video (decord, PyAV as the fallback); unreadable files are rejected."""

from data_tools.media import video_metadata


def probe(record: dict) -> dict:
    """The record with fps, frames, duration, width, height, aspect, codec, size_bytes, sha256."""
    return {**record, **video_metadata(record["path"])}


def add_arguments(parser) -> None:
    parser.description = __doc__


def make(args):
    return probe
