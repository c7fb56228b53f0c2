"""A short run for tests: the tiny model on SCAN, a few steps, everything logged and checkpointed.

    python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/tiny

Measured: 40 s on a 2-core AMD EPYC, most of it compiling (2026-12-04); it checks that things run, not what
they learn.
"""

from flaxformer_lite import config as config_lib


def get_config():
    config = config_lib.default_config()
    config.dataset.kind = "scan"
    config.dataset.name = "simple"
    config.train_split, config.eval_split = "train[:512]", "test[:64]"
    config.tokenizer.kind = "word"
    config_lib.with_preset(config, "tiny")
    config.data.batch_size = 8
    config.data.max_inputs_length = 16
    config.data.max_targets_length = 64
    config.train.schedule = "constant"
    config.train.learning_rate = 3e-3
    config.num_train_steps = 6
    config.log_every_secs = 0.0
    config.metrics_every_steps = 2
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    config.async_checkpoints = False
    config.decode_eval_examples = 16
    config.checkpoint_best_metric = "eval/exact_match"
    return config
