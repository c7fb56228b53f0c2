"""Autoregressive decoding: greedy search, beam search with the GNMT length penalty, and sampling.

Two layers:

* Generic cores, :func:`greedy`, :func:`beam_search` and :func:`sample`, that work on any step function
  ``logits_fn(token_ids [n, 1], cache) -> (logits [n, V], new_cache)``: a Transformer decoder, or a toy
  table in the tests. Each runs the whole search inside one ``lax.while_loop``, so it can be jitted (with
  shardings: every array is batch-leading and only plain ``jnp``/``lax`` ops are used, no host callbacks).
* :func:`decode_batch`, the model-facing wrapper: it encodes the sources once, builds the cache (with the
  encoder-decoder attention keys/values projected once per sentence), tiles it for the beams, and calls a
  core.

Conventions (token ids: 0 = pad, which is also the decoder start token, 1 = EOS):

* Outputs have a static width ``max_decode_length`` (``L``). Row ``i`` emits at most ``max_lengths[i]``
  tokens; :func:`decode_batch` uses the number of non-pad source tokens + ``extra_length`` (50), capped at
  ``L``, which defaults to the padded source width + ``extra_length``.
* The emitted tokens exclude the start token and include the EOS when there is one; every position after
  the EOS (or after ``max_lengths[i]`` tokens, when the limit cuts a hypothesis that never emitted EOS)
  holds ``pad_id``. ``Decoded.lengths`` counts the emitted tokens, EOS included (no token is forbidden:
  a model that emits ``pad_id`` itself gets it back, and ``lengths`` tells it from the padding).
* A row stops as soon as it is finished; the loop stops when every row is, or after ``L`` steps. Finished
  rows keep their result while the others go on, so each sentence decodes exactly as it would alone.

The cache is any pytree whose leaves are batch-leading arrays (``[n, ...]``) or scalars (step counters);
beam search gathers the former along axis 0 when beams are reordered. For the Transformer,
:func:`encode_memory` primes it with the encoder-decoder attention keys/values once per sentence (before
beams are tiled), and the steps pass ``encoded=None``, so no step projects the encoder output again (see
``MultiHeadAttention``, ``static_kv``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from flaxformer_lite.transformer import Transformer

LogitsFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]

NEG_INF = -jnp.inf


class Decoded(NamedTuple):
    """Result of a decoding core, one entry per batch row (per sentence)."""

    tokens: jax.Array  # [b, L] int32: emitted tokens (EOS included), pad_id afterwards.
    lengths: jax.Array  # [b] int32: number of emitted tokens, EOS included.
    log_probs: jax.Array  # [b] float32: sum of the model's log-probabilities (log_softmax of raw logits).
    scores: jax.Array  # [b] float32: what the search ranks: log_probs / length_penalty for beam search,
    #                     log_probs for greedy search and sampling.


def length_penalty(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT length penalty (Wu et al., 2016): ``((5 + length) / 6) ** alpha``; a hypothesis scores
    ``log P(Y) / length_penalty(|Y|)``. ``alpha = 0`` ranks by log-probability alone."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def tile_beams(tree: Any, beam_size: int) -> Any:
    """Repeats every batch-leading leaf ``beam_size`` times along axis 0: row ``i`` becomes rows
    ``i * beam_size ... i * beam_size + beam_size - 1`` (the layout :func:`beam_search` expects).
    Scalar leaves (step counters) are left alone."""
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, beam_size, axis=0) if jnp.ndim(x) else x, tree)


def _gather_rows(tree: Any, rows: jax.Array) -> Any:
    """``leaf[rows]`` along axis 0 for every batch-leading leaf of a cache; scalars are left alone."""
    n = rows.shape[0]

    def gather(x):
        if not jnp.ndim(x):
            return x
        if x.shape[0] != n:
            raise ValueError(f"cache leaf of shape {x.shape} is not batch-leading with {n} rows "
                             "(did you tile the cache for the beams with tile_beams?)")
        return jnp.take(x, rows, axis=0, mode="clip")  # Rows are in range; "clip" skips the fill-select.

    return jax.tree_util.tree_map(gather, tree)


def _limits(max_lengths: jax.Array, max_decode_length: int) -> jax.Array:
    if max_decode_length < 1:
        raise ValueError(f"max_decode_length must be positive, got {max_decode_length}")
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    if max_lengths.ndim != 1:
        raise ValueError(f"max_lengths must have shape [batch], got {max_lengths.shape}")
    return jnp.clip(max_lengths, 0, max_decode_length)


class Growth(NamedTuple):
    """Decode the first ``steps`` steps on a short cache, then ``grow`` it (``cache -> cache``) to full length.

    A step's cost grows with its cache's length, while most outputs end long before the longest one
    allowed (source length + 50). On Multi30k's test_2016_flickr (a 98-long cache) a 32-position first
    cache made beam search 1.5x and greedy search 1.2x faster on a CPU. The search's results do not change:
    a cache position is read only once it is filled.
    """

    steps: int
    grow: Callable[[Any], Any]


def _search_loop(advance: Callable[[dict], dict], state: dict, width: int, growth: Growth | None) -> dict:
    """Runs ``advance`` until every row is done or ``width`` steps, growing the cache after ``growth.steps``."""
    if growth is not None and growth.steps < width:
        state = jax.lax.while_loop(_until(growth.steps), advance, state)
        state = {**state, "cache": growth.grow(state["cache"])}
    return jax.lax.while_loop(_until(width), advance, state)


def _shrinking_loop(advance: Callable[[dict], dict], state: dict, width: int, sizes: tuple[int, ...],
                    results: tuple[str, ...]) -> dict:
    """:func:`_search_loop` that drops finished rows: once at most ``sizes[0]`` rows are still going, the
    search goes on with that many rows (they are gathered to the front), then ``sizes[1]``, and so on.

    Real outputs end long before the longest of their batch, while every row costs a step the same, done
    or not: greedy search over Multi30k's test_2016_flickr in batches of 128 ran 35,200 row-steps for
    15,944 tokens. ``state`` is batch-leading (every leaf with the batch's rows is per-row, the cache's
    included; scalars are shared) and numbers its rows in ``row``. Returns the ``results`` leaves for the
    whole batch. Each size is a loop of its own shape, so each costs tracing and compiling once.
    """
    out = {name: state[name] for name in results}

    def save(out, state):  # The rows of ``state`` into the batch's results.
        return {name: out[name].at[state["row"]].set(state[name]) for name in results}

    for size in sizes:
        state = jax.lax.while_loop(
            lambda s, size=size: (s["step"] < width) & (jnp.sum(~s["done"]) > size), advance, state)
        out = save(out, state)
        keep = jnp.argsort(state["done"], stable=True)[:size]  # Every row still going, first.
        rows = state["done"].shape[0]
        state = jax.tree_util.tree_map(
            lambda x: jnp.take(x, keep, axis=0, mode="clip") if jnp.ndim(x) and x.shape[0] == rows else x, state)
    return save(out, jax.lax.while_loop(_until(width), advance, state))


def _until(limit: int) -> Callable[[dict], jax.Array]:
    return lambda s: (s["step"] < limit) & ~jnp.all(s["done"])


# ---------------------------------------------------------------------------------------------------------
# Greedy search and sampling: one token per row and step.
# ---------------------------------------------------------------------------------------------------------
def _one_token_per_step(logits_fn: LogitsFn, cache: Any, max_lengths: jax.Array, max_decode_length: int,
                        choose: Callable[[jax.Array, jax.Array], jax.Array], *, start_id: int, eos_id: int,
                        pad_id: int, growth: Growth | None = None, shrink: tuple[int, ...] = ()) -> Decoded:
    """The loop shared by greedy search and sampling; ``choose(logits [n, V], step) -> tokens [n]``."""
    max_lengths = _limits(max_lengths, max_decode_length)
    batch = max_lengths.shape[0]
    if shrink and growth is not None:
        raise ValueError("shrink and growth cannot be combined: a grown cache would need a loop per stage")
    if any(not 0 < size < batch for size in shrink) or list(shrink) != sorted(shrink, reverse=True):
        raise ValueError(f"shrink must be decreasing row counts below the batch's {batch}, got {shrink}")
    state = dict(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((batch, max_decode_length), pad_id, jnp.int32),
        last=jnp.full((batch,), start_id, jnp.int32),
        done=max_lengths <= 0,
        lengths=jnp.zeros((batch,), jnp.int32),
        log_probs=jnp.zeros((batch,), jnp.float32),
        max_lengths=max_lengths,
        row=jnp.arange(batch, dtype=jnp.int32),
        cache=cache,
    )

    def advance(state):
        step, done = state["step"], state["done"]
        logits, cache = logits_fn(state["last"][:, None], state["cache"])
        logits = logits.reshape(logits.shape[0], -1).astype(jnp.float32)
        token = choose(logits, step).astype(jnp.int32)
        # log_softmax(logits)[token], without writing out the whole normalized array.
        log_prob = (jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
                    - jax.nn.logsumexp(logits, axis=-1))
        token = jnp.where(done, pad_id, token)
        return dict(
            state,
            step=step + 1,
            tokens=jax.lax.dynamic_update_slice(state["tokens"], token[:, None], (0, step)),
            last=token,
            done=done | (token == eos_id) | (step + 1 >= state["max_lengths"]),
            lengths=state["lengths"] + (~done).astype(jnp.int32),
            log_probs=state["log_probs"] + jnp.where(done, 0.0, log_prob),
            cache=cache,
        )

    if shrink:
        state = _shrinking_loop(advance, state, max_decode_length, shrink, ("tokens", "lengths", "log_probs"))
    else:
        state = _search_loop(advance, state, max_decode_length, growth)
    return Decoded(state["tokens"], state["lengths"], state["log_probs"], state["log_probs"])


def first_argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, axis=-1)`` (the lowest index among ties) as a max and a masked min: on a CPU
    this took half the time of ``argmax``'s single reduction over (value, index) pairs."""
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    is_max = logits == jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, ids, logits.shape[-1]), axis=-1)


