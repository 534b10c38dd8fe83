"""pair: preference pairs from manifests (Appendix A.1, pair construction).

- GT-Pairs: every GT video (`--in`, the normalize output) is the winner against each of its generated
  videos (`--generated`, one or more import-generated outputs): several generators, several pairs.
- Annotated pairs (`--scores`): generated videos of the same GT id paired with each other. The score file
  (CSV or JSONL, long format: video, annotator, dimension, score on a 1-5 scale) is averaged per video
  over annotators and dimensions; the higher average wins. Kept: gap >= `--min-gap` and winner >=
  `--min-winner-score` (the paper's ideal subset: 2 and 4); `--fill-to N` then adds seeded random pairs with
  gap >= `--fill-min-gap` (the paper's Annotated_Pair: all gap >= 2, `--min-winner-score 0`, plus gap-1 pairs).
- Train/test split by GT id (`--test-fraction`, seeded hash): no GT video is on both sides.

Writes manifest.jsonl (every pair, with `split`), train.jsonl, test.jsonl and rejects.jsonl. Pairing reads
only manifests, so it takes no worker processes; `--shard I/N` pairs every N-th GT id from I.
"""

import hashlib
import itertools
import random
import sys
from collections import defaultdict
from pathlib import Path

from data_tools.stage import input_records, read_table, shard_share, shard_suffix, write_jsonl


def split_of(gt_id: str, test_fraction: float, seed: int) -> str:
    """'test' for a seeded-hash fraction of GT ids, else 'train'; a pure function of (gt_id, seed)."""
    h = int(hashlib.sha256(f"{seed}:{gt_id}".encode()).hexdigest()[:12], 16) / 16**12
    return "test" if h < test_fraction else "train"


def _ref(record: dict) -> dict:
    return {k: record[k] for k in ("id", "path", "sha256", "generator") if k in record}


def gt_pairs(gts: list[dict], generated: list[dict]) -> tuple[list[dict], list[dict]]:
    """(GT-Pairs, rejects): each GT against each of its generated videos, in input order."""
    by_gt = defaultdict(list)
    for g in generated:
        by_gt[g.get("gt_id")].append(g)
    known = {gt["id"] for gt in gts}
    pairs, rejects = [], []
    for gt in gts:
        if not by_gt.get(gt["id"]):
            rejects.append({"id": gt["id"], "path": gt.get("path"), "reason": "no generated video for this GT",
                            "stage": "pair"})
        for g in by_gt.get(gt["id"], []):
            pairs.append({"id": f"{gt['id']}~{g['id']}", "kind": "gt", "gt_id": gt["id"], "prompt": gt.get("prompt"),
                          "image": gt.get("image"), "winner": _ref(gt), "loser": _ref(g)})
    for g in generated:
        if g.get("gt_id") not in known:
            rejects.append({"id": g["id"], "path": g.get("path"), "stage": "pair",
                            "reason": f"gt_id {g.get('gt_id')!r} is not among the GT videos"})
    return pairs, rejects


def video_scores(path) -> dict[str, float]:
    """Mean score per video over annotators and dimensions; a row outside 1-5 is an error naming it."""
    sums = defaultdict(list)
    for n, row in enumerate(read_table(path), 1):
        try:
            video, score = str(row["video"]), float(row["score"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: row {n} needs video and a numeric score, found {row}") from None
        if not 1 <= score <= 5:
            raise ValueError(f"{path}: row {n}: score {score:g} outside the 5-point scale 1-5")
        sums[video].append(score)
    return {v: sum(s) / len(s) for v, s in sums.items()}


def annotated_pairs(generated: list[dict], scores: dict[str, float], *, min_gap: float = 2.0,
                    min_winner_score: float = 4.0, fill_to: int = 0, fill_min_gap: float = 1.0,
                    seed: int = 0) -> list[dict]:
    """Pairs of scored generated videos sharing a GT id, selected as the module docstring says."""
    groups = defaultdict(list)
    for g in generated:
        if g["id"] in scores:
            groups[g.get("gt_id")].append(g)
    kept, spare = [], []
    for gt_id, videos in groups.items():
        for a, b in itertools.combinations(videos, 2):
            win, lose = (a, b) if scores[a["id"]] >= scores[b["id"]] else (b, a)
            gap = scores[win["id"]] - scores[lose["id"]]
            if gap <= 0:
                continue
            pair = {"id": f"{win['id']}>{lose['id']}", "kind": "annotated", "gt_id": gt_id, "prompt": win.get("prompt"),
                    "image": win.get("image"), "winner": _ref(win), "loser": _ref(lose),
                    "scores": {"winner": scores[win["id"]], "loser": scores[lose["id"]], "gap": gap}}
            if gap >= min_gap and scores[win["id"]] >= min_winner_score:
                kept.append(pair)
            elif gap >= fill_min_gap:
                spare.append(pair)
    if fill_to > len(kept):
        kept += random.Random(seed).sample(spare, min(len(spare), fill_to - len(kept)))
    return kept


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.add_argument("--generated", action="append", default=[], help="import-generated output (repeatable)")
    parser.add_argument("--scores", help="human scores: CSV or JSONL with video, annotator, dimension, score")
    parser.add_argument("--min-gap", type=float, default=2.0)
    parser.add_argument("--min-winner-score", type=float, default=4.0)
    parser.add_argument("--fill-to", type=int, default=0, help="add random pairs up to this many annotated pairs")
    parser.add_argument("--fill-min-gap", type=float, default=1.0)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    i, n = args.shard
    if args.fill_to and n > 1:
        sys.exit("data_tools pair: --fill-to samples over all annotated pairs; run it without --shard")
    try:
        gts = shard_share(input_records(args.input), args.shard)
        generated = [r for src in args.generated for r in input_records(src)]
        scores = video_scores(args.scores) if args.scores else {}
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"data_tools pair: {e}")
    mine = {gt["id"] for gt in gts}
    pairs, rejects = gt_pairs(gts, generated)
    if n > 1:  # other shards own the generated videos of their GT ids
        rejects = [r for r in rejects if r["id"] in mine]
        generated = [g for g in generated if g.get("gt_id") in mine]
    pairs += annotated_pairs(generated, scores, min_gap=args.min_gap, min_winner_score=args.min_winner_score,
                             fill_to=args.fill_to, fill_min_gap=args.fill_min_gap, seed=args.seed)
    for p in pairs:
        p["split"] = split_of(p["gt_id"], args.test_fraction, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = shard_suffix(args.shard)
    write_jsonl(out / f"manifest{suffix}.jsonl", pairs)
    for split in ("train", "test"):
        write_jsonl(out / f"{split}{suffix}.jsonl", [p for p in pairs if p["split"] == split])
    write_jsonl(out / f"rejects{suffix}.jsonl", rejects)
    counts = {k: sum(p["kind"] == k for p in pairs) for k in ("gt", "annotated")}
    summary = {"stage": "pair", "shard": f"{i}/{n}", "gt_pairs": counts["gt"], "annotated_pairs": counts["annotated"],
               "train": sum(p["split"] == "train" for p in pairs), "test": sum(p["split"] == "test" for p in pairs),
               "rejected": len(rejects)}
    print(f"pair: {counts['gt']} GT-Pairs, {counts['annotated']} annotated pairs ({summary['train']} train, "
          f"{summary['test']} test), {len(rejects)} rejected -> {out}")
    return summary
