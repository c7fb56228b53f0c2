"""Building blocks shared by attention and the Transformer: projections, embeddings, positions, feed-forward.

Every parameter is created through :func:`param_with_axes`, so it carries logical axis names (``vocab``,
``embed``, ``heads``, ``kv``, ``mlp``, ``position``) that the sharding rules of the training code map onto the
device mesh. All matrix products, attention's included, go through :func:`policy_einsum`, so there is one
place that decides how the compute dtype is used and how gradients are computed.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import backend

Initializer = Callable[..., jax.Array]


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """Asks for ``x`` to be laid out by logical axis names (``activation_batch``, ``activation_heads``...).

    Binds only under ``sharding.activation_rules`` (the training and decoding programs on a mesh); elsewhere
    it returns ``x`` unchanged. Without such hints XLA propagates the parameters' FSDP layout into the
    activations and reshards them back and forth ("involuntary full rematerialization").
    """
    return nn.with_logical_constraint(x, axes)


def param_with_axes(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: str,
) -> jax.Array:
    """Creates a parameter whose metadata holds one logical axis name per dimension.

    When the parameter exists (``apply``), it is returned after a shape check, without ``Module.param``:
    that traces the initializer again at every use only to check the shape, which slows tracing.
    """
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(axes)} axis names {tuple(axes)} for a {len(shape)}-d shape {shape}")
    if module.has_variable("params", name):
        value = nn.meta.unbox(module.get_variable("params", name))
        if np.shape(value) != tuple(shape):
            raise ValueError(f"parameter {'/'.join(module.path + (name,))} has shape {np.shape(value)}; the "
                             f"model's config needs {tuple(shape)}")
        return value
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.dtype(dtype))


def policy_einsum(equation: str, x: jax.Array, y: jax.Array, dtype: str,
                  out_dtype: str | None = None) -> jax.Array:
    """An einsum under the model's dtype policy, with its gradient products in a CPU-friendly operand order.

    ``einsum(equation, x, y)`` with both operands in the compute ``dtype``, accumulated in float32.

    The result is cast to ``out_dtype`` (default: ``dtype``). ``equation`` names every axis explicitly (no
    ``...``), and every axis appears in at least two of its three terms, as in any projection or attention
    product. Every matrix product of the model, forward and backward, goes through here, for two reasons
    that matter on CPUs (``experiments/benchmark.py``):

    * bfloat16 operands with a float32 result use the fast bfloat16 units, while a bfloat16 result is
      slower than float32; autodiff of a plain ``einsum`` would run the backward products with one float32
      and one bfloat16 operand, that is in float32. The custom gradient below keeps all three products of
      every matmul in the fast form.
    * The gradient of the weights is computed as ``x^T g`` (activations on the left), which XLA runs without
      first transposing a large gradient (for the output projection, a ``tokens x vocabulary`` one).
    """
    return _policy_einsum(equation, jnp.dtype(dtype), jnp.dtype(out_dtype or dtype), x.astype(dtype),
                          y.astype(dtype))


def _product(equation: str, x: jax.Array, y: jax.Array, dtype, out_dtype) -> jax.Array:
    return einsum(equation, x.astype(dtype), y.astype(dtype), jnp.float32).astype(out_dtype)


def einsum(equation: str, x: jax.Array, y: jax.Array, preferred_element_type=None) -> jax.Array:
    """``jnp.einsum(equation, x, y)``, as the very ``lax.dot_general`` (and transpose) it emits, for
    equations whose every axis appears in two of the three terms.

    ``jnp.einsum`` plans its contraction (opt_einsum) and enters a nested ``jit`` at every call, and the
    model makes many calls per traced decoder step: this form lowers faster into the same program. Same
    program matters: the operand order decides which products XLA's CPU backend can run in bfloat16 at all
    (see ``_ordered_product``).
    """
    swap, dimension_numbers, permutation = _dot_plan(equation)
    if swap:
        x, y = y, x
    result = jax.lax.dot_general(x, y, dimension_numbers, preferred_element_type=preferred_element_type)
    return result if permutation is None else jax.lax.transpose(result, permutation)


@functools.lru_cache(maxsize=None)
def _dot_plan(equation: str) -> tuple[bool, tuple, tuple[int, ...] | None]:
    """(swap the operands?, dot_general dimension numbers, output permutation or None), as ``jnp.einsum``
    chooses them: batch axes in output order, contracted axes sorted; the first operand on the left unless
    the other order needs no transpose."""
    inputs, out = equation.split("->")
    x_axes, y_axes = inputs.split(",")
    for axis in x_axes + y_axes:
        if (axis in x_axes) + (axis in y_axes) + (axis in out) < 2:
            raise ValueError(f"einsum {equation!r}: axis {axis!r} must appear in two of its three terms")
    contracted = sorted(a for a in x_axes if a in y_axes and a not in out)
    batch = [a for a in out if a in x_axes and a in y_axes]
    x_rest = [a for a in x_axes if a not in batch and a not in contracted]
    y_rest = [a for a in y_axes if a not in batch and a not in contracted]

    def dimension_numbers(left: str, right: str) -> tuple:
        return (([left.index(a) for a in contracted], [right.index(a) for a in contracted]),
                ([left.index(a) for a in batch], [right.index(a) for a in batch]))

    if batch + x_rest + y_rest == list(out):
        return False, dimension_numbers(x_axes, y_axes), None
    names = batch + y_rest + x_rest
    permutation = tuple(names.index(a) for a in out)
    return True, dimension_numbers(y_axes, x_axes), (None if permutation == tuple(range(len(out))) else permutation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _policy_einsum(equation, dtype, out_dtype, x, y):
    return _product(equation, x, y, dtype, out_dtype)


def _policy_einsum_fwd(equation, dtype, out_dtype, x, y):
    return _product(equation, x, y, dtype, out_dtype), (x, y)


def _policy_einsum_bwd(equation, dtype, out_dtype, residuals, g):
    x, y = residuals
    inputs, out = equation.split("->")
    x_axes, y_axes = inputs.split(",")
    dx = _ordered_product((out, g), (y_axes, y), x_axes, dtype, x.dtype, smaller_first=False)
    dy = _ordered_product((x_axes, x), (out, g), y_axes, dtype, y.dtype, smaller_first=True)
    return dx, dy


def _ordered_product(first, second, result_axes: str, dtype, out_dtype, smaller_first: bool) -> jax.Array:
    """A gradient product, with the operands in the order XLA's CPU backend runs fast (and at all); other
    backends take them as given (``backend.cpu_operand_order``).

    XLA transposes the first operand when its contracted axes are not the last ones, as in every weight
    gradient (contracted over the tokens), fusing the transpose into whatever computed the operand (e.g.
    a dropout mask). So in a batched product the operand whose axes start with the batch axes (those in all
    three terms, e.g. ``bh`` of attention) goes first - the other order of some attention gradients has no
    bfloat16 x bfloat16 -> float32 kernel on CPU at all. Otherwise, for a weight gradient
    (``smaller_first``), the smaller operand goes first: for the vocabulary projection that is the
    activations, which saves transposing a ``tokens x vocabulary`` gradient.
    """
    batch = "".join(a for a in first[0] if a in second[0] and a in result_axes)
    if not backend.cpu_operand_order():
        swap = False
    elif batch:
        swap = second[0].startswith(batch) and not first[0].startswith(batch)
    else:
        swap = smaller_first and second[1].size < first[1].size
    if swap:
        first, second = second, first
    return _product(f"{first[0]},{second[0]}->{result_axes}", first[1], second[1], dtype, out_dtype)


_policy_einsum.defvjp(_policy_einsum_fwd, _policy_einsum_bwd)


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
    # Store the kernel as [out axes..., in axes...]. The same map; for a layer whose input is much wider than
    # its output (the feed-forward block's second matrix) this lets XLA compute the weight gradient without
    # transposing the wide input, a cost on a CPU.
    kernel_out_first: bool = False
    # Dtype of the result (default: ``dtype``); "float32" keeps the product's float32 accumulation, as the
    # output logits need.
    out_dtype: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = len(self.in_axes), len(self.features)
        in_shape = x.shape[x.ndim - n_in:]
        letters = "abcdefghijklmnopqrstuvw"
        batch = letters[: x.ndim - n_in]
        contracted = "xyz"[:n_in]
        out = letters[x.ndim - n_in: x.ndim - n_in + n_out]
        if self.kernel_out_first:
            init = nn.initializers.xavier_uniform(
                in_axis=tuple(range(n_out, n_out + n_in)), out_axis=tuple(range(n_out)))
            kernel = param_with_axes(self, "kernel", init, (*self.features, *in_shape),
                                     (*self.out_axes, *self.in_axes), self.param_dtype)
            kernel_axes = out + contracted
        else:
            init = nn.initializers.xavier_uniform(
                in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
            kernel = param_with_axes(self, "kernel", init, (*in_shape, *self.features),
                                     (*self.in_axes, *self.out_axes), self.param_dtype)
            kernel_axes = contracted + out
        y = policy_einsum(f"{batch}{contracted},{kernel_axes}->{batch}{out}", x, kernel, self.dtype,
                          self.out_dtype)
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, self.features, self.out_axes,
                                   self.param_dtype)
            y = add_bias(y, bias)
        return y


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` over ``y``'s last axes, in ``y``'s dtype; the bias gradient is one float32 sum.

    Autodiff would sum the gradient in the compute dtype, which XLA's CPU backend turns into a conversion to
    float32 and a windowed reduction many times slower than this.
    """
    return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
    return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
    summed = tuple(range(g.ndim - bias.ndim))
    return g, jnp.sum(g.astype(jnp.float32), summed).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


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

    num_embeddings: int  # Vocabulary size: ids in [0, num_embeddings).
    features: int  # Embedding width (d_model).
    # Rows of the table, >= num_embeddings: a multiple of every mesh axis and of accelerator tiles. The rows
    # past the vocabulary are never looked up, and ``attend`` gives them logits no softmax can choose.
    padded_size: int | None = None
    scale_by_sqrt_features: bool = True  # Multiply looked-up vectors by sqrt(features), as the paper does.
    dtype: str = "float32"  # Compute dtype.
    param_dtype: str = "float32"  # Storage dtype of the table.

    def setup(self):
        init = nn.initializers.normal(stddev=self.features ** -0.5)
        rows = self.padded_size or self.num_embeddings
        if rows < self.num_embeddings:
            raise ValueError(f"padded_size={rows} is smaller than the vocabulary ({self.num_embeddings})")
        self.embedding = param_with_axes(self, "embedding", init, (rows, self.features), ("vocab", "embed"),
                                         self.param_dtype)

    def _table(self) -> jax.Array:
        """The table laid out as the activations use it: whole rows (gathered over ``fsdp``, as FSDP
        gathers every weight before use), rows still split over ``tensor``."""
        return constrain(self.embedding, "activation_vocab", "activation_embed")

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self._table(), ids, axis=0).astype(self.dtype)
        if self.scale_by_sqrt_features:
            x = x * jnp.asarray(math.sqrt(self.features), self.dtype)
        return x

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits ``x @ E^T`` over the (padded) table, ``[..., rows]``, in float32: the product runs in the
        compute dtype, but its float32 accumulation is not rounded back to it, so the loss sees exact logits."""
        flat = x.reshape(-1, x.shape[-1])
        logits = policy_einsum("nd,vd->nv", flat, self._table(), self.dtype, out_dtype="float32")
        return logits.reshape(*x.shape[:-1], self.embedding.shape[0])


# The logit of a padded vocabulary id: exp() of it minus any real logit is exactly 0 in float32, while
# sums and differences with it stay finite (a beam's score plus it is still far below every real score).
PADDED_LOGIT = -1e9


def mask_padded_logits(logits: jax.Array, vocab_size: int) -> jax.Array:
    """Float32 ``logits [..., rows]`` with the ids past ``vocab_size`` set to ``PADDED_LOGIT``."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] == vocab_size:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, PADDED_LOGIT)


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
            # Positions count within a row, so a row no longer than the table keeps them inside it (a
            # decoding step's one position is checked by ``decoding``). Past it, jnp.take would give NaN.
            if x.ndim >= 2 and x.shape[-2] > self.max_length:
                raise ValueError(f"a sequence of {x.shape[-2]} positions does not fit the learned position "
                                 f"table of {self.max_length} rows: raise --config.model.max_length, or "
                                 "shorten the data (--config.data.max_inputs_length / max_targets_length)")
            init = nn.initializers.normal(stddev=0.02)  # BERT's and flax examples/wmt's choice.
            table = param_with_axes(self, "pos_embedding", init, (self.max_length, features),
                                    ("position", "embed"), self.param_dtype)
            table = jnp.take(table, positions, axis=0)
        else:
            raise ValueError(f"unknown position encoding {self.kind!r}: expected 'sinusoidal' or 'learned'")
        return x + table.astype(self.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Zeroes each element with probability ``rate`` and scales the rest by ``1 / (1 - rate)``.

    The mask compares 16-bit random numbers with ``rate``: two per 32-bit draw of ``jax.random.bits``, and
    no conversion to floats. ``jax.random.bernoulli`` (one float per element) made dropout a tenth of a
    training step on a CPU; this costs a quarter as much. ``rate`` is rounded to a multiple of 2^-16 and
    the scale uses the rounded value, so the expectation of every element is unchanged.
    """
    threshold = round(rate * 65536)
    if threshold == 0:
        return x
    last = x.shape[-1] if x.ndim else 1
    bits = jax.random.bits(rng, (*x.shape[:-1], (last + 1) // 2), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(*x.shape[:-1], -1)[..., :last]
    keep = halves.reshape(x.shape) >= jnp.uint16(threshold)
    return jnp.where(keep, x / jnp.asarray(1.0 - threshold / 65536, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """Dropout with :func:`dropout`'s mask; draws from the ``dropout`` rng stream, as ``nn.Dropout`` does."""

    rate: float  # Probability of zeroing an element.

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


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
        h = ACTIVATIONS[self.activation](constrain(h, "activation_batch", "activation_length", "activation_mlp"))
        h = Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return DenseGeneral((d_model,), ("mlp",), ("embed",), use_bias=True, dtype=self.dtype,
                            param_dtype=self.param_dtype, kernel_out_first=True, name="wo")(h)
