"""Forward-pass demo: builds a model from a preset, runs it on a random batch and prints what it computed.

    python experiments/demo.py --preset=small --batch_size=8 --length=32
"""

import math
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import flaxformer_lite as ffl

_PRESET = flags.DEFINE_enum("preset", "small", sorted(ffl.PRESETS), "Model size.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sentence pairs in the random batch.")
_LENGTH = flags.DEFINE_integer("length", 32, "Source and target length of the random batch.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = ffl.preset(_PRESET.value, dtype=_DTYPE.value)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, _LENGTH.value + 1, size=(2, _BATCH.value))
    inputs, targets = (np.where(np.arange(_LENGTH.value) < n[:, None],
                                rng.integers(3, cfg.vocab_size, size=(_BATCH.value, _LENGTH.value)), 0)
                       for n in lengths)
    model = ffl.Transformer(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), inputs, targets)
    params = nn.unbox(variables)
    print(f"preset {_PRESET.value}: {sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)):,} "
          f"parameters on {jax.devices()[0].platform}")
    forward = jax.jit(model.apply)
    start = time.perf_counter()
    logits = forward(variables, inputs, targets).block_until_ready()
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    logits = forward(variables, inputs, targets).block_until_ready()
    run = time.perf_counter() - start
    real = targets != 0
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    print(f"logits {tuple(logits.shape)} {logits.dtype}; untrained cross-entropy "
          f"{float(nll[real].mean()):.3f} (ln vocab = {math.log(cfg.vocab_size):.3f}); "
          f"first call {compile_and_run:.2f}s (compiles), second {run * 1e3:.1f} ms")


if __name__ == "__main__":
    app.run(main)
