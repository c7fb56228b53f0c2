"""The settings of one sweep command: its flags, and the frozen ``Settings`` that main builds from them.

``launch/sweep.py`` defines the flags with ``define_flags`` and turns them into a ``Settings`` once, in
``main``; everything below takes that object, so no code past ``main`` reads absl flags and every part can
be tested by building a ``Settings`` by hand.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from typing import Sequence

from absl import app, flags

BACKENDS = ("local", "slurm")
MODES = ("auto", "min", "max")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the sweep command's flags on ``flag_values`` (a fresh ``FlagValues`` in tests)."""
    fv = flag_values
    flags.DEFINE_string("config", None, "Experiment config file[:variant], as for experiments/train.py.",
                        flag_values=fv)
    flags.DEFINE_string("sweep", None, "Sweep file[:arg] defining get_sweep(); default: the config file's own "
                        "get_sweep().", flag_values=fv)
    flags.DEFINE_string("root", None, "Directory of the sweep: one workdir per point, results.*.",
                        required=True, flag_values=fv)
    flags.DEFINE_integer("workers", 1, "Points run at the same time (Slurm: array task limit).", flag_values=fv)
    flags.DEFINE_enum("backend", "local", list(BACKENDS), "Where points run.", flag_values=fv)
    flags.DEFINE_string("metric", "eval/loss", "Metric to sort and plot by: a metrics.jsonl key (eval/loss, "
                        "eval/bleu, train/loss, ...) or evaluate/<key> from evaluate.py (evaluate/bleu, "
                        "evaluate/exact_match, evaluate/chrf).", flag_values=fv)
    flags.DEFINE_enum("mode", "auto", list(MODES), "Whether lower or higher --metric is better; auto: lower for "
                      "loss/perplexity/nll, higher otherwise.", flag_values=fv)
    flags.DEFINE_bool("evaluate", True, "Run experiments/evaluate.py on each trained point.", flag_values=fv)
    flags.DEFINE_multi_string("eval_flags", [], "Flags for evaluate.py, e.g. --eval_flags=--split=test.",
                              flag_values=fv)
    flags.DEFINE_bool("retry_failed", True, "Rerun points that failed before (they resume).", flag_values=fv)
    flags.DEFINE_integer("gpus_per_worker", 0, "Local backend: give each running point its own "
                         "CUDA_VISIBLE_DEVICES slice of this many GPUs (0: leave it alone).", flag_values=fv)
    flags.DEFINE_string("slurm_args", "", "Extra sbatch options, e.g. '--partition=gpu --gres=gpu:1 "
                        "--time=4:00:00 --cpus-per-task=8'.", flag_values=fv)
    flags.DEFINE_bool("nowait", False, "Slurm: submit and return without waiting for the array.", flag_values=fv)
    flags.DEFINE_bool("collect", False, "Only rewrite the results from what is in --root.", flag_values=fv)
    flags.DEFINE_float("poll_secs", 10.0, "How often results are refreshed while points run.", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "Print each point's command and exit.", flag_values=fv)
    flags.DEFINE_integer("run_index", None, "Internal (Slurm array tasks): run point N of ROOT/sweep.json.",
                         flag_values=fv)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one sweep command does, fixed when it starts (paths absolute)."""

    root: str
    repo: str  # The checkout whose experiments/train.py and evaluate.py the points run (their cwd).
    launcher: str  # launch/sweep.py: what Slurm array tasks run to train one point.
    config: str | None = None  # Absolute config file, plus ":variant" when one was given.
    sweep: str = ""  # Sweep file[:arg]; empty: the config file's get_sweep().
    train_flags: tuple[str, ...] = ()  # After ``--``: given to every train.py, before the point's overrides.
    workers: int = 1
    backend: str = "local"
    metric: str = "eval/loss"
    mode: str = "auto"
    evaluate: bool = True
    eval_flags: tuple[str, ...] = ()
    retry_failed: bool = True
    gpus_per_worker: int = 0
    slurm_args: tuple[str, ...] = ()  # Each one an ``#SBATCH`` option.
    wait: bool = True  # Slurm: wait for the array (False: --nowait).
    collect: bool = False
    poll_secs: float = 10.0
    dry_run: bool = False
    run_index: int | None = None
    python: str = sys.executable  # The interpreter the points (and Slurm tasks) run with.

    def __post_init__(self):
        problems = []
        if self.config is None and not self.collect and self.run_index is None:
            problems.append("--config is required (unless --collect)")
        if self.backend not in BACKENDS:
            problems.append(f"--backend={self.backend}: expected one of {', '.join(BACKENDS)}")
        if self.mode not in MODES:
            problems.append(f"--mode={self.mode}: expected one of {', '.join(MODES)}")
        if not self.metric:
            problems.append("--metric is empty")
        if self.workers < 0:
            problems.append(f"--workers={self.workers}: expected 0 or more")
        if self.gpus_per_worker < 0:
            problems.append(f"--gpus_per_worker={self.gpus_per_worker}: expected 0 or more")
        if not self.poll_secs > 0:
            problems.append(f"--poll_secs={self.poll_secs}: expected a positive number of seconds")
        if self.run_index is not None and self.run_index < 0:
            problems.append(f"--run_index={self.run_index}: expected a point index, 0 or more")
        if problems:
            raise app.UsageError("; ".join(problems))

    @property
    def local_workers(self) -> int:
        """Points the local backend runs at once (``--workers=0`` means one, as it always has)."""
        return max(1, self.workers)

    @classmethod
    def from_flags(cls, flag_values: flags.FlagValues, argv: Sequence[str], repo: str, launcher: str) -> Settings:
        """The settings of parsed ``flag_values``; ``argv`` is what absl left (its program name, then the flags
        after ``--``)."""
        fv = flag_values
        config = fv.config
        if config:
            file, sep, variant = config.partition(":")
            config = os.path.abspath(file) + sep + variant
        try:
            slurm_args = tuple(shlex.split(fv.slurm_args))
        except ValueError as e:
            raise app.UsageError(f"--slurm_args={fv.slurm_args!r}: {e}") from None
        return cls(
            root=os.path.abspath(fv.root), repo=os.path.abspath(repo), launcher=os.path.abspath(launcher),
            config=config or None, sweep=fv.sweep or "", train_flags=tuple(argv[1:]), workers=fv.workers,
            backend=fv.backend, metric=fv.metric, mode=fv.mode, evaluate=fv.evaluate,
            eval_flags=tuple(fv.eval_flags), retry_failed=fv.retry_failed, gpus_per_worker=fv.gpus_per_worker,
            slurm_args=slurm_args, wait=not fv.nowait, collect=fv.collect, poll_secs=fv.poll_secs,
            dry_run=fv.dry_run, run_index=fv.run_index)