def greedy(logits_fn: LogitsFn, cache: Any, max_lengths: jax.Array, max_decode_length: int, *,
           start_id: int = 0, eos_id: int = 1, pad_id: int = 0, growth: Growth | None = None,
           shrink: tuple[int, ...] = ()) -> Decoded:
    """Greedy search: at each step every row takes its most probable token (the lowest id on a tie).

    ``cache`` is the initial cache for ``b = len(max_lengths)`` rows; ``max_lengths [b]`` bounds each row's
    output; ``max_decode_length`` is the static output width. See the module docstring for conventions.
    ``shrink``, decreasing row counts such as ``(b // 4, b // 16)``, drops finished rows: once no more rows
    than the next count are still going, the search goes on with that many (see ``_shrinking_loop``; every
    leaf of the cache with ``b`` rows is taken as per-row). The results are the same.
    """
    return _one_token_per_step(logits_fn, cache, max_lengths, max_decode_length,
                               lambda logits, step: first_argmax(logits), start_id=start_id,
                               eos_id=eos_id, pad_id=pad_id, growth=growth, shrink=shrink)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[jax.Array, jax.Array | None]:
    """Logits ``[b, V]`` of the sampling distribution: divided by ``temperature``, then restricted to the
    ``top_k`` most probable tokens (0: no limit), then to the nucleus: the smallest set of most probable
    tokens whose probability (renormalized after top-k) reaches ``top_p`` (1.0: no limit).

    Returns ``(filtered, token_ids)``: when a restriction applies, ``filtered`` is ``[b, K]`` over the
    tokens ``token_ids [b, K]`` (sorted, most probable first; excluded ones at ``-inf``); otherwise it is
    the tempered ``[b, V]`` logits and ``token_ids`` is ``None``.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k <= 0 and top_p >= 1.0:
        return logits, None
    k = logits.shape[-1] if top_k <= 0 else min(top_k, logits.shape[-1])
    values, ids = jax.lax.top_k(logits, k)
    if top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # Probability of the strictly more probable tokens.
        values = jnp.where(mass_before < top_p, values, NEG_INF)  # The most probable token always stays.
    return values, ids


def sample(logits_fn: LogitsFn, cache: Any, max_lengths: jax.Array, max_decode_length: int,
           rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           start_id: int = 0, eos_id: int = 1, pad_id: int = 0, growth: Growth | None = None) -> Decoded:
    """Ancestral sampling from the model, with temperature, top-k and top-p (see :func:`filter_logits`).

    ``temperature=0`` (a Python number) is greedy search. Step ``t`` draws with ``fold_in(rng, t)``, so a
    fixed ``rng`` reproduces the samples. ``log_probs`` are under the model (raw logits), not under the
    filtered distribution.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    def choose(logits, step):
        if temperature == 0:
            return first_argmax(logits)
        filtered, ids = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        choice = jax.random.categorical(jax.random.fold_in(rng, step), filtered, axis=-1)
        return choice if ids is None else jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]

    return _one_token_per_step(logits_fn, cache, max_lengths, max_decode_length, choose, start_id=start_id,
                               eos_id=eos_id, pad_id=pad_id, growth=growth)


