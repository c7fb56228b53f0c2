"""JAX's persistent compilation cache, kept in the run's workdir.

Tracing and compiling the decoder took ~3 s on a 2-core CPU, as long as translating a few hundred sentences
with it; the train step longer. With the cache, a resumed run and every evaluation after the first load
their compiled programs from ``WORKDIR/compilation_cache`` instead (tracing still runs). Keeping it in the
workdir means it lives and dies with the run that needs it. A cache directory chosen by the user
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) takes precedence.
"""

from __future__ import annotations

import os

from absl import logging
import jax

_MIN_COMPILE_SECONDS = 0.2  # Programs that compile faster than this are not worth a file.


def use_workdir_cache(workdir: str) -> str:
    """Points JAX's persistent compilation cache at ``workdir/compilation_cache`` unless one is set already;
    returns the directory in use. Call it before anything is compiled: JAX opens the cache once."""
    chosen = jax.config.jax_compilation_cache_dir
    if not chosen:
        chosen = os.path.join(os.path.abspath(workdir), "compilation_cache")
        jax.config.update("jax_compilation_cache_dir", chosen)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX's default (1 s) leaves out the encoder that evaluation compiles per source width (0.3-0.5 s
        # each here), which then compiles again in every run.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    logging.info("XLA compilation cache: %s", chosen)
    return chosen
