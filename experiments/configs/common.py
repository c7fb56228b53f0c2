"""Blocks that several experiment configs share: small functions, each setting one part of a config.

A config file reads top to bottom as calls of these plus its own lines, e.g.
``common.local_translation(config, "../shared/data/multi30k", "en", "de", ("train", "val"))``. Config
files import it as ``experiments.configs.common``: every entry point puts the checkout on ``sys.path``.
"""

from flaxformer_lite import config as config_lib


def local_translation(config, path: str, source_lang: str, target_lang: str, splits: tuple[str, str]):
    """A parallel corpus in a local folder of ``{split}.{lang}[.gz]`` files, with one SentencePiece
    vocabulary for both languages; ``splits`` is (train, eval)."""
    config.dataset.kind = "local"
    config.dataset.path = path
    config.dataset.source_lang, config.dataset.target_lang = source_lang, target_lang
    config.train_split, config.eval_split = splits
    config.tokenizer.kind = "sentencepiece"
    config.tokenizer.vocab_size = 8000
    return config


def packed_rows(config, batch_size: int, length: int = 64):
    """Batches of ``batch_size`` packed rows of ``length`` tokens on each side."""
    config.data.batch_size = batch_size
    config.data.max_inputs_length = length
    config.data.max_targets_length = length
    return config


def rsqrt_schedule(config, learning_rate: float = 1e-3, warmup_steps: int = 1000):
    """A linear warm-up to ``learning_rate``, then decay as 1/sqrt(step)."""
    config.train.schedule = "rsqrt"
    config.train.learning_rate = learning_rate
    config.train.warmup_steps = warmup_steps
    return config


def small_translation_training(config, decode_eval_examples: int):
    """The small pre-LN model in bfloat16, trained 20k steps on 32 rows of 64 tokens, evaluated and saved
    every 500 steps; greedy BLEU on the first ``decode_eval_examples`` eval examples picks the best checkpoint."""
    config_lib.with_preset(config, "small", pre_layer_norm=True, dropout_rate=0.1)
    # bfloat16 products, float32 accumulation and parameters: faster on CPUs too, at the same validation loss.
    config.model.dtype = "bfloat16"
    packed_rows(config, 32)
    rsqrt_schedule(config)
    config.num_train_steps = 20_000
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.decode_eval_examples = decode_eval_examples
    config.checkpoint_best_metric = "eval/bleu"
    return config
