"""The grain input pipeline: examples in, fixed-shape int32 batches out.

Train: shard per process -> tokenize both sides, append EOS -> filter or truncate over-long examples ->
seeded shuffle, reshuffled each epoch -> first-fit packing (or plain padding) -> batch -> optional prefetch.
Eval: every example exactly once, in order, never dropped or truncated.

Batches are dicts of numpy int32 arrays keyed exactly like the model's keyword arguments: ``inputs``,
``targets`` of shape [batch, length] with 0 as padding and, for packed training batches,
``inputs_positions``/``targets_positions`` (0-based position within the example, 0 on padding) and
``inputs_segmentation``/``targets_segmentation`` (1, 2, ... for the examples of a row, 0 on padding).

Tokenization is done once, eagerly, over this process's shard rather than lazily per epoch: it is paid once
instead of every epoch (SentencePiece's batched encoder makes that cheap), the filter/truncate counts are
exact and known before the first step, and the epoch length is known, so shuffling is a true per-epoch
permutation. The cost is memory, about 4 bytes per token (a 4.5M-pair corpus
of ~30 tokens a side is ~1 GB); the corpora this project targets are far smaller.

Packing is our own, planned per epoch on the token lengths alone: the epoch's permutation is fed to an
online first-fit over a window of ``batch_size * packing_bins_per_batch`` open rows (an example goes into
the oldest open row where both of its sides fit; when none has room, the oldest row is closed and a new
one opened), and rows are emitted in closing order. Batches are then filled with a handful of vectorised
numpy operations. grain's ``FirstFitPackIterDataset`` is correct, but it pays Python overhead per example
and closes all its open rows whenever one example fits nowhere; this planner is faster and packs denser
(``experiments/data_stats.py`` compares the two).
The iterator's state is just ``{epoch, batch}``: the plan of an epoch is a pure function of (seed, epoch),
so a restored iterator recomputes it and continues exactly where it stopped. It is a grain
``DatasetIterator``, so grain's thread prefetch and checkpoint handler work on it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import grain
import numpy as np

from flaxformer_lite.data import tokenizer as tokenizer_lib

# Keys of eval batches that are not model arguments: pop them (``split_eval_batch``) before calling the model.
EVAL_EXTRA_KEYS = ("example_index",)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Shapes and behaviour of the train and eval pipelines."""

    batch_size: int = 64  # Rows per batch in this process; the global batch is batch_size * process_count.
    max_inputs_length: int = 64  # Row length of `inputs`, EOS included.
    max_targets_length: int = 64  # Row length of `targets`, EOS included.
    overlong: str = "filter"  # Over-long training examples: 'filter' drops them, 'truncate' cuts them to fit.
    pack: bool = True  # Pack several examples per row (train only); False pads one example per row.
    packing_bins_per_batch: int = 2  # Open rows of the first-fit window, in batches; more packs denser.
    seed: int = 0  # Shuffle seed; epoch e is shuffled with (seed, e).
    num_epochs: int | None = None  # Passes over the training split; None repeats forever.
    prefetch_buffer_size: int = 0  # Batches a background thread prepares ahead of the training loop; 0 = off.

    def __post_init__(self):
        def fail(field: str, message: str):
            raise ValueError(f"PipelineConfig.{field}: {message}, got {getattr(self, field)!r}")

        for name in ("batch_size", "max_inputs_length", "max_targets_length", "packing_bins_per_batch"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        if self.overlong not in ("filter", "truncate"):
            fail("overlong", "must be 'filter' or 'truncate'")
        if self.num_epochs is not None and self.num_epochs < 1:
            fail("num_epochs", "must be >= 1, or None to repeat forever")
        if self.prefetch_buffer_size < 0:
            fail("prefetch_buffer_size", "must be >= 0 (0: off)")


@dataclasses.dataclass(frozen=True)
class LengthStats:
    """What the length limits did to a split (of this process's shard, for training)."""

    num_examples: int  # Examples read.
    num_kept: int  # Examples the pipeline emits per epoch.
    num_filtered: int  # Dropped because a side was too long ('filter').
    num_truncated: int  # Cut to fit ('truncate'); for eval always 0.
    num_inputs_overlong: int  # Examples whose inputs (with EOS) exceed max_inputs_length.
    num_targets_overlong: int  # Examples whose targets (with EOS) exceed max_targets_length.
    longest_inputs: int  # Longest inputs seen, EOS included, before any cut.
    longest_targets: int  # Longest targets seen, EOS included, before any cut.
    num_inputs_tokens: int  # Tokens of kept examples (after truncation), EOS included.
    num_targets_tokens: int  # Same for targets.


class TokenizedExamples:
    """Random-access token ids of a split, as two flat int32 arrays with offsets.

    Flat arrays rather than one array per example: a numpy array object costs ~100 bytes, more than the
    tokens of a short sentence, and the flat layout lets ``build_batch`` gather a whole batch in a few numpy
    calls. ``example_index`` maps position here to the example's index in the source.
    """

    def __init__(
        self, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], example_index: np.ndarray
    ):
        if not len(inputs) == len(targets) == len(example_index):
            raise ValueError("inputs, targets and example_index must have one entry per example")
        self._inputs, self._inputs_offsets = _flatten(inputs)
        self._targets, self._targets_offsets = _flatten(targets)
        self.example_index = np.asarray(example_index, np.int64)

    def __len__(self) -> int:
        return len(self.example_index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        return {
            "inputs": self._inputs[self._inputs_offsets[i] : self._inputs_offsets[i + 1]],
            "targets": self._targets[self._targets_offsets[i] : self._targets_offsets[i + 1]],
        }

    def lengths(self, key: str) -> np.ndarray:
        return np.diff(self._side(key)[1])

    def _side(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        return (
            (self._inputs, self._inputs_offsets)
            if key == "inputs"
            else (self._targets, self._targets_offsets)
        )

    def build_batch(
        self, rows: Sequence[Sequence[int]], batch_size: int, lengths: Mapping[str, int], segments: bool
    ) -> dict[str, np.ndarray]:
        """A [batch_size, length] batch whose row r holds examples ``rows[r]`` back to back; other rows pad.

        Vectorised over the whole batch (a fixed number of numpy calls, whatever the number of examples),
        since a Python loop over examples would be the pipeline's bottleneck. With ``segments``, adds
        ``{key}_positions`` and ``{key}_segmentation``.
        """
        if len(rows) > batch_size:
            raise ValueError(f"{len(rows)} rows do not fit in a batch of {batch_size}")
        per_row = np.fromiter(map(len, rows), np.int64, len(rows))
        ids = np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(per_row.sum()))
        row_of = np.repeat(np.arange(len(rows)), per_row)
        first_of_row = np.cumsum(per_row) - per_row  # Index in `ids` of each row's first example.
        segment = np.arange(len(ids)) - np.repeat(first_of_row, per_row) + 1
        batch = {}
        for key, length in lengths.items():
            flat, offsets = self._side(key)
            n = offsets[ids + 1] - offsets[ids]
            start = np.cumsum(n) - n  # Where each example starts in the batch's concatenated tokens.
            column = start - np.repeat(start[first_of_row], per_row)  # ... and in its row.
            if len(ids) and int((column + n).max()) > length:
                raise ValueError(f"a row of {key} is longer than {length}")
            within = np.arange(int(n.sum())) - np.repeat(start, n)  # Position of each token in its example.
            r, c = np.repeat(row_of, n), np.repeat(column, n) + within
            tokens = np.zeros((batch_size, length), np.int32)
            tokens[r, c] = flat[np.repeat(offsets[ids], n) + within]
            batch[key] = tokens
            if segments:
                batch[f"{key}_positions"] = np.zeros((batch_size, length), np.int32)
                batch[f"{key}_positions"][r, c] = within
                batch[f"{key}_segmentation"] = np.zeros((batch_size, length), np.int32)
                batch[f"{key}_segmentation"][r, c] = np.repeat(segment, n)
        return batch


def _flatten(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays).astype(np.int32) if len(arrays) else np.zeros(0, np.int32)
    return flat, offsets


def tokenize_examples(
    source: Any,
    indices: Sequence[int],
    inputs_tokenizer: tokenizer_lib.Tokenizer,
    targets_tokenizer: tokenizer_lib.Tokenizer,
    chunk_size: int = 8192,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids of ``source[i]`` for ``i`` in ``indices``, both sides, EOS appended, not truncated."""
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    eos = np.array([tokenizer_lib.EOS_ID], np.int32)
    for start in range(0, len(indices), chunk_size):
        examples = [source[int(i)] for i in indices[start : start + chunk_size]]
        for key, tok, out in (("inputs", inputs_tokenizer, inputs), ("targets", targets_tokenizer, targets)):
            ids = tok.encode_batch([tokenizer_lib.to_text(e[key]) for e in examples])
            out.extend(np.concatenate([np.asarray(x, np.int32), eos]) for x in ids)
    return inputs, targets


def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Imported here: the data code is usable (and testable) without initialising a backend.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    return process_index, process_count


def _apply_length_limits(
    inputs: list[np.ndarray], targets: list[np.ndarray], example_index: np.ndarray, config: PipelineConfig
) -> tuple[TokenizedExamples, LengthStats]:
    """Filters or truncates examples whose sides exceed the row lengths; counts what it did."""
    li, lt = config.max_inputs_length, config.max_targets_length
    in_len = np.array([len(x) for x in inputs], np.int64)
    tgt_len = np.array([len(x) for x in targets], np.int64)
    in_over, tgt_over = in_len > li, tgt_len > lt
    overlong = in_over | tgt_over
    if config.overlong == "filter":
        keep = np.flatnonzero(~overlong)
        kept_inputs = [inputs[i] for i in keep]
        kept_targets = [targets[i] for i in keep]
        kept_index = example_index[keep]
    else:
        # Plain truncation, EOS lost: re-appending EOS would teach the model to stop mid-sentence.
        kept_inputs = [x[:li] for x in inputs]
        kept_targets = [x[:lt] for x in targets]
        kept_index = example_index
    n_over = int(overlong.sum())
    stats = LengthStats(
        num_examples=len(inputs),
        num_kept=len(kept_inputs),
        num_filtered=n_over if config.overlong == "filter" else 0,
        num_truncated=n_over if config.overlong == "truncate" else 0,
        num_inputs_overlong=int(in_over.sum()),
        num_targets_overlong=int(tgt_over.sum()),
        longest_inputs=int(in_len.max(initial=0)),
        longest_targets=int(tgt_len.max(initial=0)),
        num_inputs_tokens=int(sum(len(x) for x in kept_inputs)),
        num_targets_tokens=int(sum(len(x) for x in kept_targets)),
    )
    return TokenizedExamples(kept_inputs, kept_targets, kept_index), stats


def first_fit_rows(
    order: np.ndarray,
    inputs_lengths: np.ndarray,
    targets_lengths: np.ndarray,
    max_inputs_length: int,
    max_targets_length: int,
    num_open_rows: int,
) -> Iterator[list[int]]:
    """Packs examples ``order`` (ids, in this order) into rows, first fit over a window of open rows.

    Each example goes into the oldest open row where both of its sides fit. When none has room, the oldest
    row is closed (yielded) and the example starts a new row; the window bounds how far an example can travel
    from its place in the shuffled order. At the end the still-open rows are yielded, oldest first. A
    generator, so that planning is spread over the batches instead of stalling the first batch of an epoch.
    Every example must fit an empty row (the length limits are applied before).
    """
    free_in = np.full(num_open_rows, max_inputs_length, np.int64)
    free_tgt = np.full(num_open_rows, max_targets_length, np.int64)
    members: list[list[int]] = [[] for _ in range(num_open_rows)]
    oldest = 0
    for i, li, lt in zip(order.tolist(), inputs_lengths[order].tolist(), targets_lengths[order].tolist()):
        fits = np.flatnonzero((free_in >= li) & (free_tgt >= lt))
        if fits.size:  # Oldest first means ring order from `oldest`.
            later = fits[fits >= oldest]
            b = int(later[0]) if later.size else int(fits[0])
        else:
            b = oldest
            yield members[b]
            members[b] = []
            free_in[b], free_tgt[b] = max_inputs_length, max_targets_length
            oldest = (oldest + 1) % num_open_rows
        members[b].append(i)
        free_in[b] -= li
        free_tgt[b] -= lt
    for k in range(num_open_rows):
        b = (oldest + k) % num_open_rows
        if members[b]:
            yield members[b]


class _TrainBatches(grain.IterDataset):
    """Shuffled, repeated, packed (or padded) batches of in-memory tokenized examples."""

    def __init__(self, examples: TokenizedExamples, config: PipelineConfig):
        super().__init__()
        self._examples = examples
        self._config = config

    def __iter__(self) -> _TrainBatchIterator:
        return _TrainBatchIterator(self._examples, self._config)

    def __str__(self) -> str:
        return f"_TrainBatches(pack={self._config.pack})"


class _TrainBatchIterator(grain.DatasetIterator):
    """Iterates epochs of batches, planning each epoch's rows as its batches are requested.

    The last batch of each epoch is filled up with all-pad rows (segment 0: no loss) rather than dropped or
    topped up from the next epoch, so no example and no shape is lost and an epoch's plan depends on nothing
    but (seed, epoch); restoring replays at most one epoch's plan.
    """

    def __init__(self, examples: TokenizedExamples, config: PipelineConfig):
        super().__init__()
        self._examples = examples
        self._config = config
        self._lengths = {"inputs": config.max_inputs_length, "targets": config.max_targets_length}
        self._epoch = 0
        self._batch = 0
        self._stream: Iterator[tuple[list[list[int]], bool]] | None = None  # Batches of rows of self._epoch.

    def _epoch_batches(self, epoch: int) -> Iterator[tuple[list[list[int]], bool]]:
        """(rows of a batch, whether it is the epoch's last) for every batch of ``epoch``."""
        cfg = self._config
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self._examples))
        if cfg.pack:
            rows = first_fit_rows(
                order,
                self._examples.lengths("inputs"),
                self._examples.lengths("targets"),
                cfg.max_inputs_length,
                cfg.max_targets_length,
                cfg.batch_size * cfg.packing_bins_per_batch,
            )
        else:
            rows = ([i] for i in order.tolist())
        chunk: list[list[int]] = []
        for row in rows:
            if len(chunk) == cfg.batch_size:  # Held back until we know whether another row follows.
                yield chunk, False
                chunk = []
            chunk.append(row)
        yield chunk, True

    def __next__(self) -> dict[str, np.ndarray]:
        cfg = self._config
        if cfg.num_epochs is not None and self._epoch >= cfg.num_epochs:
            raise StopIteration
        if self._stream is None:
            self._stream = self._epoch_batches(self._epoch)
            try:
                for _ in range(self._batch):  # Replay after set_state.
                    next(self._stream)
            except StopIteration:
                raise ValueError(
                    f"iterator state (epoch {self._epoch}, batch {self._batch}) is past the epoch's end"
                ) from None
        rows, last = next(self._stream)
        self._batch += 1
        if last:
            self._epoch, self._batch, self._stream = self._epoch + 1, 0, None
        return self._examples.build_batch(rows, cfg.batch_size, self._lengths, cfg.pack)

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batch": self._batch, "num_examples": len(self._examples)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if int(state["num_examples"]) != len(self._examples):
            raise ValueError(
                f"state is of a pipeline over {state['num_examples']} examples, this one has "
                f"{len(self._examples)}: different data, shard or length limits"
            )
        self._epoch, self._batch, self._stream = int(state["epoch"]), int(state["batch"]), None


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The training batches of this process and what the length limits did to its shard.

    ``iter(train_data)`` gives a grain ``DatasetIterator``: ``get_state()`` is a JSON-serialisable dict, and
    ``set_state(state)`` on an iterator of an identically built pipeline continues the same batch stream.
    """

    dataset: grain.IterDataset  # Yields batch dicts (see module docstring).
    stats: LengthStats  # Per-process counts (each process sees only its shard).
    examples: TokenizedExamples  # The kept, tokenized examples of this shard.

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)


def make_train_data(source: Any, inputs_tokenizer: tokenizer_lib.Tokenizer, targets_tokenizer: tokenizer_lib.Tokenizer,
                    config: PipelineConfig, *, process_index: int | None = None,
                    process_count: int | None = None) -> TrainData:
    """Builds the training pipeline of this process over its shard ``source[process_index::process_count]``.

    With ``num_epochs`` set, processes may end with different numbers of batches (different shards pack
    differently); multi-process training should run a fixed number of steps over ``num_epochs=None``.
    """
    process_index, process_count = _resolve_process(process_index, process_count)
    index = np.arange(process_index, len(source), process_count, dtype=np.int64)
    inputs, targets = tokenize_examples(source, index, inputs_tokenizer, targets_tokenizer)
    examples, stats = _apply_length_limits(inputs, targets, index, config)
    verb = "filtered out" if config.overlong == "filter" else "truncated"
    log = logging.warning if (stats.num_filtered or stats.num_truncated) else logging.info
    log(
        "Train shard %d/%d: %d examples, %d %s for exceeding lengths (inputs %d, targets %d; "
        "%d inputs and %d targets longer); %d kept.",
        process_index,
        process_count,
        stats.num_examples,
        stats.num_filtered + stats.num_truncated,
        verb,
        config.max_inputs_length,
        config.max_targets_length,
        stats.num_inputs_overlong,
        stats.num_targets_overlong,
        stats.num_kept,
    )
    if len(examples) == 0:
        raise ValueError("no training examples left after applying the length limits")
    dataset: grain.IterDataset = _TrainBatches(examples, config)
    if config.prefetch_buffer_size > 0:
        dataset = grain.experimental.ThreadPrefetchIterDataset(
            dataset, prefetch_buffer_size=config.prefetch_buffer_size
        )
    return TrainData(dataset=dataset, stats=stats, examples=examples)


def _bucket(length: int, base: int) -> int:
    """Smallest of base, 2*base, 4*base, ... holding ``length``: few distinct shapes, few compilations."""
    if length <= base:
        return base
    return base * 2 ** math.ceil(math.log2(length / base))


class EvalData:
    """Every example of an eval split exactly once, in order (or longest source first), in fixed-size batches.

    Batches carry ``inputs``, ``targets`` and ``example_index`` (index into the split, -1 on the all-pad
    rows that fill the last batch). ``example_index`` is not a model argument: use ``split_eval_batch``.

    Over-long examples are neither dropped nor truncated: a batch that holds one is padded to a longer
    bucket (``max_length * 2**k``) instead, so its scores are those of the whole example. We chose this over
    truncation with a flag because a truncated source makes the reference untranslatable and skews BLEU
    silently; the cost is one more compiled shape for the rare long batch, and a model with learned
    positions must cover the bucket length (sinusoidal positions need nothing). ``stats`` counts the
    over-long examples.

    Multi-process: the global batch ``k`` is examples ``[k*G, (k+1)*G)`` with
    ``G = batch_size * process_count``; this process holds rows ``[process_index*batch_size, ...)`` of it.
    Every process yields the same number of batches with the same shapes (buckets are chosen per global
    batch), and the union is the whole split.
    """

    def __init__(
        self,
        source: Any,
        examples: TokenizedExamples,
        stats: LengthStats,
        config: PipelineConfig,
        process_index: int,
        process_count: int,
    ):
        self.source = source
        self.examples = examples
        self.stats = stats
        self._config = config
        self._process_index = process_index
        self._process_count = process_count
        self._global_batch = config.batch_size * process_count

    def __len__(self) -> int:
        """Batches per process (the same on every process)."""
        return math.ceil(len(self.examples) / self._global_batch)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        cfg = self._config
        in_len, tgt_len = self.examples.lengths("inputs"), self.examples.lengths("targets")
        for k in range(len(self)):
            global_rows = slice(k * self._global_batch, (k + 1) * self._global_batch)
            lengths = {
                "inputs": _bucket(int(in_len[global_rows].max()), cfg.max_inputs_length),
                "targets": _bucket(int(tgt_len[global_rows].max()), cfg.max_targets_length),
            }
            first = k * self._global_batch + self._process_index * cfg.batch_size
            mine = range(first, min(first + cfg.batch_size, len(self.examples)))
            batch = self.examples.build_batch([[i] for i in mine], cfg.batch_size, lengths, segments=False)
            batch["example_index"] = np.full(cfg.batch_size, -1, np.int32)
            batch["example_index"][: len(mine)] = self.examples.example_index[mine.start : mine.stop]
            yield batch

    def texts(self, example_index: int) -> tuple[str, str]:
        """The raw (inputs, targets) text of an example, e.g. the reference for BLEU."""
        example = self.source[int(example_index)]
        return tokenizer_lib.to_text(example["inputs"]), tokenizer_lib.to_text(example["targets"])


def make_eval_data(source: Any, inputs_tokenizer: tokenizer_lib.Tokenizer, targets_tokenizer: tokenizer_lib.Tokenizer,
                   config: PipelineConfig, *, process_index: int | None = None, process_count: int | None = None,
                   max_examples: int = 0, longest_first: bool = False) -> EvalData:
    """Builds the eval batches of a split (all of it is tokenized in every process: eval splits are small).

    Only ``batch_size`` and the max lengths of ``config`` are used; nothing is shuffled, packed or dropped.
    ``max_examples`` keeps the first N examples of the split (0: all). ``longest_first`` orders them by
    source length, longest first (ties in split order), for decoding: sentences of similar length share a
    batch, so a batch is padded less and its search stops sooner, and an out-of-memory batch fails first.
    Either way ``example_index`` maps every row back to its place in the split.
    """
    process_index, process_count = _resolve_process(process_index, process_count)
    count = min(len(source), max_examples) if max_examples else len(source)
    index = np.arange(count, dtype=np.int64)
    inputs, targets = tokenize_examples(source, index, inputs_tokenizer, targets_tokenizer)
    if longest_first:
        order = np.argsort([-len(x) for x in inputs], kind="stable")
        inputs, targets, index = [inputs[i] for i in order], [targets[i] for i in order], index[order]
    examples = TokenizedExamples(inputs, targets, index)
    in_len, tgt_len = examples.lengths("inputs"), examples.lengths("targets")
    stats = LengthStats(
        num_examples=len(examples),
        num_kept=len(examples),
        num_filtered=0,
        num_truncated=0,
        num_inputs_overlong=int((in_len > config.max_inputs_length).sum()),
        num_targets_overlong=int((tgt_len > config.max_targets_length).sum()),
        longest_inputs=int(in_len.max(initial=0)),
        longest_targets=int(tgt_len.max(initial=0)),
        num_inputs_tokens=int(in_len.sum()),
        num_targets_tokens=int(tgt_len.sum()),
    )
    n_over = stats.num_inputs_overlong + stats.num_targets_overlong
    (logging.warning if n_over else logging.info)(
        "Eval split: %d examples; %d inputs longer than %d and %d targets longer than %d are kept whole in "
        "longer batches (longest: %d / %d).",
        stats.num_examples,
        stats.num_inputs_overlong,
        config.max_inputs_length,
        stats.num_targets_overlong,
        config.max_targets_length,
        stats.longest_inputs,
        stats.longest_targets,
    )
    return EvalData(source, examples, stats, config, process_index, process_count)


def split_eval_batch(batch: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(model arguments, extras such as ``example_index``) of an eval batch; index -1 marks pad rows."""
    model = {k: v for k, v in batch.items() if k not in EVAL_EXTRA_KEYS}
    extras = {k: v for k, v in batch.items() if k in EVAL_EXTRA_KEYS}
    return model, extras


def packing_efficiency(batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Share of non-pad tokens in ``inputs``, ``targets`` and both together ('total') over ``batches``."""
    nonpad = {"inputs": 0, "targets": 0}
    total = {"inputs": 0, "targets": 0}
    for batch in batches:
        for key in nonpad:
            nonpad[key] += int(np.count_nonzero(batch[key]))
            total[key] += int(batch[key].size)
    out = {k: nonpad[k] / total[k] if total[k] else 0.0 for k in nonpad}
    all_total = sum(total.values())
    out["total"] = sum(nonpad.values()) / all_total if all_total else 0.0
    return out
