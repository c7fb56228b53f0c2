"""A 4-point sweep of ``experiments/configs/tiny.py`` for tests: three learning rates and one failing point.

The failing point asks for an activation the model does not have, so the sweep's failure reporting runs.

    python launch/sweep.py --config=experiments/configs/tiny.py --sweep=experiments/sweeps/tiny.py \
        --root=/tmp/sweep_tiny --workers=2 -- --config.data_dir=/tmp/tfds
"""

from flaxformer_lite import sweep_space as space


def get_sweep():
    return space.chain(
        space.grid(**{"train.learning_rate": [1e-3, 3e-3, 1e-2]}),
        space.fixed(**{"train.learning_rate": 3e-3, "model.activation": "swish"}),  # Fails: not an activation.
    )
