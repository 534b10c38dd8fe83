"""SLURM batch scripts rendered from launch/slurm/*.sbatch and a cluster config, and their submission.

A template holds `{{name}}` fields; every field it names must be given (else an error naming the template and the
field). The `#SBATCH` lines of the job (`{{directives}}`), the environment set-up (a venv, or a pyxis/enroot
container for srun) and the shell-quoting of paths and arguments are made here.
"""

import contextlib
import datetime
import io
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_wan.config import ConfigError, build_dataclass

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "slurm"
GPU_STAGES = ("encode", "generate")  # data_tools stages that run a model
KINDS = ("train", "preprocess", "generate", "bench")  # job kinds, keys of sbatch_extra (as are the stage names)


@dataclass
class Cluster:
    """Where and how jobs run; a YAML file of these keys (launch/cluster.example.yaml) and/or command-line flags."""

    nodes: int = 1  # train: nodes of the job (one srun task per node)
    gpus_per_node: int = 8  # train and bench: GPUs per node (0: CPU-only); array jobs take one where they need one
    ranks_per_node: int | None = None  # train: torchrun processes per node; default gpus_per_node (CPU-only: 1)
    cpus_per_task: int = 16  # CPU cores per srun task (train: per node)
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"  # the job's (or each array task's) time limit
    container_image: str | None = None  # pyxis/enroot image: srun --container-image
    container_mounts: str | None = None  # more srun --container-mounts (workdir is mounted), e.g. /data:/data
    venv: str | None = None  # a virtual environment to activate (instead of a container)
    workdir: str = str(REPO)  # the checkout the job runs in
    log_dir: str = "logs"  # relative to workdir: SLURM output, per-restart logs, rendered scripts
    job_name: str | None = None  # default: the kind (and the stage)
    max_restarts: int = 20  # train: requeues after a signal before giving up (then exit 75)
    signal_lead: int = 90  # train: seconds before the time limit that USR1 asks for a checkpoint (> step + save)
    array_parallel: int | None = None  # array jobs: at most this many tasks at once
    sbatch_extra: dict = field(default_factory=dict)  # more #SBATCH options per kind/stage: {train: [--exclusive]}
    env: dict = field(default_factory=dict)  # environment variables exported in the job

    def __post_init__(self):
        if self.ranks_per_node is None:
            self.ranks_per_node = self.gpus_per_node or 1

    def check(self) -> None:
        for key, least in (("nodes", 1), ("gpus_per_node", 0), ("ranks_per_node", 1), ("cpus_per_task", 1),
                           ("max_restarts", 0), ("signal_lead", 1)):
            if getattr(self, key) < least:
                raise ConfigError(f"{key}: expected >= {least}, found {getattr(self, key)}")
        if self.container_image and self.venv:
            raise ConfigError("container_image and venv: give one of them (the container brings its environment)")
        from data_tools.__main__ import STAGES

        for kind, options in self.sbatch_extra.items():
            if kind not in (*KINDS, *STAGES):
                raise ConfigError(f"sbatch_extra.{kind}: expected a job kind {list(KINDS)} or a stage {list(STAGES)}")
            if not isinstance(options, list):
                raise ConfigError(f"sbatch_extra.{kind}: expected a list of options, found {options!r}")

    def extra(self, kind: str, stage: str | None = None) -> list:
        """The sbatch_extra options of a job of `kind` (a preprocess job: and of its `stage`)."""
        return [*self.sbatch_extra.get(kind, []), *(self.sbatch_extra.get(stage, []) if stage != kind else [])]


def load_cluster(path=None, overrides: dict | None = None) -> Cluster:
    """The Cluster of YAML `path` (or the defaults) with `overrides` ({key: value}, None values ignored)."""
    values = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        cluster = build_dataclass(Cluster, values, "")
        cluster.check()
    except ConfigError as e:
        raise ConfigError(f"{path or 'cluster settings'}: {e}") from None
    return cluster


def fill(template: Path, fields: dict) -> str:
    """`template` with each `{{name}}` replaced by fields[name]."""
    text = template.read_text(encoding="utf-8")
    missing = sorted({m for m in re.findall(r"{{(\w+)}}", text) if m not in fields})
    if missing:
        raise KeyError(f"{template}: no value for field(s) {missing}")
    return re.sub(r"{{(\w+)}}", lambda m: str(fields[m.group(1)]), text)


def quoted_args(args) -> str:
    """Arguments as one shell-quoted string with a leading space each ("" for none)."""
    return "".join(" " + shlex.quote(str(a)) for a in args)


def _directives(c: Cluster, name: str, extra: list, *, nodes: int = 1, gpus: str | None = None,
                array: int | None = None, after: str | None = None) -> str:
    log = f"{c.log_dir}/%x-%A_%a.out" if array else f"{c.log_dir}/%x-%j.out"
    options = [f"--job-name={name}", f"--chdir={c.workdir}", f"--nodes={nodes}", f"--cpus-per-task={c.cpus_per_task}",
               f"--time={c.time}", f"--output={log}"]
    options += [f"--partition={c.partition}"] if c.partition else []
    options += [f"--account={c.account}"] if c.account else []
    options += [gpus] if gpus else []
    if array:
        options.append(f"--array=0-{array - 1}" + (f"%{c.array_parallel}" if c.array_parallel else ""))
    options += [f"--dependency=afterok:{after.replace(',', ':')}"] if after else []
    options += extra
    return "\n".join(f"#SBATCH {o}" for o in options)


