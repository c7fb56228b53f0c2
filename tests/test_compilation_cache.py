"""compilation_cache.py: the persistent cache goes to the workdir, and keeps small programs too, unless the
user chose otherwise (each case in a fresh interpreter: JAX's cache settings are process-wide); the
ProgramStore keeps compiled programs for later processes, keyed by what determines them."""

import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import compilation_cache
from flaxformer_lite.compilation_cache import ProgramStore

SHOW = ("import sys, jax; from flaxformer_lite import compilation_cache; "
        "print(compilation_cache.use_workdir_cache(sys.argv[1])); "
        "print(jax.config.jax_persistent_cache_min_compile_time_secs)")


def settings(workdir, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE_DIR",
                                                                      "JAX_PERSISTENT_CACHE"))}
    result = subprocess.run([sys.executable, "-c", SHOW, str(workdir)], capture_output=True, text=True,
                            timeout=120, env={**clean, "JAX_PLATFORMS": "cpu", **env})
    assert result.returncode == 0, result.stderr[-2000:]
    directory, seconds = result.stdout.split()
    return directory, float(seconds)


def test_the_workdir_cache_keeps_programs_that_compile_in_a_fifth_of_a_second(tmp_path):
    assert settings(tmp_path) == (str(tmp_path / "compilation_cache"), pytest.approx(0.2))


def test_the_users_choices_win(tmp_path):
    mine = tmp_path / "my_cache"
    directory, seconds = settings(tmp_path / "run", JAX_COMPILATION_CACHE_DIR=str(mine),
                                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="3")
    assert (directory, seconds) == (str(mine), 3.0)


# ---------------------------------------------------------------------------------------------------------
# ProgramStore
# ---------------------------------------------------------------------------------------------------------
def _program(traces):
    def f(x, y):
        traces.append(x.shape)  # Runs only when JAX traces f.
        return jnp.tanh(x @ y) + 1.0

    return jax.jit(f)


def test_a_stored_program_runs_in_a_new_store_without_tracing(tmp_path):
    x, y = jnp.arange(12.0).reshape(3, 4) / 10, jnp.ones((4, 2))
    traces = []
    first = ProgramStore(str(tmp_path)).call("f", _program(traces), x, y, context="settings")
    assert traces == [(3, 4)] and len(list(tmp_path.glob("f-*.jaxprogram"))) == 1
    again = ProgramStore(str(tmp_path)).call("f", _program(traces), x, y, context="settings")
    assert traces == [(3, 4)]  # Loaded, not traced.
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(again, jnp.tanh(x @ y) + 1.0)


def test_other_shapes_settings_or_names_are_other_programs(tmp_path):
    x, y = jnp.ones((3, 4)), jnp.ones((4, 2))
    traces = []
    store = ProgramStore(str(tmp_path))
    store.call("f", _program(traces), x, y, context="a")
    store.call("f", _program(traces), x, y, context="a")  # Same program: kept in memory.
    store.call("f", _program(traces), jnp.ones((5, 4)), y, context="a")
    store.call("f", _program(traces), x.astype(jnp.bfloat16), y, context="a")
    store.call("f", _program(traces), x, y, context="b")
    store.call("g", _program(traces), x, y, context="a")
    assert len(traces) == 5 and len(list(tmp_path.iterdir())) == 5


def test_an_unreadable_program_file_is_compiled_again_and_replaced(tmp_path):
    x, y = jnp.ones((3, 4)), jnp.ones((4, 2))
    traces = []
    ProgramStore(str(tmp_path)).call("f", _program(traces), x, y)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a program")
    with mock.patch.object(compilation_cache.logging, "warning") as warning:
        result = ProgramStore(str(tmp_path)).call("f", _program(traces), x, y)
    assert "Could not load compiled program" in warning.call_args[0][0] and len(traces) == 2
    np.testing.assert_array_equal(result, jnp.tanh(x @ y) + 1.0)
    ProgramStore(str(tmp_path)).call("f", _program(traces), x, y)
    assert len(traces) == 2  # The replaced file loads.


# Compiles f through a ProgramStore with JAX's persistent cache on, in a fresh interpreter; prints the result.
STORE = """
import sys, jax, jax.numpy as jnp
from flaxformer_lite.compilation_cache import ProgramStore
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
f = jax.jit(lambda x: jnp.sin(x) * 2.0)
x = jnp.arange(6.0)
print(ProgramStore(sys.argv[2]).call("f", f, x).tolist() if sys.argv[3] == "store" else f(x).tolist())
"""


def test_programs_from_the_persistent_cache_are_used_but_not_stored(tmp_path):
    """Such executables serialize without their code on CPU: storing one would fail at its first call."""
    def compile_in_new_process(how):
        result = subprocess.run([sys.executable, "-c", STORE, str(tmp_path / "jax"), str(tmp_path / "store"),
                                 how], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    want = compile_in_new_process("plain")  # Fills the persistent cache.
    assert compile_in_new_process("store") == want
    assert not (tmp_path / "store").exists()
    (tmp_path / "jax").rename(tmp_path / "old")  # A fresh compile is stored, and the stored copy runs.
    assert compile_in_new_process("store") == want and len(list((tmp_path / "store").iterdir())) == 1
    assert compile_in_new_process("store") == want
