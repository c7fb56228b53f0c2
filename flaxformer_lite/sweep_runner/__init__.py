"""The sweep runner behind ``launch/sweep.py``: runs every point of a sweep as its own training process.

One module per concern: ``settings`` (the command's flags and the frozen ``Settings`` built from them),
``spec`` (points, names, workdirs, state: ROOT/sweep.json), ``point`` (train then evaluate one point as
child processes), ``results`` (ROOT/results.csv, .md, .png), the backends ``local`` (a pool of workers) and
``slurm`` (a job array), and ``runner`` (one command from start to end). The points themselves are defined
with ``flaxformer_lite.sweep_space``.
"""

from flaxformer_lite.sweep_runner.runner import run
from flaxformer_lite.sweep_runner.settings import Settings, define_flags
from flaxformer_lite.sweep_runner.spec import Sweep

__all__ = ["Settings", "Sweep", "define_flags", "run"]
