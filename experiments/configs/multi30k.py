"""Multi30k En->De (image captions), from a local folder of ``{split}.{lang}.gz`` files.

    python experiments/train.py --config=experiments/configs/multi30k.py \
        --config.dataset.path=../shared/data/multi30k [--config.max_train_seconds=2400]

Measured with ``--config.max_train_seconds=2400`` (40 minutes): 4,642 steps on a 2-core Intel Xeon with AMX,
last checkpoint, beam 4, alpha 0.6: val 37.71, test_2016_flickr 37.35 BLEU (2026-12-03, issue 19's numbers);
see ``docs/quality.md``.

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
