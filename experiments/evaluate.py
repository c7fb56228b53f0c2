"""Translates a split with a trained run and scores it (sacrebleu BLEU and chrF, exact match).

    python experiments/evaluate.py --workdir=workdir/scan --split=test
    python experiments/evaluate.py --workdir=runs/m30k --split=val --checkpoint=best --average_last=5

Uses the run's own config.json and vocabulary. Writes ``WORKDIR/eval/<split>-<checkpoint>-<decoding>.json``
(metrics, settings, sacrebleu signatures, example count, decode time) and the hypotheses as ``.txt``, one
line per source line of the split.
"""

import json
import os
import sys

from absl import app, flags, logging
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a checkout.

from flaxformer_lite import errors, sharding, storage, translation  # noqa: E402
from flaxformer_lite import run as run_lib  # noqa: E402
from flaxformer_lite import backend  # noqa: E402
from flaxformer_lite import config as config_lib  # noqa: E402
from flaxformer_lite.data import datasets, pipeline  # noqa: E402

config_lib.register_jax_flags()  # --jax_* flags (--jax_platforms=cpu, --jax_log_compiles, ...).
backend.keep_host_memory_for_reuse()  # Before JAX starts its threads: see its docstring.

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments/train.py.", required=True)
_SPLIT = flags.DEFINE_string("split", None, "Split to translate; default: the run's eval_split.")
_DECODE_CONFIG = translation.define_decode_flags()
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Translate only the first N examples (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Sentences per decoding batch (0: 128 for greedy search, which "
                               "drops finished rows as it goes; the run's data.batch_size otherwise).")
_GREEDY_BATCH = 128  # Greedy search drops finished rows, so a large batch costs little once most have ended.
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory, if not the run's.")
_INITIALIZE_DISTRIBUTED = sharding.define_distributed_flags()


def decoding_label(cfg: translation.DecodeConfig) -> str:
    if cfg.method == "beam":
        return f"beam{cfg.beam_size}-a{cfg.alpha:g}"
    if cfg.method == "sample":
        return f"sample-t{cfg.temperature:g}-k{cfg.top_k}-p{cfg.top_p:g}-s{cfg.seed}"
    return "greedy"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _INITIALIZE_DISTRIBUTED()  # Several processes: all of them decode, process 0 writes the report.
    run_lib.use_compilation_cache(_WORKDIR.value)
    decode_cfg = _DECODE_CONFIG()
    run = run_lib.restore(_WORKDIR.value, flags.FLAGS.checkpoint, flags.FLAGS.average_last, _DATA_DIR.value)
    split = _SPLIT.value or run.config.eval_split
    data_cfg = config_lib.build("data", run.config)
    batch_size = _BATCH.value or (_GREEDY_BATCH if decode_cfg.method == "greedy" else 0)
    if batch_size:
        data_cfg = data_cfg.__class__(**{**data_cfg.__dict__, "batch_size": batch_size})
    source = datasets.load_split(config_lib.build("dataset", run.config), split, run.config.data_dir)
    # Every process reads the whole split: the decoder takes whole batches and splits their rows itself.
    eval_data = pipeline.make_eval_data(source, run.data.inputs_tokenizer, run.data.targets_tokenizer, data_cfg,
                                        process_index=0, process_count=1, max_examples=_MAX_EXAMPLES.value,
                                        longest_first=True)
    logging.info("Translating %s (%d examples) with checkpoint %s, %s, on mesh %s", split, len(source),
                 run.label, decoding_label(decode_cfg), dict(run.mesh.shape))
    decode_fn = translation.make_decode_fn(run.model, decode_cfg, run.mesh)
    metrics, rows = translation.translate_and_score(
        decode_fn, run.params, eval_data, run.data.targets_tokenizer, run.config.dataset.target_lang,
        max_examples=_MAX_EXAMPLES.value)
    stem = run_lib.RunDir.of(_WORKDIR.value).eval / f"{split}-{run.label}-{decoding_label(decode_cfg)}"
    words = sum(len(h.split()) for _, _, h in rows)
    report = {"split": split, "checkpoint": run.label, "settings": vars(decode_cfg) | {"batch_size":
              data_cfg.batch_size}, **metrics, "hypothesis_words_per_sec": words / metrics["decode_seconds"]}
    if jax.process_index() != 0:
        return
    storage.write(f"{stem}.txt", "".join(h.replace("\n", " ") + "\n" for _, _, h in rows))
    storage.write(f"{stem}.json", json.dumps(report, indent=2, ensure_ascii=False))
    for source_text, reference, hypothesis in rows[:3]:
        logging.info("src: %s | ref: %s | hyp: %s", source_text, reference, hypothesis)
    print(f"{split} {run.label} {decoding_label(decode_cfg)}: BLEU {metrics['bleu']:.2f}  chrF {metrics['chrf']:.2f}"
          f"  exact {metrics['exact_match']:.2f}%  ({metrics['num_examples']} examples, "
          f"{metrics['decode_seconds']:.1f} s)  -> {stem}.json")


if __name__ == "__main__":
    errors.run(main)
