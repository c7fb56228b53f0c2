"""Tatoeba English->Chinese (short everyday sentences), from a local folder of ``{split}.{lang}`` files.

    python experiments/train.py --config=experiments/configs/tatoeba_en_zh.py \
        --config.dataset.path=../shared/data/tatoeba_en_zh

Chinese has no spaces: SentencePiece segments it, with byte fallback for characters it has not seen.
"""

from flaxformer_lite import config as config_lib


def get_config():
    config = config_lib.default_config()
    config.dataset.kind = "local"
    config.dataset.path = "../shared/data/tatoeba_en_zh"
    config.dataset.source_lang, config.dataset.target_lang = "en", "zh"
    config.train_split, config.eval_split = "train", "dev"
    config.tokenizer.kind = "sentencepiece"
    config.tokenizer.vocab_size = 8000
    config_lib.with_preset(config, "small", pre_layer_norm=True, dropout_rate=0.1)
    config.model.dtype = "bfloat16"  # As multi30k.py: faster on CPUs too, same loss (see that file).
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
    config.decode_eval_examples = 1050  # All of dev, greedy: BLEU (zh tokenizer) picks the best checkpoint.
    config.checkpoint_best_metric = "eval/bleu"
    return config