def _environment(c: Cluster) -> dict:
    """Fields shared by every template: workdir, set-up, srun's container options, exports, log dir."""
    if c.container_image:  # the checkout is mounted at its own path: configs and outputs have one name everywhere
        mounts = ",".join([f"{c.workdir}:{c.workdir}", *([c.container_mounts] if c.container_mounts else [])])
        srun = [f"--container-image={c.container_image}", f"--container-mounts={mounts}",
                f"--container-workdir={c.workdir}"]
        setup = f"# environment: the container {c.container_image} (pyxis), entered by srun"
    elif c.venv:
        srun, setup = [], f"source {shlex.quote(str(Path(c.venv) / 'bin' / 'activate'))}"
    else:
        srun, setup = [], "# environment: the one sbatch was called from"
    exports = "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in c.env.items())
    return {"workdir": shlex.quote(c.workdir), "setup": setup, "srun_args": "".join(a + " " for a in srun),
            "env": exports, "log_dir": shlex.quote(c.log_dir), "threads_per_rank": c.cpus_per_task}


def _gpus_per_node(c: Cluster) -> str | None:
    return f"--gpus-per-node={c.gpus_per_node}" if c.gpus_per_node else None


def render_train(c: Cluster, config: str, overrides=(), after: str | None = None) -> str:
    """train.sbatch for the run config `config` with `overrides`, checked as megatron_wan.train would check them.

    Outside a container the installed torchrun must have the flags launch.agent needs (in a container the job
    checks its own at start)."""
    from launch.agent import check_torchrun
    from megatron_wan.config import load_config, validate

    cfg = load_config(config, overrides)
    try:
        validate(cfg, c.nodes * c.ranks_per_node)
    except ConfigError as e:
        raise ConfigError(f"{config} on nodes x ranks_per_node = {c.nodes} x {c.ranks_per_node}: {e}") from None
    if not cfg.run.resume:
        raise ConfigError("run.resume: false would make every requeued start begin again; use true under SLURM")
    if not c.container_image:
        check_torchrun()
    fields = {"directives": _directives(c, c.job_name or "train", c.extra("train"), nodes=c.nodes,
                                        gpus=_gpus_per_node(c), after=after),
              "ranks_per_node": c.ranks_per_node, "config": shlex.quote(config), "overrides": quoted_args(overrides),
              "output_dir": shlex.quote(cfg.run.output_dir), "steps": cfg.run.steps, "max_restarts": c.max_restarts,
              "signal_lead": c.signal_lead, **_environment(c),
              "threads_per_rank": max(1, c.cpus_per_task // c.ranks_per_node)}
    return fill(TEMPLATES / "train.sbatch", fields)


def check_stage_args(stage: str, input_path: str, output: str, shards: int, workers: int, stage_args) -> None:
    """Parse a task's command line with the stage's own parser (python -m data_tools); ConfigError if it refuses."""
    from data_tools.__main__ import build_parser

    workers = ["--workers", str(workers)] if stage != "generate" else []  # as the templates write the command
    argv = [stage, "--in", input_path, "--out", output, *workers, "--shard", f"0/{shards}", *stage_args]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(argv)
    except SystemExit as e:
        message = (errors.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
        raise ConfigError(f"arguments of the stage (after --) {list(stage_args)}: {message}") from None


def render_array(c: Cluster, stage: str, input_path: str, output: str, shards: int, workers: int = 1,
                 stage_args=(), after: str | None = None) -> str:
    """preprocess.sbatch (any data_tools stage) or, for `generate`, generate.sbatch: an array of `shards` tasks,
    the stage's arguments checked by its own parser; `after`: job ids that must end successfully first."""
    from data_tools.__main__ import STAGES

    if stage not in STAGES:
        raise ConfigError(f"stage: expected one of {list(STAGES)}, found {stage!r}")
    if shards < 1:
        raise ConfigError(f"shards: expected >= 1, found {shards}")
    check_stage_args(stage, input_path, output, shards, workers, stage_args)
    template, kind = ("generate.sbatch", "generate") if stage == "generate" else ("preprocess.sbatch", "preprocess")
    gpus = "--gpus=1" if stage in GPU_STAGES and c.gpus_per_node else None
    fields = {"directives": _directives(c, c.job_name or f"data-{stage}", c.extra(kind, stage), gpus=gpus,
                                        array=shards, after=after), "stage": stage,
              "input": shlex.quote(input_path), "output": shlex.quote(output), "shards": shards, "workers": workers,
              "stage_args": quoted_args(stage_args), **_environment(c)}
    return fill(TEMPLATES / template, fields)


def render_bench(c: Cluster, suite: str, suite_args=(), after: str | None = None) -> str:
    """bench.sbatch: `python -m megatron_wan.bench SUITE ARGS` on one node."""
    from megatron_wan.suites import SUITES

    if suite not in SUITES:
        raise ConfigError(f"suite: expected one of {list(SUITES)}, found {suite!r}")
    fields = {"directives": _directives(c, c.job_name or f"bench-{suite}", c.extra("bench"), gpus=_gpus_per_node(c),
                                        after=after),
              "suite": suite, "suite_args": quoted_args(suite_args), **_environment(c)}
    return fill(TEMPLATES / "bench.sbatch", fields)


def script_path(c: Cluster, kind: str) -> Path:
    """Where a submitted script is kept: LOG_DIR/sbatch/KIND-TIMESTAMP.sbatch (under workdir)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(c.workdir) / c.log_dir / "sbatch" / f"{kind}-{stamp}.sbatch"


def submit(script: str, path: Path) -> str:
    """Write `script` to `path` and submit it with sbatch; returns the job id."""
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch is not on PATH: submit from a SLURM login node, or use --dry-run")
    path.parent.mkdir(parents=True, exist_ok=True)  # also LOG_DIR, where SLURM writes the job's output
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"sbatch {path} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()
