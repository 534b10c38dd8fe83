"""Files in and out: CSV / JSONL records, NAME=PATH arguments, tables written as markdown and CSV."""

import csv
import io
import json
import math
from pathlib import Path


def read_records(path) -> list[tuple[str, dict]]:
    """Rows of a CSV file (with a header line) or a JSONL file (one object per line), each with its
    location `FILE:LINE` for error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [(f"{path}:{reader.line_num}", row) for row in reader]
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object")
            records.append((f"{path}:{lineno}", record))
        return records
    raise ValueError(f"{path}: expected a .csv or .jsonl file")


def number(value, where: str, finite: bool = True) -> float:
    """`value` (a number or numeric text) as a float, finite unless `finite=False`; `where` names the file,
    line and key on error."""
    try:
        if isinstance(value, bool):
            raise TypeError
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if finite and not math.isfinite(result):
        raise ValueError(f"{where}: {value!r} is not a finite number")
    return result


def named_path(text: str) -> tuple[str, Path]:
    """`NAME=PATH` -> (NAME, PATH); a bare existing PATH is named by its file stem. Names may contain `=` (the
    paper's `r = DGR`): the split is at the first `=` followed by an existing path, else at the last `=`."""
    cuts = [i for i, ch in enumerate(text) if ch == "=" and text[:i].strip()]
    if Path(text).exists() or not cuts:
        return Path(text).stem, Path(text)
    cut = next((i for i in cuts if Path(text[i + 1:]).exists()), cuts[-1])
    return text[:cut].strip(), Path(text[cut + 1:])


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown (GitHub) table."""
    lines = [header, ["---"] * len(header), *rows]
    return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    """CSV text of a header and rows."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([header, *rows])
    return out.getvalue()


def write_tables(prefix, header: list[str], plain_rows: list[list[str]], marked_rows: list[list[str]]) -> list[Path]:
    """PREFIX.md (from `marked_rows`, which may carry markdown emphasis) and PREFIX.csv (from `plain_rows`)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, csv_path = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv")
    md.write_text(markdown(header, marked_rows), encoding="utf-8")
    csv_path.write_text(csv_text(header, plain_rows), encoding="utf-8")
    return [md, csv_path]
