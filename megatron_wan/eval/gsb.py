"""GSB human evaluation (Tables 1, 3, 4, 8): Good / Same / Bad labels of A against B per pair, for Video Quality
(VQ) and Prompt Follow (PF), and Score = (Good + Same) / (Same + Bad); above 1, A is better.

Annotation files (CSV or JSONL) hold one record per judged pair: `model_a`, `model_b`, and a `VQ` and a `PF`
label, each Good, Same or Bad (any case); other columns (an id, the prompt, the annotator) are ignored.
"""

import math
from pathlib import Path

from megatron_wan.eval.tables import markdown, read_records, write_tables

GSB_DIMENSIONS = ("VQ", "PF")
LABELS = ("good", "same", "bad")


def gsb_score(good: int, same: int, bad: int) -> float:
    """(Good + Same) / (Same + Bad); infinite when A wins every pair, an error when there are no labels."""
    if same + bad == 0:
        if good == 0:
            raise ValueError("GSB score of no labels (Good = Same = Bad = 0)")
        return math.inf
    return (good + same) / (same + bad)


def read_annotations(*paths) -> dict:
    """(model_a, model_b) -> dimension -> {"good": n, "same": n, "bad": n}, comparisons in order of appearance."""
    counts = {}
    for path in paths:
        for where, record in read_records(path):
            missing = [k for k in ("model_a", "model_b", *GSB_DIMENSIONS) if k not in record]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)}")
            pair = (record["model_a"], record["model_b"])
            tallies = counts.setdefault(pair, {dim: dict.fromkeys(LABELS, 0) for dim in GSB_DIMENSIONS})
            for dim in GSB_DIMENSIONS:
                label = str(record[dim]).strip().lower()
                if label not in LABELS:
                    raise ValueError(f"{where}: {dim} is {record[dim]!r}, expected Good, Same or Bad")
                tallies[dim][label] += 1
    return counts


def gsb_table(counts: dict) -> tuple[list, list]:
    """Table 1's layout: "A vs B", then per dimension "Good / Same / Bad" and the Score to 2 decimals."""
    header = ["Comparison (A vs B)"]
    for dim in GSB_DIMENSIONS:
        header += [dim, f"{dim} Score"]
    rows = []
    for (a, b), tallies in counts.items():
        row = [f"{a} vs {b}"]
        for dim in GSB_DIMENSIONS:
            g, s, bad = (tallies[dim][label] for label in LABELS)
            row += [f"{g} / {s} / {bad}", f"{gsb_score(g, s, bad):.2f}"]
        rows.append(row)
    return header, rows


def add_arguments(parser):
    parser.add_argument("annotations", type=Path, nargs="+",
                        help="CSV or JSONL files: model_a, model_b, VQ, PF (Good/Same/Bad) per judged pair")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.csv (default: print the markdown only)")


def run(args):
    counts = read_annotations(*args.annotations)
    header, rows = gsb_table(counts)
    if args.out:
        write_tables(args.out, header, rows, rows)
    print(markdown(header, rows), end="")
    return counts
