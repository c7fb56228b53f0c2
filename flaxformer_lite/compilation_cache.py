"""JAX's persistent compilation cache in the run's workdir, for training, evaluation and translation.

A resumed run, or a second evaluation, loads its compiled programs from ``WORKDIR/compilation_cache``
instead of compiling them again (tracing and lowering still run). Keeping the cache in the workdir means it
lives and dies with the run that needs it. A cache directory chosen by the user
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) takes precedence.
"""

from __future__ import annotations

import os

from absl import logging
import jax

from flaxformer_lite import run

_MIN_COMPILE_SECONDS = 0.2  # Programs that compile faster than this are not worth a file.


def use_workdir_cache(workdir) -> str:
    """Points JAX's persistent compilation cache at ``workdir/compilation_cache`` unless one is set already;
    returns the directory in use. Call it before anything is compiled: JAX opens the cache once."""
    chosen = jax.config.jax_compilation_cache_dir
    if not chosen:
        chosen = str(run.RunDir.of(workdir).compilation_cache)
        jax.config.update("jax_compilation_cache_dir", chosen)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX's default (1 s) leaves out the short programs of evaluation (an encoder per source width),
        # which would then compile again in every run.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    logging.info("XLA compilation cache: %s", chosen)
    return chosen
