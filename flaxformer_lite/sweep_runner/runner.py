"""One sweep command from start to end: save the spec, run the unfinished points on a backend, report."""

from __future__ import annotations

import shlex
import time

from absl import logging

from flaxformer_lite import sweep_space
from flaxformer_lite.sweep_runner import local, results, slurm
from flaxformer_lite.sweep_runner.point import Children, run_point
from flaxformer_lite.sweep_runner.settings import Settings
from flaxformer_lite.sweep_runner.spec import Sweep


def run_task(settings: Settings) -> int:
    """One Slurm array task: point ``settings.run_index`` of the saved spec; 0 when it is finished."""
    sweep = Sweep.load(settings.root, settings.repo)
    if settings.run_index >= len(sweep.points):
        raise IndexError(f"--run_index={settings.run_index}: {settings.root}/sweep.json has "
                         f"{len(sweep.points)} points")
    status = run_point(sweep, settings.run_index, Children(cwd=settings.repo), retry_failed=settings.retry_failed)
    results.write_results(sweep, settings.metric, settings.mode)
    return 0 if status in ("finished", "skipped") else 1


def new_sweep(settings: Settings) -> Sweep:
    """The sweep of ``settings.config`` and ``settings.sweep`` (not saved yet)."""
    points = sweep_space.load_sweep(settings.sweep, settings.config)
    return Sweep(settings.root, settings.config, points, settings.train_flags, settings.evaluate,
                 settings.eval_flags, settings.repo, settings.python)


def run(settings: Settings) -> int:
    """What ``launch/sweep.py`` does with its settings; returns the process exit code."""
    if settings.run_index is not None:
        return run_task(settings)
    if settings.collect:
        sweep = Sweep.load(settings.root, settings.repo)
    else:
        sweep = new_sweep(settings)
        if settings.dry_run:
            for index in range(len(sweep.points)):
                print(shlex.join(sweep.train_command(index)))
            return 0
        sweep.save()
    indices = sweep.unfinished()
    skipped = len(sweep.points) - len(indices)
    logging.info("Sweep %s: %d points, %d finished already, %d to run", settings.root, len(sweep.points), skipped,
                 len(indices))
    start = time.time()
    if not settings.collect and indices:
        if settings.backend == "local":
            local.run_local(sweep, indices, settings)
        else:
            slurm.run_slurm(sweep, indices, settings)
    rows = results.write_results(sweep, settings.metric, settings.mode)
    print(f"sweep {settings.root}: {results.summary(rows)} (skipped {skipped} finished before; "
          f"{time.time() - start:.0f} s) -> {settings.root}/results.md", flush=True)
    for row in rows:
        if row["status"] == "failed":
            print(f"FAILED {row['name']}: {row['reason']}", flush=True)
    return 0
