"""A sweep on disk: its points, their names, workdirs and commands, and each point's state (ROOT/sweep.json).

The spec is saved once per launch, so that Slurm array tasks and ``--collect`` see exactly the points,
flags and interpreter of the launch. A point's state is read from its workdir (trained: the checkpoint of
``num_train_steps`` exists, or ``stopped.json`` says the time budget ran out at a saved step; evaluated: an ``eval/*.json`` report exists) plus its ``status.json``, which
records what the runner last did with it (running, finished, failed with a reason, interrupted, pending).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Sequence

from flaxformer_lite import run as run_lib
from flaxformer_lite import sweep_space
from flaxformer_lite.sweep_runner import files

# The states of a point, in the order summaries list them.
STATES = ("finished", "running", "interrupted", "pending", "failed")


class Sweep:
    """The points of a sweep, their workdirs and how each is run; saved as ROOT/sweep.json."""

    def __init__(self, root: str, config: str, points: list[dict], train_flags: Sequence[str], evaluate: bool,
                 eval_flags: Sequence[str], repo: str, python: str = sys.executable):
        self.root, self.config, self.points = os.path.abspath(root), config, points
        self.train_flags, self.evaluate, self.eval_flags = list(train_flags), evaluate, list(eval_flags)
        self.repo, self.python = repo, python
        self.names = [sweep_space.point_name(p) for p in points]

    def save(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        files.write_atomic(os.path.join(self.root, "sweep.json"), json.dumps({
            "config": self.config, "train_flags": self.train_flags, "evaluate": self.evaluate,
            "eval_flags": self.eval_flags, "python": self.python,
            "points": [{"name": n, "overrides": p} for n, p in zip(self.names, self.points)]}, indent=1))

    @classmethod
    def load(cls, root: str, repo: str) -> Sweep:
        spec = files.read_json(os.path.join(root, "sweep.json"))
        if spec is None:
            raise FileNotFoundError(f"{root}/sweep.json not found: run the sweep once first")
        return cls(root, spec["config"], [p["overrides"] for p in spec["points"]], spec["train_flags"],
                   spec["evaluate"], spec["eval_flags"], repo, spec.get("python", sys.executable))

    def workdir(self, index: int) -> str:
        return os.path.join(self.root, self.names[index])

    def train_command(self, index: int) -> list[str]:
        return [self.python, os.path.join(self.repo, "experiments", "train.py"), f"--config={self.config}",
                f"--workdir={self.workdir(index)}", *self.train_flags,
                *sweep_space.override_flags(self.points[index])]

    def eval_command(self, index: int) -> list[str]:
        return [self.python, os.path.join(self.repo, "experiments", "evaluate.py"),
                f"--workdir={self.workdir(index)}", *self.eval_flags]

    # ------------------------------------------------------------------------------------------ point state

    def trained(self, index: int) -> bool:
        run_dir = run_lib.RunDir.of(self.workdir(index))
        config = files.read_json(str(run_dir.config))
        if not config:
            return False
        if (run_dir.checkpoints / str(config["num_train_steps"])).is_dir():
            return True
        # A point with a time budget (--config.max_train_seconds) is trained once it has spent it.
        stopped = files.read_json(str(run_dir.stopped))
        return bool(stopped) and stopped.get("reason") == "max_train_seconds" and \
            (run_dir.checkpoints / str(stopped["step"])).is_dir()

    def evaluated(self, index: int) -> bool:
        return bool(glob.glob(str(run_lib.RunDir.of(self.workdir(index)).eval / "*.json")))

    def finished(self, index: int) -> bool:
        return self.trained(index) and (not self.evaluate or self.evaluated(index))

    def unfinished(self) -> list[int]:
        return [i for i in range(len(self.points)) if not self.finished(i)]

    def status(self, index: int) -> dict:
        return files.read_json(os.path.join(self.workdir(index), "status.json"), {}) or {}

    def set_status(self, index: int, **fields) -> dict:
        os.makedirs(self.workdir(index), exist_ok=True)
        status = {**self.status(index), **fields}
        files.write_atomic(os.path.join(self.workdir(index), "status.json"), json.dumps(status, indent=1))
        return status
