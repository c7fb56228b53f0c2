"""Scaled dot-product attention, multi-head attention and the masks they consume.

Masks are boolean arrays broadcastable to ``[batch, heads, query_length, key_length]``; ``True`` means "may
attend". They are built separately (padding, causal, packed-segment) and combined with a logical and, so a
reader can see exactly which positions each attention layer is allowed to use.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite import backend
from flaxformer_lite.layers import DenseGeneral, constrain, dropout, einsum, matmul

# Logical layout of per-head activations [batch, length, heads, head_dim] (see sharding.DEFAULT_AXIS_RULES).
_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")

# Added to the logits of masked positions. The float32 minimum makes exp() underflow to exactly 0, so masked
# keys get exactly zero weight, while a fully masked row stays finite (uniform) instead of NaN.
_MASKED_LOGIT = float(jnp.finfo(jnp.float32).min)



# ---------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------
def padding_mask(query_tokens: jax.Array, key_tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """``[b, 1, q, k]``: both the query and the key token are real (not ``pad_id``)."""
    q_real = query_tokens != pad_id
    k_real = key_tokens != pad_id
    return (q_real[:, None, :, None] & k_real[:, None, None, :])


def causal_mask(query_length: int, key_length: int | None = None) -> jax.Array:
    """``[1, 1, q, k]``: query ``i`` may attend to keys ``j <= i`` (the decoder cannot look ahead)."""
    key_length = query_length if key_length is None else key_length
    return jnp.tril(jnp.ones((query_length, key_length), dtype=jnp.bool_))[None, None]


def segment_mask(query_segment_ids: jax.Array, key_segment_ids: jax.Array) -> jax.Array:
    """``[b, 1, q, k]``: query and key belong to the same example of a packed row."""
    return query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical and of the given masks (``None`` entries are ignored; all ``None`` gives ``None``)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    combined = present[0]
    for m in present[1:]:
        combined = jnp.logical_and(combined, m)
    return combined


# ---------------------------------------------------------------------------------------------------------
# Scaled dot-product attention
# ---------------------------------------------------------------------------------------------------------
def _is_decoding_step(query: jax.Array, heads_first_kv: bool) -> bool:
    """One query position against a heads-first cache, on a backend that wants it as matrix-vector products
    (``[b, h, d] x [b, h, k, d]`` in float32 without the query axis: faster on a CPU, see ``backend``)."""
    return heads_first_kv and query.shape[1] == 1 and backend.matrix_vector_decoding()


def dot_product_attention_weights(query: jax.Array, key: jax.Array, mask: jax.Array | None = None, *,
                                  heads_first_kv: bool = False) -> jax.Array:
    """softmax(Q K^T / sqrt(d_k)) as float32 ``[b, h, q, k]``, for ``query [b, q, h, d_k]`` and
    ``key [b, k, h, d_k]`` (or ``[b, h, k, d_k]`` with ``heads_first_kv``, the layout of the decoding cache).

    The products may be in bfloat16, but logits are accumulated and the softmax is taken in float32: in
    bfloat16 the softmax of long rows loses most of its precision.
    """
    depth = query.shape[-1]
    query = query / jnp.asarray(math.sqrt(depth), query.dtype)
    if _is_decoding_step(query, heads_first_kv):
        logits = einsum("bhd,bhkd->bhk", query[:, 0].astype(jnp.float32), key.astype(jnp.float32))
        logits = logits[:, :, None, :]
    else:
        key_axes = "bhkd" if heads_first_kv else "bkhd"
        logits = matmul(f"bqhd,{key_axes}->bhqk", query, key, query.dtype, out_dtype="float32")
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED_LOGIT)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def fused_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
                    implementation: str) -> jax.Array:
    """softmax(Q K^T / sqrt(d_k)) V through ``jax.nn.dot_product_attention`` (``xla`` or ``cudnn``), for the
    layouts and masks of :func:`dot_product_attention` without ``heads_first_kv``. No probabilities come
    out, so no dropout on them. cuDNN refusing the case (shape, dtype, version) falls back to XLA's form."""
    if mask is not None and mask.ndim != 4:
        raise ValueError(f"attention masks are [b, h, q, k]; got shape {mask.shape}")
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as error:
            backend.warn_once(f"cuDNN attention does not take this case ({error}); using XLA's")
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    heads_first_kv: bool = False,
):
    """softmax(Q K^T / sqrt(d_k)) V for ``query [b, q, h, d_k]``, ``key/value [b, k, h, d_k|d_v]``.

    With ``heads_first_kv`` keys and values are ``[b, h, k, d]``: the decoding cache keeps that layout,
    in which the products need no transpose of the whole cache at every step.

    Dropout (when ``deterministic`` is False and the rate is positive) is applied to the attention
    probabilities, as in the reference implementation of the paper. With ``return_weights`` the
    probabilities before dropout are returned too, as ``(output, weights)``.
    """
    weights = dot_product_attention_weights(query, key, mask, heads_first_kv=heads_first_kv)
    probs = weights
    if not deterministic and dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("attention dropout needs a dropout_rng when deterministic=False")
        probs = dropout(probs, dropout_rate, dropout_rng)
    if _is_decoding_step(query, heads_first_kv):
        output = einsum("bhk,bhkd->bhd", probs[:, :, 0], value.astype(jnp.float32))
        output = output[:, None].astype(value.dtype)
    else:
        value_axes = "bhkd" if heads_first_kv else "bkhd"
        output = matmul(f"bhqk,{value_axes}->bqhd", probs, value, value.dtype)
    return (output, weights) if return_weights else output


