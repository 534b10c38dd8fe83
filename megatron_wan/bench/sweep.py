"""The training setups side by side: one Reg-DPO recipe changed one setting at a time, every figure measured in one run.

    python -m megatron_wan.bench sweep [--out outputs/bench/sweep] [--grid 8 32 32] [--steps 5] [--quick] [--compile]

Rows: the engine (megatron vs DeepSpeed ZeRO-3 with parameters and optimizer offloaded), pair_mode (batched,
sequential, ranks), context parallel size (1, 2, 4), activation checkpointing (off, on), the reference (adapter,
copy, copy_offload), FSDP2 sharding (run.dp_shard 2, LoRA and full fine-tune) and, with --compile,
model.compile (without and with checkpointing; compiled in the warmup steps, before anything is timed). The
baseline is megatron, batched, CP=1, no checkpointing, adapter, replicated (dp_shard 1).

Each row is the training stack itself (Trainer: PairDataset, engine, objective) with the `tiny` preset, LoRA, fp32,
one pair per data-parallel rank, on local processes (megatron_wan.parallel.local.run_local; gloo on CPU, where the
processes share the cores; on a GPU node one GPU each): two for every row but CP=4 (four).
The data is a synthetic encoded dataset written here in the layout of `data_tools encode` (shards, manifest.json,
train.jsonl): random latents and text embeddings, so the sweep needs no model folder and no videos.

Rows with the same process layout run in the same processes, their steps interleaved (one step of each in turn), so
that a drift of the machine hits them alike. Per row: the median step time of the timed steps and, from it, pairs/s,
video tokens/s, model TFLOP/s and MFU (the Trainer's: FLOPs from the model's parameter description, against a matmul
timed in each process on CPU); memory is the peak of one further step on the largest rank: on CPU the bytes saved
for backward (exact, SavedTensorMeter, parameters excluded), on CUDA the peak allocated bytes; state is the exact
bytes of weights, gradients and optimizer state the Megatron engine holds on the largest rank. Ratios are against
the baseline. Writes OUT/sweep.md (the table), OUT/sweep.png (the chart) and OUT/sweep.json.
"""

import argparse
import json
import os
import statistics
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_wan.bench.meters import SavedTensorMeter
from megatron_wan.data.shards import ShardWriter
from megatron_wan.models.wan21 import preset
from megatron_wan.parallel.local import run_local
from megatron_wan.parallel.parallelize import compute_parameters

PRESET = "tiny"
LATENT_CHANNELS = 16
TEXT_TOKENS = 24  # stored per sample; PairDataset zero-pads them to data.text_len


FULL = ("run.finetune=full", "lora=null", "objective.reference=copy")


@dataclass(frozen=True)
class Row:
    name: str
    setting: str  # what this row changes from the baseline
    overrides: tuple = ()
    cp: int = 1
    world: int = 2


ROWS = (
    Row("baseline", "megatron, batched, CP=1, no recompute, adapter"),
    Row("deepspeed", "engine: DeepSpeed ZeRO-3, params + optimizer offloaded", ("run.engine=deepspeed",)),
    Row("sequential", "pair_mode: sequential", ("objective.pair_mode=sequential",)),
    Row("ranks", "pair_mode: ranks (winner and loser on partner ranks)", ("objective.pair_mode=ranks",)),
    Row("cp2", "context parallel 2 (ring)", cp=2),
    Row("cp4", "context parallel 4 (ring)", cp=4, world=4),
    Row("recompute", "activation checkpointing per block", ("model.recompute=true",)),
    Row("ref-copy", "reference: frozen copy", ("objective.reference=copy",)),
    Row("ref-offload", "reference: copy offloaded, streamed per block", ("objective.reference=copy_offload",)),
    Row("dp-shard-2", "FSDP2 dp_shard 2: LoRA base, adapters, gradients, AdamW sharded", ("run.dp_shard=2",)),
    Row("full", "full fine-tune (reference: frozen copy), replicated", FULL),
    Row("full-dp-shard-2", "full fine-tune, FSDP2 dp_shard 2 (policy and copy sharded)", (*FULL, "run.dp_shard=2")),
)


