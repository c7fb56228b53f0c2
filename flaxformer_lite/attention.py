"""Scaled dot-product attention, multi-head attention and the masks they consume.

Masks are boolean arrays broadcastable to ``[batch, heads, query_length, key_length]``; ``True`` means "may
attend". They are built separately (padding, causal, packed-segment) and combined with a logical and, so a
reader can see exactly which positions each attention layer is allowed to use.
"""

from __future__ import annotations

import enum
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite import backend
from flaxformer_lite.layers import DenseGeneral, constrain, dropout, einsum, policy_einsum

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
        logits = policy_einsum(f"bqhd,{key_axes}->bhqk", query, key, query.dtype, out_dtype="float32")
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
        output = policy_einsum(f"bhqk,{value_axes}->bqhd", probs, value, value.dtype)
    return (output, weights) if return_weights else output


def grouped_step_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                           mask: jax.Array | None) -> jax.Array:
    """Attention of ``query [g * n, q, h, d]`` over heads-first ``key/value [n, h, s, d]`` shared by ``g``
    consecutive query rows (the beams of a sentence over its encoder keys/values), under a mask of ``n``
    rows: each key is read once per sentence, by one matrix product of the ``g * q`` queries, not once per
    beam. Float32 products and softmax, no dropout (decoding)."""
    rows, length, heads, depth = query.shape
    batch = key.shape[0]
    if rows % batch:
        raise ValueError(f"{rows} query rows are not a multiple of the {batch} rows of the keys/values")
    query = jnp.swapaxes(query.reshape(batch, rows // batch * length, heads, depth), 1, 2)  # [n, h, gq, d]
    query = query.astype(jnp.float32) / math.sqrt(depth)
    logits = einsum("bhqd,bhkd->bhqk", query, key.astype(jnp.float32))
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED_LOGIT)
    output = einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), value.astype(jnp.float32))
    return jnp.swapaxes(output, 1, 2).reshape(rows, length, heads, depth).astype(value.dtype)


class Mode(enum.Enum):
    """What a :class:`MultiHeadAttention` call does (``mode=``); each mode takes the inputs it names.

    * ``FULL``: training and the encoder: attends from ``inputs_q`` to ``inputs_kv``, no cache.
    * ``SELF_STEP``: one decoding step of self-attention: appends the key/value of the one new position of
      ``inputs_q`` to the ``cache`` collection and attends over the positions filled so far.
    * ``CROSS_STEP``: one decoding step of encoder-decoder attention: attends from ``inputs_q`` over the
      keys/values stored by ``PROJECT_CROSS_KV`` (the ``cross_kv`` collection), projecting nothing.
    * ``PROJECT_CROSS_KV``: projects ``inputs_kv`` (the encoder output) into keys/values and stores them in
      the ``cross_kv`` collection; no query, returns ``None``.
    """

    FULL = "full"
    SELF_STEP = "self_step"
    CROSS_STEP = "cross_step"
    PROJECT_CROSS_KV = "project_cross_kv"


# Which inputs each mode takes: (inputs_q, inputs_kv).
_MODE_INPUTS = {Mode.FULL: (True, True), Mode.SELF_STEP: (True, False), Mode.CROSS_STEP: (True, False),
                Mode.PROJECT_CROSS_KV: (False, True)}


