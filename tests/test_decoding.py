"""Decoding: the cross-attention keys/values, greedy / beam search / sampling on the tiny model and on toy
chains (the model-free ``search`` module)."""

import ast
import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import Transformer, backend, decoding, preset, search, shift_right

EXTRA = 6  # Each sentence may emit (source length + EXTRA) tokens: short loops keep the tests fast.
# Mixed lengths; the first row is the longest and unpadded. Every source ends with EOS (1).
INPUTS = np.array([[54, 41, 33, 18, 21, 4, 6, 1],
                   [3, 1, 0, 0, 0, 0, 0, 0],
                   [12, 52, 42, 58, 1, 0, 0, 0],
                   [62, 47, 41, 35, 36, 59, 1, 0]], np.int32)
LIMITS = (INPUTS != 0).sum(1) + EXTRA
WIDTH = INPUTS.shape[1] + EXTRA


@functools.cache
def tiny():
    """The tiny model with random weights under which greedy search stops with EOS in some sentences
    (rows 0 and 3) and runs to the length limit in the others; every argmax wins by at least 0.03.

    The weights are drawn with NumPy into the shapes of ``init`` (``jax.eval_shape``): compiling the
    initializers would take seconds. Dense kernels are N(0, 1 / fan_in), embeddings N(0, 1 / d_model),
    LayerNorms the identity, biases zero.
    """
    model = Transformer(preset("tiny"))
    rng = np.random.default_rng(17)
    shapes = jax.eval_shape(model.init, jax.random.key(0), INPUTS, INPUTS)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path).removesuffix(".value")  # Inside the logical-axes box.
        if name.endswith("['scale']"):
            value = np.ones(leaf.shape)
        elif name.endswith("['bias']"):
            value = np.zeros(leaf.shape)
        elif "['wo']" in name:  # Stored out-first (layers.DenseGeneral.kernel_out_first): [d_model, d_ff].
            value = (rng.normal(size=leaf.shape[::-1]) / np.sqrt(leaf.shape[1])).T
        else:  # Kernels contract their leading axis (two leading axes, heads x kv, for attention outputs).
            fan_in = leaf.shape[-1] if name.endswith("['embedding']") else (
                leaf.shape[0] * leaf.shape[1] if "['out']" in name else leaf.shape[0])
            value = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def encode_fn():
    model, _ = tiny()
    return jax.jit(lambda variables, inputs: model.apply(variables, inputs, method=Transformer.encode))


@functools.cache
def decoder_fn(**kwargs):
    model, _ = tiny()
    options = decoding.DecodeConfig(extra_length=EXTRA, **kwargs)
    return jax.jit(lambda variables, inputs, rng=None: decoding.decode_batch(model, variables, inputs, options,
                                                                             rng=rng))


def decode(inputs=INPUTS, rng=None, **kwargs):
    result = decoder_fn(**kwargs)(tiny()[1], inputs, rng)
    return jax.tree_util.tree_map(np.asarray, result)


@functools.cache
def greedy_batch():
    return decode(method="greedy")


def options(method, **kwargs):
    """DecodeConfig of the tests' searches: beam search with 3 beams, or ``method`` as it is."""
    beam = dict(beam_size=3, alpha=0.6) if method == "beam" else {}
    return decoding.DecodeConfig(method=method, extra_length=EXTRA, **beam, **kwargs)


def assert_well_formed(result, limits):
    """EOS only as the last emitted token, pad (0) after it; a row without EOS stopped at its limit."""
    for row, (tokens, length) in enumerate(zip(result.tokens, result.lengths, strict=True)):
        assert 1 <= length <= limits[row]
        assert np.all(tokens[length:] == 0), row
        assert not np.any(tokens[: length - 1] == 1), row
        assert tokens[length - 1] == 1 or length == limits[row], row


# ---------------------------------------------------------------------------------------------------------
# The encoder-decoder attention cache.
# ---------------------------------------------------------------------------------------------------------
def count_dot_generals(jaxpr, output_shape):
    """dot_general equations, in all nested jaxprs, whose result has ``output_shape``."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            count += tuple(eqn.outvars[0].aval.shape) == output_shape
        for sub in sub_jaxprs(eqn):
            count += count_dot_generals(sub, output_shape)
    return count


def count_dot_generals_reading(jaxpr, operand_shape):
    """dot_general equations, in all nested jaxprs, with an operand of ``operand_shape``."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            count += any(tuple(v.aval.shape) == operand_shape for v in eqn.invars)
        for sub in sub_jaxprs(eqn):
            count += count_dot_generals_reading(sub, operand_shape)
    return count


def sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def while_bodies(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            yield eqn.params["body_jaxpr"].jaxpr
        for sub in sub_jaxprs(eqn):
            yield from while_bodies(sub)


def test_cross_attention_keys_values_are_projected_once_per_sentence():
    model, variables = tiny()
    cfg = model.config
    layers, (batch, source_length) = cfg.num_decoder_layers, INPUTS.shape
    # Projecting the encoder output gives keys/values [rows, source_length, heads, head_dim]; nothing else
    # in a decoding step has that shape (the step reads them heads-first, [rows, heads, source_length, d]).
    projected = lambda rows: (rows, source_length, cfg.num_heads, cfg.attention_head_dim)  # noqa: E731
    encoded = encode_fn()(variables, INPUTS)
    cross_kv = jax.jit(lambda v, e: decoding.project_cross_kv(model, v, e))(variables, encoded)
    cache = decoding.init_cache(model, variables, batch, WIDTH)
    tokens = np.zeros((batch, 1), np.int32)

    def step(cache):
        return decoding.decode_step(model, variables, cross_kv, INPUTS, tokens, cache)

    project = jax.make_jaxpr(lambda e: decoding.project_cross_kv(model, variables, e))(encoded).jaxpr
    assert count_dot_generals(project, projected(batch)) == 2 * layers  # K, V: the detector sees them.
    assert count_dot_generals(jax.make_jaxpr(step)(cache).jaxpr, projected(batch)) == 0  # A step projects none.
    # The two collections have separate homes: a step changes only the self-attention cache.
    assert set(cache["decoder"]["layer_0"]["self_attention"]) == {"cached_key", "cached_value", "cache_index"}
    assert "cross_attention" not in cache["decoder"]["layer_0"]
    assert set(cross_kv["decoder"]["layer_0"]["cross_attention"]) == {"key", "value"}

    # End to end: decode_batch's loop body attends to the cached keys/values but projects nothing. Beam
    # search projects them for the b sentences and its b * beam_size rows read them there, never tiled.
    for method in ("greedy", "beam"):
        run = functools.partial(decoding.decode_batch, model, options=options(method))
        jaxpr = jax.make_jaxpr(run)(variables, INPUTS).jaxpr
        (body,) = list(while_bodies(jaxpr))
        cached = (batch, cfg.num_heads, source_length, cfg.attention_head_dim)
        assert count_dot_generals_reading(body, cached) == 2 * layers  # Attention (logits, values)...
        assert count_dot_generals(body, projected(batch)) == 0  # ...to keys/values projected elsewhere:
        # once, for the b sentences: Q, K, V in each encoder layer, then K, V in each decoder layer.
        assert count_dot_generals(jaxpr, projected(batch)) == 3 * cfg.num_encoder_layers + 2 * layers
        tiled = (batch * 3,) + cached[1:]
        assert count_dot_generals_reading(body, tiled) == 0 and count_dot_generals(jaxpr, projected(batch * 3)) == 0

    # And the results are unchanged: steps on the cache reproduce the teacher-forced logits.
    targets = np.array([[11, 12, 13, 1, 0], [14, 1, 0, 0, 0], [5, 6, 7, 8, 1], [9, 10, 1, 0, 0]], np.int32)
    teacher_forced = np.asarray(jax.jit(model.apply)(variables, INPUTS, targets))
    decoder_inputs = np.asarray(shift_right(targets))
    cached_step = jax.jit(lambda cache, tokens: decoding.decode_step(model, variables, cross_kv, INPUTS, tokens,
                                                                     cache))
    for t in range(targets.shape[1]):
        logits, cache = cached_step(cache, decoder_inputs[:, t: t + 1])
        real = targets[:, t] != 0
        np.testing.assert_allclose(np.asarray(logits)[real], teacher_forced[real, t], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Greedy and beam search on the tiny model.
# ---------------------------------------------------------------------------------------------------------
def naive_greedy(model, variables, inputs, limits, width):
    """Greedy search that re-runs the whole (teacher-forced, uncached) decoder on the prefix at each step.

    The decoder is called directly with every position marked real: the teacher-forced path would treat a
    generated pad token (0) as padding, which the cached decoder (rightly) does not.
    """
    encoded = encode_fn()(variables, inputs)
    run = jax.jit(lambda tokens: model.apply(
        variables, encoded, inputs, shift_right(tokens), targets=jnp.ones_like(tokens),
        method=lambda m, *args, **kwargs: m.decoder(*args, **kwargs)))
    tokens = np.zeros((inputs.shape[0], width), np.int32)
    done = np.zeros(inputs.shape[0], bool)
    for t in range(width):
        logits = np.asarray(run(tokens))[:, t]  # Position t sees tokens[:, :t] only (causal).
        token = logits.argmax(-1)
        tokens[:, t] = np.where(done, 0, token)
        done |= (token == 1) | (t + 1 >= limits)
    return tokens


def test_cached_greedy_equals_naive_greedy():
    model, variables = tiny()
    result = greedy_batch()
    np.testing.assert_array_equal(result.tokens, naive_greedy(model, variables, INPUTS, LIMITS, WIDTH))
    assert_well_formed(result, LIMITS)
    ends = result.tokens[np.arange(len(INPUTS)), result.lengths - 1]
    assert (ends == 1).any() and (ends != 1).any()  # Both ways of stopping occur.


def test_beam_size_one_equals_greedy():
    beam = decode(method="beam", beam_size=1, alpha=0.0)
    greedy = greedy_batch()
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_array_equal(beam.lengths, greedy.lengths)
    np.testing.assert_allclose(beam.log_probs, greedy.log_probs, rtol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_each_sentence_decodes_as_it_would_alone(method):
    kwargs = dict(method="beam", beam_size=3, alpha=0.6) if method == "beam" else dict(method="greedy")
    batch = greedy_batch() if method == "greedy" else decode(**kwargs)
    assert_well_formed(batch, LIMITS)
    # Alone: a batch of one. The first sentence is unpadded; the others keep their padding (the encoder
    # ignores it: test_transformer), which keeps one compiled shape for all of them.
    for row in range(len(INPUTS)):
        alone = decode(INPUTS[row: row + 1], **kwargs)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
        np.testing.assert_allclose(alone.scores[0], batch.scores[row], rtol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_a_short_first_cache_changes_nothing(method):
    """Steps on a 3-position cache, grown to full width when a sentence goes on, give the same results."""
    kwargs = dict(method="beam", beam_size=3, alpha=0.6) if method == "beam" else dict(method="greedy")
    grown, full = decode(first_cache_length=3, **kwargs), decode(first_cache_length=0, **kwargs)
    assert full.lengths.max() > 3  # The cache did grow.
    np.testing.assert_array_equal(grown.tokens, full.tokens)
    np.testing.assert_allclose(grown.scores, full.scores, rtol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_sources_encoded_at_their_own_width_decode_the_same(method):
    """``encode_cross_kv`` on the sources cut to their longest, padded back to the batch's width, is the
    cross_kv ``decode_batch`` would make itself (what ``translation.make_decode_fn`` does for each batch)."""
    model, variables = tiny()
    kwargs = dict(method="beam", beam_size=3, alpha=0.6) if method == "beam" else dict(method="greedy")
    inputs = INPUTS[1:]  # Rows with padding: the longest has 7 tokens of the 8 columns.
    used = int((inputs != 0).sum(1).max())
    assert used < inputs.shape[1]
    cross_kv = jax.jit(lambda v, x: decoding.encode_cross_kv(model, v, x, source_width=inputs.shape[1]))(
        variables, inputs[:, :used])
    with_memory = jax.tree_util.tree_map(np.asarray, jax.jit(lambda v, x, m: decoding.decode_batch(
        model, v, x, options(method), cross_kv=m))(variables, inputs, cross_kv))
    alone = decode(inputs, **kwargs)
    np.testing.assert_array_equal(with_memory.tokens, alone.tokens)
    np.testing.assert_allclose(with_memory.scores, alone.scores, rtol=1e-5)


def test_dropping_finished_rows_changes_nothing():
    """Greedy search on 16 rows (the 4 sentences in every order-shifted copy, with 4 all-pad fillers in place of
    one copy) going on with 4 rows, then 1, as rows finish: every row as in the plain batch."""
    rows = np.concatenate([np.roll(INPUTS, k, axis=0) for k in range(3)] + [np.zeros_like(INPUTS)])
    shrinking = decode(rows, method="greedy", min_rows=1)  # 16 -> 4 -> 1 rows.
    plain = decode(rows, method="greedy", min_rows=0)
    np.testing.assert_array_equal(shrinking.tokens, plain.tokens)
    np.testing.assert_array_equal(shrinking.lengths, plain.lengths)
    np.testing.assert_allclose(shrinking.scores, plain.scores, rtol=1e-5)
    alone = greedy_batch()
    np.testing.assert_array_equal(shrinking.tokens[:12], np.concatenate([np.roll(alone.tokens, k, axis=0)
                                                                         for k in range(3)]))
    assert not shrinking.tokens[12:].any()
    # The loop bodies: one per row count (16, 4, 1), none of them growing a cache.
    model, variables = tiny()
    jaxpr = jax.make_jaxpr(lambda v, x: decoding.decode_batch(model, v, x, options("greedy", min_rows=1)))(
        variables, rows).jaxpr
    assert len(list(while_bodies(jaxpr))) == 3


def test_growing_the_cache_then_dropping_rows_changes_nothing():
    """The two speed-ups composed: 3 steps on a 3-position cache for all 16 rows, the cache grown, then
    16 -> 4 -> 1 rows as they finish: the results of plain greedy search (neither)."""
    rows = np.concatenate([np.roll(INPUTS, k, axis=0) for k in range(3)] + [np.zeros_like(INPUTS)])
    composed = decode(rows, method="greedy", min_rows=1, first_cache_length=3)
    plain = decode(rows, method="greedy", min_rows=0, first_cache_length=0)
    assert plain.lengths.max() > 3  # The cache did grow.
    np.testing.assert_array_equal(composed.tokens, plain.tokens)
    np.testing.assert_array_equal(composed.lengths, plain.lengths)
    np.testing.assert_allclose(composed.scores, plain.scores, rtol=1e-5)
    # The loop bodies: the short cache at 16 rows, then one per row count (16, 4, 1) on the grown cache.
    model, variables = tiny()
    cfg = model.config
    jaxpr = jax.make_jaxpr(lambda v, x: decoding.decode_batch(
        model, v, x, options("greedy", min_rows=1, first_cache_length=3)))(variables, rows).jaxpr
    bodies = list(while_bodies(jaxpr))
    self_keys = lambda body: {v.aval.shape[:3] for v in body.invars  # noqa: E731  [rows, h, steps] of the
                              if v.aval.shape[1:2] == (cfg.num_heads,) and v.aval.shape[2:3] in ((3,), (WIDTH,))}
    assert [self_keys(body) for body in bodies] == [{(16, 4, 3)}, {(16, 4, WIDTH)}, {(4, 4, WIDTH)},
                                                    {(1, 4, WIDTH)}]


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_all_pad_rows_emit_nothing(method):
    """The filler rows of a last, partial batch are finished from the start; the real rows are unchanged."""
    kwargs = dict(method="beam", beam_size=3, alpha=0.6) if method == "beam" else dict(method="greedy")
    padded = np.concatenate([INPUTS, np.zeros_like(INPUTS[:2])])
    result, alone = decode(padded, **kwargs), decode(**kwargs)
    np.testing.assert_array_equal(result.lengths[len(INPUTS):], [0, 0])
    assert not result.tokens[len(INPUTS):].any()
    np.testing.assert_array_equal(result.tokens[: len(INPUTS)], alone.tokens)


# ---------------------------------------------------------------------------------------------------------
# Toy Markov chains with known probabilities (generic cores).
# ---------------------------------------------------------------------------------------------------------
def markov(transitions, vocab):
    """A step function over a transition table {previous token: {next token: probability}}.

    Unlisted rows are uniform; unlisted entries get probability ~1e-9. The cache holds a per-row step
    counter and a scalar, to exercise the reordering and the scalar leaves.
    """
    table = np.full((vocab, vocab), 1e-9)
    for previous in range(vocab):
        if previous not in transitions:
            table[previous] = 1.0 / vocab
        for token, p in transitions.get(previous, {}).items():
            table[previous, token] = p
    log_table = np.log(table / table.sum(1, keepdims=True))

    def logits_fn(tokens, cache):
        return jnp.asarray(log_table, jnp.float32)[tokens[:, 0]], {"rows": cache["rows"] + 1,
                                                                    "scalar": cache["scalar"]}

    def cache(rows):
        return {"rows": jnp.zeros((rows,), jnp.int32), "scalar": jnp.zeros((), jnp.int32)}

    return logits_fn, cache, log_table


A, B = 2, 3
X = list(range(4, 24))  # 20 tokens.
# Greedy takes A (0.6), then one of 20 equally likely tokens, then EOS: 0.03. B then EOS has 0.4.
GREEDY_TRAP = {0: {A: 0.6, B: 0.4}, A: {x: 1 / 20 for x in X}, B: {1: 1.0}, **{x: {1: 1.0} for x in X}}


def run_core(search, transitions, vocab, batch, width, **kwargs):
    logits_fn, cache, log_table = markov(transitions, vocab)
    rows = batch * kwargs.get("beam_size", 1)
    limits = jnp.full((batch,), width)
    return jax.tree_util.tree_map(np.asarray, search(logits_fn, cache(rows), limits, width, **kwargs)), log_table


def test_greedy_core_drops_finished_rows_with_the_same_results():
    # Greedy goes 0 -> 2 -> 3 -> ... and never picks EOS, so each row runs to its own limit (1 to 9 tokens).
    chain = {0: {2: 0.6, 1: 0.4}, **{t: {t + 1: 0.6, 1: 0.4} for t in range(2, 11)}}
    logits_fn, cache, _ = markov(chain, 12)
    limits = jnp.arange(32) % 9 + 1
    run = lambda drop_rows: jax.tree_util.tree_map(np.asarray, jax.jit(  # noqa: E731
        lambda c: search.greedy(logits_fn, c, limits, 9, drop_rows=drop_rows))(cache(32)))
    plain, shrinking = run(()), run((8, 2))
    np.testing.assert_array_equal(plain.lengths, limits)
    for got, want in zip(shrinking, plain):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="decreasing"):
        search.greedy(logits_fn, cache(32), limits, 9, drop_rows=(2, 8))


def test_beam_search_finds_the_sequence_greedy_misses():
    greedy, log_table = run_core(search.greedy, GREEDY_TRAP, 24, 2, 6)
    np.testing.assert_array_equal(greedy.tokens, [[A, X[0], 1, 0, 0, 0]] * 2)
    np.testing.assert_allclose(greedy.log_probs, np.log(0.6 * 0.05), rtol=1e-5)
    for alpha in (0.0, 0.6):
        beam, _ = run_core(search.beam_search, GREEDY_TRAP, 24, 2, 6, beam_size=2, alpha=alpha)
        np.testing.assert_array_equal(beam.tokens, [[B, 1, 0, 0, 0, 0]] * 2)
        np.testing.assert_array_equal(beam.lengths, [2, 2])
        log_p = log_table[0, B] + log_table[B, 1]
        np.testing.assert_allclose(beam.log_probs, log_p, rtol=1e-5)
        np.testing.assert_allclose(beam.scores, log_p / ((5 + 2) / 6) ** alpha, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 0.7, 1.0])
def test_length_penalty_chooses_as_the_formula_says(alpha):
    # Short: EOS at once (0.6, length 1). Long: L1 (0.4), L2 ... L9 (each ~1), EOS: length 10.
    chain = {0: {1: 0.6, 2: 0.4}, **{t: {t + 1: 1.0} for t in range(2, 10)}, 10: {1: 1.0}}
    result, log_table = run_core(search.beam_search, chain, 12, 1, 12, beam_size=2, alpha=alpha)
    short, long = [1], list(range(2, 11)) + [1]
    log_p = {"short": log_table[0, 1],
             "long": log_table[0, 2] + sum(log_table[t, t + 1] for t in range(2, 10)) + log_table[10, 1]}
    scores = {name: log_p[name] / ((5 + n) / 6) ** alpha for name, n in (("short", 1), ("long", 10))}
    # The crossover is at alpha = log(log 0.4 / log 0.6) / log 2.5 = 0.637: 0.6 keeps the short one.
    best = max(scores, key=scores.get)
    assert best == ("short" if alpha < 0.637 else "long")
    expected = short if best == "short" else long
    np.testing.assert_array_equal(result.tokens[0], expected + [0] * (12 - len(expected)))
    np.testing.assert_allclose(result.scores[0], scores[best], rtol=1e-5)


def test_beam_search_cuts_hypotheses_at_the_limit():
    # EOS is never likely: the best hypotheses reach the per-sentence limits (3 and 5) and finish there.
    chain = {0: {2: 0.9, 1: 0.01}, **{t: {t + 1: 0.9, 1: 0.01} for t in range(2, 9)}}
    logits_fn, cache, _ = markov(chain, 10)
    result = search.beam_search(logits_fn, cache(4), jnp.array([3, 5]), 6, beam_size=2, alpha=0.6)
    np.testing.assert_array_equal(result.tokens, [[2, 3, 4, 0, 0, 0], [2, 3, 4, 5, 6, 0]])
    np.testing.assert_array_equal(result.lengths, [3, 5])


# ---------------------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [256, 1024, 8192, 37])
def test_best_extensions_by_vocabulary_blocks_are_top_k_of_the_whole_array(vocab):
    """Beam search's top-k taken by blocks of vocabulary gives top_k's values and ids, ties (lowest id
    first) and -inf beams (the unused beams of step 0, done sentences) included; 37 has no block size."""
    assert search._block_size(vocab) == {256: 128, 1024: 128, 8192: 128, 37: 0}[vocab]
    rng = np.random.default_rng(vocab)
    spike = np.zeros((3, 4, vocab))
    spike[:, :, -1] = 1.0  # The last block ranks first, and the ties after it are in the first blocks.
    for kind in ("normal", "ties", "spike"):
        for beams, count in ((1, 1), (4, 8), (2, 3)):
            shape = (3, beams, vocab)
            logits = {"normal": rng.standard_normal(shape), "ties": rng.integers(-2, 2, shape),
                      "spike": spike[:, :beams]}[kind]
            log_probs = rng.standard_normal((3, beams))
            log_probs[1, 1:] = -np.inf  # Only the first beam counts (step 0).
            log_probs[2] = -np.inf  # A done sentence.
            logits, log_probs = jnp.asarray(logits, jnp.float32), jnp.asarray(log_probs, jnp.float32)
            whole = (log_probs[:, :, None] + jax.nn.log_softmax(logits)).reshape(3, beams * vocab)
            want_values, want_ids = jax.lax.top_k(whole, count)
            values, ids = search.best_extensions(logits, log_probs, count)
            np.testing.assert_array_equal(ids, want_ids, err_msg=f"{kind}, {beams} beams, top {count}")
            np.testing.assert_allclose(values, want_values, rtol=1e-6)


def test_top_k_1_sampling_is_greedy():
    result = decode(method="sample", rng=jax.random.key(7), top_k=1)
    np.testing.assert_array_equal(result.tokens, greedy_batch().tokens)
    np.testing.assert_allclose(result.log_probs, greedy_batch().log_probs, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1e-3])
def test_sampling_as_temperature_goes_to_zero_is_greedy(temperature):
    chain = {0: {2: 0.4, 3: 0.35, 1: 0.25}, 2: {4: 0.45, 5: 0.4, 1: 0.15}, 4: {1: 0.5, 6: 0.45}}
    greedy, _ = run_core(search.greedy, chain, 8, 1, 5)
    np.testing.assert_array_equal(greedy.tokens, [[2, 4, 1, 0, 0]])
    sampled, _ = run_core(search.sample, chain, 8, 256, 5, rng=jax.random.key(3), temperature=temperature)
    np.testing.assert_array_equal(sampled.tokens, np.repeat(greedy.tokens, 256, axis=0))
    # While at temperature 1 the rows differ.
    sampled, _ = run_core(search.sample, chain, 8, 256, 5, rng=jax.random.key(3), temperature=1.0)
    assert len({tuple(row) for row in sampled.tokens}) > 3


# One step over 10 tokens with probabilities 0.3, 0.25, 0.2, 0.1, 0.05 x 3, 0.04, 0.01 (token 1, EOS, is 0.25).
FIRST_STEP = {0: dict(zip([2, 1, 3, 4, 5, 6, 7, 8, 9], [0.3, 0.25, 0.2, 0.1, 0.05, 0.05, 0.05, 0.04, 0.01],
                          strict=True))}


def sample_first_tokens(rng, **kwargs):
    result, log_table = run_core(search.sample, FIRST_STEP, 10, 4000, 1, rng=rng, **kwargs)
    return result.tokens[:, 0], np.exp(log_table[0])


@pytest.mark.parametrize("kwargs, support", [
    (dict(top_k=3), [2, 1, 3]),
    (dict(top_p=0.7), [2, 1, 3]),  # 0.3 + 0.25 < 0.7 <= 0.3 + 0.25 + 0.2: the token reaching p is kept.
    (dict(top_k=2, top_p=0.5), [2]),  # After top-k: 0.545 and 0.455; the first alone reaches 0.5.
    (dict(top_k=2, top_p=0.6), [2, 1]),
    (dict(top_k=2, top_p=0.6, temperature=0.1), [2]),  # Sharpened: 0.86 and 0.14.
])
def test_top_k_and_top_p_restrict_the_support(kwargs, support):
    tokens, probs = sample_first_tokens(jax.random.key(0), **kwargs)
    assert set(np.unique(tokens)) == set(support)
    if "temperature" not in kwargs:  # Frequencies follow the renormalized probabilities.
        expected = probs[support] / probs[support].sum()
        observed = np.array([(tokens == t).mean() for t in support])
        np.testing.assert_allclose(observed, expected, atol=0.035)


def test_sampling_is_reproducible_and_depends_on_the_rng():
    chain = {0: {2: 0.5, 3: 0.3, 1: 0.2}, **{t: {t + 1: 0.5, 2: 0.3, 1: 0.2} for t in range(2, 9)}}
    logits_fn, cache, _ = markov(chain, 10)
    run = jax.jit(lambda rng: search.sample(logits_fn, cache(64), jnp.full((64,), 8), 8, rng,
                                              temperature=1.0).tokens)
    first, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len({tuple(row) for row in np.asarray(first)}) > 5  # Rows draw independently.


def test_bad_arguments():
    model, variables = tiny()
    with pytest.raises(ValueError, match="method"):
        decoding.DecodeConfig(method="nucleus")
    with pytest.raises(ValueError, match="first_cache_length"):
        decoding.DecodeConfig(first_cache_length=-1)
    with pytest.raises(ValueError, match="rng"):
        decoding.decode_batch(model, variables, INPUTS, decoding.DecodeConfig(method="sample"))
    with pytest.raises(ValueError, match="tile_beams"):
        logits_fn, cache, _ = markov({}, 10)
        search.beam_search(logits_fn, cache(2), jnp.array([3, 3]), 3, beam_size=2)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_the_accelerator_forms_decode_the_same(method, monkeypatch):
    """What a GPU or TPU runs (backend.is_cpu() False: the cache in the compute dtype, no matrix-vector
    decoding products, gradient products in their natural order, fused attention through
    jax.nn.dot_product_attention), traced here on the CPU: the same hypotheses as the CPU forms."""
    model, variables = tiny()
    run = lambda: jax.tree_util.tree_map(np.asarray, jax.jit(  # noqa: E731  (a fresh trace each time)
        lambda v, x: decoding.decode_batch(model, v, x, options(method)))(variables, INPUTS))
    def loss_and_grads():  # Teacher-forced, with the gradient products of training.
        def loss(v):
            logits = model.apply(v, INPUTS, on_cpu.tokens)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 5]), logits
        return jax.value_and_grad(loss, has_aux=True)(variables)

    on_cpu = run()
    (_, cpu_logits), cpu_grads = loss_and_grads()
    monkeypatch.setattr(backend, "is_cpu", lambda: False)
    assert backend.attention_implementation("auto", dtype=jnp.float32, head_dim=8,
                                            needs_probabilities=False) == "xla"
    elsewhere = run()
    np.testing.assert_array_equal(elsewhere.tokens, on_cpu.tokens)
    np.testing.assert_allclose(elsewhere.scores, on_cpu.scores, rtol=1e-5)
    (_, logits), grads = loss_and_grads()
    np.testing.assert_allclose(logits, cpu_logits, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads, cpu_grads)


def test_the_search_module_runs_without_the_model():
    """``search`` imports only jax: loaded on its own from its file (not through the package, which imports
    the model), it runs greedy and beam search over a toy step function."""
    path = pathlib.Path(search.__file__)
    imported = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert imported <= {"__future__", "collections.abc", "typing", "jax", "jax.numpy"}, imported
    spec = importlib.util.spec_from_file_location("standalone_search", path)
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)
    logits_fn, cache, _ = markov(GREEDY_TRAP, 24)
    greedy = standalone.greedy(logits_fn, cache(2), jnp.full((2,), 6), 6)
    np.testing.assert_array_equal(greedy.tokens, [[A, X[0], 1, 0, 0, 0]] * 2)
    beam = standalone.beam_search(logits_fn, cache(4), jnp.full((2,), 6), 6, beam_size=2)
    np.testing.assert_array_equal(beam.tokens, [[B, 1, 0, 0, 0, 0]] * 2)
