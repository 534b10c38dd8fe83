"""Rank methods per dimension into the paper's ranking points and Total_Score (Tables 2, 5, 6, 9, 10).

Per dimension, n methods get n..1 points by value (higher is better). Values are compared as printed
(`decimals` places, 5 in the paper) and tied methods all get the highest points of their block, the next
method continuing below the block: the paper's Table 6 gives two tied Dyn.Deg. values 4 and 4 and the next 2;
Table 10 gives Bkgd.Cons. 0.93416, 0.93416 (places 6-7) 7 and 7 and Mot.Smooth. 0.98540 (x2) 6 and 6.
Total_Score is the sum of a method's points. Arrows compare each value with a base method's, as printed.
"""

from pathlib import Path

from megatron_wan.eval.tables import markdown, number, read_records, write_tables

DIMENSIONS = {  # VBench dimension -> the paper's column header
    "subject_consistency": "Subj.Cons.",
    "background_consistency": "Bkgd.Cons.",
    "motion_smoothness": "Mot.Smooth.",
    "dynamic_degree": "Dyn.Deg.",
    "aesthetic_quality": "Aesth.Qual.",
    "imaging_quality": "Img.Qual.",
}
TOTAL = "Total_Score"
UP, DOWN, SAME = "↑", "↓", "-"
DECIMALS = 5


def points(scores: dict, decimals: int | None = DECIMALS) -> dict:
    """Ranking points of one column (key -> number): the count of values at or below each value, so n for the
    best, 1 for the worst, and ties share their block's highest points. `decimals`: compare as rounded."""
    key = {k: v if decimals is None else round(v, decimals) for k, v in scores.items()}
    return {k: sum(other <= key[k] for other in key.values()) for k in key}


def dimensions_of(values: dict) -> list:
    """The dimensions every method has (in the first method's order); an error names a method that differs."""
    if not values:
        raise ValueError("no methods to rank")
    first, *rest = values
    dims = list(values[first])
    for method in rest:
        if set(values[method]) != set(dims):
            missing, extra = set(dims) - set(values[method]), set(values[method]) - set(dims)
            raise ValueError(f"method {method!r}: dimensions differ from {first!r} "
                             f"(missing {sorted(missing)}, extra {sorted(extra)})")
    for method, row in values.items():
        for dim, value in row.items():
            number(value, f"method {method!r}, {dim}")
    return dims


def rank_methods(values: dict, decimals: int = DECIMALS) -> dict:
    """method -> dimension -> float  =>  method -> dimension -> points, plus "Total_Score" per method."""
    dims = dimensions_of(values)
    ranked = {method: {} for method in values}
    for dim in dims:
        for method, p in points({m: float(values[m][dim]) for m in values}, decimals).items():
            ranked[method][dim] = p
    for row in ranked.values():
        row[TOTAL] = sum(row[dim] for dim in dims)
    return ranked


def arrows(values: dict, base, decimals: int = DECIMALS) -> dict:
    """method -> dimension -> ↑ / ↓ / - against method `base`, comparing values as printed."""
    if base not in values:
        raise ValueError(f"base method {base!r} is not among the methods {list(values)}")
    ref = {dim: round(float(v), decimals) for dim, v in values[base].items()}

    def sign(dim, value):
        value = round(float(value), decimals)
        return UP if value > ref[dim] else DOWN if value < ref[dim] else SAME

    return {method: {dim: sign(dim, v) for dim, v in row.items()} for method, row in values.items()}


def ranked_table(values: dict, base=None, decimals: int = DECIMALS) -> tuple[list, list, list]:
    """The paper's layout: header, plain rows ("0.93496 ↑ [3]", Total_Score) and the same rows with the best
    value of each column in bold and the second in <u>underline</u> (a tie for first leaves no second)."""
    dims = dimensions_of(values)
    ranked = rank_methods(values, decimals)
    signs = arrows(values, base, decimals) if base is not None else None
    n = len(values)
    total_points = points({m: ranked[m][TOTAL] for m in values}, None)

    def mark(text, p):
        return f"**{text}**" if p == n else f"<u>{text}</u>" if p == n - 1 else text

    header = ["Method", *(DIMENSIONS.get(d, d) for d in dims), TOTAL]
    plain, marked = [], []
    for method, row in values.items():
        texts = [f"{float(row[d]):.{decimals}f}" for d in dims]
        suffixes = [(f" {signs[method][d]}" if signs else "") + f" [{ranked[method][d]}]" for d in dims]
        total = str(ranked[method][TOTAL])
        plain.append([str(method), *(t + s for t, s in zip(texts, suffixes)), total])
        marked.append([str(method), *(mark(t, ranked[method][d]) + s for t, s, d in zip(texts, suffixes, dims)),
                       mark(total, total_points[method])])
    return header, plain, marked


def read_values(path) -> dict:
    """A values table: CSV or JSONL records with a `method` column and one numeric column per dimension."""
    values = {}
    for where, record in read_records(path):
        if "method" not in record:
            raise ValueError(f"{where}: no 'method' column")
        method = record["method"]
        if method in values:
            raise ValueError(f"{where}: method {method!r} appears twice")
        values[method] = {k: number(v, f"{where}, {k}") for k, v in record.items() if k != "method"}
    dimensions_of(values)
    return values


def report(values: dict, prefix=None, base=None, decimals: int = DECIMALS) -> str:
    """The ranked table as markdown; with `prefix`, also written to PREFIX.md and PREFIX.csv."""
    header, plain, marked = ranked_table(values, base, decimals)
    if prefix is not None:
        write_tables(prefix, header, plain, marked)
    return markdown(header, marked)


def add_arguments(parser):
    parser.add_argument("values", type=Path, help="CSV or JSONL: a `method` column and one column per dimension")
    parser.add_argument("--base", help="method the arrows compare with (the paper: Base)")
    parser.add_argument("--decimals", type=int, default=DECIMALS, help="printed precision; ties are judged at it")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.csv (default: print the markdown only)")


def run(args):
    values = read_values(args.values)
    print(report(values, args.out, args.base, args.decimals), end="")
    return rank_methods(values, args.decimals)
