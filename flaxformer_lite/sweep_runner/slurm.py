"""The Slurm backend: one job array with a task per unfinished point, at most ``--workers`` running at once.

Each array task runs ``launch/sweep.py --root=ROOT --run_index=N``, which trains and evaluates point N of
ROOT/sweep.json like the local backend does; the checkout and ROOT must be on a file system every node sees.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time

from absl import logging

from flaxformer_lite.sweep_runner import files, results
from flaxformer_lite.sweep_runner.settings import Settings
from flaxformer_lite.sweep_runner.spec import Sweep


def slurm_script(sweep: Sweep, indices: list[int], settings: Settings) -> str:
    """The sbatch script of the array: task ids are point indices, so a rerun's array holds only the points
    still to run, and every task knows its point from ``$SLURM_ARRAY_TASK_ID``."""
    array = ",".join(str(i) for i in indices) + (f"%{settings.workers}" if settings.workers else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{os.path.basename(sweep.root)}",
             f"#SBATCH --array={array}", f"#SBATCH --output={sweep.root}/slurm/%A_%a.out",
             "#SBATCH --ntasks=1"]
    lines += [f"#SBATCH {arg}" for arg in settings.slurm_args]
    task = shlex.join([sweep.python, settings.launcher, f"--root={sweep.root}"])
    options = shlex.join([f"--metric={settings.metric}", f"--mode={settings.mode}",
                          *([] if settings.retry_failed else ["--noretry_failed"])])
    lines += ["set -euo pipefail", f"cd {shlex.quote(settings.repo)}",
              f'exec {task} --run_index="$SLURM_ARRAY_TASK_ID" {options}']
    return "\n".join(lines) + "\n"


def _squeue_active(job_id: str) -> list[str]:
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], capture_output=True, text=True)
    if result.returncode != 0:  # The job left squeue's memory (MinJobAge): it is over.
        return []
    return [line for line in result.stdout.splitlines() if line.strip()]


def run_slurm(sweep: Sweep, indices: list[int], settings: Settings) -> str | None:
    """Submits the array for ``indices`` and, unless ``settings.wait`` is off, waits for it while rewriting the
    results; returns the job id (None when there was nothing to run)."""
    if not indices:
        return None
    slurm_dir = os.path.join(sweep.root, "slurm")
    os.makedirs(slurm_dir, exist_ok=True)
    script = os.path.join(slurm_dir, "sweep.sbatch")
    files.write_atomic(script, slurm_script(sweep, indices, settings))
    for index in indices:
        if sweep.status(index).get("status") != "failed" or settings.retry_failed:
            sweep.set_status(index, status="pending", name=sweep.names[index], overrides=sweep.points[index])
    result = subprocess.run(["sbatch", "--parsable", script], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    jobs = files.read_json(os.path.join(slurm_dir, "jobs.json"), []) + [
        {"job_id": job_id, "indices": indices, "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}]
    files.write_atomic(os.path.join(slurm_dir, "jobs.json"), json.dumps(jobs, indent=1))
    logging.info("Submitted array job %s (%d tasks, %s at a time): %s", job_id, len(indices), settings.workers,
                 script)
    print(f"submitted slurm array job {job_id}", flush=True)
    if not settings.wait:
        return job_id
    while _squeue_active(job_id):
        results.write_results(sweep, settings.metric, settings.mode)
        time.sleep(settings.poll_secs)
    # Tasks killed by Slurm (time limit, node failure, scancel) never wrote a final status.
    for index in indices:
        if sweep.status(index).get("status") in ("pending", "running") and not sweep.finished(index):
            tail = files.tail(os.path.join(slurm_dir, f"{job_id}_{index}.out"))
            sweep.set_status(index, status="failed", log_tail=tail,
                             reason=f"slurm task {job_id}_{index} ended without finishing: "
                                    f"{files.failure_reason(tail)}")
    return job_id