COMPILE_ROWS = (  # with --compile (Inductor's compile time is long on a CPU)
    Row("compile", "model.compile: each block's forward compiled (torch.compile)", ("model.compile=true",)),
    Row("compile-recompute", "model.compile with activation checkpointing", ("model.compile=true",
                                                                             "model.recompute=true")),
)


@dataclass
class Result:
    row: Row
    step_s: float
    metrics: dict  # the Trainer's metrics of the median step, throughput recomputed at the median time
    memory: int  # bytes, the largest rank
    state: int | None  # bytes of weights + gradients + optimizer state, the largest rank (megatron engine)


def write_dataset(out: Path, grid, pairs: int = 8, seed: int = 0, task: str = "t2v", buckets=()) -> Path:
    """An encoded dataset of `pairs` pairs of random latents [16, *grid] in `data_tools encode`'s layout (I2V: with
    the winner's CLIP tokens and conditioning latent, for the `tiny-i2v` preset). With `buckets` (more grids),
    pair i has grid i of [grid, *buckets], cyclically: a multi-resolution dataset."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = preset(PRESET if task == "t2v" else "tiny-i2v")
    g = torch.Generator().manual_seed(seed)
    grids = [tuple(grid), *map(tuple, buckets)]
    with ShardWriter(out / "shard-00000", metadata={"synthetic": True}) as w:
        for i in range(pairs):
            shape = grids[i % len(grids)]
            for side in ("win", "lose"):
                sample = {"latent": torch.randn(LATENT_CHANNELS, *shape, generator=g),
                          "text_emb": torch.randn(TEXT_TOKENS, cfg.text_dim, generator=g)}
                if task == "i2v" and side == "win":
                    sample["clip_emb"] = torch.randn(257, cfg.image_dim, generator=g)
                    sample["cond_latent"] = torch.randn(cfg.in_dim - cfg.out_dim, *shape, generator=g)
                w.add(f"{side}{i}", sample)
    records = [{"id": f"pair{i}", "winner": {"id": f"win{i}"}, "loser": {"id": f"lose{i}"}, "split": "train"}
               for i in range(pairs)]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = {"format": "megatron_wan-shards", "version": 1, "encoder": {"task": task, "synthetic": True},
                "samples": 2 * pairs, "pairs": pairs, "shards": [{"prefix": "shard-00000", "samples": 2 * pairs}]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def _config(row: Row, data: Path, runs: Path, text_len: int):
    """The run config of `row`: the baseline recipe (tiny, LoRA, fp32, one pair per DP rank) with its overrides."""
    from megatron_wan.config import load_config

    return load_config(None, [
        f"model.preset={PRESET}", "model.attention_backend=sdpa", "model.cp_comm=ring", "run.task=t2v",
        "run.finetune=lora", "run.dtype=fp32", "run.batch_size=1", "run.steps=1000000", "run.resume=false",
        "run.tensorboard=false", "lora.rank=4", "lora.alpha=8", "optim.lr=1e-4", f"data.dir={data}",
        f"data.text_len={text_len}", f"run.output_dir={runs / row.name}", f"run.context_parallel={row.cp}",
        *row.overrides])


def _step(trainer) -> dict:
    metrics = trainer.train_step()
    trainer.step += 1
    return metrics


def _memory_of_step(trainer) -> int:
    """Peak bytes of one step: saved for backward on CPU (exact), allocated on CUDA."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        _step(trainer)
        return torch.cuda.max_memory_allocated()
    with SavedTensorMeter(exclude=compute_parameters(trainer.engine.module)) as meter:
        _step(trainer)
    return meter.peak