# ---------------------------------------------------------------------------------------------------------
# Beam search.
# ---------------------------------------------------------------------------------------------------------
def beam_search(logits_fn: LogitsFn, cache: Any, max_lengths: jax.Array, max_decode_length: int, *,
                beam_size: int = 4, alpha: float = 0.6, start_id: int = 0, eos_id: int = 1,
                pad_id: int = 0, growth: Growth | None = None) -> Decoded:
    """Beam search with a separate set of finished hypotheses and the GNMT length penalty.

    ``max_lengths [b]`` bounds each sentence; ``cache`` is for ``b * beam_size`` rows, sentence-major (tile a
    per-sentence cache with :func:`tile_beams`); ``logits_fn`` gets ``[b * beam_size, 1]`` tokens. Returns
    the best finished hypothesis of every sentence.

    Each sentence keeps ``k = beam_size`` alive hypotheses (log-probability ``log P``) and up to ``k``
    finished ones, scored ``log P / length_penalty(length, alpha)`` with the length counting the EOS.
    At every step, among all extensions of the alive hypotheses:

    * the ``k`` best by ``log P`` form the beam; those that end in EOS move to the finished set (they are
      scored with their length penalty, and the set keeps the ``k`` best scores). When a sentence reaches
      its ``max_lengths`` limit, all ``k`` become finished (cut without EOS).
    * the alive set is refilled with the ``k`` best extensions that do not end in EOS, which continue.

    With ``beam_size=1`` and ``alpha=0`` this is exactly greedy search.

    Early stopping: a sentence is done when no alive hypothesis can still beat the worst of its ``k``
    finished ones (``-inf`` while fewer than ``k`` are finished): since ``log P`` only falls as a
    hypothesis grows, the best an alive one can reach is ``log P / max(lp(length + 1), lp(limit))``. Done
    sentences keep their finished set; the loop ends when every sentence is done.
    """
    k = beam_size
    if k < 1:
        raise ValueError(f"beam_size must be positive, got {k}")
    max_lengths = _limits(max_lengths, max_decode_length)
    batch, width = max_lengths.shape[0], max_decode_length
    sentence = jnp.arange(batch)[:, None]
    neg = jnp.full((batch, k), NEG_INF, jnp.float32)
    state = dict(
        step=jnp.zeros((), jnp.int32),
        # Alive hypotheses: all k start from the start token, but only the first one counts at step 0.
        alive_seqs=jnp.full((batch, k, width), pad_id, jnp.int32),
        alive_last=jnp.full((batch, k), start_id, jnp.int32),
        alive_log_probs=neg.at[:, 0].set(0.0),
        finished_seqs=jnp.full((batch, k, width), pad_id, jnp.int32),
        finished_scores=neg,
        finished_log_probs=neg,
        finished_lengths=jnp.zeros((batch, k), jnp.int32),
        done=max_lengths <= 0,
        cache=cache,
    )

    def advance(state):
        step, done = state["step"], state["done"]
        length = step + 1  # Length of every extension made at this step.
        logits, cache = logits_fn(state["alive_last"].reshape(batch * k, 1), state["cache"])
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.reshape(batch, k, vocab).astype(jnp.float32))
        extensions = state["alive_log_probs"][:, :, None] + log_probs  # [b, k, V]
        at_limit = (length >= max_lengths)[:, None]  # [b, 1]

        def extend(flat_ids):  # Sequences of the extensions with flat ids (beam * V + token) [b, k].
            beams, tokens = flat_ids // vocab, flat_ids % vocab
            seqs = jax.lax.dynamic_update_slice(state["alive_seqs"][sentence, beams], tokens[:, :, None],
                                                (0, 0, step))
            return beams, tokens, seqs

        # One top-k for both sets: the 2k best extensions hold the k best and, since only k of all
        # extensions end in EOS (one per beam), also the k best that do not. (The barrier keeps XLA from
        # rewriting a top-k whose result is sliced into a sort of the whole [b, k * V] array, 100x slower.)
        candidate_log_probs, candidate_ids = jax.lax.optimization_barrier(
            jax.lax.top_k(extensions.reshape(batch, k * vocab), min(2 * k, k * vocab)))

        # 1. The beam: the k best extensions. Those ending in EOS, or all of them at the limit, finish.
        top_log_probs, top_ids = candidate_log_probs[:, :k], candidate_ids[:, :k]
        _, top_tokens, top_seqs = extend(top_ids)
        finishing = (top_tokens == eos_id) | at_limit
        new_scores = jnp.where(finishing, top_log_probs / length_penalty(length, alpha), NEG_INF)
        scores = jnp.concatenate([state["finished_scores"], new_scores], axis=1)  # [b, 2k]
        finished_scores, keep = jax.lax.top_k(scores, k)
        pick = lambda old, new: jnp.concatenate([old, new], axis=1)[sentence, keep]  # noqa: E731
        frozen = lambda old, new: jnp.where(  # noqa: E731  (done sentences keep their finished set)
            done.reshape((batch,) + (1,) * (old.ndim - 1)), old, new)
        finished = dict(
            finished_scores=frozen(state["finished_scores"], finished_scores),
            finished_seqs=frozen(state["finished_seqs"], pick(state["finished_seqs"], top_seqs)),
            finished_log_probs=frozen(state["finished_log_probs"],
                                      pick(state["finished_log_probs"], top_log_probs)),
            finished_lengths=frozen(state["finished_lengths"],
                                    pick(state["finished_lengths"], jnp.full((batch, k), length))),
        )

        # 2. The alive set: the k best extensions that do not end in EOS (none once the limit is reached).
        alive_log_probs, alive_picks = jax.lax.top_k(
            jnp.where(candidate_ids % vocab == eos_id, NEG_INF, candidate_log_probs), k)
        alive_ids = jnp.take_along_axis(candidate_ids, alive_picks, axis=1)
        alive_beams, alive_tokens, alive_seqs = extend(alive_ids)
        alive_log_probs = jnp.where(at_limit | done[:, None], NEG_INF, alive_log_probs)
        cache = _gather_rows(cache, (sentence * k + alive_beams).reshape(-1))

        # 3. Early stopping: can the best alive hypothesis still beat the worst finished one?
        best_reachable = alive_log_probs[:, 0] / jnp.maximum(length_penalty(length + 1, alpha),
                                                             length_penalty(max_lengths, alpha))
        done = done | (best_reachable <= finished["finished_scores"][:, -1]) | (length >= max_lengths)
        return dict(step=length, alive_seqs=alive_seqs, alive_last=alive_tokens,
                    alive_log_probs=jnp.where(done[:, None], NEG_INF, alive_log_probs), done=done,
                    cache=cache, **finished)

    state = _search_loop(advance, state, width, growth)
    return Decoded(state["finished_seqs"][:, 0], state["finished_lengths"][:, 0],
                   state["finished_log_probs"][:, 0], state["finished_scores"][:, 0])


