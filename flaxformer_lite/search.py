"""Model-free autoregressive search: greedy search, beam search with the GNMT length penalty, and sampling.

Every search works on a step function ``step(tokens [n, 1], cache) -> (logits [n, V], new_cache)`` (a
Transformer decoder in ``decoding``, a toy table in the tests) and runs inside ``lax.while_loop`` stages, so
it can be jitted (with shardings: every array is batch-leading and only plain ``jnp``/``lax`` ops are used).

The cache is any pytree. Its leaves with at least one axis are **per-row**: they lead with the search's
rows (``[n, ...]``), and beam search gathers them along axis 0 when it reorders beams, and dropping
finished rows drops them; scalar leaves (step counters) are shared by all rows. Anything else a step needs
and no row changes (e.g. the encoder's keys/values under beam search) belongs in the step's closure.

Conventions (token ids: 0 = pad, which is also the decoder start token, 1 = EOS, unless given):

* Outputs have a static width ``max_decode_length`` (``L``). Row ``i`` emits at most ``max_lengths[i]``
  tokens (capped at ``L``).
* The emitted tokens exclude the start token and include the EOS when there is one; every position after
  the EOS (or after ``max_lengths[i]`` tokens, when the limit cuts a hypothesis that never emitted EOS)
  holds ``pad_id``. ``Decoded.lengths`` counts the emitted tokens, EOS included (no token is forbidden:
  a model that emits ``pad_id`` itself gets it back, and ``lengths`` tells it from the padding).
* A row stops as soon as it is finished; the loop stops when every row is, or after ``L`` steps. Finished
  rows keep their result while the others go on, so each sentence decodes exactly as it would alone.

Two speed-ups, each an explicit argument and neither changing any result (:class:`Growth`, and
``drop_rows`` of :func:`greedy`). They compose in one driver: first the steps on the short cache at full
rows, then the growth, then one loop per row count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]

NEG_INF = -jnp.inf


class Decoded(NamedTuple):
    """Result of a search, one entry per batch row (per sentence)."""

    tokens: jax.Array  # [b, L] int32: emitted tokens (EOS included), pad_id afterwards.
    lengths: jax.Array  # [b] int32: number of emitted tokens, EOS included.
    log_probs: jax.Array  # [b] float32: sum of the model's log-probabilities (log_softmax of raw logits).
    scores: jax.Array  # [b] float32: what the search ranks: log_probs / length_penalty for beam search,
    #                     log_probs for greedy search and sampling.


class Growth(NamedTuple):
    """Run the first ``steps`` steps on a short cache, then ``grow`` it (``cache -> cache``) to full length.

    A step's cost grows with its cache's length, while most outputs end long before the longest one
    allowed. The results do not change: a cache position is read only once it is filled. ``grow`` must
    keep every per-row leaf's row axis.
    """

    steps: int
    grow: Callable[[Any], Any]


def length_penalty(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT length penalty (Wu et al., 2016): ``((5 + length) / 6) ** alpha``; a hypothesis scores
    ``log P(Y) / length_penalty(|Y|)``. ``alpha = 0`` ranks by log-probability alone."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def tile_beams(tree: Any, beam_size: int) -> Any:
    """Repeats every per-row leaf ``beam_size`` times along axis 0: row ``i`` becomes rows
    ``i * beam_size ... i * beam_size + beam_size - 1`` (the layout :func:`beam_search` expects).
    Scalar leaves (step counters) are left alone."""
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, beam_size, axis=0) if jnp.ndim(x) else x, tree)


def take_rows(tree: Any, indices: jax.Array, rows: int | None = None, where: str = "cache") -> Any:
    """``leaf[indices]`` along axis 0 for every per-row leaf of ``tree`` (scalars are left alone). Every
    per-row leaf must have ``rows`` rows (default: ``len(indices)``, as for a reordering of beams)."""
    rows = indices.shape[0] if rows is None else rows

    def take(x):
        if not jnp.ndim(x):
            return x
        if x.shape[0] != rows:
            raise ValueError(f"{where} leaf of shape {x.shape} is not per-row with {rows} rows (did you tile "
                             "the cache for the beams with tile_beams?)")
        return jnp.take(x, indices, axis=0, mode="clip")  # Indices are in range; "clip" skips the fill-select.

    return jax.tree_util.tree_map(take, tree)


def _limits(max_lengths: jax.Array, max_decode_length: int) -> jax.Array:
    if max_decode_length < 1:
        raise ValueError(f"max_decode_length must be positive, got {max_decode_length}")
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    if max_lengths.ndim != 1:
        raise ValueError(f"max_lengths must have shape [batch], got {max_lengths.shape}")
    return jnp.clip(max_lengths, 0, max_decode_length)


def _until(limit: int) -> Callable[[dict], jax.Array]:
    return lambda s: (s["step"] < limit) & ~jnp.all(s["done"])


def _run(advance: Callable[[dict], dict], state: dict, width: int, growth: Growth | None,
         drop_rows: tuple[int, ...] = (), results: tuple[str, ...] = ()) -> dict:
    """Runs ``advance`` until every row is done or ``width`` steps, in static stages, each a while loop:

    1. with ``growth``: ``growth.steps`` steps on the short cache, then ``growth.grow`` on the cache;
    2. for each count of ``drop_rows``: steps until no more rows than the count are still going, then the
       search goes on with that many rows (every row still going, gathered to the front);
    3. the remaining steps.

    With ``drop_rows`` every leaf of ``state`` that leads with the rows is per-row, the cache's included
    (scalars are shared), ``state["row"]`` numbers the rows, and the ``results`` leaves are returned for
    the whole batch. Each stage is a loop of its own shapes, so each costs tracing and compiling once.
    """
    if growth is not None and growth.steps < width:
        state = jax.lax.while_loop(_until(growth.steps), advance, state)
        state = {**state, "cache": growth.grow(state["cache"])}
    if not drop_rows:
        return jax.lax.while_loop(_until(width), advance, state)

    def save(out, state):  # The rows of ``state`` into the batch's results.
        return {name: out[name].at[state["row"]].set(state[name]) for name in results}

    out = {name: state[name] for name in results}
    for size in drop_rows:
        state = jax.lax.while_loop(
            lambda s, size=size: (s["step"] < width) & (jnp.sum(~s["done"]) > size), advance, state)
        out = save(out, state)
        keep = jnp.argsort(state["done"], stable=True)[:size]  # Every row still going, first.
        state = take_rows(state, keep, state["done"].shape[0], "search state")
    return save(out, jax.lax.while_loop(_until(width), advance, state))


def _check_drop_rows(drop_rows: tuple[int, ...], batch: int) -> tuple[int, ...]:
    drop_rows = tuple(drop_rows)
    if any(not 0 < size < batch for size in drop_rows) or list(drop_rows) != sorted(set(drop_rows), reverse=True):
        raise ValueError(f"drop_rows must be decreasing row counts below the batch's {batch}, got {drop_rows}")
    return drop_rows


# ---------------------------------------------------------------------------------------------------------
# Greedy search and sampling: one token per row and step.
# ---------------------------------------------------------------------------------------------------------
def _one_token_per_step(step_fn: StepFn, cache: Any, max_lengths: jax.Array, max_decode_length: int,
                        choose: Callable[[jax.Array, jax.Array], jax.Array], *, start_id: int, eos_id: int,
                        pad_id: int, growth: Growth | None, drop_rows: tuple[int, ...] = ()) -> Decoded:
    """The loop shared by greedy search and sampling; ``choose(logits [n, V], step) -> tokens [n]``."""
    max_lengths = _limits(max_lengths, max_decode_length)
    batch = max_lengths.shape[0]
    drop_rows = _check_drop_rows(drop_rows, batch)
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
        logits, cache = step_fn(state["last"][:, None], state["cache"])
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

    state = _run(advance, state, max_decode_length, growth, drop_rows, ("tokens", "lengths", "log_probs"))
    return Decoded(state["tokens"], state["lengths"], state["log_probs"], state["log_probs"])


def first_argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, axis=-1)`` (the lowest index among ties) as a max and a masked min, which a CPU
    runs faster than ``argmax``'s single reduction over (value, index) pairs."""
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    is_max = logits == jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, ids, logits.shape[-1]), axis=-1)