def _measure(rows: list[Row], data: Path, runs: Path, text_len: int, warmup: int, steps: int) -> dict:
    """On each process of one layout: every row's Trainer, warmed up, then `steps` steps of each in turn."""
    from megatron_wan.train import Trainer

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's, every step
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // rows[0].world))
    trainers = {row.name: Trainer(_config(row, data, runs, text_len)) for row in rows}
    peak = max(t.peak for t in trainers.values())  # each timed a matmul at its start; one peak for the process
    for trainer in trainers.values():
        trainer.peak = peak
    for _ in range(warmup):
        for trainer in trainers.values():
            _step(trainer)
    memory = {name: _memory_of_step(trainer) for name, trainer in trainers.items()}
    state = {name: _state_bytes(trainer.engine) for name, trainer in trainers.items()}
    timed = {name: [] for name in trainers}
    for _ in range(steps):
        for name, trainer in trainers.items():
            timed[name].append(_step(trainer))
    return {name: {"memory": memory[name], "state": state[name], "steps": timed[name]} for name in trainers}


def _state_bytes(engine) -> int | None:
    """This rank's exact bytes of weights, gradients and AdamW state on the Megatron engine (gradients, freed at
    each step's end, counted as the trainable shards they reduce into); None for DeepSpeed (offloaded)."""
    from megatron_wan.bench.fsdp_memory import state_bytes
    from megatron_wan.engines.megatron import MegatronEngine
    from megatron_wan.parallel.parallelize import local_bytes

    if not isinstance(engine, MegatronEngine):
        return None
    return state_bytes(engine, gradients=False)["total"] + local_bytes(engine.params)


def _median_step(steps: list[dict]) -> tuple[float, dict]:
    """(median step seconds, the metrics of that step with throughput figures at it)."""
    seconds = statistics.median(s["step_time"] for s in steps)
    nearest = min(steps, key=lambda s: abs(s["step_time"] - seconds))
    scale = nearest["step_time"] / seconds
    metrics = {**nearest, "step_time": seconds}
    for key in ("samples_per_s", "tokens_per_s", "tflops", "mfu"):
        metrics[key] = nearest[key] * scale
    return seconds, metrics


