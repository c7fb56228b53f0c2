"""Running one point of a sweep: train.py (or its resume), then evaluate.py, as child processes with logs.

Each point's ``status.json`` is kept up to date (running, finished, failed with the reason and its log's
tail, interrupted), so the results table and a rerun both know what happened; a failing point never raises.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from typing import Any

from absl import logging

from flaxformer_lite import run as run_lib
from flaxformer_lite.sweep_runner import files
from flaxformer_lite.sweep_runner.spec import Sweep


class Children:
    """Live child processes, so that SIGINT/SIGTERM of the launcher reaches them (train.py checkpoints)."""

    def __init__(self, cwd: str):
        self.cwd = cwd
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, command: list[str], log_path: str, env: dict, startup_lock: str | None = None,
            started: str | None = None) -> int:
        """Runs ``command`` with output appended to ``log_path``; returns its exit code.

        With ``startup_lock``, the command starts only while holding that file lock (``flock``: across
        threads, processes and, on a shared file system, Slurm tasks), and keeps it until the file
        ``started`` exists or the command exits.
        """
        lock = None
        if startup_lock:
            lock = open(startup_lock, "a")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return self._run(command, log_path, env, lock, started)
        finally:
            if lock is not None:
                lock.close()

    def _run(self, command, log_path, env, lock, started) -> int:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: "
                      f"{shlex.join(command)}\n")
            log.flush()
            with self._lock:
                if self.stopping:
                    return -signal.SIGTERM
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                        start_new_session=True)
                self._procs.add(proc)
            try:
                if lock is not None:
                    while proc.poll() is None and not (started and os.path.exists(started)):
                        time.sleep(0.2)
                    lock.close()  # Releases the flock.
                return proc.wait()
            finally:
                with self._lock:
                    self._procs.discard(proc)

    def terminate(self) -> None:
        with self._lock:
            self.stopping = True
            for proc in self._procs:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass


def run_point(sweep: Sweep, index: int, children: Children, env: dict | None = None,
              retry_failed: bool = True) -> str:
    """Trains (or resumes) and evaluates one point; returns its final status. Never raises for a failed run."""
    name, workdir = sweep.names[index], sweep.workdir(index)
    if sweep.finished(index):
        status = sweep.status(index)
        if status.get("status") != "finished":
            sweep.set_status(index, status="finished")
        logging.info("[%s] already finished: skipped", name)
        return "skipped"
    if children.stopping:  # The launcher is shutting down: leave the point as it is.
        return "interrupted"
    previous = sweep.status(index)
    if previous.get("status") == "failed" and not retry_failed:
        logging.info("[%s] failed before (%s): not retried", name, previous.get("reason"))
        return "failed"
    env = dict(os.environ if env is None else env)
    start = time.time()
    spent = float(previous.get("wall_seconds", 0.0))
    sweep.set_status(index, status="running", name=name, overrides=sweep.points[index], host=socket.gethostname(),
                     attempts=int(previous.get("attempts", 0)) + 1, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                     reason=None, log_tail=None, slurm_job=os.environ.get("SLURM_ARRAY_JOB_ID"))

    def finish(status: str, log: str | None = None, stage: str = "") -> str:
        fields: dict[str, Any] = {"status": status, "wall_seconds": spent + time.time() - start}
        if log is not None:
            tail = files.tail(log)
            fields.update(reason=f"{stage}: {files.failure_reason(tail)}", log_tail=tail)
        sweep.set_status(index, **fields)
        level = logging.info if status == "finished" else logging.warning
        level("[%s] %s%s (%.0f s)", name, status, f": {fields.get('reason')}" if log else "",
              time.time() - start)
        return status

    resuming = run_lib.RunDir.of(workdir).checkpoints.is_dir()
    logging.info("[%s] %s", name, "resuming" if resuming else "starting")
    train_log = os.path.join(workdir, "train.log")
    if not sweep.trained(index):
        # Points start one at a time, each until its config.json is written: by then it has built (or
        # found) the tfds dataset, which concurrent first builds of one data_dir would race on.
        code = children.run(sweep.train_command(index), train_log, env,
                            startup_lock=os.path.join(sweep.root, ".startup.lock"),
                            started=str(run_lib.RunDir.of(workdir).config))
        if children.stopping:
            return finish("interrupted")
        if code != 0 or not sweep.trained(index):
            return finish("failed", train_log, f"train exit {code}")
    if sweep.evaluate and not sweep.evaluated(index):
        eval_log = os.path.join(workdir, "eval.log")
        code = children.run(sweep.eval_command(index), eval_log, env)
        if children.stopping:
            return finish("interrupted")
        if code != 0 or not sweep.evaluated(index):
            return finish("failed", eval_log, f"evaluate exit {code}")
    return finish("finished")
