"""The choices that depend on the XLA backend (CPU, GPU, TPU), in one place.

Some forms exist only because XLA's CPU backend runs them faster, or at all: a float32 decoding cache with
matrix-vector products for a decoding step, gradient products with their operands in a CPU-friendly order,
and attention as two einsums instead of ``jax.nn.dot_product_attention``. On GPUs and TPUs the model uses
the plain forms: the cache in the compute dtype and fused attention (cuDNN's flash attention on NVIDIA
GPUs where it supports the case, XLA's elsewhere). Everything here is decided while tracing, from
``jax.default_backend()``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

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
def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, frozenset[str] | None]:
    """The host CPU's model name and its x86 feature flags (None: unknown, e.g. not Linux or not x86)."""
    model, flags = platform.processor() or platform.machine(), None
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model != value.strip():
                    model = value.strip()
                elif key.strip() == "flags" and flags is None:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def emulated_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this is an x86 CPU with neither AVX-512 BF16 nor AMX, where bfloat16 products are emulated and
    a bfloat16 model trains slower than a float32 one (``docs/performance.md``)."""
    flags = host_cpu(cpuinfo)[1]
    return is_cpu() and flags is not None and not flags & {"avx512_bf16", "amx_bf16"}


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_host_memory_for_reuse() -> bool:
    """Makes glibc's malloc keep freed memory for reuse: one arena, no mmap below 1 GiB, no trimming.

    XLA's CPU runtime allocates the large buffers of every step anew; with glibc's defaults each one comes
    back as fresh pages from the kernel, whose first-touch faults are a large share of a training step on a CPU
    (``docs/performance.md``). The price is a resident size that stays at its peak. Call it at the start of
    a process, before JAX starts its threads. Nothing happens off Linux/glibc, under another allocator
    (``LD_PRELOAD``), when any ``MALLOC_*`` variable is set, or with ``FLAXFORMER_LITE_MALLOC=default``.
    Returns whether it changed anything.
    """
    if (platform.system() != "Linux" or os.environ.get("FLAXFORMER_LITE_MALLOC") == "default"
            or os.environ.get("LD_PRELOAD") or any(k.startswith("MALLOC_") for k in os.environ)):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # Not glibc (musl has no mallopt).
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_THRESHOLD, 1 << 30),
                mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)])


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    logging.warning(message)
