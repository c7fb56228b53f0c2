"""The choices that depend on the XLA backend (CPU, GPU, TPU), in one place.

Some forms exist only because XLA's CPU backend runs them faster, or at all: a float32 decoding cache with
matrix-vector products for a decoding step, gradient products with their operands in a CPU-friendly order,
and attention as two einsums instead of ``jax.nn.dot_product_attention``. On GPUs and TPUs the model uses
the plain forms: the cache in the compute dtype and fused attention (cuDNN's flash attention on NVIDIA
GPUs where it supports the case, XLA's elsewhere). Everything here is decided while tracing, from
``jax.default_backend()``.
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import jax.numpy as jnp

# TransformerConfig.attention_implementation values.
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")


def is_cpu() -> bool:
    return jax.default_backend() == "cpu"


def decoding_cache_dtype(compute_dtype) -> jnp.dtype:
    """Keys/values of the decoding cache: float32 on a CPU, where a decoding step's products then run in
    float32 on the cache as it is (a bfloat16 cache cost a conversion of the whole cache at every step);
    the compute dtype elsewhere (half the memory and bandwidth)."""
    return jnp.dtype(jnp.float32) if is_cpu() else jnp.dtype(compute_dtype)


def matrix_vector_decoding() -> bool:
    """Whether a decoding step's attention is written as float32 matrix-vector products (CPU only)."""
    return is_cpu()


def cpu_operand_order() -> bool:
    """Whether gradient products put their operands in the order XLA's CPU backend needs (see
    ``layers._ordered_product``); other backends take the products in their natural order."""
    return is_cpu()


def attention_implementation(requested: str, *, dtype, head_dim: int, needs_probabilities: bool) -> str:
    """``einsum`` (the model's own two products), ``xla`` or ``cudnn`` (``jax.nn.dot_product_attention``).

    ``needs_probabilities``: dropout on the attention probabilities or their weights sown for plotting,
    which only the einsum path has. ``auto`` takes the einsum path on a CPU (faster there, forward and
    backward), cuDNN on a GPU for 16-bit inputs with a head size it supports, XLA's fused form otherwise.
    """
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {requested!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if needs_probabilities or requested == "einsum":
        return "einsum"
    if requested != "auto":
        return requested
    if is_cpu():
        return "einsum"
    if (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128):
        return "cudnn"
    return "xla"


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    logging.warning(message)