# ---------------------------------------------------------------------------------------------------------
# The model-facing wrapper.
# ---------------------------------------------------------------------------------------------------------
def encode_memory(model: Transformer, variables: Any, inputs: jax.Array, *,
                  source_width: int | None = None) -> Any:
    """Encodes ``inputs [b, s]`` and projects the encoder output into every decoder layer's cross-attention
    keys/values (``Transformer.prime_cache``): the part of the decoding cache that stays fixed. Decoding
    steps read it and pass ``encoded=None``, so the encoder output is projected once per sentence.

    With ``source_width`` the keys/values are padded to that many source positions (masked, as the sources'
    own padding): sources cut to their batch's longest are encoded at that width and decoded at one shape
    for a whole split (see ``evaluation.make_decode_fn``).
    """
    if "params" not in variables:
        variables = {"params": variables}
    encoded = model.apply(variables, inputs, method=Transformer.encode)
    _, mutated = model.apply(variables, encoded, method=Transformer.prime_cache, mutable=["cache"])
    memory = mutated["cache"]
    if source_width is None or source_width == inputs.shape[1]:
        return memory
    return jax.tree_util.tree_map(
        lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, source_width - x.shape[2]), (0, 0))), memory)


def init_cache(model: Transformer, variables: Any, encoded: jax.Array, max_decode_length: int) -> Any:
    """The decoding cache of ``model`` for ``encoded.shape[0]`` rows and up to ``max_decode_length`` steps:
    the cross-attention keys/values projected from ``encoded`` (once: see :func:`encode_memory`), the
    self-attention keys/values and counters at zero."""
    _, mutated = model.apply(variables, encoded, method=Transformer.prime_cache, mutable=["cache"])
    memory = mutated["cache"]
    return _merge(_step_cache(model, variables, memory, encoded.shape[0], encoded.shape[1], max_decode_length),
                  memory)