def greedy(step_fn: StepFn, cache: Any, max_lengths: jax.Array, max_decode_length: int, *,
           start_id: int = 0, eos_id: int = 1, pad_id: int = 0, growth: Growth | None = None,
           drop_rows: tuple[int, ...] = ()) -> Decoded:
    """Greedy search: at each step every row takes its most probable token (the lowest id on a tie).

    ``cache`` is the initial cache for ``b = len(max_lengths)`` rows; ``max_lengths [b]`` bounds each row's
    output; ``max_decode_length`` is the static output width. See the module docstring for conventions.
    ``growth`` (:class:`Growth`) starts on a short cache. ``drop_rows``, decreasing row counts such as
    ``(b // 4, b // 16)``, drops finished rows: once no more rows than the next count are still going, the
    search goes on with that many (after the growth, if any), since every row costs a step the same, done
    or not. The results are the same either way.
    """
    return _one_token_per_step(step_fn, cache, max_lengths, max_decode_length,
                               lambda logits, step: first_argmax(logits), start_id=start_id,
                               eos_id=eos_id, pad_id=pad_id, growth=growth, drop_rows=drop_rows)


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


def sample(step_fn: StepFn, cache: Any, max_lengths: jax.Array, max_decode_length: int,
           rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           start_id: int = 0, eos_id: int = 1, pad_id: int = 0, growth: Growth | None = None) -> Decoded:
    """Ancestral sampling from the model, with temperature, top-k and top-p (see :func:`filter_logits`).

    ``temperature=0`` (a Python number) is greedy search. Step ``t`` draws with ``fold_in(rng, t)`` for the
    whole batch, so a fixed ``rng`` reproduces the samples (and rows cannot be dropped: a row's draw depends
    on its place in the batch). ``log_probs`` are under the model (raw logits), not under the filtered
    distribution.
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

    return _one_token_per_step(step_fn, cache, max_lengths, max_decode_length, choose, start_id=start_id,
                               eos_id=eos_id, pad_id=pad_id, growth=growth)


# ---------------------------------------------------------------------------------------------------------
# Beam search.
# ---------------------------------------------------------------------------------------------------------
def _block_size(vocab: int, largest: int = 128, smallest: int = 16) -> int:
    """The largest power of two from ``smallest`` to ``largest`` that divides ``vocab`` (0: none does)."""
    size = largest
    while size >= smallest and vocab % size:
        size //= 2
    return size if size >= smallest and size < vocab else 0


def best_extensions(logits: jax.Array, log_probs: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k`` of ``log_probs[:, :, None] + log_softmax(logits)`` flattened to ``[b, k * V]`` (the
    scores of every one-token extension of ``k`` beams) for ``logits [b, k, V]`` and ``log_probs [b, k]``:
    ``(values [b, count], flat ids [b, count])``, ties to the lowest id, as ``top_k`` of the whole array.

    A CPU's ``top_k`` of ``count`` among ``k * V`` costs a few times a pass over them, so it is taken by
    blocks of vocabulary (a power of two dividing ``V``): the blocks holding the best ``count`` extensions
    are among the ``count`` blocks of highest maximum (ties: lowest block), since every block above one of
    them holds an extension that ranks above it; the result is the ``top_k`` of those blocks' extensions,
    in their order in the whole array. Without such a block size it is ``top_k`` of the whole array.
    """
    batch, beams, vocab = logits.shape
    log_probs = log_probs[:, :, None]
    block = _block_size(vocab)
    if not block or count * block >= beams * vocab:
        extensions = log_probs + jax.nn.log_softmax(logits, axis=-1)
        return jax.lax.top_k(extensions.reshape(batch, beams * vocab), count)
    blocks = logits.reshape(batch, beams * vocab // block, block)
    block_max = jnp.max(blocks, axis=-1).reshape(batch, beams, vocab // block)
    row_max = jnp.max(block_max, axis=-1, keepdims=True)  # [b, k, 1]: each beam's largest logit.
    log_sum = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True))
    # Scores as jax.nn.log_softmax rounds them, (logit - max) - log_sum; increasing in the logit, so a
    # block's best is the score of its max.
    block_best = (log_probs + ((block_max - row_max) - log_sum)).reshape(batch, -1)
    _, chosen = jax.lax.top_k(block_best, count)
    chosen = jnp.sort(chosen, axis=-1)  # [b, count]: in the order of the whole array, for its ties.
    beam = chosen // (vocab // block)
    pick = lambda x: jnp.take_along_axis(x[:, :, 0], beam, axis=1)[:, :, None]  # noqa: E731  [b, count, 1]
    candidates = pick(log_probs) + ((jnp.take_along_axis(blocks, chosen[:, :, None], axis=1) - pick(row_max))
                                    - pick(log_sum))
    values, picks = jax.lax.top_k(candidates.reshape(batch, count * block), count)
    ids = jnp.take_along_axis(chosen, picks // block, axis=1) * block + picks % block
    return values, ids


def beam_search(step_fn: StepFn, cache: Any, max_lengths: jax.Array, max_decode_length: int, *,
                beam_size: int = 4, alpha: float = 0.6, start_id: int = 0, eos_id: int = 1,
                pad_id: int = 0, growth: Growth | None = None) -> Decoded:
    """Beam search with a separate set of finished hypotheses and the GNMT length penalty.

    ``max_lengths [b]`` bounds each sentence; ``cache`` is for ``b * beam_size`` rows, sentence-major (tile a
    per-sentence cache with :func:`tile_beams`); ``step_fn`` gets ``[b * beam_size, 1]`` tokens. Returns
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
        logits, cache = step_fn(state["alive_last"].reshape(batch * k, 1), state["cache"])
        vocab = logits.shape[-1]
        at_limit = (length >= max_lengths)[:, None]  # [b, 1]

        def extend(flat_ids):  # Sequences of the extensions with flat ids (beam * V + token) [b, k].
            beams, tokens = flat_ids // vocab, flat_ids % vocab
            seqs = jax.lax.dynamic_update_slice(state["alive_seqs"][sentence, beams], tokens[:, :, None],
                                                (0, 0, step))
            return beams, tokens, seqs

        # One top-k for both sets: the 2k best extensions hold the k best and, since only k of all
        # extensions end in EOS (one per beam), also the k best that do not. (The barrier keeps XLA from
        # rewriting a top-k whose result is sliced into a sort of the whole [b, k * V] array, far slower.)
        logits = logits.reshape(batch, k, vocab).astype(jnp.float32)
        candidate_log_probs, candidate_ids = jax.lax.optimization_barrier(
            best_extensions(logits, state["alive_log_probs"], min(2 * k, k * vocab)))

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
        cache = take_rows(cache, (sentence * k + alive_beams).reshape(-1))

        # 3. Early stopping: can the best alive hypothesis still beat the worst finished one?
        best_reachable = alive_log_probs[:, 0] / jnp.maximum(length_penalty(length + 1, alpha),
                                                             length_penalty(max_lengths, alpha))
        done = done | (best_reachable <= finished["finished_scores"][:, -1]) | (length >= max_lengths)
        return dict(step=length, alive_seqs=alive_seqs, alive_last=alive_tokens,
                    alive_log_probs=jnp.where(done[:, None], NEG_INF, alive_log_probs), done=done,
                    cache=cache, **finished)

    state = _run(advance, state, width, growth)
    return Decoded(state["finished_seqs"][:, 0], state["finished_lengths"][:, 0],
                   state["finished_log_probs"][:, 0], state["finished_scores"][:, 0])
