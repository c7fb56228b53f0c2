"""Tatoeba En->Zh in its 20-minute budget (``experiments/configs/tatoeba_en_zh.py``): the learning-rate schedule,
which is what a short budget is most sensitive to; each point is chosen on dev BLEU (beam 4, zh tokenizer).

    python launch/sweep.py --config=experiments/configs/tatoeba_en_zh.py \
        --sweep=experiments/sweeps/tatoeba_en_zh.py --root=sweeps/tatoeba --metric=evaluate/bleu \
        -- --config.dataset.path=../shared/data/tatoeba_en_zh
"""

from flaxformer_lite import sweep_space as space


def get_sweep():
    return space.zip_(**{
        # The first point is the schedule of the other small configs; the config now has the second.
        "train.learning_rate": [1e-3, 2e-3, 3e-3],
        "train.warmup_steps": [1000, 500, 500],
    })
