"""Checkpoints: a writer for the training loop and plain reader functions, the only module that imports Orbax.

Orbax's API moves quickly (the version is pinned exactly in ``pyproject.toml``), so everything the project
needs from it is here. Layout on disk (Orbax's own; step directories are named by the bare step number)::

    <directory>/<step>/state/        the train state pytree (PyTreeCheckpointHandler, OCDBT format)
    <directory>/<step>/data/process_<i>-of-<n>.json   each process's data iterator position (grain's handler)
    <directory>/<step>/metrics/      the metrics used for best-checkpoint keeping (only with ``best_metric``)
    <directory>/<step>/commit_success.txt   Orbax's commit marker, written last
    <directory>/<step>.orbax-checkpoint-tmp*  an unfinished save; never listed as a step

Decisions, and why:

* Retention is "the last ``max_to_keep`` checkpoints, plus the single best one by ``best_metric``": Orbax's
  ``max_to_keep`` + ``best_fn`` alone would keep the K best and could delete the newest checkpoint, the one
  a resumed run needs.
* Every process saves its own data iterator position: shards differ in size and pack differently, so one
  process's position means nothing to another. A run resumed on another process count is refused.
* The state is restored against an abstract target whose leaves carry shardings, so a checkpoint written on
  one mesh restores onto any other mesh or device count; readers restore ``params`` alone.
* One step resolution (:func:`resolve_steps`) serves the training loop and every reader: ``latest`` means "the
  newest readable", so a checkpoint that fails to restore (missing commit marker, truncated or deleted
  files) is skipped with a warning for the one before it. Resuming from an older step also deletes the
  unreadable newer ones: the run will save those step numbers again, and Orbax would refuse to.
"""

from __future__ import annotations

import logging as logging_std
import math
import os
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flaxformer_lite import errors, sharding, storage

_STATE = "state"
_DATA = "data"
_COMMIT_MARKER = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE
_MAX_ERROR_CHARS = 500  # TensorStore errors embed whole JSON specs; keep warnings readable.

PyTree = Any


class _OrbaxInfoFilter(logging_std.Filter):
    """Drops Orbax's INFO records (dozens per save) from the absl log; its warnings and errors still pass."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def _quiet_orbax_info() -> None:
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OrbaxInfoFilter) for f in handler.filters):
        handler.addFilter(_OrbaxInfoFilter())


_quiet_orbax_info()


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."


def _metric_fn(best_metric: str, best_mode: str) -> Callable[[dict], float]:
    """Orbax's ``best_fn``: a missing or NaN metric ranks worst instead of breaking the sort."""
    worst = -math.inf if best_mode == "max" else math.inf

    def value(metrics: dict[str, Any]) -> float:
        found = metrics.get(best_metric) if isinstance(metrics, dict) else None
        return worst if found is None or math.isnan(float(found)) else float(found)

    return value


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.PyTreeSave, ocp.handlers.PyTreeCheckpointHandler)
    registry.add(_STATE, ocp.args.PyTreeRestore, ocp.handlers.PyTreeCheckpointHandler)
    registry.add(_DATA, grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointHandler)
    registry.add(_DATA, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler)
    return registry


def _manager(directory, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(storage.as_path(directory), options=options, handler_registry=_registry())


def _reader(directory, best_metric: str | None = None, best_mode: str = "max") -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, max_to_keep=None,
        best_fn=_metric_fn(best_metric, best_mode) if best_metric else None, best_mode=best_mode)
    return _manager(directory, options)


def _committed(manager: ocp.CheckpointManager, step: int) -> None:
    marker = manager.directory / str(step) / _COMMIT_MARKER
    if not marker.exists():
        raise FileNotFoundError(f"{marker.parent} has no {_COMMIT_MARKER} (unfinished save)")


def _read_state(manager: ocp.CheckpointManager, step: int, target: PyTree, partial: bool = False) -> PyTree:
    _committed(manager, step)
    restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=partial)
    return manager.restore(step, args=ocp.args.Composite(**{_STATE: restore}))[_STATE]


