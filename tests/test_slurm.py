"""Jobs of `python -m launch` on a real (private, single-node) SLURM: the tiny training pre-empted by its time limit
(USR1 before it), requeued once and resumed with the per-step losses of an uninterrupted run; `max_restarts`
reached ends the job non-zero; a 2-task preprocess array chained into the next stage. Skips where slurm-wlm and
munge are not installed or cannot run (not root); `.ci/run` installs them."""

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gtpair_data import CLIPS
from slurm_cluster import ENDED, Cluster, unavailable

from data_tools.stage import read_jsonl

REPO = Path(__file__).parent.parent
RECIPE = str(REPO / "configs" / "tiny-t2v-regdpo.yaml")
CPU_JOB = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--venv", sys.prefix]  # two jobs at once on 2 CPUs
TRAINING_S = 60  # job A's steps: this long at the step time seen in job B (USR1 comes <= 30 s after it is due)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    try:
        cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    except (RuntimeError, OSError) as e:
        if os.environ.get("CI") == "true":  # installed by .ci/run: it must start
            raise
        pytest.skip(f"a private SLURM could not start here: {e}")
    yield cluster
    cluster.stop()


def submit(slurm, tmp_path, *argv) -> str:
    """The job id of `python -m launch KIND ARGV` (rendered and submitted: nothing written by hand)."""
    kind, rest = argv[0], list(argv[1:])
    done = subprocess.run([sys.executable, "-m", "launch", kind, *CPU_JOB, "--log-dir", str(tmp_path / "logs"),
                           *rest], cwd=REPO, env=slurm.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()[-1]


def train_args(models, encoded, out, steps, *overrides):
    return ["--ranks-per-node", "2", "--config", RECIPE, f"model.weights={models['t2v']}", f"data.dir={encoded['t2v']}",
            f"run.output_dir={out}", f"run.steps={steps}", "run.save_every=1000", "run.tensorboard=false",
            *overrides]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def job_log(tmp_path, job_id) -> str:
    return "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-4000:]}" for p in sorted((tmp_path / "logs").rglob(
        "*")) if p.is_file() and job_id in str(p))


def wait_for_steps(out: Path, n: int, timeout=300.0) -> None:
    log, deadline = out / "metrics.jsonl", time.time() + timeout
    while not (log.exists() and log.read_text().count("\n") >= n) and time.time() < deadline:
        time.sleep(0.2)


