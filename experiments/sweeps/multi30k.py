"""Multi30k En->De sweeps for ``experiments/configs/multi30k.py``.

The default is a realistic sweep for one GPU per point: model size and its learning rate move together (zip),
crossed with dropout (grid), plus 4 seeded random samples around the best-known setting. ``multi30k.py:small``
is the 4-point grid alone.

    python launch/sweep.py --config=experiments/configs/multi30k.py --sweep=experiments/sweeps/multi30k.py \
        --root=sweeps/m30k --workers=4 --metric=eval/bleu -- --config.dataset.path=../shared/data/multi30k

``multi30k.py:cpu`` is for one 2-core CPU at a fixed time budget: the config as it was before it (the small
model, a 1e-3 peak after 1,000 warm-up steps), then one change at a time (schedule, model shape, vocabulary
size); ``multi30k.py:cpu_full`` is its best point, now the config, to run the same way with
``--config.max_train_seconds=2400``. Results: ``docs/quality.md``.

    python launch/sweep.py --config=experiments/configs/multi30k.py --sweep=experiments/sweeps/multi30k.py:cpu \
        --root=sweeps/m30k_cpu --metric=evaluate/bleu -- --config.dataset.path=../shared/data/multi30k \
        --config.max_train_seconds=840 [--config.model.dtype=float32 where bfloat16 is emulated]
"""

from flaxformer_lite import sweep_space as space


def get_sweep(variant: str = "full"):
    # Explicit values, so the points stay the same runs now that the config has the best of them.
    before = {"model.d_model": 256, "model.d_ff": 1024, "model.num_encoder_layers": 3,
              "model.num_decoder_layers": 3, "train.learning_rate": 1e-3, "train.warmup_steps": 1000}
    fast_schedule = {"train.learning_rate": 2e-3, "train.warmup_steps": 500}  # Tatoeba's sweep's choice.
    # A model with 2.6x fewer FLOPs per token (37.8 against 97.0 GFLOP a step) takes more steps in a budget.
    narrow = {"model.d_model": 128, "model.d_ff": 512, "model.num_encoder_layers": 4, "model.num_decoder_layers": 4}
    if variant == "cpu_full":  # The best short point, for the full budget (--config.max_train_seconds=2400).
        return space.fixed(**{**before, **fast_schedule, **narrow})
    if variant == "cpu":
        return space.chain(
            space.fixed(**before),  # The config before this sweep.
            space.fixed(**{**before, **fast_schedule, **narrow}),
            space.fixed(**{**before, **fast_schedule}),
            space.fixed(**{**before, **fast_schedule, "tokenizer.vocab_size": 4000}),
            space.fixed(**{**before, **fast_schedule, "model.d_model": 192, "model.d_ff": 768}),
        )
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
