"""PNG curves: training metrics from JSONL logs (the paper's Fig. 2 panels; validation's `val/*` beside them) and the
Total_Score of every checkpoint of several runs, all checkpoints ranked jointly (Fig. 7).

A training log (a run's OUT/metrics.jsonl) has one JSON object per line with `step` and any of the metrics below
(validation rows: `val/METRIC`, drawn dashed with markers in METRIC's panel). A
checkpoint table (CSV or JSONL) has one record per checkpoint: `run`, `step` and one VBench value per dimension.
"""

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megatron_wan.eval.ranking import DECIMALS, TOTAL, rank_methods
from megatron_wan.eval.tables import csv_text, named_path, number, read_records

TRAINING_METRICS = {  # log key -> panel title, in Fig. 2's order
    "dgr": "DGR",
    "r": "r",
    "dgr_plus_r": "DGR + r",
    "win_gap": "Win Gap",
    "lose_gap": "Lose Gap",
    "s": "s(θ)",
    "loss_dpo": "L_DPO",
}
VAL = "val/"  # the prefix of validation metrics


def _step(record: dict, where: str):
    """The record's `step`, an int when integral."""
    if "step" not in record:
        raise ValueError(f"{where}: no 'step'")
    step = number(record["step"], f"{where}, step")
    return int(step) if step.is_integer() else step


def read_log(path) -> dict:
    """metric -> [(step, value)] of a JSONL training log, `val/METRIC` too (NaN and inf are kept: a diverging run
    shows them)."""
    series = {}
    for where, record in read_records(path):
        step = _step(record, where)
        for metric in (*TRAINING_METRICS, *(VAL + m for m in TRAINING_METRICS)):
            if metric in record:
                value = number(record[metric], f"{where}, {metric}", finite=False)
                series.setdefault(metric, []).append((step, value))
    return series


def read_checkpoints(path) -> dict:
    """(run, step) -> dimension -> value from a checkpoint table."""
    values = {}
    for where, record in read_records(path):
        if "run" not in record:
            raise ValueError(f"{where}: no 'run'")
        key = (record["run"], _step(record, where))
        if key in values:
            raise ValueError(f"{where}: run {key[0]!r} step {key[1]} appears twice")
        values[key] = {k: number(v, f"{where}, {k}") for k, v in record.items() if k not in ("run", "step")}
    return values


def checkpoint_totals(values: dict, decimals: int = DECIMALS) -> dict:
    """run -> [(step, Total_Score)] by step, every checkpoint of every run ranked in one table."""
    ranked = rank_methods(values, decimals)
    curves = {}
    for (run, step), row in ranked.items():
        curves.setdefault(run, []).append((step, row[TOTAL]))
    return {run: sorted(points) for run, points in curves.items()}


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def plot_training(logs: dict, path) -> Path:
    """One panel per metric found in the logs (run name -> JSONL path), a line per run; writes PNG `path`."""
    series = {name: read_log(log) for name, log in logs.items()}
    metrics = [m for m in TRAINING_METRICS if any(m in s or VAL + m in s for s in series.values())]
    if not metrics:
        raise ValueError(f"none of {', '.join(TRAINING_METRICS)} in {', '.join(map(str, logs.values()))}")
    cols = min(len(metrics), 4)
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows), layout="constrained")
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, (name, s) in enumerate(series.items()):
            if metric in s:  # a run keeps its colour in every panel
                ax.plot(*zip(*s[metric]), color=f"C{j}", label=name, linewidth=1)
            if VAL + metric in s:
                ax.plot(*zip(*s[VAL + metric]), color=f"C{j}", label=f"{name} (validation)", linewidth=1,
                        linestyle="--", marker="o", markersize=3)
        ax.set_title(TRAINING_METRICS[metric])
        ax.set_xlabel("step")
    return _save_with_legend(fig, path, 6)


def _save_with_legend(fig, path, most_columns: int) -> Path:
    """One legend for every panel of `fig` (each label once) below them, then save it to `path`."""
    handles = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(handles), most_columns))
    return _save(fig, path)


def plot_total_scores(curves: dict, path) -> Path:
    """Total_Score against step, a line per run (Fig. 7); writes PNG `path`."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for run, points in curves.items():
        ax.plot(*zip(*points), marker="o", markersize=3, label=str(run))
    ax.set_xlabel("step")
    ax.set_ylabel(TOTAL)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_checkpoint_metrics(series: dict, titles: dict, path) -> Path:
    """One panel per metric (titles: metric -> panel title), a line per run: series is metric -> run -> [(step,
    mean, std)] by step, the std drawn as a band (the spread over seeds); writes PNG `path` (Fig. 7 per metric)."""
    metrics = [m for m in titles if series.get(m)]
    if not metrics:
        raise ValueError(f"none of {', '.join(titles)} has any checkpoint")
    cols = min(len(metrics), 4)
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows), layout="constrained")
    runs = list(dict.fromkeys(run for m in metrics for run in series[m]))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for run, points in series[metric].items():
            steps, means, stds = (list(v) for v in zip(*points))
            colour, style = f"C{runs.index(run) % 10}", ("-", "--", ":")[runs.index(run) // 10 % 3]  # > 10 runs
            ax.plot(steps, means, color=colour, linestyle=style, marker="o", markersize=3, linewidth=1, label=str(run))
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=colour, alpha=0.15, linewidth=0)
        ax.set_title(titles[metric])
        ax.set_xlabel("step")
    return _save_with_legend(fig, path, 4)


def add_arguments(parser):
    parser.add_argument("--log", type=named_path, action="append", default=[], metavar="RUN=JSONL",
                        help="a run's metric log, or its output directory (named by it) holding metrics.jsonl; "
                             "repeat per run")
    parser.add_argument("--checkpoints", type=Path, help="CSV or JSONL: run, step, one column per VBench dimension")
    parser.add_argument("--decimals", type=int, default=DECIMALS, help="printed precision; ties are judged at it")
    parser.add_argument("--out", type=Path, required=True,
                        help="writes training_curves.png, total_score.png and total_score.csv")


def run(args):
    if not args.log and not args.checkpoints:
        raise ValueError("give --log RUN=JSONL and/or --checkpoints FILE")
    written = []
    if args.log:
        logs = {name: path / "metrics.jsonl" if path.is_dir() else path for name, path in args.log}
        written.append(plot_training(logs, args.out / "training_curves.png"))
    if args.checkpoints:
        curves = checkpoint_totals(read_checkpoints(args.checkpoints), args.decimals)
        written.append(plot_total_scores(curves, args.out / "total_score.png"))
        rows = [[str(run), str(step), str(total)] for run, points in curves.items() for step, total in points]
        (args.out / "total_score.csv").write_text(csv_text(["run", "step", TOTAL], rows), encoding="utf-8")
    print("\n".join(map(str, written)))
    return written