def signal_due_now(slurm, job_id: str, lead: int) -> None:
    """Shorten a running job's time limit (whole minutes) so that its --signal=USR1@LEAD is due now: slurmctld sends
    it at its next time-limit check (every 30 s, at or after LEAD + 30 s before the limit), while 90 s or more are
    left before the limit itself."""
    started = datetime.datetime.fromisoformat(slurm.job(job_id)["StartTime"])
    elapsed = (datetime.datetime.now() - started).total_seconds()
    minutes = int((elapsed + lead + 30) // 60)
    assert slurm.scontrol("update", f"JobId={job_id}", f"TimeLimit={minutes}").returncode == 0


def test_preemption_requeue_resume_and_max_restarts(slurm, models, encoded, tmp_path):
    """Job A: its time limit shortened mid-run, USR1 from SLURM (--signal=USR1@LEAD) saves, the job requeues itself
    and its second start (with a long limit again) resumes and finishes: Restarts=1, exit 0, the per-step losses of
    job C, never stopped. Job B, max_restarts 0: USR1 to its batch shell (scancel --batch) is forwarded, the ranks
    save, and the job ends FAILED with exit 75 instead of COMPLETED."""
    a_out, b_out, c_out = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    b = submit(slurm, tmp_path, "train", "--max-restarts", "0", "--job-name", "b",
               *train_args(models, encoded, b_out, 10_000))
    wait_for_steps(b_out, 5)  # alone on the node: A and C, side by side, step no faster
    step_s = sum(json.loads(r)["step_time"] for r in (b_out / "metrics.jsonl").read_text().splitlines()[1:5]) / 4
    steps = max(40, round(TRAINING_S / step_s))
    a = submit(slurm, tmp_path, "train", "--signal-lead", "120", "--max-restarts", "1", "--job-name", "a",
               *train_args(models, encoded, a_out, steps))
    stopped = subprocess.run(["scancel", "--batch", "--signal=USR1", b], env=slurm.env, capture_output=True,
                             text=True)
    assert stopped.returncode == 0, stopped.stderr
    wait_for_steps(a_out, 2)
    signal_due_now(slurm, a, 120)
    c = submit(slurm, tmp_path, "train", "--job-name", "c", *train_args(models, encoded, c_out, steps))  # after B

    job_b = slurm.wait(b)
    assert (job_b["JobState"], job_b["ExitCode"], job_b["Restarts"]) == ("FAILED", "75:0", "0"), job_log(tmp_path, b)
    b_steps = json.loads((b_out / "summary.json").read_text())["steps"]
    assert 5 <= b_steps < 10_000 and (b_out / "checkpoints" / f"step_{b_steps:06d}" / "trainer.json").exists()
    assert "0 restarts reached, not requeueing; exit 75" in job_log(tmp_path, b)

    deadline = time.time() + 300
    while slurm.job(a)["Restarts"] == "0" and slurm.job(a)["JobState"] not in ENDED and time.time() < deadline:
        time.sleep(0.5)  # until requeued by its batch script
    assert slurm.job(a)["Restarts"] == "1", job_log(tmp_path, a)
    assert slurm.scontrol("update", f"JobId={a}", "TimeLimit=30").returncode == 0  # the second start finishes
    job_a, job_c = slurm.wait(a), slurm.wait(c)
    assert (job_a["JobState"], job_a["ExitCode"], job_a["Restarts"]) == ("COMPLETED", "0:0", "1"), job_log(tmp_path,
                                                                                                            a)
    assert (job_c["JobState"], job_c["ExitCode"], job_c["Restarts"]) == ("COMPLETED", "0:0", "0"), job_log(tmp_path,
                                                                                                            c)
    summary = json.loads((a_out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["resumed_from"], summary  # the second start resumed
    assert losses(a_out) == losses(c_out) and len(losses(c_out)) == steps  # bit for bit
    log = job_log(tmp_path, a)
    assert "stopped at a checkpoint at step" in log and "requeueing job" in log and "training done" in log


def test_preprocess_array_chained_into_the_next_stage(slurm, tmp_path):
    """probe as a 2-task array (each task one shard of the clips), then select over both parts once the array has
    ended successfully (--after)."""
    clips, probe, select = tmp_path / "clips", tmp_path / "probe", tmp_path / "select"
    shutil.copytree(CLIPS, clips)  # (a directory below a hidden one, as .venv, reads as empty)
    array = submit(slurm, tmp_path, "preprocess", "--stage", "probe", "--in", str(clips), "--out", str(probe),
                   "--shards", "2")
    chained = submit(slurm, tmp_path, "preprocess", "--stage", "select", "--in", str(probe), "--out", str(select),
                     "--shards", "1", "--after", array, "--", "--duration", "0", "1000")
    job = slurm.wait(chained)
    tasks = slurm.wait(array)["tasks"]
    assert [t["ExitCode"] for t in tasks] == ["0:0", "0:0"] and job["ExitCode"] == "0:0", job_log(tmp_path, array)
    assert job["Dependency"] == "(null)" and job["StartTime"] >= max(t["EndTime"] for t in tasks)
    parts = [read_jsonl(probe / f"manifest.{i}-of-2.jsonl") for i in range(2)]
    assert all(parts) and sum(map(len, parts)) == len(list(clips.glob("*.mp4")))
    selected = read_jsonl(select / "manifest.jsonl")
    rejected = read_jsonl(select / "rejects.jsonl") if (select / "rejects.jsonl").exists() else []
    assert sorted(r["id"] for r in selected + rejected) == sorted(r["id"] for p in parts for r in p)