class MultiHeadAttention(nn.Module):
    """Multi-head attention (paper, 3.2.2): project to heads, attend per head, concatenate, project back.

    Used as self-attention (``inputs_kv is inputs_q``) and as encoder-decoder attention. The projections
    have no bias by default, as in the paper. The attention probabilities are sown into the
    ``intermediates`` collection as ``attention_weights``; this costs nothing unless the caller makes that
    collection mutable.

    Incremental decoding keeps keys and values in two collections (see :class:`Mode`), each entry a plain
    array whose leading axis is the batch (or a scalar counter), so a search can gather, tile or drop rows
    along axis 0:

    * ``cache`` (``Mode.SELF_STEP``, decoder self-attention; must be mutable): each step appends its key and
      value at ``cache_index`` of ``cached_key``/``cached_value`` ``[b, h, max_length, d]`` (float32 on a
      CPU, the compute dtype elsewhere: ``backend.decoding_cache_dtype``). A ``SELF_STEP`` call that finds
      no cache creates it from its input's length, and only that (``decoding.init_cache`` makes that call
      on a full-length input under ``jax.eval_shape`` and fills the cache with zeros).
    * ``cross_kv`` (``Mode.PROJECT_CROSS_KV`` writes it, ``Mode.CROSS_STEP`` reads it): the encoder-decoder
      attention's ``key``/``value`` ``[b, h, s, d]``, projected from the encoder output once per sentence,
      since it is the same at every step. A ``CROSS_STEP`` query may have ``g * b`` rows, the ``g`` beams
      of each sentence in a row, which then share its keys/values and mask (:func:`grouped_step_attention`).
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
        inputs_kv: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        mode: Mode = Mode.FULL,
    ) -> jax.Array | None:
        """Attends from ``inputs_q [b, q, d]`` to ``inputs_kv [b, k, d]`` (``Mode.FULL``) under ``mask``,
        or does the decoding step ``mode`` names (see :class:`Mode` for the inputs each one takes)."""
        if not isinstance(mode, Mode):
            raise ValueError(f"attention mode {mode!r} is not one of {[m.name for m in Mode]}")
        for name, value, wanted in zip(("inputs_q", "inputs_kv"), (inputs_q, inputs_kv), _MODE_INPUTS[mode]):
            if (value is not None) != wanted:
                raise ValueError(f"attention mode {mode.name} {'needs' if wanted else 'takes no'} {name}")
        project = lambda name: lambda x: constrain(DenseGeneral(  # noqa: E731  (three identical projections)
            (self.num_heads, self.head_dim), ("embed",), ("heads", "kv"), use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x), *_HEADS)
        if mode is Mode.PROJECT_CROSS_KV:
            self._project_cross_kv(inputs_kv, project)
            return None
        d_model = inputs_q.shape[-1]
        query = project("query")(inputs_q)
        heads_first = False
        if mode is Mode.CROSS_STEP:
            if not self.has_variable("cross_kv", "key"):
                raise ValueError("attention mode CROSS_STEP needs the cross_kv collection: project the encoder "
                                 "output with Mode.PROJECT_CROSS_KV first")
            key, value = self.get_variable("cross_kv", "key"), self.get_variable("cross_kv", "value")
            heads_first = True
        else:
            source = inputs_q if mode is Mode.SELF_STEP else inputs_kv
            key = project("key")(source)
            value = project("value")(source)
            if mode is Mode.SELF_STEP:
                key, value, mask, heads_first = self._update_cache(key, value, mask)

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        implementation = backend.attention_implementation(
            self.implementation, dtype=query.dtype, head_dim=self.head_dim,
            needs_probabilities=dropout_rng is not None or self.is_mutable_collection("intermediates"))
        if mode is Mode.CROSS_STEP and query.shape[0] != key.shape[0]:
            output = grouped_step_attention(query, key, value, mask)
        elif implementation != "einsum" and not heads_first:
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
            raise ValueError(f"attention mode SELF_STEP takes one position per call: expected keys of shape "
                             f"{(batch, 1, heads, depth)}, got {key.shape}")
        index = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, as_cached(key), (0, 0, index, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, as_cached(value), (0, 0, index, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + 1
        filled = (jnp.arange(max_length) <= index)[None, None, None, :]
        return key, value, combine_masks(mask, filled), True

    def _project_cross_kv(self, inputs_kv: jax.Array, project) -> None:
        """Stores the keys/values of the encoder output, heads-first ``[b, h, s, d]`` as the self-attention
        cache, in the ``cross_kv`` collection (which must be mutable)."""
        cache_dtype = backend.decoding_cache_dtype(self.dtype)
        for name in ("key", "value"):
            projected = jnp.swapaxes(project(name)(inputs_kv), 1, 2).astype(cache_dtype)
            self.put_variable("cross_kv", name, projected)
