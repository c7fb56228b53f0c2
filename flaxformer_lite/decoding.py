"""Decoding with a Transformer: the options, the encoder's keys/values, the step function, and the searches.

The parts, each usable alone (``search`` holds the model-free searches):

1. :func:`encode_cross_kv` encodes the sources once and projects every decoder layer's encoder-decoder
   ("cross") attention keys/values from them (:func:`project_cross_kv`): the ``cross_kv`` collection of
   the model, fixed for a sentence.
2. :func:`init_cache` makes the self-attention cache (the ``cache`` collection) at zero.
3. :func:`decode_step` is one step: ``(tokens [n, 1], cache) -> (logits [n, V], cache)`` given the
   ``cross_kv`` and the sources (for their padding mask).
4. :func:`decode_batch` runs a search over them with the options of a :class:`DecodeConfig`.

Token ids: 0 = pad (also the decoder start token), ``DecodeConfig.eos_id`` (1) = EOS. Sentence ``i`` emits
at most its number of non-pad source tokens + ``extra_length`` (50) tokens, within a static width of the
padded source width + ``extra_length`` unless ``max_decode_length`` is given (see ``search`` for the output
conventions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flaxformer_lite import search
from flaxformer_lite.search import Decoded
from flaxformer_lite.transformer import Transformer

METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to turn a model into translations: the search and its speed-ups (which change no result)."""

    method: str = "beam"  # "greedy", "beam" or "sample".
    beam_size: int = 4  # Beams per sentence (paper: 4).
    alpha: float = 0.6  # GNMT length penalty exponent (paper: 0.6); 0 ranks by log-probability alone.
    temperature: float = 1.0  # Sampling temperature.
    top_k: int = 0  # Sample among the k most likely tokens; 0 disables.
    top_p: float = 1.0  # Sample within the smallest set of tokens whose probability reaches p; 1 disables.
    extra_length: int = 50  # Longest output = source length + this (paper: 50).
    seed: int = 0  # Sampling seed.
    # Speed: the first this many steps run on a self-attention cache of this length, grown to the full
    # width only if some sentence goes on (a step's cost grows with its cache). 0: full width from the start.
    first_cache_length: int = 32
    # Speed, greedy search only: drop finished rows, going on with b // 4, then b // 16, ... rows of a batch
    # of b as they finish (none fewer than this; every row costs a step, done or not). 0: never.
    min_rows: int = 8
    max_decode_length: int = 0  # Static output width; 0: the padded source width + extra_length.
    eos_id: int = 1  # End-of-sentence id; one that matches no token (-1) decodes every row to its limit.

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"decode method {self.method!r} is not one of {METHODS}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        for name in ("extra_length", "first_cache_length", "min_rows", "max_decode_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"DecodeConfig.{name} must be >= 0, got {getattr(self, name)}")


def _model_variables(variables: Any) -> dict:
    """``{'params': ...}`` (also from the bare params), without any decoding collection."""
    if "params" not in variables:
        variables = {"params": variables}
    return {name: value for name, value in variables.items() if name not in ("cache", "cross_kv")}


def project_cross_kv(model: Transformer, variables: Any, encoded: jax.Array) -> Any:
    """Every decoder layer's encoder-decoder attention keys/values ``[b, h, s, d]``, projected from the
    encoder output ``encoded [b, s, d_model]`` (the model's ``cross_kv`` collection)."""
    _, mutated = model.apply(_model_variables(variables), encoded, method=Transformer.project_cross_kv,
                             mutable=["cross_kv"])
    return mutated["cross_kv"]


def encode_cross_kv(model: Transformer, variables: Any, inputs: jax.Array, *,
                    source_width: int | None = None) -> Any:
    """Encodes ``inputs [b, s]`` and projects the encoder output into :func:`project_cross_kv`.

    With ``source_width`` the keys/values are padded to that many source positions (masked, as the sources'
    own padding): sources cut to their batch's longest are encoded at that width and decoded at one shape
    for a whole split (see ``translation.make_decode_fn``).
    """
    variables = _model_variables(variables)
    cross_kv = project_cross_kv(model, variables, model.apply(variables, inputs, method=Transformer.encode))
    if source_width is None or source_width == inputs.shape[1]:
        return cross_kv
    return jax.tree_util.tree_map(
        lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, source_width - x.shape[2]), (0, 0))), cross_kv)


def init_cache(model: Transformer, variables: Any, rows: int, length: int) -> Any:
    """The self-attention cache (the ``cache`` collection) for ``rows`` rows and ``length`` steps, at zero:
    keys/values ``[rows, h, length, d]`` and the step counters. The shapes come from ``jax.eval_shape`` of a
    ``length``-long step (which creates the cache and computes nothing)."""
    variables = _model_variables(variables)

    def make():
        cross_kv = project_cross_kv(model, variables, jnp.zeros((rows, 1, model.config.d_model)))
        return model.apply({**variables, "cross_kv": cross_kv}, jnp.ones((rows, 1), jnp.int32),
                           jnp.zeros((rows, length), jnp.int32), method=Transformer.decode_step,
                           mutable=["cache"])[1]["cache"]

    return jax.tree_util.tree_map(lambda shape: jnp.zeros(shape.shape, shape.dtype), jax.eval_shape(make))