def _read_params(manager: ocp.CheckpointManager, step: int, abstract_params: PyTree) -> PyTree:
    """Reads only ``state.params`` (a top-level ``params`` field or key of the saved state)."""
    return _read_state(manager, step, {"params": abstract_params}, partial=True)["params"]


# ----------------------------------------------------------------------------------------- step resolution


def resolve_steps(steps: Sequence[int], which: str | int, best: int | None = None) -> list[int]:
    """The steps to try, in order, for ``which``: ``"latest"`` (every step, newest first: a damaged one
    gives way to the one before), ``"best"`` (``best``) or a step number (exactly that one).

    Errors name the choices, so a bad ``--checkpoint`` flag reads as what to type instead.
    """
    steps = sorted(int(s) for s in steps)
    if not steps:
        raise errors.NotFoundError("no checkpoints")
    if which == "latest":
        return steps[::-1]
    if which == "best":
        if best is None:
            raise errors.ConfigError("no best checkpoint: the run kept none (config.checkpoint_best_metric unset, or "
                                     "no evaluation saved with it yet)")
        return [int(best)]
    if isinstance(which, int) or str(which).isdigit():
        if int(which) not in steps:
            raise errors.ConfigError(f"no checkpoint at step {which}: expected latest, best or one of {steps}")
        return [int(which)]
    raise errors.ConfigError(f"checkpoint {which!r}: expected latest, best or one of {steps}")


def _first_readable(candidates: Sequence[int], read: Callable[[int], Any], what: str,
                    directory) -> tuple[Any, int, list[int]]:
    """``read(step)`` over ``candidates`` until one succeeds on every process: (result, step, failed steps)."""
    failed, last_error = [], None
    for step in candidates:
        result, error = None, None
        try:
            result = read(step)
        except Exception as e:  # noqa: BLE001 -- any damage to a checkpoint shows up as some exception
            error = last_error = e
        if sharding.all_processes_agree(error is None):  # All hosts fall back to the same step.
            return result, step, failed
        failed.append(step)
        if len(candidates) > len(failed):
            logging.warning("Could not restore %s from checkpoint step %d in %s (%s); trying the previous "
                            "checkpoint.", what, step, directory,
                            _short(error) if error is not None else "failed on another process")
    raise RuntimeError(
        f"No restorable checkpoint in {directory} (tried steps {failed}); last error: "
        f"{_short(last_error) if last_error is not None else 'failed on another process'}"
    ) from last_error


# ------------------------------------------------------------------------------------------------ readers


def all_steps(directory) -> list[int]:
    """Committed steps in ``directory``, ascending (``[]`` if it does not exist)."""
    if not storage.as_path(directory).exists():
        return []
    with _reader(directory) as manager:
        return sorted(int(s) for s in manager.all_steps())


