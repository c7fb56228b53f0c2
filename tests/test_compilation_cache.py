"""run.use_compilation_cache: the persistent cache goes to the workdir, and keeps small programs too, unless the
user chose otherwise (each case in a fresh interpreter: JAX's cache settings are process-wide)."""

import os
import subprocess
import sys

import pytest


SHOW = ("import sys, jax; from flaxformer_lite import run; "
        "print(run.use_compilation_cache(sys.argv[1])); "
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
