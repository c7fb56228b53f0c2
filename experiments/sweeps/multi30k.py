"""A realistic Multi30k En->De sweep for ``experiments/configs/multi30k.py`` (one GPU per point).

Model size and its learning rate move together (zip), crossed with dropout (grid), plus 4 seeded random
samples around the best-known setting. ``multi30k.py:small`` is the 4-point grid alone.

    python launch/sweep.py --config=experiments/configs/multi30k.py --sweep=experiments/sweeps/multi30k.py \
        --root=sweeps/m30k --workers=4 --metric=eval/bleu -- --config.dataset.path=../shared/data/multi30k
"""

from flaxformer_lite import sweep_space as space


def get_sweep(variant: str = "full"):
    sizes = space.zip_(**{
        "model.d_model": [256, 512],
        "model.d_ff": [1024, 2048],
        "model.num_heads": [4, 8],
        "train.learning_rate": [1e-3, 7e-4],
    })
    grid = space.product(sizes, space.grid(**{"model.dropout_rate": [0.1, 0.3]}))
    if variant == "small":
        return grid
    around_best = space.product(
        space.fixed(**{"model.d_model": 256, "model.d_ff": 1024, "model.num_heads": 4}),
        space.random(4, seed=0, **{
            "train.learning_rate": space.loguniform(3e-4, 3e-3),
            "model.dropout_rate": space.uniform(0.1, 0.4),
            "train.label_smoothing": [0.0, 0.1, 0.2],
            "train.warmup_steps": space.randint(500, 4000),
        }),
    )
    return space.chain(grid, around_best)