def layouts(rows) -> dict[tuple, list[Row]]:
    """Rows grouped by (world size, CP): each group runs in one set of processes."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.world, row.cp), []).append(row)
    return groups


def run(rows, data: Path, runs: Path, text_len: int, warmup: int, steps: int) -> list[Result]:
    env = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    found = {}
    for (world, cp), group in layouts(rows).items():
        t0 = time.perf_counter()
        per_rank = run_local(_measure, world, group, data, runs, text_len, warmup, steps, env=env)
        for row in group:
            seconds, metrics = _median_step(per_rank[0][row.name]["steps"])
            memory = max(rank[row.name]["memory"] for rank in per_rank)
            states = [rank[row.name]["state"] for rank in per_rank]
            found[row.name] = Result(row, seconds, metrics, memory, None if None in states else max(states))
        print(f"sweep: {', '.join(r.name for r in group)} on {world} processes (CP={cp}): "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return [found[row.name] for row in rows]


COLUMNS = ("setup", "ranks", "s/step", "pairs/s", "tokens/s", "TFLOP/s", "MFU", "memory MiB/rank",
           "state MiB/rank", "x step time", "x pairs/s", "x memory", "x state")


def table(results: list[Result], memory_kind: str) -> str:
    base = results[0]
    lines = ["| " + " | ".join(COLUMNS) + " | what changes |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r in results:
        m = r.metrics
        cells = [r.row.name, f"{r.row.world} (CP={r.row.cp})", f"{r.step_s:.3f}", f"{m['samples_per_s']:.2f}",
                 f"{m['tokens_per_s']:.0f}", f"{m['tflops']:.4f}", f"{m['mfu']:.3f}", f"{r.memory / 2**20:.1f}",
                 "-" if r.state is None else f"{r.state / 2**20:.2f}",
                 f"{r.step_s / base.step_s:.2f}", f"{m['samples_per_s'] / base.metrics['samples_per_s']:.2f}",
                 f"{r.memory / base.memory:.2f}", "-" if r.state is None else f"{r.state / base.state:.2f}"]
        lines.append("| " + " | ".join(cells) + f" | {r.row.setting} |")
    lines.append("")
    lines.append(f"memory: {memory_kind}, the largest rank; state: exact bytes of the policy's weights (trainable "
                 "and frozen), gradients and AdamW state on the largest rank; MFU against the "
                 "device's peak (CPU: a matmul timed in each process); x: ratio to the baseline row, measured in "
                 "the same run (the rows of one process "
                 "layout with their steps interleaved, cp2 and cp4 in their own processes after them)")
    return "\n".join(lines)


def chart(results: list[Result], path: Path, title: str, memory_kind: str) -> Path:
    """Bars of pairs/s and memory per rank, each as a ratio to the baseline row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results[0]
    names = [r.row.name for r in results]
    series = {"pairs/s": [r.metrics["samples_per_s"] / base.metrics["samples_per_s"] for r in results],
              f"memory per rank ({memory_kind})": [r.memory / base.memory for r in results]}
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.4
    for i, (label, values) in enumerate(series.items()):
        xs = [k + (i - 0.5) * width for k in range(len(names))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylim(0, 1.25 * max(max(v) for v in series.values()))
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("ratio to baseline (same run)")
    ax.set_title(textwrap.fill(title, 120), fontsize=8)
    ax.legend(loc="upper right", ncols=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m megatron_wan.bench sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/bench/sweep")
    ap.add_argument("--grid", type=int, nargs=3, default=(8, 32, 32), help="latent frames, height, width")
    ap.add_argument("--text-len", type=int, default=128, help="text tokens the model attends to (data.text_len)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per row")
    ap.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS + COMPILE_ROWS],
                    help="a subset (the baseline is added)")
    ap.add_argument("--compile", action="store_true", help="add the model.compile rows")
    ap.add_argument("--quick", action="store_true", help="a small grid, 1 warmup and 2 timed steps (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.grid, args.text_len, args.warmup, args.steps = (4, 8, 8), 32, 1, 2
    rows = [r for r in ROWS + (COMPILE_ROWS if args.compile else ())
            if r.name == "baseline" or not args.rows or r.name in args.rows]
    out = Path(args.out)
    started = time.perf_counter()
    data = write_dataset(out / "data", args.grid)
    results = run(rows, data, out / "runs", args.text_len, args.warmup, args.steps)
    cfg = preset(PRESET)
    tokens = args.grid[0] * args.grid[1] * args.grid[2] // (cfg.patch_size[1] * cfg.patch_size[2])
    memory_kind = "peak allocated" if torch.cuda.is_available() else "bytes saved for backward"
    title = (f"{PRESET} preset (dim {cfg.dim}, {cfg.num_layers} layers), LoRA r4, fp32, Reg-DPO, 1 pair per DP rank, "
             f"latent {list(args.grid)} = {tokens} video tokens + {args.text_len} text, {os.cpu_count()} CPU cores, "
             f"median of {args.steps} steps after {args.warmup}")
    text = f"# Reg-DPO training setups, one run\n\n{title}\n\n{table(results, memory_kind)}\n"
    if not torch.cuda.is_available():
        text += ("\nBytes saved for backward are exact (SavedTensorMeter) and count activations only: DeepSpeed's "
                 "ZeRO-3 saves on weights, gradients and optimizer state, a reference copy costs weights.\n")
    (out / "sweep.md").write_text(text)
    chart(results, out / "sweep.png", title, memory_kind)
    rows_out = [{"name": r.row.name, "setting": r.row.setting, "world": r.row.world, "cp": r.row.cp,
                 "step_s": r.step_s, "memory_bytes": r.memory, "state_bytes": r.state, "metrics": r.metrics}
                for r in results]
    (out / "sweep.json").write_text(json.dumps({"title": title, "memory": memory_kind, "rows": rows_out}, indent=1))
    print(text)
    print(f"sweep: {time.perf_counter() - started:.0f} s -> {out / 'sweep.md'}, {out / 'sweep.png'}")
    return rows_out


if __name__ == "__main__":
    main()
