r"""Measures the input pipeline on a parallel text corpus: tokenizer, length limits, packing, throughput.

Reads ``{data_dir}/train.{src}.gz`` and ``train.{tgt}.gz`` (gzip'd UTF-8, one sentence per line), trains (or
reuses) a shared SentencePiece vocabulary in ``{workdir}/vocab``, then for each max length reports what the
length filter drops, the packing efficiency (share of non-pad tokens) of packed and of plain padded batches,
and how many examples per second one epoch of the train pipeline delivers. The plain rate is the pipeline's
own (the consumer does nothing); with ``--consumer_ms`` a consumer that sleeps like a training step (releasing
the GIL, as a dispatched JAX step does) is timed without and with a prefetch thread, which should hide the
pipeline behind the step. grain's own ``FirstFitPackIterDataset`` is measured on the same examples for
comparison (the reason the project packs with its own planner).

  python experiments/data_stats.py --data_dir=/work/shared/data/multi30k --src=en --tgt=de \
      --max_length=64,128 --vocab_size=8000 --workdir=/tmp/data_stats
"""

import dataclasses
import gzip
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import grain

from flaxformer_lite.data import pipeline
from flaxformer_lite.data import tokenizer as tokenizer_lib

_DATA_DIR = flags.DEFINE_string(
    "data_dir", "/work/shared/data/multi30k", "Folder with train.{lang}.gz files."
)
_SRC = flags.DEFINE_string("src", "en", "Source language suffix.")
_TGT = flags.DEFINE_string("tgt", "de", "Target language suffix.")
_MAX_LENGTH = flags.DEFINE_list("max_length", ["64", "128"], "Row lengths (inputs and targets) to measure.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "Shared SentencePiece vocabulary size.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/data_stats", "Where the vocabulary is stored (and reused).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Rows per batch.")
_BINS = flags.DEFINE_list("packing_bins_per_batch", ["1", "2", "4"], "First-fit open rows, in batches.")
_CONSUMER_MS = flags.DEFINE_float(
    "consumer_ms", 5.0, "Simulated train step per batch for the prefetch timing."
)
_OUTPUT = flags.DEFINE_string("output", "", "Optional JSON file for the results.")


def _read_lines(path: str) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _epoch(
    config: pipeline.PipelineConfig, source, tok, consumer_s: float = 0.0
) -> tuple[list[dict], float, pipeline.LengthStats]:
    """All batches of config.num_epochs epochs, and the seconds iterating them took (not building them)."""
    data = pipeline.make_train_data(source, tok, tok, config, process_index=0, process_count=1)
    it = iter(data)
    start = time.perf_counter()
    batches = []
    for batch in it:
        batches.append(batch)
        if consumer_s:
            time.sleep(consumer_s)
    seconds = time.perf_counter() - start
    it.close()
    return batches, seconds, data.stats


def _grain_first_fit_epoch(examples: pipeline.TokenizedExamples, config: pipeline.PipelineConfig):
    """One epoch through grain's FirstFitPackIterDataset: (efficiency, batches, examples/s)."""
    lengths = {"inputs": config.max_inputs_length, "targets": config.max_targets_length}
    ds = grain.MapDataset.source(examples).shuffle(seed=config.seed)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct=lengths,
        num_packing_bins=config.batch_size * config.packing_bins_per_batch,
        seed=config.seed,
        shuffle_bins=True,
    )
    it = it.batch(config.batch_size)
    start = time.perf_counter()
    batches = list(it)
    seconds = time.perf_counter() - start
    return _efficiency(batches), len(batches), len(examples) / seconds


def _efficiency(batches: list[dict]) -> dict:
    """Share of non-pad tokens over the epoch, and without its last (part-empty) batch, the steady state."""
    out = pipeline.packing_efficiency(batches)
    out["total_without_last_batch"] = pipeline.packing_efficiency(batches[:-1])["total"]
    return out


def data_examples(source, tok, config) -> pipeline.TokenizedExamples:
    return pipeline.make_train_data(source, tok, tok, config, process_index=0, process_count=1).examples


def main(argv):
    del argv
    src = _read_lines(os.path.join(_DATA_DIR.value, f"train.{_SRC.value}.gz"))
    tgt = _read_lines(os.path.join(_DATA_DIR.value, f"train.{_TGT.value}.gz"))
    if len(src) != len(tgt):
        raise ValueError(f"{len(src)} source lines but {len(tgt)} target lines")
    source = [{"inputs": s, "targets": t} for s, t in zip(src, tgt)]
    results = {"examples": len(source)}

    start = time.perf_counter()
    tok_config = tokenizer_lib.TokenizerConfig(vocab_size=_VOCAB_SIZE.value)
    tok, _ = tokenizer_lib.load_or_train_tokenizers(tok_config, os.path.join(_WORKDIR.value, "vocab"), source)
    results["tokenizer_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    inputs, targets = pipeline.tokenize_examples(source, range(len(source)), tok, tok)
    results["tokenize_split_seconds"] = time.perf_counter() - start
    n_in, n_tgt = sum(map(len, inputs)), sum(map(len, targets))
    results["mean_tokens_with_eos"] = {"inputs": n_in / len(source), "targets": n_tgt / len(source)}
    logging.info(
        "Vocabulary %d pieces (%.1f s); split tokenized in %.2f s; mean length %.1f / %.1f",
        tok.vocab_size,
        results["tokenizer_seconds"],
        results["tokenize_split_seconds"],
        n_in / len(source),
        n_tgt / len(source),
    )

    for max_length in map(int, _MAX_LENGTH.value):
        base = pipeline.PipelineConfig(
            batch_size=_BATCH_SIZE.value,
            max_inputs_length=max_length,
            max_targets_length=max_length,
            num_epochs=1,
        )
        row = {}
        batches, seconds, stats = _epoch(dataclasses.replace(base, pack=False), source, tok)
        row["length_stats"] = dataclasses.asdict(stats)
        row["unpacked"] = {
            "efficiency": _efficiency(batches),
            "batches": len(batches),
            "examples_per_s": stats.num_kept / seconds,
        }
        for bins in map(int, _BINS.value):
            config = dataclasses.replace(base, packing_bins_per_batch=bins)
            batches, seconds, stats = _epoch(config, source, tok)
            row[f"packed_bins{bins}"] = {
                "efficiency": _efficiency(batches),
                "batches": len(batches),
                "examples_per_s": stats.num_kept / seconds,
            }
            efficiency, n, rate = _grain_first_fit_epoch(data_examples(source, tok, config), config)
            row[f"grain_first_fit_bins{bins}"] = {
                "efficiency": efficiency,
                "batches": n,
                "examples_per_s": rate,
            }
        packed = dataclasses.replace(base, packing_bins_per_batch=int(_BINS.value[-1]), num_epochs=3)
        if _CONSUMER_MS.value:
            consumer = _CONSUMER_MS.value / 1000
            batches, seconds, stats = _epoch(packed, source, tok, consumer)
            row["with_consumer_3_epochs"] = {
                "consumer_ms": _CONSUMER_MS.value,
                "steps": len(batches),
                "no_prefetch_s": seconds,
                "floor_s": len(batches) * consumer,
            }
            _, seconds, stats = _epoch(
                dataclasses.replace(packed, prefetch_buffer_size=4), source, tok, consumer
            )
            row["with_consumer_3_epochs"]["thread_prefetch_s"] = seconds
        results[f"max_length_{max_length}"] = row

    text = json.dumps(results, indent=1)
    print(text)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)
