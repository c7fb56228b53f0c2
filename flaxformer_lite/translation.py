"""Translating a whole split with a compiled, sharded decoder and scoring it: sacrebleu BLEU, chrF, exact match.

Used by ``experiments/evaluate.py`` (a full split, any checkpoint), ``experiments/translate.py`` and by the
trainer (a slice of the validation split every few steps, which also picks the ``best`` checkpoint).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from absl import logging
import jax
from jax.sharding import Mesh
import numpy as np
import sacrebleu

from flaxformer_lite import decoding, sharding
from flaxformer_lite.decoding import DecodeConfig  # noqa: F401  (re-exported: the options of make_decode_fn)
from flaxformer_lite.data import pipeline
from flaxformer_lite.data import tokenizer as tokenizer_lib
from flaxformer_lite.transformer import Transformer


def define_decode_flags() -> Callable[[], DecodeConfig]:
    """Registers the decoding and checkpoint flags that evaluate.py, translate.py and visualize.py share.

    Returns a function that builds the ``DecodeConfig`` from the parsed flags (call it after parsing).
    Flags: --checkpoint, --average_last, --method, --beam_size, --alpha, --temperature, --top_k, --top_p,
    --seed, --first_cache_length, --min_rows.
    """
    from absl import flags  # Only the command-line programs need flags.

    flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
    flags.DEFINE_integer("average_last", 0, "Average the parameters of the last K checkpoints.")
    flags.DEFINE_enum("method", "beam", list(decoding.METHODS), "Decoding method.")
    flags.DEFINE_integer("beam_size", 4, "Beam size (paper: 4).")
    flags.DEFINE_float("alpha", 0.6, "Length penalty exponent (paper: 0.6).")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold (1: off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    defaults = DecodeConfig()
    flags.DEFINE_integer("first_cache_length", defaults.first_cache_length,
                         "Speed: steps on a self-attention cache this long before it grows to full width "
                         "(0: full width from the start). Results do not change.")
    flags.DEFINE_integer("min_rows", defaults.min_rows,
                         "Speed, greedy search: drop finished rows, going on with a quarter of the rows, "
                         "a sixteenth, ... but no fewer than this (0: never). Results do not change.")

    def build() -> DecodeConfig:
        f = flags.FLAGS
        return DecodeConfig(method=f.method, beam_size=f.beam_size, alpha=f.alpha, temperature=f.temperature,
                            top_k=f.top_k, top_p=f.top_p, seed=f.seed, first_cache_length=f.first_cache_length,
                            min_rows=f.min_rows)

    return build


def make_decode_fn(model: Transformer, cfg: DecodeConfig, mesh: Mesh | None = None,
                   ) -> Callable[[Any, np.ndarray, int], np.ndarray]:
    """A ``(params, inputs [b, s], batch_number) -> tokens [b, L]`` for ``cfg``, jitted, on ``mesh``.

    The rows of a batch are split over the mesh's data-parallel devices (``data`` x ``fsdp``; empty rows
    pad the batch to a multiple of them) and the parameters stay where they are (placed by the run's
    rules). With several processes every process calls it with the same whole batch and gets every row's
    tokens back. Without ``mesh``: the first device. The decoder compiles once per input shape;
    ``translate`` decodes a whole split at one shape (``decode_width``). The encoder runs on the batch's
    own sources only, cut to the next multiple of 16 (one small program per such width): most batches
    are much shorter than the split's longest source. Sampling draws batch ``n`` with
    ``fold_in(PRNGKey(cfg.seed), n)``.
    """
    mesh = mesh or sharding.create_mesh((1, 1, 1), jax.devices()[:1])
    rows = sharding.batch_sharding(mesh)
    encoders: dict[int, Callable] = {}

    def encoder(width):  # Encodes sources cut to their batch's longest, padded back to ``width``.
        if width not in encoders:
            encoders[width] = jax.jit(lambda params, inputs: decoding.encode_cross_kv(model, params, inputs,
                                                                                      source_width=width))
        return encoders[width]

    @jax.jit
    def decode(params, inputs, cross_kv, batch_number):
        rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), batch_number)
        return decoding.decode_batch(model, params, inputs, cfg, rng=rng, cross_kv=cross_kv).tokens

    def run(params, inputs, batch_number):
        count, width = inputs.shape
        parts = sharding.data_parallel_size(mesh)
        inputs = np.pad(inputs, ((0, -count % parts), (0, 0)))  # All-pad rows finish at once.
        longest = int((inputs != model.config.pad_id).sum(1).max(initial=1))
        used = min(width, -(-longest // 16) * 16)
        cross_kv = encoder(width)(params, sharding.global_rows(inputs[:, :used], rows))
        tokens = decode(params, sharding.global_rows(inputs, rows), cross_kv, np.int32(batch_number))
        return sharding.to_host(tokens)[:count]

    return run


def decode_width(eval_data: pipeline.EvalData, multiple: int = 16) -> int:
    """The source width every batch of ``eval_data`` is decoded at: its longest source, rounded up to a
    multiple of ``multiple``.

    One width means one compiled decoder for the whole split: compiling a decoder costs more than the
    padding it saves, since the batches are sorted longest first and their searches stop early anyway.
    """
    longest = int(eval_data.examples.lengths("inputs").max(initial=1))
    return -(-longest // multiple) * multiple


def _to_width(inputs: np.ndarray, width: int) -> np.ndarray:
    """Cuts trailing pad columns, or pads with them, to ``width`` columns."""
    if inputs.shape[1] >= width:
        return inputs[:, :width]
    return np.pad(inputs, ((0, 0), (0, width - inputs.shape[1])))


def translate(decode_fn, params, eval_data: pipeline.EvalData, targets_tokenizer: tokenizer_lib.Tokenizer, *,
              max_examples: int = 0, log_every_secs: float = 10.0) -> dict[int, str]:
    """Hypotheses for every example of ``eval_data`` (or its first ``max_examples``), by example index."""
    total = min(len(eval_data.examples), max_examples) if max_examples else len(eval_data.examples)
    hypotheses: dict[int, str] = {}
    width = decode_width(eval_data)
    start = last_log = time.perf_counter()
    for batch_number, batch in enumerate(eval_data):
        if len(hypotheses) >= total:
            break
        _, extras = pipeline.split_eval_batch(batch)
        tokens = decode_fn(params, _to_width(batch["inputs"], width), batch_number)
        for row, index in enumerate(extras["example_index"]):
            if index >= 0 and len(hypotheses) < total:
                hypotheses[int(index)] = targets_tokenizer.decode(tokens[row].tolist())
        now = time.perf_counter()
        if now - last_log >= log_every_secs:
            rate = len(hypotheses) / (now - start)
            logging.info("decoded %d/%d sentences, %.1f sentences/s, ETA %.0f s", len(hypotheses), total, rate,
                         (total - len(hypotheses)) / max(rate, 1e-9))
            last_log = now
    return hypotheses


def bleu_tokenizer(target_lang: str) -> str:
    """sacrebleu's tokenizer for a target language: ``zh`` for Chinese, ``13a`` (the WMT default) otherwise."""
    return "zh" if target_lang.lower().startswith("zh") else "13a"


def score(hypotheses: Iterable[str], references: Iterable[str], target_lang: str = "") -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu, cased, on detokenized text), exact match, and their signatures."""
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu = sacrebleu.metrics.BLEU(tokenize=bleu_tokenizer(target_lang))
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    exact = np.mean([h.strip() == r.strip() for h, r in zip(hypotheses, references)]) if references else 0.0
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "exact_match": 100.0 * float(exact),
        "num_examples": len(references),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def translate_and_score(decode_fn, params, eval_data: pipeline.EvalData,
                        targets_tokenizer: tokenizer_lib.Tokenizer, target_lang: str = "", *,
                        max_examples: int = 0) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Translates (a prefix of) a split and scores it; returns (metrics, [(source, reference, hypothesis)])."""
    start = time.perf_counter()
    hypotheses = translate(decode_fn, params, eval_data, targets_tokenizer, max_examples=max_examples)
    seconds = time.perf_counter() - start
    rows = []
    for index in sorted(hypotheses):
        source, reference = eval_data.texts(index)
        rows.append((source, reference, hypotheses[index]))
    metrics = score([h for _, _, h in rows], [r for _, r, _ in rows], target_lang)
    metrics["decode_seconds"] = seconds
    return metrics, rows

