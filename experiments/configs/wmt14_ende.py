"""WMT'14 English->German from the tfds catalog, with the paper's hyperparameters (for accelerators).

    python experiments/train.py --config=experiments/configs/wmt14_ende.py:base   # or :big

Paper (5.1-5.4): shared 37k BPE vocabulary, batches of ~25k source + 25k target tokens, Adam (0.9, 0.98,
1e-9) with 4000 warm-up steps and the d_model^-0.5 schedule, label smoothing 0.1; base trains 100k steps,
big 300k. The batch here is 768 rows of 64 packed tokens (~25k target tokens per side before padding):
set ``mesh_shape`` and ``data.batch_size`` (rows per process) for your hardware.

Measured: nothing yet; it is an accelerator recipe (days on a 2-core CPU), not run by this project so far.
"""

from experiments.configs import common
from flaxformer_lite import config as config_lib


def get_config(size: str = "base"):
    if size not in ("base", "big"):
        raise ValueError(f"wmt14_ende.py variant must be 'base' or 'big', got {size!r}")
    config = config_lib.default_config()
    config.dataset.kind = "tfds"
    config.dataset.name = "wmt14_translate/de-en"
    config.dataset.source_lang, config.dataset.target_lang = "en", "de"
    config.train_split, config.eval_split = "train", "validation"
    config.tokenizer.kind = "sentencepiece"
    config.tokenizer.model_type = "bpe"
    config.tokenizer.vocab_size = 37_000
    config_lib.with_preset(config, size)
    common.packed_rows(config, 768)
    config.train.schedule = "transformer"
    config.train.learning_rate = 1.0  # A multiplier of the paper's schedule.
    config.train.warmup_steps = 4000
    config.train.label_smoothing = 0.1
    config.num_train_steps = 100_000 if size == "base" else 300_000
    config.eval_every_steps = 5000
    config.eval_max_batches = 50
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 20 if size == "big" else 5  # The paper averages the last 5 (base) / 20 (big).
    config.decode_eval_examples = 500
    config.checkpoint_best_metric = "eval/bleu"
    return config