def restore_params(directory, abstract_params: PyTree, which: str | int = "latest", *,
                   best_metric: str | None = None, best_mode: str = "max", average_last: int = 0,
                   keep_checkpoints: int | None = None) -> tuple[PyTree, str]:
    """The parameters of checkpoint ``which`` (see :func:`resolve_steps`) and a label saying which they are.

    ``abstract_params`` are ``jax.ShapeDtypeStruct`` leaves whose shardings say where each array goes.
    ``average_last=K`` averages the K most recent steps up to the chosen one, as the paper does (5 for base,
    20 for big), in float32 as a running mean, so that averaging identical checkpoints is the identity.
    With the run's ``keep_checkpoints`` (N), those steps come from the newest N only: an older best
    checkpoint kept beside them (``CheckpointWriter``'s ``best_metric``) is not part of the recent series.
    Labels: ``"1500"``, ``"best-1200"``, ``"avg5-1500"``.
    """
    with _reader(directory, best_metric, best_mode) as manager:
        steps = sorted(int(s) for s in manager.all_steps())
        if not steps:
            raise errors.NotFoundError(f"no checkpoints in {manager.directory}")
        best = manager.best_step() if best_metric else None
        candidates = resolve_steps(steps, which, best)
        prefix = "best-" if which == "best" else ""
        if average_last <= 1:
            params, step, _ = _first_readable(
                candidates, lambda s: _read_params(manager, s, abstract_params), "the params", manager.directory)
            logging.info("Restored params from step %d in %s.", step, manager.directory)
            return params, f"{prefix}{step}"
        recent = steps[-keep_checkpoints:] if keep_checkpoints else steps
        series = recent if candidates[0] in recent else [candidates[0]]  # An old best stands alone.
        chosen = [s for s in series if s <= candidates[0]][-average_last:]
        if len(chosen) < average_last:
            logging.warning("only %d checkpoints up to step %d to average (asked for %d): %s", len(chosen),
                            candidates[0], average_last, chosen)
        mean = None
        for k, step in enumerate(chosen, start=1):
            params = jax.tree.map(lambda x: x.astype(jnp.float32), _read_params(manager, step, abstract_params))
            mean = params if mean is None else jax.tree.map(lambda m, x, k=k: m + (x - m) / k, mean, params)
        logging.info("Restored params averaged over steps %s in %s.", chosen, manager.directory)
        params = jax.tree.map(lambda m, a: m.astype(a.dtype), mean, abstract_params)
        return params, f"{prefix}avg{len(chosen)}-{candidates[0]}"


# ------------------------------------------------------------------------------------------------- writer


