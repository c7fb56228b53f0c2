"""Translates sentences with a trained run: ``--text`` or one sentence per line on stdin.

    python experiments/translate.py --workdir=runs/m30k --text="A man is riding a bike."
    echo "jump twice after walk left" | python experiments/translate.py --workdir=workdir/scan
"""

import os
import sys

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a checkout.

from flaxformer_lite import evaluation, trainer  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments/train.py.", required=True)
_TEXT = flags.DEFINE_multi_string("text", None, "Sentence(s) to translate; default: read stdin.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
_AVERAGE = flags.DEFINE_integer("average_last", 0, "Average the parameters of the last K checkpoints.")
_METHOD = flags.DEFINE_enum("method", "beam", ["greedy", "beam", "sample"], "Decoding method.")
_BEAM = flags.DEFINE_integer("beam_size", 4, "Beam size (paper: 4).")
_ALPHA = flags.DEFINE_float("alpha", 0.6, "Length penalty exponent (paper: 0.6).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold (1: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
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
    cfg = evaluation.DecodeConfig(method=_METHOD.value, beam_size=_BEAM.value, alpha=_ALPHA.value,
                                  temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                                  seed=_SEED.value)
    run = trainer.restore_run(_WORKDIR.value, _CHECKPOINT.value, _AVERAGE.value)
    decode_fn = evaluation.make_decode_fn(run.model, cfg)
    lines = _TEXT.value or [line.rstrip("\n") for line in sys.stdin]
    for start in range(0, len(lines), _BATCH):
        chunk = lines[start: start + _BATCH]
        tokens = decode_fn(run.params, encode_batch(run.data.inputs_tokenizer, chunk), start // _BATCH)
        for row in tokens:
            print(run.data.targets_tokenizer.decode(row.tolist()), flush=True)


if __name__ == "__main__":
    app.run(main)
