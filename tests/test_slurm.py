"""launch/sweep.py --backend=slurm against a real one-node Slurm started on localhost by the fixture (and the
backend's bookkeeping against a fake ``sbatch``/``squeue``, which needs no Slurm).

The fixture runs munged (with a fresh key), slurmctld and slurmd in the foreground from a private directory,
with a minimal slurm.conf: no cgroups (proctrack/linuxproc, task/none), cons_tres over one node ``localhost``
with this machine's CPUs, no accounting. It needs the Debian packages ``slurm-wlm`` and ``munge`` and root
(slurmd starts jobs as their user); without them the test is skipped with the reason.
"""

import csv
import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

from helpers import FAST, ROOT, TINY, free_port

SWEEP = ROOT / "launch" / "sweep.py"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


def _which(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def _slurm_conf(base: pathlib.Path, munge_socket: pathlib.Path) -> str:
    cpus = os.cpu_count() or 1
    return "\n".join([
        "ClusterName=fflite",
        f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={munge_socket}",
        "CredType=cred/munge",
        f"StateSaveLocation={base}/state",
        f"SlurmdSpoolDir={base}/spool",
        f"SlurmctldPidFile={base}/slurmctld.pid",
        f"SlurmdPidFile={base}/slurmd.pid",
        f"SlurmctldLogFile={base}/slurmctld.log",
        f"SlurmdLogFile={base}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MinJobAge=300",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Starts munged + slurmctld + slurmd on localhost; yields the environment for sbatch/squeue."""
    missing = [d for d in DAEMONS if not _which(d)]
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd runs jobs as their user)")
    base = tmp_path_factory.mktemp("slurm")
    os.chmod(base, 0o700)
    for sub in ("munge", "state", "spool"):
        (base / sub).mkdir(mode=0o700)
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    munge_socket = base / "munge" / "munge.socket"
    conf = base / "slurm.conf"
    conf.write_text(_slurm_conf(base, munge_socket))
    env = dict(os.environ, SLURM_CONF=str(conf))
    procs = []

    def start(*command):
        log = open(base / f"{pathlib.Path(command[0]).name}.out", "w")
        procs.append(subprocess.Popen([_which(command[0]), *command[1:]], stdout=log, stderr=subprocess.STDOUT,
                                      env=env))

    def logs():
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(base.glob("*.out")) + sorted(
            base.glob("*.log")))

    try:
        start("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
              f"--pid-file={base}/munge/munged.pid", f"--log-file={base}/munge/munged.log",
              f"--seed-file={base}/munge/munged.seed")
        deadline = time.time() + 20
        while not munge_socket.exists():
            assert time.time() < deadline and procs[0].poll() is None, f"munged did not start\n{logs()}"
            time.sleep(0.1)
        start("slurmctld", "-D", "-i", "-f", str(conf))
        start("slurmd", "-D", "-N", "localhost", "-f", str(conf))
        deadline = time.time() + 60
        while True:
            state = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], capture_output=True, text=True,
                                   env=env).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                break
            dead = [p.args[0] for p in procs if p.poll() is not None]
            if dead or time.time() > deadline:
                pytest.skip(f"local Slurm did not come up (node state {state!r}, exited: {dead}):\n{logs()}")
            time.sleep(0.5)
        yield env
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_slurm_backend_submits_and_marks_tasks_slurm_killed(tmp_path, monkeypatch):
    """A fake sbatch records its script and answers a job id; the fake squeue says the job is gone at once,
    as after a time limit: the points it never ran are marked failed with the tail of their task's log."""
    from flaxformer_lite import sweep_runner
    from flaxformer_lite.sweep_runner import slurm as slurm_backend

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch.calls\necho "77;cluster"\n')
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "squeue"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    points = [{"train.learning_rate": lr} for lr in (1e-3, 1e-2, 1e-1)]
    root = tmp_path / "sweep"
    sweep = sweep_runner.Sweep(root, str(TINY), points, [], True, [], repo=str(ROOT))
    sweep.set_status(2, status="failed", reason="before")
    settings = sweep_runner.Settings(root=str(root), repo=str(ROOT), launcher=str(SWEEP), config=str(TINY),
                                     backend="slurm", workers=1, poll_secs=0.01, wait=False, retry_failed=False)

    assert slurm_backend.run_slurm(sweep, [0, 1, 2], settings) == "77"  # --nowait: submitted, nothing marked.
    assert (tmp_path / "sbatch.calls").read_text() == f"--parsable {root}/slurm/sweep.sbatch\n"
    assert "#SBATCH --array=0,1,2%1" in (root / "slurm" / "sweep.sbatch").read_text()
    assert [sweep.status(i)["status"] for i in range(3)] == ["pending", "pending", "failed"]  # Not retried.

    (root / "slurm" / "77_1.out").write_text("step 1\nslurmstepd: error: *** JOB 77 CANCELLED DUE TO TIME LIMIT\n")
    assert slurm_backend.run_slurm(sweep, [0, 1], dataclasses.replace(settings, wait=True)) == "77"
    jobs = json.loads((root / "slurm" / "jobs.json").read_text())
    assert [(j["job_id"], j["indices"]) for j in jobs] == [("77", [0, 1, 2]), ("77", [0, 1])]
    killed = sweep.status(1)
    assert killed["status"] == "failed" and killed["reason"].startswith("slurm task 77_1 ended without finishing: ")
    assert "TIME LIMIT" in killed["reason"] and killed["log_tail"][0] == "step 1"
    assert sweep.status(0)["reason"] == "slurm task 77_0 ended without finishing: no output"
    assert slurm_backend.run_slurm(sweep, [], settings) is None


@pytest.mark.slow
def test_slurm_backend_runs_a_sweep_as_an_array_job(tmp_path, slurm):
    sweep_file = tmp_path / "two.py"
    sweep_file.write_text("from flaxformer_lite import sweep_space\n\n\ndef get_sweep():\n"
                          "    return sweep_space.grid(**{'train.learning_rate': [1e-3, 1e-2]})\n")
    root, data_dir = tmp_path / "sweep", tmp_path / "tfds"
    env = dict(slurm, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    command = [sys.executable, str(SWEEP), "--backend=slurm", f"--config={TINY}", f"--sweep={sweep_file}",
               f"--root={root}", "--workers=2", "--slurm_args=--cpus-per-task=1", "--poll_secs=1",
               "--eval_flags=--max_examples=4", "--", f"--config.data_dir={data_dir}", *FAST]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "submitted slurm array job" in result.stdout and "2 finished" in result.stdout, result.stdout
    job_id = result.stdout.split("submitted slurm array job ")[1].split()[0]
    assert "#SBATCH --array=0,1%2" in (root / "slurm" / "sweep.sbatch").read_text()
    assert sorted(p.name for p in (root / "slurm").glob("*.out")) == [f"{job_id}_0.out", f"{job_id}_1.out"]
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert all(r["steps"] == "2" and r["evaluate/bleu"] != "" for r in rows)
    # Collecting again (or rerunning) submits nothing: both points are finished.
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert again.returncode == 0 and "submitted" not in again.stdout and "skipped 2" in again.stdout


@pytest.mark.slow
def test_train_sbatch_runs_two_processes_under_srun(tmp_path, slurm):
    """launch/slurm/train.sbatch on the one local node: 2 srun tasks x 4 CPU devices form one 8-device run."""
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    env = dict(slurm, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHON=sys.executable)
    result = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
         f"--output={tmp_path}/slurm-%j.out", str(ROOT / "launch" / "slurm" / "train.sbatch"), f"--config={TINY}",
         f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.num_train_steps=3"],
        capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    (out,) = tmp_path.glob("slurm-*.out")
    log = out.read_text()
    assert result.returncode == 0, log[-4000:]
    assert "process 0 of 2, 4 local / 8 global devices" in log and "process 1 of 2, 4 local / 8 global" in log
    assert (workdir / "checkpoints" / "3").is_dir() and (workdir / "metrics.jsonl").exists()
