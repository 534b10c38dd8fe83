"""A private single-node SLURM (Debian's slurm-wlm and munge) for the tests: munged, slurmctld and slurmd started
in the foreground under a temporary directory, on free ports, and stopped by their PIDs."""

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")  # job states that are final


def unavailable() -> str | None:
    """Why a private SLURM cannot run here, or None."""
    missing = [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; as root: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd runs jobs as their user and needs root here"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(d: Path, node: str, cpus: int) -> str:
    """slurm.conf of one node with `cpus` CPUs, state and logs under `d`.

    A requeued job may start again after the credential lifetime (AuthInfo cred_expire, default 120 s; 10 here);
    the scheduler passes every 2 s and time limits are checked every 30 s (slurmctld's fixed period). Job ids start
    at a random number: train.sbatch derives the rendezvous port from the job id, so two such clusters on one
    machine do not meet on one port."""
    return "\n".join([
        "ClusterName=mwtest", f"SlurmctldHost={node}(127.0.0.1)", f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={d}/munge.socket,cred_expire=10",
        f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool", f"SlurmctldPidFile={d}/slurmctld.pid",
        f"SlurmdPidFile={d}/slurmd.pid", f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=2",
        "MpiDefault=none", "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "KillWait=10",
        "MinJobAge=3600", "InactiveLimit=0", "SlurmdTimeout=300", f"FirstJobId={random.randint(1000, 19000)}",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP", ""])


class Cluster:
    """The running daemons; `env` is the environment for the SLURM client commands (SLURM_CONF)."""

    def __init__(self, d: Path):
        self.dir = d
        self.procs: list[subprocess.Popen] = []
        node = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        conf = d / "slurm.conf"
        conf.write_text(slurm_conf(d, node, os.cpu_count() or 1))
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        try:
            self._start_daemons(d, key, conf, node)
        except BaseException:
            self.stop()
            raise

    def _start_daemons(self, d: Path, key: Path, conf: Path, node: str) -> None:
        self._start(["munged", "--foreground", "--force", f"--socket={d}/munge.socket", f"--key-file={key}",
                     f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munge.seed"],
                    lambda: (d / "munge.socket").exists())
        self._start(["slurmctld", "-D", "-i", "-f", str(conf)], lambda: self.scontrol("ping").returncode == 0)
        self._start(["slurmd", "-D", "-f", str(conf), "-N", node],
                    lambda: "State=IDLE" in self.scontrol("show", "node", node).stdout)

    def _start(self, cmd, ready, timeout=60.0) -> None:
        log = open(self.dir / f"{cmd[0]}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.procs[-1].poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {self.procs[-1].returncode}: {self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{cmd[0]} not ready after {timeout:.0f} s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n" + p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.stdout")))

    def scontrol(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, env=self.env)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as {key: value} (the first record: an array's first task)."""
        out = self.scontrol("show", "job", "-o", job_id).stdout.splitlines()
        return dict(f.split("=", 1) for f in out[0].split() if "=" in f) if out else {}

    def tasks(self, job_id: str) -> list[dict]:
        out = self.scontrol("show", "job", "-o", job_id).stdout.splitlines()
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out]

    def wait(self, job_id: str, states=ENDED, timeout=600.0) -> dict:
        """The job once every record of it is in one of `states`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            tasks = self.tasks(job_id)
            if tasks and all(t.get("JobState") in states for t in tasks):
                return tasks[0] if len(tasks) == 1 else {"tasks": tasks}
            time.sleep(1)
        raise TimeoutError(f"job {job_id}: not in {states} after {timeout:.0f} s: {self.tasks(job_id)}")

    def stop(self) -> None:
        """Cancel every job (their processes end with them), then stop the daemons."""
        if self.procs and self.procs[-1].poll() is None:
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
            deadline = time.time() + 60
            while time.time() < deadline and subprocess.run(
                    ["squeue", "--noheader", "--states=RUNNING,COMPLETING"], env=self.env, capture_output=True,
                    text=True).stdout.strip():
                time.sleep(1)
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
