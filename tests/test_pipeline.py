"""Tests of the grain train/eval pipelines: packing, length limits, shuffling, sharding, checkpointing."""

import collections
import json

import numpy as np
import pytest

from flaxformer_lite.data import pipeline
from flaxformer_lite.data import tokenizer as tokenizer_lib

_WORDS = [f"w{i}" for i in range(60)]


def _make_source(n, seed=0, long_every=0, as_bytes=False):
    """Random word sequences (1-14 words); every `long_every`-th example has 40-word inputs or targets."""
    rng = np.random.default_rng(seed)
    source = []
    for i in range(n):
        n_in, n_tgt = rng.integers(1, 15, size=2)
        if long_every and i % long_every == long_every - 1:
            if (i // long_every) % 2:
                n_in = 40
            else:
                n_tgt = 40
        example = {
            "inputs": " ".join(rng.choice(_WORDS, n_in)),
            "targets": " ".join(rng.choice(_WORDS, n_tgt)),
        }
        if as_bytes:
            example = {k: v.encode() for k, v in example.items()}
        source.append(example)
    return source


_TOKENIZER = tokenizer_lib.WordTokenizer.build(_WORDS)


def _config(**kwargs):
    defaults = dict(batch_size=4, max_inputs_length=24, max_targets_length=20, num_epochs=1)
    defaults.update(kwargs)
    return pipeline.PipelineConfig(**defaults)


def _train(source, **kwargs):
    process = {k: kwargs.pop(k) for k in ("process_index", "process_count") if k in kwargs}
    process.setdefault("process_index", 0)
    process.setdefault("process_count", 1)
    return pipeline.make_train_data(source, _TOKENIZER, _TOKENIZER, _config(**kwargs), **process)


def _expected(example, max_in=None, max_tgt=None):
    ids = lambda text: tuple(_TOKENIZER.encode(tokenizer_lib.to_text(text)) + [1])
    return ids(example["inputs"])[:max_in], ids(example["targets"])[:max_tgt]


def _unpack(batches, truncated=False):
    """(inputs, targets) token tuples of every packed example, checking the packed layout on the way."""
    out = []
    for batch in batches:
        assert set(batch) == {
            "inputs",
            "targets",
            "inputs_positions",
            "targets_positions",
            "inputs_segmentation",
            "targets_segmentation",
        }
        for key, value in batch.items():
            assert value.dtype == np.int32 and value.shape[0] == 4
        for row in range(4):
            per_side = {}
            for side in ("inputs", "targets"):
                tokens, seg, pos = (
                    batch[side][row],
                    batch[f"{side}_segmentation"][row],
                    batch[f"{side}_positions"][row],
                )
                # Padding is exactly where the segment id is 0, and has position 0.
                assert np.array_equal(tokens == 0, seg == 0) and not pos[seg == 0].any()
                used = seg[seg > 0]
                # Segments are 1, 2, ... in order, each one contiguous (so none spans rows or interleaves).
                assert np.array_equal(np.unique(used), np.arange(1, len(np.unique(used)) + 1))
                assert np.all(np.diff(used) >= 0) and not seg[len(used) :].any()
                segments = {}
                for s in np.unique(used):
                    mask = seg == s
                    assert np.array_equal(
                        pos[mask], np.arange(mask.sum())
                    )  # Positions restart at 0 per example.
                    assert (tokens[mask][:-1] != 1).all()  # EOS only at the end...
                    assert tokens[mask][-1] == 1 or (
                        truncated and mask.sum() == len(tokens)
                    )  # ...unless cut off.
                    segments[int(s)] = tuple(int(t) for t in tokens[mask])
                per_side[side] = segments
            assert (
                per_side["inputs"].keys() == per_side["targets"].keys()
            )  # Segment s pairs inputs with targets.
            out.extend((per_side["inputs"][s], per_side["targets"][s]) for s in sorted(per_side["inputs"]))
    return out


def test_packing_keeps_every_example_exactly_once():
    source = _make_source(203, long_every=10)
    data = _train(source)
    batches = list(data)
    expected = [_expected(ex) for ex in source]
    expected = [e for e in expected if len(e[0]) <= 24 and len(e[1]) <= 20]
    assert data.stats.num_kept == len(expected) == 203 - 20
    assert collections.Counter(_unpack(batches)) == collections.Counter(expected)
    assert all(b["inputs"].shape == (4, 24) and b["targets"].shape == (4, 20) for b in batches)
    efficiency = pipeline.packing_efficiency(batches)
    # Rows hold several examples: far denser than one padded example per row (~8/24 tokens).
    assert efficiency["inputs"] > 0.6 and efficiency["targets"] > 0.6


def test_first_fit_rows_uses_oldest_row_with_room():
    inputs = np.array([10, 10, 10, 5, 20, 3])
    targets = np.array([1, 1, 1, 1, 1, 9])
    rows = list(pipeline.first_fit_rows(np.arange(5), inputs, targets, 24, 10, num_open_rows=2))
    # 0, 1 fill row A (4 left); 2, 3 go to row B; 4 fits nowhere: A (oldest) closes, 4 opens a new row.
    assert rows == [[0, 1], [2, 3], [4]]
    # Example 5 would fit row A's inputs (4 left) but not its targets (8 left): it goes to row B.
    assert list(pipeline.first_fit_rows(np.array([0, 1, 2, 5]), inputs, targets, 24, 10, 2)) == [
        [0, 1],
        [2, 5],
    ]


def test_filter_and_truncate_counts(caplog):
    source = _make_source(100, long_every=10)  # 5 over-long inputs, 5 over-long targets.
    filtered = _train(source, overlong="filter").stats
    assert "10 filtered out" in caplog.text  # Logged, not only returned.
    assert filtered.num_examples == 100 and filtered.num_kept == 90
    assert filtered.num_filtered == 10 and filtered.num_truncated == 0
    assert (filtered.num_inputs_overlong, filtered.num_targets_overlong) == (5, 5)
    assert filtered.longest_inputs == filtered.longest_targets == 41  # 40 words + EOS.

    truncated = _train(source, overlong="truncate")
    assert truncated.stats.num_kept == 100
    assert truncated.stats.num_filtered == 0 and truncated.stats.num_truncated == 10
    got = collections.Counter(_unpack(list(truncated), truncated=True))
    assert got == collections.Counter(_expected(ex, 24, 20) for ex in source)
    assert truncated.stats.num_inputs_tokens == sum(len(_expected(ex, 24, 20)[0]) for ex in source)


def _order(batches):
    """Identities of the examples of unpacked batches, in order (pad rows skipped)."""
    return [tuple(row) for b in batches for row in b["inputs"] if row.any()]


def test_unpacked_batches_and_seeded_shuffle():
    source = _make_source(40)
    data = _train(source, pack=False, num_epochs=2, seed=1)
    batches = list(data)
    assert len(batches) == 20 and set(batches[0]) == {"inputs", "targets"}
    assert batches[0]["inputs"].shape == (4, 24) and batches[0]["targets"].shape == (4, 20)
    order = _order(batches)
    epoch1, epoch2 = order[:40], order[40:]
    truth = [tuple(np.pad(_expected(ex)[0], (0, 24 - len(_expected(ex)[0])))) for ex in source]
    assert sorted(epoch1) == sorted(epoch2) == sorted(truth)  # Each epoch is a permutation of the split...
    assert epoch1 != epoch2 and epoch1 != truth  # ...shuffled, and reshuffled for the second epoch.
    assert _order(_train(source, pack=False, num_epochs=2, seed=1)) == order  # Same seed, same order.
    assert _order(_train(source, pack=False, num_epochs=2, seed=2)) != order
    packed = lambda seed: [b["inputs"].tolist() for b in _train(source, seed=seed)]
    assert packed(1) == packed(1) and packed(1) != packed(2)


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("pack", [True, False])
def test_iterator_state_restores_the_exact_stream(pack, prefetch):
    source = _make_source(150)
    kwargs = dict(pack=pack, num_epochs=None, prefetch_buffer_size=prefetch, packing_bins_per_batch=3)
    reference = iter(_train(source, **kwargs))
    uninterrupted = [next(reference) for _ in range(100)]  # ~3 epochs: crosses epoch boundaries too.
    for k in (5, 37):  # Mid-epoch, and a later epoch (a packed epoch here is ~15 batches, unpacked 38).
        it = iter(_train(source, **kwargs))
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        it.close()
        fresh = iter(_train(source, **kwargs))
        fresh.set_state(state)
        for i in range(k, 100):
            got = next(fresh)
            assert got.keys() == uninterrupted[i].keys()
            for key in got:
                np.testing.assert_array_equal(got[key], uninterrupted[i][key], err_msg=f"batch {i}, {key}")
        fresh.close()
    reference.close()


def test_state_of_another_pipeline_is_refused():
    it = iter(_train(_make_source(30)))
    next(it)
    other = iter(_train(_make_source(31)))
    with pytest.raises(ValueError, match="different data"):
        other.set_state(it.get_state())


def test_process_shards_are_disjoint_and_cover_the_split():
    source = _make_source(50)
    shards = [_train(source, pack=False, process_index=p, process_count=3) for p in range(3)]
    indices = [set(s.examples.example_index.tolist()) for s in shards]
    assert [len(i) for i in indices] == [17, 17, 16]
    assert not (indices[0] & indices[1] or indices[0] & indices[2] or indices[1] & indices[2])
    assert set.union(*indices) == set(range(50))
    # And the batches of each process hold only its shard's examples.
    for p, shard in enumerate(shards):
        truth = sorted(
            tuple(np.pad(_expected(source[i])[0], (0, 24 - len(_expected(source[i])[0]))))
            for i in range(p, 50, 3)
        )
        assert sorted(_order(shard)) == truth
    # Without explicit arguments the shard is jax's process (a single one here): the whole split.
    default = pipeline.make_train_data(source, _TOKENIZER, _TOKENIZER, _config(pack=False))
    assert default.examples.example_index.tolist() == list(range(50))


def test_eval_yields_every_example_once_in_order():
    source = _make_source(10, as_bytes=True)
    source[6]["inputs"] = " ".join(["w1"] * 30).encode()  # Longer than 24: kept whole, in a 48 bucket.
    config = _config(batch_size=4)
    data = pipeline.make_eval_data(source, _TOKENIZER, _TOKENIZER, config, process_index=0, process_count=1)
    batches = list(data)
    assert len(data) == len(batches) == 3
    assert data.stats.num_inputs_overlong == 1 and data.stats.num_filtered == data.stats.num_truncated == 0
    assert [b["inputs"].shape for b in batches] == [(4, 24), (4, 48), (4, 24)]
    assert np.concatenate([b["example_index"] for b in batches]).tolist() == list(range(10)) + [-1, -1]
    last, extras = pipeline.split_eval_batch(batches[-1])
    assert set(last) == {"inputs", "targets"} and set(extras) == {"example_index"}
    assert not last["inputs"][2:].any() and not last["targets"][2:].any()  # Fill rows are all padding.
    for batch in batches:
        for row, i in enumerate(batch["example_index"]):
            if i >= 0:
                want_in, want_tgt = _expected(source[i])
                assert (
                    tuple(batch["inputs"][row][: len(want_in)]) == want_in
                    and not batch["inputs"][row][len(want_in) :].any()
                )
                assert tuple(batch["targets"][row][: len(want_tgt)]) == want_tgt
    assert data.texts(6) == (" ".join(["w1"] * 30), source[6]["targets"].decode())


def test_eval_longest_first_keeps_the_first_examples_and_maps_rows_back():
    source = _make_source(12, seed=3)
    data = pipeline.make_eval_data(source, _TOKENIZER, _TOKENIZER, _config(batch_size=4), process_index=0,
                                   process_count=1, max_examples=9, longest_first=True)
    rows = [(i, tuple(x[x != 0])) for b in data for i, x in zip(b["example_index"], b["inputs"]) if i >= 0]
    assert sorted(i for i, _ in rows) == list(range(9))  # The first 9 of the split, each once.
    assert all(tokens == _expected(source[i])[0] for i, tokens in rows)  # Rows map back to their examples.
    lengths = [len(tokens) for _, tokens in rows]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]  # Longest first...
    for (i, _), (j, _), a, b in zip(rows, rows[1:], lengths, lengths[1:]):
        assert a > b or i < j  # ...and equal lengths in split order.


def test_eval_multi_process_covers_split_with_equal_shapes():
    source = _make_source(11, long_every=5)
    config = _config(batch_size=2)
    per_process = [
        list(
            pipeline.make_eval_data(source, _TOKENIZER, _TOKENIZER, config, process_index=p, process_count=2)
        )
        for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 3  # ceil(11 / (2 * 2)).
    merged = []
    for b0, b1 in zip(*per_process):
        assert b0["inputs"].shape == b1["inputs"].shape and b0["targets"].shape == b1["targets"].shape
        merged += b0["example_index"].tolist() + b1["example_index"].tolist()
    assert merged == list(range(11)) + [-1]  # The global batches are the split in order.


def test_packing_efficiency():
    batch = {"inputs": np.array([[3, 1, 0, 0], [4, 4, 4, 1]]), "targets": np.array([[5, 1], [0, 0]])}
    assert pipeline.packing_efficiency([batch, batch]) == {"inputs": 0.75, "targets": 0.5, "total": 8 / 12}
