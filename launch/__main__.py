"""python -m launch {train,preprocess,generate,bench,local,checkpoint-step} [options]: SLURM jobs from a cluster config.

    python -m launch train --cluster launch/cluster.example.yaml --config configs/wan2.1-t2v-14b-regdpo.yaml \\
        model.weights=/models/Wan2.1-T2V-14B-Diffusers data.dir=/data/encoded --dry-run
    python -m launch preprocess --stage normalize --in work/filter --out work/gt --shards 32 -- --captions c.csv
    python -m launch generate --in work/gt --out work/gen --shards 16 -- --model /models/Wan2.1-T2V-14B-Diffusers
    python -m launch bench sweep -- --steps 5
    python -m launch local --nproc 2 --config configs/tiny-t2v-regdpo.yaml run.steps=5
    python -m launch checkpoint-step outputs/tiny-t2v-regdpo

Cluster settings come from `--cluster FILE` (YAML; keys as launch/cluster.example.yaml) and the flags below, which
win. Options of the launcher go before `--`; what follows it goes to the stage (checked by the stage's own parser
before anything is submitted) or to the suite. `--dry-run` prints the rendered sbatch script on stdout and the
sbatch command on stderr, and submits nothing; without it the script is written to LOG_DIR/sbatch/ and submitted.
`--after JOBID` starts a job when those jobs have ended successfully. `local` runs the training on this machine with
torchrun (python -m launch.agent `--standalone`), the same entry and config as the SLURM job. `checkpoint-step`
prints the step of a run's newest complete checkpoint (what the train job reads to decide whether to requeue).
"""

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from launch.sbatch import Cluster, load_cluster, render_array, render_bench, render_train, script_path, submit
from megatron_wan.config import ConfigError

FLAG_TYPES = {int: int, str: str, int | None: int, str | None: str}  # Cluster keys settable by a flag


def _cluster_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("cluster (flags override the --cluster file)")
    group.add_argument("--cluster", metavar="FILE", help="cluster settings (YAML)")
    for f in dataclasses.fields(Cluster):
        if f.type in FLAG_TYPES:
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=FLAG_TYPES[f.type])
    group.add_argument("--after", metavar="JOBID[,JOBID]", help="start when these jobs have ended successfully "
                                                                 "(sbatch --dependency=afterok)")
    group.add_argument("--dry-run", action="store_true", help="print the script and the command; submit nothing")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    cluster = [_cluster_options()]
    train = sub.add_parser("train", parents=cluster, help="multi-node training (train.sbatch)")
    train.add_argument("--config", required=True, help="run recipe (configs/*.yaml)")
    train.add_argument("overrides", nargs="*", help="key.sub=value, passed to megatron_wan.train")
    preprocess = sub.add_parser("preprocess", parents=cluster, help="a data_tools stage as an array job")
    preprocess.add_argument("--stage", required=True, help="probe, select, filter, normalize, import-generated, pair, "
                                                           "encode")
    preprocess.add_argument("--workers", type=int, default=1, help="worker processes per task")
    generate = sub.add_parser("generate", parents=cluster, help="the negatives (data_tools generate) as an array job")
    for p in (preprocess, generate):
        p.add_argument("--in", dest="input", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--shards", type=int, required=True, help="array tasks; task I runs --shard I/N")
        p.add_argument("stage_args", nargs="*", help="further options of the stage (after --)")
    bench = sub.add_parser("bench", parents=cluster, help="a benchmark suite on one node")
    bench.add_argument("suite", nargs="?", default="sweep")
    bench.add_argument("suite_args", nargs="*", help="options of the suite (after --)")
    local = sub.add_parser("local", help="training on this machine with torchrun")
    local.add_argument("--nproc", type=int, default=2, help="processes (ranks)")
    local.add_argument("--config", required=True)
    local.add_argument("overrides", nargs="*")
    local.add_argument("--dry-run", action="store_true", help="print the command; run nothing")
    step = sub.add_parser("checkpoint-step", help="print the step of the newest complete checkpoint of a run (0: none)")
    step.add_argument("output_dir", help="the run's run.output_dir")
    return parser


def local_command(nproc: int, config: str, overrides=()) -> list[str]:
    """torchrun (launch.agent) on this machine: `nproc` ranks of megatron_wan.train with `config` and `overrides`."""
    return [sys.executable, "-m", "launch.agent", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_wan.train", "--config", config, *overrides]


def run_local_training(nproc: int, config: str, overrides=(), dry_run: bool = False) -> int:
    """Check the config for `nproc` ranks, print the torchrun command and (unless `dry_run`) run it."""
    from megatron_wan.config import load_config, validate

    validate(load_config(config, overrides), nproc)
    cmd = local_command(nproc, config, overrides)
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # the DeepSpeed engine on a machine without CUDA
    return subprocess.run(cmd, env=env).returncode


def render(args) -> tuple[Cluster, str]:
    """(the cluster settings, the rendered script) of parsed arguments."""
    cluster = load_cluster(args.cluster, {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Cluster)})
    if args.kind == "train":
        return cluster, render_train(cluster, args.config, args.overrides, args.after)
    if args.kind == "bench":
        return cluster, render_bench(cluster, args.suite, args.suite_args, args.after)
    stage, workers = ("generate", 1) if args.kind == "generate" else (args.stage, args.workers)
    return cluster, render_array(cluster, stage, args.input, args.out, args.shards, workers, args.stage_args,
                                 args.after)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.kind == "local":
            return run_local_training(args.nproc, args.config, args.overrides, args.dry_run)
        if args.kind == "checkpoint-step":
            from megatron_wan.checkpointing import latest_step

            print(latest_step(Path(args.output_dir) / "checkpoints"))
            return 0
        cluster, script = render(args)
        path = script_path(cluster, args.kind)
        command = f"sbatch --parsable {shlex.quote(str(path))}"
        if args.dry_run:
            sys.stdout.write(script)
            print(f"dry run: {command} (the script above, written there on submission)", file=sys.stderr)
            return 0
        print(f"{command}: job {submit(script, path)}")
    except (ConfigError, FileNotFoundError, KeyError, RuntimeError) as e:
        sys.exit(f"python -m launch {args.kind}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
