"""Tatoeba English->Chinese (short everyday sentences), from a local folder of ``{split}.{lang}`` files.

    python experiments/train.py --config=experiments/configs/tatoeba_en_zh.py \
        --config.dataset.path=../shared/data/tatoeba_en_zh

Chinese has no spaces: SentencePiece segments it, with byte fallback for characters it has not seen.
"""

from experiments.configs import common
from flaxformer_lite import config as config_lib


def get_config():
    config = config_lib.default_config()
    common.local_translation(config, "../shared/data/tatoeba_en_zh", "en", "zh", ("train", "dev"))
    common.small_translation_training(config, decode_eval_examples=1050)  # All of dev (BLEU's zh tokenizer).
    config.max_train_seconds = 1200  # 20 minutes of training (evaluation not counted); num_train_steps is a cap.
    return config
