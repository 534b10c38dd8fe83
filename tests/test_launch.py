"""The launcher: dry-run renders of the train, preprocess, generate and bench jobs that `bash -n` accepts, settings
errors that name the key, and the local launcher running the tiny recipe end to end on 2 CPU ranks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.__main__ import main

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
