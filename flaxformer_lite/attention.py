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

from flaxformer_lite.layers import DenseGeneral

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
def dot_product_attention_weights(query: jax.Array, key: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(Q K^T / sqrt(d_k)) as float32 ``[b, h, q, k]``, for inputs ``[b, q|k, h, d_k]``.

    The products may be in bfloat16, but logits are accumulated and the softmax is taken in float32: in
    bfloat16 the softmax of long rows loses most of its precision.
    """
    depth = query.shape[-1]
    query = query / jnp.asarray(math.sqrt(depth), query.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED_LOGIT)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


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
):
    """softmax(Q K^T / sqrt(d_k)) V for ``query [b, q, h, d_k]``, ``key/value [b, k, h, d_k|d_v]``.

    Dropout (when ``deterministic`` is False and the rate is positive) is applied to the attention
    probabilities, as in the reference implementation of the paper. With ``return_weights`` the
    probabilities before dropout are returned too, as ``(output, weights)``.
    """
    weights = dot_product_attention_weights(query, key, mask)
    probs = weights
    if not deterministic and dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("attention dropout needs a dropout_rng when deterministic=False")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    output = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(value.dtype), value)
    return (output, weights) if return_weights else output


class MultiHeadAttention(nn.Module):
    """Multi-head attention (paper, 3.2.2): project to heads, attend per head, concatenate, project back.

    Used as self-attention (``inputs_kv is inputs_q``) and as encoder-decoder attention. The projections
    have no bias by default, as in the paper. With ``decode=True`` the layer keeps the keys and values of
    the steps decoded so far in the ``cache`` collection and takes one new position per call (initialize
    the cache by calling ``init`` with ``decode=True`` on a full-length input). The attention probabilities
    are sown into the ``intermediates`` collection as ``attention_weights``; this costs nothing unless the
    caller makes that collection mutable.
    """

    num_heads: int  # Number of attention heads h.
    head_dim: int  # Size d_k = d_v of each head.
    dropout_rate: float = 0.0  # Dropout on the attention probabilities.
    use_bias: bool = False  # Biases on the Q/K/V/output projections (the paper has none).
    dtype: str = "float32"  # Compute dtype.
    param_dtype: str = "float32"  # Storage dtype of the projections.

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        d_model = inputs_q.shape[-1]
        project = lambda name: DenseGeneral(  # noqa: E731  (three identical projections)
            (self.num_heads, self.head_dim), ("embed",), ("heads", "kv"), use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        query = project("query")(inputs_q)
        key = project("key")(inputs_kv)
        value = project("value")(inputs_kv)

        if decode:
            key, value, mask = self._update_cache(key, value, mask)

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        output, weights = dot_product_attention(
            query, key, value, mask, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
            deterministic=deterministic, return_weights=True)
        self.sow("intermediates", "attention_weights", weights)

        return DenseGeneral((d_model,), ("heads", "kv"), ("embed",), use_bias=self.use_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="out")(output)

    def _update_cache(self, key: jax.Array, value: jax.Array, mask: jax.Array | None):
        """Writes this step's key/value at the cache index and returns the whole cache to attend over."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:  # Called by init: the full-length input only fixes the cache shapes.
            return key, value, mask
        batch, max_length, heads, depth = cached_key.value.shape
        if key.shape != (batch, 1, heads, depth):
            raise ValueError(f"decode=True takes one position per call: expected keys of shape "
                             f"{(batch, 1, heads, depth)}, got {key.shape}")
        index = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + 1
        filled = (jnp.arange(max_length) <= index)[None, None, None, :]
        return key, value, combine_masks(mask, filled)
