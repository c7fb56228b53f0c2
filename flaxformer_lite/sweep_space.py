"""The points of a sweep as plain Python: lists of config overrides from grid products, zips and random samples.

A sweep is a list of points; a point is a dict ``{"model.d_model": 256, "train.learning_rate": 1e-3}`` of
overrides of an experiment config (keys are config paths; a leading ``config.`` is accepted and dropped).
Sweep files (``experiments/sweeps/*.py``, or a ``get_sweep()`` next to ``get_config()`` in a config file)
define ``get_sweep()`` returning such a list, built with the helpers below::

    from flaxformer_lite import sweep_space as space

    def get_sweep():
        return space.product(
            space.grid(**{"model.d_model": [256, 512]}),
            space.zip_(**{"train.learning_rate": [1e-3, 5e-4], "train.warmup_steps": [2000, 4000]}),
            space.random(4, seed=0, **{"model.dropout_rate": space.uniform(0.1, 0.3)}),
        )

This module only describes points. ``flaxformer_lite.sweep_runner`` (started by ``launch/sweep.py``) runs
every point as its own ``experiments/train.py`` process with ``--config.KEY=VALUE`` flags
(``override_flags``) in a workdir named after the point (``point_name``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from flaxformer_lite import errors

Point = dict[str, Any]


def _key(key: str) -> str:
    key = key[len("config."):] if key.startswith("config.") else key
    if not key or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part) for part in key.split(".")):
        raise ValueError(f"bad sweep key {key!r}: expected a config path such as 'model.d_model'")
    return key


def _points(**axes: Iterable[Any]) -> dict[str, list[Any]]:
    out = {}
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"sweep axis {key!r} needs a list of values, got {values!r}")
        out[_key(key)] = list(values)
    return out


def grid(**axes: Iterable[Any]) -> list[Point]:
    """Every combination of the values (the first key varies slowest): ``grid(a=[1, 2], b=[3, 4])`` -> 4."""
    axes_ = _points(**axes)
    return [dict(zip(axes_, combo)) for combo in itertools.product(*axes_.values())]


def zip_(**axes: Iterable[Any]) -> list[Point]:
    """Values taken together, position by position; all lists must have the same length."""
    axes_ = _points(**axes)
    lengths = {k: len(v) for k, v in axes_.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zip_ needs lists of one length, got {lengths}")
    return [dict(zip(axes_, combo)) for combo in zip(*axes_.values())]


# Distributions for ``random``: callables from a numpy Generator to one value.
def uniform(low: float, high: float) -> Callable[[np.random.Generator], float]:
    return lambda rng: float(rng.uniform(low, high))


def loguniform(low: float, high: float) -> Callable[[np.random.Generator], float]:
    """Uniform in log space, e.g. learning rates: ``loguniform(1e-4, 1e-2)``."""
    if low <= 0 or high <= 0:
        raise ValueError("loguniform needs positive bounds")
    return lambda rng: float(math.exp(rng.uniform(math.log(low), math.log(high))))


def randint(low: int, high: int) -> Callable[[np.random.Generator], int]:
    """An integer in ``[low, high]`` (both included)."""
    return lambda rng: int(rng.integers(low, high + 1))


def choice(values: Sequence[Any]) -> Callable[[np.random.Generator], Any]:
    values = list(values)
    return lambda rng: values[int(rng.integers(len(values)))]


def random(num_points: int, seed: int, **distributions: Callable[[np.random.Generator], Any] | Sequence[Any],
           ) -> list[Point]:
    """``num_points`` seeded random samples; a list as a distribution means ``choice(list)``.

    The same seed always gives the same points (floats are rounded to 6 significant digits so that names
    and flags stay short and reproducible).
    """
    rng = np.random.default_rng(seed)
    dists = {_key(k): (choice(v) if not callable(v) else v) for k, v in distributions.items()}
    points = []
    for _ in range(num_points):
        point = {}
        for key, dist in dists.items():
            value = dist(rng)
            point[key] = float(f"{value:.6g}") if isinstance(value, float) else value
        points.append(point)
    return points


def product(*sweeps: Sequence[Point]) -> list[Point]:
    """Every combination of one point from each sweep, merged (later sweeps win on shared keys)."""
    out: list[Point] = [{}]
    for sweep in sweeps:
        out = [{**a, **b} for a in out for b in sweep]
    return out


def chain(*sweeps: Sequence[Point]) -> list[Point]:
    """The points of each sweep one after another (duplicates removed, first kept)."""
    out, seen = [], set()
    for point in itertools.chain(*sweeps):
        point = {_key(k): v for k, v in point.items()}
        signature = json.dumps(point, sort_keys=True, default=str)
        if signature not in seen:
            seen.add(signature)
            out.append(point)
    return out


def fixed(**overrides: Any) -> list[Point]:
    """One point: shared overrides to ``product`` with a sweep."""
    return [{_key(k): v for k, v in overrides.items()}]


# --------------------------------------------------------------------------------------------- to the CLI


def format_value(value: Any) -> str:
    """A value as ml_collections' ``--config.KEY=...`` parser reads it (tuples as ``(1,2)``)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def override_flags(point: Mapping[str, Any]) -> list[str]:
    return [f"--config.{_key(k)}={format_value(v)}" for k, v in point.items()]


def point_name(point: Mapping[str, Any], max_chars: int = 80) -> str:
    """A stable, readable, filesystem-safe name: ``d_model=32,learning_rate=0.003-1a2b3c4d``.

    Keys are shortened to their last component unless two keys share it. The hash covers the full
    overrides, so different points never share a name (or a workdir).
    """
    keys = [_key(k) for k in point]
    last = [k.rsplit(".", 1)[-1] for k in keys]
    shown = [lk if last.count(lk) == 1 else k for k, lk in zip(keys, last)]
    slug = ",".join(f"{s}={format_value(v)}" for s, v in zip(shown, point.values())) or "default"
    slug = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", slug)[:max_chars]
    digest = hashlib.sha1(json.dumps({_key(k): v for k, v in point.items()}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def swept_keys(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys that take more than one value across the sweep (in first-seen order)."""
    keys: list[str] = []
    for point in points:
        keys += [k for k in point if k not in keys]
    return [k for k in keys
            if len({json.dumps(p.get(k), sort_keys=True, default=str) for p in points}) > 1]


def load_sweep(path: str, config_path: str | None = None) -> list[Point]:
    """``get_sweep()`` of a Python file (``path[:arg]`` passes ``arg`` to it), normalized and de-duplicated.

    With ``path`` empty, the config file's own ``get_sweep()`` is used.
    """
    path = path or (config_path or "")
    file, _, arg = path.partition(":")
    if not file:
        raise errors.ConfigError("no sweep: pass --sweep=FILE[:ARG] or give the config file a get_sweep()")
    if not os.path.isfile(file):
        raise errors.NotFoundError(f"sweep file {file} not found")
    spec = importlib.util.spec_from_file_location(f"_sweep_{abs(hash(file))}", os.path.abspath(file))
    if spec is None or spec.loader is None:
        raise errors.NotFoundError(f"cannot load sweep file {file}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise errors.ConfigError(f"{file} has no get_sweep(): pass --sweep=FILE[:ARG], a file that defines one")
    points = module.get_sweep(arg) if arg else module.get_sweep()
    points = chain(points)
    if not points:
        raise errors.ConfigError(f"{path}: get_sweep() returned no points")
    return points
