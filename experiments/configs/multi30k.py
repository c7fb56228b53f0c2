"""Multi30k En->De (image captions), from a local folder of ``{split}.{lang}.gz`` files.

    python experiments/train.py --config=experiments/configs/multi30k.py \
        --config.dataset.path=../shared/data/multi30k [--config.max_train_seconds=2400]

Variants: ``multi30k.py:de`` (default), ``:fr``, ``:cs`` choose the target language. Tune on ``val``;
``test_2016_flickr`` is for reporting only.
"""

from experiments.configs import common
from flaxformer_lite import config as config_lib


def get_config(target: str = "de"):
    config = config_lib.default_config()
    common.local_translation(config, "../shared/data/multi30k", "en", target, ("train", "val"))
    common.small_translation_training(config, decode_eval_examples=1014)  # All of val.
    config.keep_checkpoints = 4  # For --average_last up to 4 at the end of a run.
    return config