class CheckpointWriter:
    """The training loop's checkpoints of ``(state, data iterators)``: periodic, kept, resumed from.

    Call every method from every process: Orbax coordinates multi-process saving (the primary host writes
    metadata, every host its own shards and data position). Finish with ``close()`` (or use the object as a
    context manager) so that a background save completes before the program exits.

    Args:
      directory: root directory (local path or ``gs://``); created if missing.
      save_interval_steps: ``should_save(step)`` is true when ``step`` is a multiple of this.
      max_to_keep: how many of the most recent checkpoints to keep (``None`` keeps all).
      best_metric: optional metric name; the checkpoint with the best value of it (among those saved
        with ``metrics`` that contain it) is kept in addition to the last ``max_to_keep``.
      best_mode: ``"max"`` or ``"min"``: which direction of ``best_metric`` is better.
      async_save: write checkpoints in a background thread (``save`` blocks only while the arrays are
        copied off the devices).
    """

    def __init__(self, directory, *, save_interval_steps: int, max_to_keep: int | None,
                 best_metric: str | None = None, best_mode: str = "max", async_save: bool = True):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.best_metric = best_metric
        policies = ocp.checkpoint_managers
        keep = [policies.LatestN(n=max_to_keep)]
        best_fn = _metric_fn(best_metric, best_mode) if best_metric else None
        if best_fn is not None:
            keep.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                       keep_checkpoints_without_metrics=False))  # LatestN covers those.
        options = ocp.CheckpointManagerOptions(
            # Exactly every save_interval_steps: no extra "initial" save of a fresh run.
            save_decision_policy=policies.FixedIntervalPolicy(save_interval_steps),
            preservation_policy=policies.AnyPreservationPolicy(keep),
            best_fn=best_fn,  # Orbax writes metrics and answers best_step() only when it is set.
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
        )
        self._manager = _manager(directory, options)
        logging.info("Checkpoints in %s: every %d steps, keep last %s, best by %s (%s), async=%s; existing "
                     "steps %s", self.directory, save_interval_steps, max_to_keep, best_metric, best_mode,
                     async_save, self.all_steps())

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (unfinished ``*.orbax-checkpoint-tmp*`` dirs are never listed)."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest committed step. It may still be unreadable: ``restore`` falls back past such steps."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Step with the best ``best_metric``; ``None`` without a metric or before any metric was saved."""
        return self._manager.best_step() if self.best_metric else None

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(int(step))

    def save(self, step: int, state: PyTree, *, data_iterator: grain.DatasetIterator | None = None,
             metrics: dict | None = None, force: bool = False) -> bool:
        """Saves ``state`` and each process's ``data_iterator`` position at ``step`` if due or ``force``.

        Returns whether a save was started; a step already saved is skipped, so a final ``force=True``
        save after an interval save of the same step is harmless. The iterator's position is read before
        this returns and the arrays are copied off the devices, so training may go on (and donate
        ``state``) while the files are written. ``metrics`` count only with a ``best_metric``.
        """
        step = int(step)
        if step in self._manager.all_steps():
            logging.info("Checkpoint for step %d already exists in %s; not saving it again.", step,
                         self.directory)
            return False
        if not force and not self.should_save(step):
            return False
        kept_metrics = None
        if self.best_metric is not None and metrics is not None:
            kept_metrics = {}
            for name, value in metrics.items():
                try:
                    kept_metrics[str(name)] = float(value)
                except (TypeError, ValueError):
                    logging.warning("Checkpoint metric %r=%r is not a number; not stored.", name, value)
            if self.best_metric not in kept_metrics:
                logging.warning("Metrics for step %d lack best_metric %r (got %s); it cannot become the best "
                                "checkpoint.", step, self.best_metric, sorted(kept_metrics))
                kept_metrics = None
        items = {_STATE: ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), metrics=kept_metrics, force=force)
        if saved:
            logging.info("Saving checkpoint for step %d to %s%s.", step, self.directory,
                         f" with metrics {kept_metrics}" if kept_metrics else "")
        return saved

    def restore(self, abstract_state: PyTree,
                data_iterator: grain.DatasetIterator | None = None) -> tuple[PyTree, int]:
        """Restores the newest readable checkpoint: ``(state, step)``, and ``data_iterator``'s position.

        ``abstract_state`` has the structure of the saved state, with ``jax.ShapeDtypeStruct`` leaves whose
        shardings say where each array goes. Unreadable newer checkpoints are skipped with a warning, then
        deleted: training resumes before them and will save those steps again.
        """
        self._manager.wait_until_finished()
        state, step, failed = _first_readable(
            resolve_steps(self.all_steps(), "latest"), lambda s: _read_state(self._manager, s, abstract_state),
            "the train state", self.directory)
        for bad in failed:
            logging.warning("Deleting unreadable checkpoint step %d (resuming from step %d).", bad, step)
            self._manager.delete(bad)
        if data_iterator is not None:
            self._restore_data(step, data_iterator)
        logging.info("Restored the train state%s from step %d in %s.",
                     " and data position" if data_iterator is not None else "", step, self.directory)
        return state, step

    def _restore_data(self, step: int, data_iterator: grain.DatasetIterator) -> None:
        folder = self.directory / str(step) / _DATA
        count = jax.process_count()
        saved = sorted(p.name for p in folder.glob("process_*-of-*.json")) if folder.exists() else []
        if not saved:
            raise ValueError(f"checkpoint {folder.parent} holds no data iterator positions, so this run "
                             "cannot continue with the batches it would have seen; train into a new --workdir")
        if f"process_{jax.process_index()}-of-{count}.json" not in saved:
            written_by = saved[0].rsplit("-of-", 1)[1].removesuffix(".json")
            raise ValueError(
                f"checkpoint {folder.parent} was written by {written_by} processes but this run has {count}: "
                f"each process resumes its own shard of the data at its own position, which another process "
                f"count cannot take over. Rerun with {written_by} processes, or train into a new --workdir.")
        self._manager.restore(step, args=ocp.args.Composite(
            **{_DATA: grain.checkpoint.CheckpointRestore(data_iterator)}))

    def wait_until_finished(self) -> None:
        """Blocks until any background save (and the deletion of old checkpoints) has completed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for outstanding saves and stops Orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