def _merge(steps: Any, memory: Any) -> Any:
    """The whole decoding cache from its two parts (see :func:`_step_cache`)."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(steps), **traverse_util.flatten_dict(memory)})


def _decoder_step(model: Transformer, variables: Any, memory: Any, inputs: jax.Array, tokens: jax.Array,
                  steps: Any) -> tuple[jax.Array, Any]:
    """One decoding step of ``tokens [n, 1]``: logits ``[n, V]`` and the new step cache (``memory`` is
    read, never changed; ``inputs`` give the sources' padding mask)."""
    logits, mutated = model.apply({**variables, "cache": _merge(steps, memory)}, None, inputs, tokens,
                                  decode=True, mutable=["cache"], method=Transformer.decode)
    fixed = traverse_util.flatten_dict(memory)
    return logits[:, -1], traverse_util.unflatten_dict(
        {path: leaf for path, leaf in traverse_util.flatten_dict(mutated["cache"]).items() if path not in fixed})


def _step_cache(model: Transformer, variables: Any, memory: Any, rows: int, source_length: int,
                max_decode_length: int) -> Any:
    """The part of the decoding cache that the steps change, at zero: self-attention keys/values for
    ``max_decode_length`` steps and the counters. ``memory`` (see :func:`encode_memory`) is the rest. The
    shapes come from ``jax.eval_shape`` of a full-length decoder call, which computes nothing."""
    def make():
        inputs = jnp.ones((rows, source_length), jnp.int32)
        targets = jnp.zeros((rows, max_decode_length), jnp.int32)
        return model.apply({**variables, "cache": memory}, None, inputs, targets, decode=True, mutable=["cache"],
                           method=Transformer.decode)[1]["cache"]

    fixed = traverse_util.flatten_dict(memory)
    return traverse_util.unflatten_dict({path: jnp.zeros(shape.shape, shape.dtype) for path, shape
                                         in traverse_util.flatten_dict(jax.eval_shape(make)).items()
                                         if path not in fixed})


def source_limits(inputs: jax.Array, *, pad_id: int = 0, extra_length: int = 50,
                  max_decode_length: int | None = None) -> tuple[jax.Array, int]:
    """``(max_lengths [b], max_decode_length)``: each sentence may emit its non-pad source length +
    ``extra_length`` tokens, within a static width of ``inputs.shape[1] + extra_length`` unless given.

    An all-pad row (the filler of a last, partial batch; a real source holds at least its EOS) gets 0: it
    is finished from the start instead of decoding ``extra_length`` steps of nothing.
    """
    width = inputs.shape[1] + extra_length if max_decode_length is None else max_decode_length
    source_lengths = jnp.sum(inputs != pad_id, axis=1, dtype=jnp.int32)
    return jnp.where(source_lengths > 0, jnp.minimum(source_lengths + extra_length, width), 0), width


def decode_batch(model: Transformer, variables: Any, inputs: jax.Array, *, method: str = "greedy",
                 beam_size: int = 4, alpha: float = 0.6, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, rng: jax.Array | None = None, max_decode_length: int | None = None,
                 extra_length: int = 50, eos_id: int = 1, first_cache_length: int = 32,
                 memory: Any = None, min_rows: int = 8) -> Decoded:
    """Translates a batch of padded sources ``inputs [b, s]`` with a :class:`Transformer`.

    ``variables`` is ``{'params': ...}`` (or the params themselves). ``method`` is ``'greedy'``, ``'beam'``
    (``beam_size``, ``alpha``; the paper uses 4 and 0.6) or ``'sample'`` (``rng``, ``temperature``,
    ``top_k``, ``top_p``). Sentence ``i`` emits at most (its non-pad length + ``extra_length``) tokens;
    the output width is ``max_decode_length``, by default ``s + extra_length``. Returns
    :class:`Decoded` with ``tokens [b, max_decode_length]``. The first ``first_cache_length`` steps run on
    a self-attention cache of that length, grown to the full width only if some sentence needs more steps
    (see :class:`Growth`; 0 starts at full width). Greedy search on a batch of ``b >= 4 * min_rows`` rows
    instead drops finished rows, going on with ``b // 4``, then ``b // 16``... (down to ``min_rows``) rows
    as they finish, on a full-width cache (see :func:`greedy`; 0 never drops rows). Either way the results
    are the same, sooner. ``memory`` is what :func:`encode_memory` returns for ``inputs``, when the caller
    has it (``evaluation.make_decode_fn`` encodes each batch at its own width).

    Jit it by closing over the static arguments, e.g.
    ``jax.jit(lambda v, x: decode_batch(model, v, x, method='beam'))``, with shardings if wanted.
    """
    if method not in ("greedy", "beam", "sample"):
        raise ValueError(f"method must be 'greedy', 'beam' or 'sample', got {method!r}")
    if method == "sample" and rng is None:
        raise ValueError("method='sample' needs an rng")
    cfg = model.config
    if "params" not in variables:
        variables = {"params": variables}
    variables = {name: value for name, value in variables.items() if name != "cache"}
    inputs = jnp.asarray(inputs, jnp.int32)
    max_lengths, width = source_limits(inputs, pad_id=cfg.pad_id, extra_length=extra_length,
                                       max_decode_length=max_decode_length)
    if cfg.position_embedding == "learned" and width > cfg.max_length:
        raise ValueError(f"max_decode_length={width} exceeds the learned position table "
                         f"(max_length={cfg.max_length})")

    if memory is None:
        memory = encode_memory(model, variables, inputs)  # Cross-attention keys/values: once per sentence.
    shrink, size = [], inputs.shape[0] // 4
    while method == "greedy" and 0 < min_rows <= size:
        shrink, size = shrink + [size], size // 4
    if shrink:
        return _greedy_shrinking(model, variables, inputs, memory, max_lengths, width, tuple(shrink), eos_id)
    first = min(first_cache_length, width) if first_cache_length > 0 else width
    cache = _step_cache(model, variables, memory, inputs.shape[0], inputs.shape[1], first)
    if method == "beam":
        cache, memory, inputs = tile_beams((cache, memory, inputs), beam_size)
    # The memory never changes while decoding: logits_fn closes over it, so the search carries (and beam
    # search reorders at every step) only the self-attention cache. Reordering the memory too took a third
    # of beam search's time on a CPU.
    def logits_fn(tokens, cache):
        return _decoder_step(model, variables, memory, inputs, tokens, cache)

    def grow(cache):  # Self-attention keys/values [n, h, first, d] -> [n, h, width, d]; counters unchanged.
        return jax.tree_util.tree_map(
            lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, width - first), (0, 0))) if jnp.ndim(x) else x, cache)

    common = dict(start_id=cfg.decoder_start_id, eos_id=eos_id, pad_id=cfg.pad_id,
                  growth=Growth(first, grow) if first < width else None)
    if method == "greedy":
        return greedy(logits_fn, cache, max_lengths, width, **common)
    if method == "beam":
        return beam_search(logits_fn, cache, max_lengths, width, beam_size=beam_size, alpha=alpha, **common)
    return sample(logits_fn, cache, max_lengths, width, rng, temperature=temperature, top_k=top_k,
                  top_p=top_p, **common)


