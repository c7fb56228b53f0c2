"""Translates sentences with a trained run: ``--text`` or one sentence per line on stdin.

    python experiments/translate.py --workdir=runs/m30k --text="A man is riding a bike."
    echo "jump twice after walk left" | python experiments/translate.py --workdir=workdir/scan
"""

import os
import sys

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a checkout.

from flaxformer_lite import backend  # noqa: E402
from flaxformer_lite import config as config_lib  # noqa: E402
from flaxformer_lite import errors, sharding, translation  # noqa: E402
from flaxformer_lite import run as run_lib  # noqa: E402

config_lib.register_jax_flags()  # --jax_* flags (--jax_platforms=cpu, --jax_log_compiles, ...).
backend.keep_host_memory_for_reuse()  # Before JAX starts its threads: see its docstring.

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments/train.py.", required=True)
_TEXT = flags.DEFINE_multi_string("text", None, "Sentence(s) to translate; default: read stdin.")
_DECODE_CONFIG = translation.define_decode_flags()
_INITIALIZE_DISTRIBUTED = sharding.define_distributed_flags()
_BATCH = 32  # Sentences decoded together.


def encode_batch(tokenizer, sentences):
    ids = [tokenizer.encode(s) + [tokenizer.eos_id] for s in sentences]
    width = -(-max(len(i) for i in ids) // 16) * 16  # A multiple of 16: few compiled shapes.
    batch = np.zeros((len(ids), width), np.int32)
    for row, sentence_ids in enumerate(ids):
        batch[row, : len(sentence_ids)] = sentence_ids
    return batch


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _INITIALIZE_DISTRIBUTED()  # Several processes: all of them decode, process 0 prints.
    run_lib.use_compilation_cache(_WORKDIR.value)
    cfg = _DECODE_CONFIG()
    run = run_lib.restore(_WORKDIR.value, flags.FLAGS.checkpoint, flags.FLAGS.average_last)
    decode_fn = translation.make_decode_fn(run.model, cfg, run.mesh)
    lines = _TEXT.value or [line.rstrip("\n") for line in sys.stdin]
    for start in range(0, len(lines), _BATCH):
        chunk = lines[start: start + _BATCH]
        tokens = decode_fn(run.params, encode_batch(run.data.inputs_tokenizer, chunk), start // _BATCH)
        for row in tokens if jax.process_index() == 0 else ():
            print(run.data.targets_tokenizer.decode(row.tolist()), flush=True)


if __name__ == "__main__":
    errors.run(main)
