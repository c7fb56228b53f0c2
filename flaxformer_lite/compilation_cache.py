"""Compiled programs kept across processes: JAX's persistent compilation cache in the run's workdir, and a
store of whole compiled programs for evaluation.

Tracing and compiling the decoder took ~3 s on a 2-core CPU, as long as translating a few hundred sentences
with it; the train step longer. With JAX's cache (``train.py``), a resumed run loads its compiled programs
from ``WORKDIR/compilation_cache`` instead (tracing and lowering still run). Keeping it in the workdir means
it lives and dies with the run that needs it. A cache directory chosen by the user
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) takes precedence. For the short decoding programs of
``evaluate.py`` and ``translate.py``, :class:`ProgramStore` goes one step further: it skips tracing and
lowering too.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import platform
from typing import Any, Callable

from absl import logging
import flax
import jax
from jax.experimental import serialize_executable
import jaxlib
import numpy as np

from flaxformer_lite import run, storage

_MIN_COMPILE_SECONDS = 0.2  # Programs that compile faster than this are not worth a file.


def use_workdir_cache(workdir) -> str:
    """Points JAX's persistent compilation cache at ``workdir/compilation_cache`` unless one is set already;
    returns the directory in use. Call it before anything is compiled: JAX opens the cache once."""
    chosen = jax.config.jax_compilation_cache_dir
    if not chosen:
        chosen = str(run.RunDir.of(workdir).compilation_cache)
        jax.config.update("jax_compilation_cache_dir", chosen)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX's default (1 s) leaves out the encoder that evaluation compiles per source width (0.3-0.5 s
        # each here), which then compiles again in every run.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    logging.info("XLA compilation cache: %s", chosen)
    return chosen


def workdir_programs(workdir) -> "ProgramStore":
    """The :class:`ProgramStore` of a run, ``workdir/compilation_cache/programs``, where ``evaluate.py`` and
    ``translate.py`` keep their decoding programs. They do not turn JAX's persistent cache on: a program it
    supplied could not be stored, and a run's cache already holds the decoders its first evaluations
    compiled, so with it on the store would never fill."""
    return ProgramStore(run.RunDir.of(workdir).compilation_cache / "programs")


class ProgramStore:
    """Compiled programs saved in a directory and found again by everything that determines them, so that a
    later process runs them without tracing, lowering or compiling.

    JAX's persistent cache (above) saves only the compiling: every process still traces and lowers each
    program to find its entry. For the decoding programs of ``evaluate.py`` that was ~1.2 s per run on a
    2-core CPU (the greedy decoder's three loops, one encoder per source width), a third of greedy search
    over Multi30k's 1,000 test sentences. Loading stored programs instead, greedy search took 2.9-3.9 s
    (median 3.1) end to end against 3.8-4.7 s (median 4.45), alternating six rounds.

    A program's key covers what can change it: the source files of this package, the versions of jax,
    jaxlib and flax, the devices and the host CPU's features, ``XLA_FLAGS`` and JAX's configuration;
    ``context``, what the caller's function closes over (model and decoding settings); and the shapes,
    dtypes, shardings and structure of the arguments. Edit the model or change a flag and the key changes; an older file is simply not used.

    A program that JAX's persistent cache supplied is used but not stored: on CPU such an executable
    serializes without its machine code (jax 0.10; the stored copy fails at its first call with "Function
    ... not found"). Only single-device programs are stored (evaluation's are).
    """

    def __init__(self, directory):
        self.directory = storage.as_path(directory)
        self._programs: dict[str, Any] = {}

    def call(self, name: str, jitted: Callable, *args, context: str = "") -> Any:
        """``jitted(*args)`` through the stored program of ``name`` for these arguments."""
        key = _program_key(name, context, args)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = self._load_or_compile(name, key, jitted, args)
        return program(*args)

    def _load_or_compile(self, name: str, key: str, jitted: Callable, args: tuple) -> Any:
        path = self.directory / f"{name}-{key[:24]}.jaxprogram"
        if path.exists():
            try:
                device_id, (payload, in_tree, out_tree) = pickle.loads(path.read_bytes())
                device = {d.id: d for d in jax.devices()}[device_id]
                program = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                    execution_devices=[device])
                logging.info("Loaded compiled program %s", path)
                return program
            except Exception as error:  # noqa: BLE001  (any unreadable file: compile instead, and replace it)
                logging.warning("Could not load compiled program %s (%s: %s); compiling it again", path,
                                type(error).__name__, error)
        hits_before = _persistent_cache_hits[0]
        program = jitted.lower(*args).compile()
        devices = {d for sharding in jax.tree_util.tree_leaves(program.input_shardings)
                   for d in sharding.device_set}
        if _persistent_cache_hits[0] != hits_before or len(devices) != 1 or jax.process_count() > 1:
            return program
        # Whole or not at all, even if this process dies mid-write.
        storage.write(path, pickle.dumps((devices.pop().id, serialize_executable.serialize(program))))
        logging.info("Stored compiled program %s", path)
        return program


_persistent_cache_hits = [0]  # Programs JAX's persistent cache supplied in this process.


def _count_persistent_cache_hits(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _persistent_cache_hits[0] += 1


jax.monitoring.register_event_listener(_count_persistent_cache_hits)


def _program_key(name: str, context: str, args: tuple) -> str:
    leaves, structure = jax.tree_util.tree_flatten(args)
    shapes = [(np.shape(x), str(getattr(x, "dtype", type(x))), bool(getattr(x, "weak_type", False)),
               str(getattr(x, "sharding", ""))) for x in leaves]
    return hashlib.sha256(repr((name, context, str(structure), shapes, _environment())).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _environment() -> str:
    """What every program depends on besides its own inputs: code, library versions, devices, settings."""
    package = os.path.dirname(os.path.abspath(__file__))
    source = hashlib.sha256()
    for root, dirs, files in os.walk(package):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                source.update(os.path.relpath(path, package).encode())
                with open(path, "rb") as f:
                    source.update(f.read())
    settings = sorted((k, v) for k, v in jax.config.values.items()
                      if not k.startswith(("jax_compilation_cache", "jax_persistent_cache")))
    devices = [(d.platform, d.device_kind, d.client.platform_version) for d in jax.devices()]
    return repr((source.hexdigest(), jax.__version__, jaxlib.__version__, flax.__version__, devices,
                 _host_cpu(), os.environ.get("XLA_FLAGS", ""), settings))


def _host_cpu() -> str:
    """The host's instruction-set extensions: CPU programs are compiled for the machine they compile on,
    and a workdir on a shared filesystem may be read from another."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.machine())
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
