"""Multi30k En->De (image captions), from a local folder of ``{split}.{lang}.gz`` files.

    python experiments/train.py --config=experiments/configs/multi30k.py \
        --config.dataset.path=../shared/data/multi30k [--config.max_train_seconds=2400]

Variants: ``multi30k.py:de`` (default), ``:fr``, ``:cs`` choose the target language. Tune on ``val``;
``test_2016_flickr`` is for reporting only.
"""

from flaxformer_lite import config as config_lib


def get_config(target: str = "de"):
    config = config_lib.default_config()
    config.dataset.kind = "local"
    config.dataset.path = "../shared/data/multi30k"
    config.dataset.source_lang, config.dataset.target_lang = "en", target
    config.train_split, config.eval_split = "train", "val"
    config.tokenizer.kind = "sentencepiece"
    config.tokenizer.vocab_size = 8000  # One joint vocabulary for both languages.
    config_lib.with_preset(config, "small", pre_layer_norm=True, dropout_rate=0.1)
    # bfloat16 products with float32 accumulation and float32 parameters: 1.4x the float32 steps/s on this
    # project's 2-core CPU, with the same validation loss after 500 steps (2.9386 vs 2.9394, 2026-11-25).
    config.model.dtype = "bfloat16"
    config.data.batch_size = 32
    config.data.max_inputs_length = 64
    config.data.max_targets_length = 64
    config.train.schedule = "rsqrt"
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 1000
    config.num_train_steps = 20_000
    config.train.total_steps = config.num_train_steps
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 4  # For --average_last up to 4 at the end of a run.
    config.decode_eval_examples = 1014  # All of val, greedy: BLEU picks the best checkpoint.
    config.checkpoint_best_metric = "eval/bleu"
    return config
