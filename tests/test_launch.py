"""The launcher: dry-run renders of the train, preprocess, generate and bench jobs that `bash -n` accepts, settings
errors that name the key, and the local launcher running the tiny recipe end to end on 2 CPU ranks."""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.__main__ import main
from launch.agent import check_torchrun, missing_flags
from megatron_wan.preemption import recommended_lead, save_window_warning

REPO = Path(__file__).parent.parent
RECIPE = str(REPO / "configs" / "tiny-t2v-regdpo.yaml")
JOBS = {
    "train": ["train", "--config", RECIPE, "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
              "run.steps=5", "run.output_dir=/runs/a b"],
    "preprocess": ["preprocess", "--stage", "normalize", "--in", "work/filter", "--out", "work/gt dir", "--shards", "8",
                   "--workers", "4", "--", "--captions", "captions.csv"],
    "encode": ["preprocess", "--stage", "encode", "--in", "work/pairs", "--out", "work/encoded", "--shards", "4",
               "--venv", "/opt/venv", "--", "--model", "/models/wan", "--dtype", "bf16"],
    "generate": ["generate", "--in", "work/gt", "--out", "work/gen", "--shards", "16", "--array-parallel", "4",
                 "--container-image", "/images/mw.sqsh", "--", "--model", "/models/wan"],
    "bench": ["bench", "sweep", "--", "--steps", "3"],
}


def dry_run(capsys, argv) -> tuple[str, str]:
    """(the rendered script, the stderr line with the sbatch command) of `python -m launch KIND --dry-run ...`."""
    assert main([argv[0], "--dry-run", *argv[1:]]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.mark.parametrize("job", sorted(JOBS))
def test_dry_run_renders_a_script_bash_accepts(job, capsys, tmp_path):
    script, err = dry_run(capsys, JOBS[job])
    assert script.startswith("#!/bin/bash\n#SBATCH ") and "{{" not in script
    assert "dry run: sbatch --parsable " in err
    path = tmp_path / f"{job}.sbatch"
    path.write_text(script)
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_train_job_resumes_across_requeues(capsys):
    script, _ = dry_run(capsys, JOBS["train"])
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=USR1@90", "#SBATCH --requeue",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1', "export CUDA_DEVICE_MAX_CONNECTIONS=1",
                 "python -m launch.agent", "--nproc-per-node=4", '--output="$LOGS/restart-$RESTART-node%n.log"',
                 'scontrol requeue "$SLURM_JOB_ID"',
                 f"-m megatron_wan.train --config {RECIPE} run.steps=5 'run.output_dir=/runs/a b'",
                 "python -m launch checkpoint-step '/runs/a b'", "if (( STEP >= 5 )); then"):
        assert line in script, line


def test_array_jobs_run_one_shard_per_task(capsys):
    script, _ = dry_run(capsys, JOBS["preprocess"])
    assert "#SBATCH --array=0-7\n" in script and "--gpus" not in script
    assert ("python -m data_tools normalize --in work/filter --out 'work/gt dir' --workers 4 \\\n"
            '    --shard "$SLURM_ARRAY_TASK_ID/8" --captions captions.csv') in script
    script, _ = dry_run(capsys, JOBS["encode"])
    assert "#SBATCH --gpus=1" in script and "source /opt/venv/bin/activate" in script
    assert "python -m data_tools encode" in script and "--model /models/wan --dtype bf16" in script
    script, _ = dry_run(capsys, JOBS["generate"])
    assert "#SBATCH --array=0-15%4" in script and "#SBATCH --gpus=1" in script
    assert f"srun --container-image=/images/mw.sqsh --container-mounts={REPO}:{REPO} " in script
    assert "python -m data_tools generate --in work/gt --out work/gen" in script