def _greedy_shrinking(model: Transformer, variables: Any, inputs: jax.Array, memory: Any, max_lengths: jax.Array,
                      width: int, shrink: tuple[int, ...], eos_id: int) -> Decoded:
    """Greedy search over a :class:`Transformer` that drops finished rows (``decode_batch``'s ``min_rows``).

    The search carries the memory and the sources (for the padding mask) with the rows, so that dropping a
    row drops them too, and runs on a full-width cache: a cache grown after some steps would need a loop
    for every stage and cache length. On Multi30k's test_2016_flickr (1,000 sentences; batches of 128
    rows going on with 32, then 8) a pass over the split took 2.5-3.1 s, 3.3-3.5 s without dropping rows
    (later passes in one process); ``evaluate.py`` end to end with a warm compilation cache 4.0-4.4 s
    against 4.6-4.8 s for batches of 32 with the short first cache (4 of 5 alternating rounds).
    """
    cfg = model.config
    cache = _step_cache(model, variables, memory, inputs.shape[0], inputs.shape[1], width)
    carried = {"steps": cache, "memory": memory, "inputs": inputs}

    def logits_fn(tokens, carried):
        logits, steps = _decoder_step(model, variables, carried["memory"], carried["inputs"], tokens,
                                      carried["steps"])
        return logits, {**carried, "steps": steps}

    return greedy(logits_fn, carried, max_lengths, width, start_id=cfg.decoder_start_id, eos_id=eos_id,
                  pad_id=cfg.pad_id, shrink=shrink)