class MultiHeadAttention(nn.Module):
    """Multi-head attention (paper, 3.2.2): project to heads, attend per head, concatenate, project back.

    Used as self-attention (``inputs_kv is inputs_q``) and as encoder-decoder attention. The projections
    have no bias by default, as in the paper. The attention probabilities are sown into the
    ``intermediates`` collection as ``attention_weights``; this costs nothing unless the caller makes that
    collection mutable.

    Incremental decoding (``decode=True``) keeps keys and values in the ``cache`` collection, which must be
    mutable; every cache entry is a plain array whose leading axis is the batch (or a scalar counter), so a
    beam search can gather or tile the cache along axis 0. Two kinds of cache:

    * ``static_kv=False`` (decoder self-attention): each call takes one new query position, appends its key
      and value at ``cache_index`` of ``cached_key``/``cached_value`` ``[b, h, max_length, d]`` (float32 on a
      CPU, the compute dtype elsewhere: ``backend.decoding_cache_dtype``) and attends over the positions filled so far. The cache is created by a call
      with ``decode=True`` on a full-length input (its shapes only: ``decoding.init_cache`` makes that
      call under ``jax.eval_shape`` and fills the cache with zeros).
    * ``static_kv=True`` (encoder-decoder attention): the keys and values come from a memory that is the
      same at every step (the encoder output), so they are projected once per sentence, not once per step.
      A call given ``inputs_kv`` projects it and stores the result as ``cached_key``/``cached_value``
      ``[b, h, s, d]``; a call with ``inputs_kv=None`` skips the key/value projections and attends over the
      stored ones. ``inputs_q=None`` only fills the cache (and returns ``None``): that is how a decoder
      primes its cache before the first step. A cache made by ``init`` holds projections under ``init``'s
      own fresh parameters: prime it, or give the first step ``inputs_kv``, with the real parameters.
    """

    num_heads: int  # Number of attention heads h.
    head_dim: int  # Size d_k = d_v of each head.
    dropout_rate: float = 0.0  # Dropout on the attention probabilities.
    use_bias: bool = False  # Biases on the Q/K/V/output projections (the paper has none).
    dtype: str = "float32"  # Compute dtype.
    param_dtype: str = "float32"  # Storage dtype of the projections.
    # "auto", "einsum", "xla" or "cudnn": see backend.attention_implementation. The einsum path is taken
    # anyway where probabilities are needed (attention dropout in training; weights sown for plotting).
    implementation: str = "auto"

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array | None,
        inputs_kv: jax.Array | None,
        mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        static_kv: bool = False,
    ) -> jax.Array | None:
        """Attends from ``inputs_q [b, q, d]`` to ``inputs_kv [b, k, d]`` under ``mask``.

        ``decode`` and ``static_kv`` select the incremental-decoding cache (see the class docstring). Only
        with ``decode=True, static_kv=True`` may ``inputs_kv`` be ``None`` (read the cached memory) or
        ``inputs_q`` be ``None`` (only store the memory). ``static_kv`` has no effect without ``decode``.
        """
        project = lambda name: lambda x: constrain(DenseGeneral(  # noqa: E731  (three identical projections)
            (self.num_heads, self.head_dim), ("embed",), ("heads", "kv"), use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x), *_HEADS)
        if decode and static_kv and inputs_q is None:
            self._static_cache(inputs_kv, project)
            return None
        if inputs_q is None or (inputs_kv is None and not (decode and static_kv)):
            raise ValueError("inputs_q/inputs_kv may be None only with decode=True and static_kv=True")
        d_model = inputs_q.shape[-1]
        query = project("query")(inputs_q)
        heads_first = False
        if decode and static_kv:
            key, value = self._static_cache(inputs_kv, project)
            heads_first = True
        else:
            key = project("key")(inputs_kv)
            value = project("value")(inputs_kv)
            if decode:
                key, value, mask, heads_first = self._update_cache(key, value, mask)

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        implementation = backend.attention_implementation(
            self.implementation, dtype=query.dtype, head_dim=self.head_dim,
            needs_probabilities=dropout_rng is not None or self.is_mutable_collection("intermediates"))
        if implementation != "einsum" and not heads_first:
            output = fused_attention(query, key, value, mask, implementation)
        else:
            output, weights = dot_product_attention(
                query, key, value, mask, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
                deterministic=deterministic, return_weights=True, heads_first_kv=heads_first)
            self.sow("intermediates", "attention_weights", weights)
        output = constrain(output, *_HEADS)

        return DenseGeneral((d_model,), ("heads", "kv"), ("embed",), use_bias=self.use_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="out")(output)

    def _update_cache(self, key: jax.Array, value: jax.Array, mask: jax.Array | None):
        """Writes this step's key/value at the cache index; returns the whole cache to attend over, its mask
        and whether it is heads-first (the cache is; the full-length call that creates it returns its input)."""
        initialized = self.has_variable("cache", "cached_key")
        cache_dtype = backend.decoding_cache_dtype(self.dtype)
        as_cached = lambda x: jnp.swapaxes(x, 1, 2).astype(cache_dtype)  # noqa: E731  [b, h, t, d]
        cached_key = self.variable("cache", "cached_key", jnp.zeros, as_cached(key).shape, cache_dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, as_cached(value).shape, cache_dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:  # The creating call: the full-length input only fixes the cache shapes.
            return key, value, mask, False
        batch, heads, max_length, depth = cached_key.value.shape
        if key.shape != (batch, 1, heads, depth):
            raise ValueError(f"decode=True takes one position per call: expected keys of shape "
                             f"{(batch, 1, heads, depth)}, got {key.shape}")
        index = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, as_cached(key), (0, 0, index, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, as_cached(value), (0, 0, index, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + 1
        filled = (jnp.arange(max_length) <= index)[None, None, None, :]
        return key, value, combine_masks(mask, filled), True

    def _static_cache(self, inputs_kv: jax.Array | None, project):
        """Keys/values of a memory that does not change between steps: projected once, then read back."""
        if inputs_kv is not None:  # Stored heads-first, [b, h, s, d], as the self-attention cache.
            cache_dtype = backend.decoding_cache_dtype(self.dtype)
            key = jnp.swapaxes(project("key")(inputs_kv), 1, 2).astype(cache_dtype)
            value = jnp.swapaxes(project("value")(inputs_kv), 1, 2).astype(cache_dtype)
            cached_key = self.variable("cache", "cached_key", lambda: key)
            cached_value = self.variable("cache", "cached_value", lambda: value)
            cached_key.value, cached_value.value = key, value
            return key, value
        if not self.has_variable("cache", "cached_key"):
            raise ValueError("static_kv decoding with inputs_kv=None needs a cache holding the projected "
                             "memory: give inputs_kv (the encoder output) first")
        return self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