def grow_cache(cache: Any, length: int) -> Any:
    """The self-attention cache padded to ``length`` steps (keys/values ``[n, h, t, d]``; counters kept)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0))) if jnp.ndim(x) else x, cache)


def decode_step(model: Transformer, variables: Any, cross_kv: Any, inputs: jax.Array, tokens: jax.Array,
                cache: Any) -> tuple[jax.Array, Any]:
    """One decoding step of ``tokens [n, 1]``: logits ``[n, V]`` and the new self-attention cache.
    ``cross_kv`` is read, never changed; ``inputs`` (the sources, as many rows as the ``cross_kv``: ``n``, or
    ``n / g`` for ``g`` beams per sentence) give its padding mask."""
    logits, mutated = model.apply({**_model_variables(variables), "cache": cache, "cross_kv": cross_kv}, inputs,
                                  tokens, method=Transformer.decode_step, mutable=["cache"])
    return logits[:, -1], mutated["cache"]


def source_limits(inputs: jax.Array, *, pad_id: int = 0, extra_length: int = 50,
                  max_decode_length: int | None = None) -> tuple[jax.Array, int]:
    """``(max_lengths [b], max_decode_length)``: each sentence may emit its non-pad source length +
    ``extra_length`` tokens, within a static width of ``inputs.shape[1] + extra_length`` unless given.

    An all-pad row (the filler of a last, partial batch; a real source holds at least its EOS) gets 0: it
    is finished from the start instead of decoding ``extra_length`` steps of nothing.
    """
    width = inputs.shape[1] + extra_length if not max_decode_length else max_decode_length
    source_lengths = jnp.sum(inputs != pad_id, axis=1, dtype=jnp.int32)
    return jnp.where(source_lengths > 0, jnp.minimum(source_lengths + extra_length, width), 0), width


def drop_row_counts(batch: int, min_rows: int) -> tuple[int, ...]:
    """The row counts greedy search goes on with as rows finish (``DecodeConfig.min_rows``): ``batch // 4``,
    ``batch // 16``, ... while at least ``min_rows``; none for ``min_rows=0``."""
    counts, size = [], batch // 4
    while 0 < min_rows <= size:
        counts, size = counts + [size], size // 4
    return tuple(counts)


def decode_batch(model: Transformer, variables: Any, inputs: jax.Array, options: DecodeConfig = DecodeConfig(),
                 *, rng: jax.Array | None = None, cross_kv: Any = None) -> Decoded:
    """Translates a batch of padded sources ``inputs [b, s]`` with a :class:`Transformer`, as ``options`` say.

    ``variables`` is ``{'params': ...}`` (or the params themselves); ``rng`` is needed for sampling.
    ``cross_kv`` is what :func:`encode_cross_kv` returns for ``inputs``, when the caller has it
    (``translation.make_decode_fn`` encodes each batch at its own width). Returns :class:`Decoded` with
    ``tokens [b, width]``.

    Beam search and sampling close their step over the ``cross_kv`` (and the sources), so the search carries,
    and beam search reorders, only the self-attention cache; under beam search they keep one row per
    sentence, which all its beams read. Greedy search that drops finished rows carries
    them with the rows instead, since they are dropped with them.

    Jit it by closing over the static arguments, e.g.
    ``jax.jit(lambda v, x: decode_batch(model, v, x, DecodeConfig(method='greedy')))``, with shardings.
    """
    if not isinstance(options, DecodeConfig):
        raise TypeError(f"decode_batch takes a DecodeConfig, got {type(options).__name__}")
    if options.method == "sample" and rng is None:
        raise ValueError("method='sample' needs an rng")
    cfg = model.config
    variables = _model_variables(variables)
    inputs = jnp.asarray(inputs, jnp.int32)
    max_lengths, width = source_limits(inputs, pad_id=cfg.pad_id, extra_length=options.extra_length,
                                       max_decode_length=options.max_decode_length)
    if cfg.position_embedding == "learned" and width > cfg.max_length:
        raise ValueError(f"max_decode_length={width} exceeds the learned position table "
                         f"(max_length={cfg.max_length})")
    if cross_kv is None:
        cross_kv = encode_cross_kv(model, variables, inputs)  # Once per sentence, before beams are tiled.

    first = min(options.first_cache_length, width) if options.first_cache_length > 0 else width
    cache = init_cache(model, variables, inputs.shape[0], first)
    growth = search.Growth(first, lambda c: grow_cache(c, width)) if first < width else None
    common = dict(start_id=cfg.decoder_start_id, eos_id=options.eos_id, pad_id=cfg.pad_id)
    drop_rows = drop_row_counts(inputs.shape[0], options.min_rows) if options.method == "greedy" else ()

    if drop_rows:  # The cross_kv and sources travel with their rows.
        def carried_step(tokens, carried):
            logits, steps = decode_step(model, variables, carried["cross_kv"], carried["inputs"], tokens,
                                        carried["cache"])
            return logits, {**carried, "cache": steps}

        carried = {"cache": cache, "cross_kv": cross_kv, "inputs": inputs}
        carried_growth = growth and search.Growth(first, lambda c: {**c, "cache": growth.grow(c["cache"])})
        return search.greedy(carried_step, carried, max_lengths, width, growth=carried_growth,
                             drop_rows=drop_rows, **common)

    if options.method == "beam":  # Only the cache: the beams of a sentence share its cross_kv and mask.
        cache = search.tile_beams(cache, options.beam_size)

    def step(tokens, cache):  # Closes over cross_kv: reordering it with the beams at every step is costly.
        return decode_step(model, variables, cross_kv, inputs, tokens, cache)

    if options.method == "greedy":
        return search.greedy(step, cache, max_lengths, width, growth=growth, **common)
    if options.method == "beam":
        return search.beam_search(step, cache, max_lengths, width, beam_size=options.beam_size,
                                  alpha=options.alpha, growth=growth, **common)
    return search.sample(step, cache, max_lengths, width, rng, temperature=options.temperature,
                         top_k=options.top_k, top_p=options.top_p, growth=growth, **common)