def test_cluster_file_and_flags(capsys, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodes: 4\ngpus_per_node: 8\naccount: proj\ntime: '02:00:00'\n"
                       "sbatch_extra: {train: ['--qos=high']}\nenv: {NCCL_IB_TIMEOUT: 22}\n")
    script, _ = dry_run(capsys, ["train", "--cluster", str(cluster), "--nodes", "1", "--config", RECIPE])
    for line in ("#SBATCH --nodes=1", "#SBATCH --account=proj", "#SBATCH --time=02:00:00", "#SBATCH --qos=high",
                 "export NCCL_IB_TIMEOUT=22", "--nproc-per-node=8"):
        assert line in script, line


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", RECIPE, "--nodes", "1", "--gpus-per-node", "3"],
     "nodes x ranks_per_node = 1 x 3: run.tensor_parallel x run.context_parallel = 2 does not divide"),
    (["train", "--config", RECIPE, "run.stpes=3"], "unknown key run.stpes"),
    (["train", "--config", RECIPE, "run.resume=false"], "run.resume"),
    (["preprocess", "--stage", "nope", "--in", "a", "--out", "b", "--shards", "2"], "stage: expected one of"),
    (["bench", "nope"], "suite: expected one of"),
    (["generate", "--in", "a", "--out", "b", "--shards", "2", "--venv", "/v", "--container-image", "/i"],
     "container_image and venv: give one"),
])
def test_errors_name_the_setting(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main([argv[0], "--dry-run", *argv[1:]])
    assert message in str(e.value)


def test_unknown_cluster_key_names_the_file(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodez: 2\n")
    with pytest.raises(SystemExit, match=r"cluster.yaml: unknown key nodez"):
        main(["bench", "--dry-run", "--cluster", str(cluster)])


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="a SLURM client is installed here")
def test_submitting_without_slurm_says_so():
    with pytest.raises(SystemExit, match="sbatch is not on PATH"):
        main(["bench", "plan"])


def test_module_entry_prints_the_script():
    done = subprocess.run([sys.executable, "-m", "launch", "bench", "--dry-run", "mfu"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "srun python -m megatron_wan.bench mfu\n" in done.stdout


def test_local_launcher_runs_the_tiny_recipe_on_two_ranks(models, encoded, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["local", "--nproc", "2", "--config", RECIPE, f"model.weights={models['t2v']}",
                 f"data.dir={encoded['t2v']}", f"run.output_dir={out}", "run.steps=3", "run.save_every=3",
                 "run.tensorboard=false"])
    assert code == 0
    assert "launch.agent --standalone --nproc-per-node=2 -m megatron_wan.train" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and not summary["interrupted"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["skipped"] == 0 for r in rows)
    assert (out / "checkpoints" / "latest").read_text() == "step_000003"


def _agent(models, encoded, out, *overrides, env=None) -> subprocess.Popen:
    """python -m launch.agent (torchrun) of the tiny recipe on 2 CPU ranks, in its own process group."""
    cmd = [sys.executable, "-m", "launch.agent", "--standalone", "--nproc-per-node=2", "-m", "megatron_wan.train",
           "--config", RECIPE, f"model.weights={models['t2v']}", f"data.dir={encoded['t2v']}",
           f"run.output_dir={out}", "run.tensorboard=false", "run.save_every=1000", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def test_agent_stop_signal_saves_and_exits_0(models, encoded, tmp_path):
    """USR1 to the launcher alone (as `scancel --signal` or a batch script would send it): forwarded to the ranks,
    which save at the end of the step and exit 0, and the launcher exits 0 (torchrun itself exits 1). The lead time
    given is too short for a step: the trainer says which to use."""
    out = tmp_path / "run"
    proc = _agent(models, encoded, out, "run.steps=200", env={"MEGATRON_WAN_SIGNAL_LEAD": "0.001"})
    log = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and 3 <= summary["steps"] < 200
    assert "SIGUSR1: saving a checkpoint at the end of this step" in err
    assert re.search(r"the stop signal comes 0.001 s before the time limit, .* set signal_lead: \d+", err)
    step = subprocess.run([sys.executable, "-m", "launch", "checkpoint-step", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert step.stdout.strip() == str(summary["steps"]), step.stderr[-2000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))


def test_agent_stop_signal_while_the_ranks_start(models, encoded, tmp_path):
    """A stop signal while the ranks still import and build the model is kept (blocked) until the trainer handles
    it: no step, no crash, exit 0."""
    out = tmp_path / "run"
    proc = _agent(models, encoded, out, "run.steps=200")
    deadline = time.time() + 120
    while len(_children(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps"] == 0 and not (out / "checkpoints" / "latest").exists()


def test_torchrun_without_a_needed_flag_is_named():
    old = argparse.ArgumentParser()  # a torchrun parser of before --signals-to-handle
    old.add_argument("--nproc-per-node")
    assert missing_flags(old) == ["--signals-to-handle"] and missing_flags() == []
    with pytest.raises(RuntimeError, match=r"torchrun of torch .* has no --signals-to-handle"):
        check_torchrun(old)


def test_cpu_only_jobs_ask_for_no_gpus(capsys):
    """0 GPUs per node is a CPU-only cluster: ranks per node are their own setting, no gres is requested."""
    script, _ = dry_run(capsys, ["train", "--config", RECIPE, "--gpus-per-node", "0", "--ranks-per-node", "2",
                                 "--cpus-per-task", "4"])
    assert "--gpus" not in script and "--nproc-per-node=2" in script and "OMP_NUM_THREADS:-2}" in script
    script, _ = dry_run(capsys, ["preprocess", "--stage", "encode", "--in", "a", "--out", "b", "--shards", "2",
                                 "--gpus-per-node", "0", "--", "--model", "/models/wan"])
    assert "--gpus" not in script
    script, _ = dry_run(capsys, ["bench", "plan", "--gpus-per-node", "0"])
    assert "--gpus" not in script
    with pytest.raises(SystemExit, match="nodes x ranks_per_node = 1 x 1: run.tensor_parallel x"):
        main(["train", "--dry-run", "--config", RECIPE, "--gpus-per-node", "0"])  # CP=2 needs 2 ranks


def test_train_job_decides_from_the_checkpoints_and_forwards_signals(capsys):
    script, _ = dry_run(capsys, [*JOBS["train"], "--max-restarts", "3", "--signal-lead", "600"])
    assert "summary.json" not in script  # written last by one rank: not what decides
    for line in ("#SBATCH --signal=USR1@600", "export MEGATRON_WAN_SIGNAL_LEAD=600",
                 "trap 'forward USR1' USR1", "trap 'forward TERM' TERM",
                 '-m megatron_wan.train --config', "'run.output_dir=/runs/a b' &\nTRAINING=$!",
                 "START_STEP=$(checkpoint_step)", "STEP=$(checkpoint_step)", "if (( RESTART < 3 )); then",
                 "exit 75"):
        assert line in script, line


def test_container_jobs_read_the_checkpoints_inside_the_container(capsys):
    """The batch shell runs on the host: the checkpoints are read through srun in the container, where the run's
    paths are the container's (a mount may rename them)."""
    script, _ = dry_run(capsys, [*JOBS["train"], "--container-image", "/images/mw.sqsh",
                                 "--container-mounts", "/lustre/runs:/runs"])
    assert (f"srun --container-image=/images/mw.sqsh --container-mounts={REPO}:{REPO},/lustre/runs:/runs "
            f"--container-workdir={REPO} --nodes=1 --ntasks=1") in script
    assert "python -m launch checkpoint-step '/runs/a b'" in script and "OUTPUT_DIR" not in script


def test_stage_arguments_are_checked_before_submission():
    with pytest.raises(SystemExit, match=r"arguments of the stage \(after --\) \['--dry-run'\]: .*unrecognized "
                                         r"arguments: --dry-run"):
        main(["preprocess", "--stage", "probe", "--in", "a", "--out", "b", "--shards", "2", "--", "--dry-run"])
    with pytest.raises(SystemExit, match=r"argument --min-edge: invalid int value: 'big'"):
        main(["preprocess", "--dry-run", "--stage", "select", "--in", "a", "--out", "b", "--shards", "2", "--",
              "--min-edge", "big"])


def test_sbatch_extra_is_per_kind(capsys, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("sbatch_extra: {train: ['--exclusive'], encode: ['--qos=gpu'], preprocess: ['--qos=cpu']}\n")
    train, _ = dry_run(capsys, ["train", "--cluster", str(cluster), "--config", RECIPE])
    normalize, _ = dry_run(capsys, ["preprocess", "--cluster", str(cluster), "--stage", "normalize", "--in", "a",
                                    "--out", "b", "--shards", "4"])
    encode, _ = dry_run(capsys, ["preprocess", "--cluster", str(cluster), "--stage", "encode", "--in", "a",
                                 "--out", "b", "--shards", "4", "--", "--model", "m"])
    assert "#SBATCH --exclusive" in train and "--qos" not in train
    assert "#SBATCH --qos=cpu" in normalize and "--exclusive" not in normalize and "--qos=gpu" not in normalize
    assert "#SBATCH --qos=cpu\n#SBATCH --qos=gpu" in encode and "--exclusive" not in encode
    cluster.write_text("sbatch_extra: ['--exclusive']\n")
    with pytest.raises(SystemExit, match=r"sbatch_extra: expected dict, found list"):
        main(["bench", "--dry-run", "--cluster", str(cluster)])
    cluster.write_text("sbatch_extra: {trian: ['--exclusive']}\n")
    with pytest.raises(SystemExit, match=r"sbatch_extra.trian: expected a job kind"):
        main(["bench", "--dry-run", "--cluster", str(cluster)])


def test_after_makes_a_dependency(capsys):
    script, _ = dry_run(capsys, ["preprocess", "--stage", "select", "--in", "a", "--out", "b", "--shards", "1",
                                 "--after", "12,13"])
    assert "#SBATCH --dependency=afterok:12:13\n" in script


def test_save_window_is_checked_against_step_and_save_time():
    """The paper's I2V-14B 200-frame case: 223 s a step (the planner), a 60 s save, the old fixed 90 s lead."""
    warning = save_window_warning(90, 223.0, 60.0)
    assert "a step takes 223.0 s and a save 60.0 s" in warning and "set signal_lead: 384" in warning
    assert recommended_lead(223.0, 60.0) == 384 and 384 >= 223 + 60
    assert save_window_warning(600, 223.0, 60.0) is None and save_window_warning(None, 223.0, 60.0) is None
