"""Runs a sweep: every point is its own ``experiments/train.py`` process (then ``experiments/evaluate.py``).

    python launch/sweep.py --config=experiments/configs/tiny.py --sweep=experiments/sweeps/tiny.py \
        --root=/tmp/sweep --workers=2 [--metric=eval/loss] [--backend=local|slurm] -- --config.data_dir=/tmp/tfds

Flags after ``--`` go to every ``train.py`` (common overrides); the sweep's own overrides follow them, so a
point wins over a common flag. Each point trains in ``ROOT/<point name>/`` (a normal workdir, plus
``train.log``, ``eval.log`` and ``status.json``); ``--workers`` points run at a time. Rerunning the same command
skips finished points (trained to ``num_train_steps`` or to their time budget, and evaluated) and resumes the others from their latest
checkpoint; a failing point is marked failed with the tail of its log and does not stop the rest.
``ROOT/results.csv``, ``ROOT/results.md`` (sorted by ``--metric``) and ``ROOT/results.png`` (the metric
against each swept hyperparameter) are rewritten as points finish and at the end.

``--backend=slurm`` writes ``ROOT/slurm/sweep.sbatch`` (a job array with one task per unfinished point, at
most ``--workers`` at once; ``--slurm_args`` adds ``#SBATCH`` options), submits it with ``sbatch``, waits for
it while refreshing the results (``--nowait`` returns at once; ``--collect`` later only rewrites them).
Array tasks run this script with ``--run_index``; the repository and ``--root`` must be on a shared file
system.

This file only turns the flags into one ``Settings``; the work is in ``flaxformer_lite/sweep_runner/`` and
the points are defined with ``flaxformer_lite/sweep_space.py``.
"""

from __future__ import annotations

import os
import sys

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # Run from a checkout.

from flaxformer_lite import errors, sweep_runner  # noqa: E402

sweep_runner.define_flags(flags.FLAGS)


def main(argv):
    settings = sweep_runner.Settings.from_flags(flags.FLAGS, argv, repo=REPO, launcher=__file__)
    sys.exit(sweep_runner.run(settings))


if __name__ == "__main__":
    errors.run(main)
