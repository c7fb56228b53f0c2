"""Building blocks shared by attention and the Transformer: projections, embeddings, positions, feed-forward.

Every parameter is created through :func:`param_with_axes`, so it carries logical axis names (``vocab``,
``embed``, ``heads``, ``kv``, ``mlp``, ``position``) that the sharding rules of the training code map onto the
device mesh. All matrix products go through :func:`matmul`, so there is one place that decides how the
compute dtype is used.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]


def param_with_axes(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: str,
) -> jax.Array:
    """Creates a parameter whose metadata holds one logical axis name per dimension."""
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(axes)} axis names {tuple(axes)} for a {len(shape)}-d shape {shape}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.dtype(dtype))


def matmul(equation: str, x: jax.Array, kernel: jax.Array, dtype: str) -> jax.Array:
    """``einsum`` of activations and a kernel, both cast to the compute dtype."""
    return jnp.einsum(equation, x.astype(dtype), kernel.astype(dtype))


class DenseGeneral(nn.Module):
    """A linear map over the last ``len(in_axes)`` input axes onto ``features`` output axes.

    Attention uses it with several output axes (``embed -> heads x kv``) and several input axes
    (``heads x kv -> embed``); the feed-forward block uses it as a plain dense layer. Xavier-uniform
    initialization counts all input axes as fan-in and all output axes as fan-out.
    """

    features: tuple[int, ...]  # Sizes of the output axes.
    in_axes: tuple[str, ...]  # Logical names of the contracted input axes (the last axes of x).
    out_axes: tuple[str, ...]  # Logical names of the output axes, one per entry of `features`.
    use_bias: bool = False  # Whether to add a bias over the output axes.
    dtype: str = "float32"  # Compute dtype.
    param_dtype: str = "float32"  # Storage dtype of kernel and bias.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = len(self.in_axes), len(self.features)
        in_shape = x.shape[x.ndim - n_in:]
        init = nn.initializers.xavier_uniform(
            in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = param_with_axes(self, "kernel", init, (*in_shape, *self.features),
                                 (*self.in_axes, *self.out_axes), self.param_dtype)
        letters = "abcdefghijklmnopqrstuvw"
        batch = letters[: x.ndim - n_in]
        contracted = "xyz"[:n_in]
        out = letters[x.ndim - n_in: x.ndim - n_in + n_out]
        y = matmul(f"{batch}{contracted},{contracted}{out}->{batch}{out}", x, kernel, self.dtype)
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, self.features, self.out_axes,
                                   self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """Layer normalization with logically named scale and bias; statistics are computed in float32."""

    epsilon: float = 1e-6  # Added to the variance before the square root.
    dtype: str = "float32"  # Output dtype.
    param_dtype: str = "float32"  # Storage dtype of scale and bias.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (features,), ("embed",), self.param_dtype)
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (features,), ("embed",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding; ``attend`` reuses it as the output projection (the paper's shared weights, 3.4).

    The table is initialized with standard deviation ``features ** -0.5`` and looked-up vectors are
    multiplied by ``sqrt(features)`` (paper, 3.4), so inputs have unit scale, and ``x @ E^T`` on unit-scale
    decoder outputs gives logits of unit scale without a further factor.
    """

    num_embeddings: int  # Vocabulary size.
    features: int  # Embedding width (d_model).
    scale_by_sqrt_features: bool = True  # Multiply looked-up vectors by sqrt(features), as the paper does.
    dtype: str = "float32"  # Compute dtype.
    param_dtype: str = "float32"  # Storage dtype of the table.

    def setup(self):
        init = nn.initializers.normal(stddev=self.features ** -0.5)
        self.embedding = param_with_axes(self, "embedding", init, (self.num_embeddings, self.features),
                                         ("vocab", "embed"), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, ids, axis=0).astype(self.dtype)
        if self.scale_by_sqrt_features:
            x = x * jnp.asarray(math.sqrt(self.features), self.dtype)
        return x

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits ``x @ E^T`` over the vocabulary."""
        return matmul("...d,vd->...v", x, self.embedding, self.dtype)


def sinusoidal_encoding(positions: jax.Array, features: int, max_timescale: float = 10_000.0) -> jax.Array:
    """The paper's encoding: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).

    Computed from explicit positions rather than taken from a table prefix, so packed rows (positions restart
    at every example) and incremental decoding (one position per step) get the right values.
    """
    if features % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {features}")
    inv_freq = 1.0 / (max_timescale ** (np.arange(0, features, 2, dtype=np.float32) / features))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., d/2]
    # Interleave sin (even dims) and cos (odd dims) exactly as the formula indexes them.
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, features)


class PositionalEncoding(nn.Module):
    """Adds position information to embeddings: the paper's sinusoids, or a learned table."""

    kind: str  # "sinusoidal" (paper) or "learned".
    max_length: int  # Rows of the learned table; positions must be smaller.
    dtype: str = "float32"  # Compute dtype.
    param_dtype: str = "float32"  # Storage dtype of the learned table.

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        features = x.shape[-1]
        if self.kind == "sinusoidal":
            table = sinusoidal_encoding(positions, features)
        elif self.kind == "learned":
            init = nn.initializers.normal(stddev=0.02)  # BERT's and flax examples/wmt's choice.
            table = param_with_axes(self, "pos_embedding", init, (self.max_length, features),
                                    ("position", "embed"), self.param_dtype)
            table = jnp.take(table, positions, axis=0)
        else:
            raise ValueError(f"unknown position encoding {self.kind!r}: expected 'sinusoidal' or 'learned'")
        return x + table.astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,  # The paper's choice.
    "gelu": nn.gelu,  # Common in later models (BERT, GPT).
}


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2 (paper, 3.3), with dropout on the hidden activations."""

    d_ff: int  # Hidden width.
    activation: str = "relu"  # Key of ACTIVATIONS.
    dropout_rate: float = 0.0  # Dropout on the hidden activations.
    dtype: str = "float32"  # Compute dtype.
    param_dtype: str = "float32"  # Storage dtype.

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: expected one of {sorted(ACTIVATIONS)}")
        d_model = x.shape[-1]
        h = DenseGeneral((self.d_ff,), ("embed",), ("mlp",), use_bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="wi")(x)
        h = ACTIVATIONS[self.activation](h)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return DenseGeneral((d_model,), ("mlp",), ("embed",), use_bias=True, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="wo")(h)
