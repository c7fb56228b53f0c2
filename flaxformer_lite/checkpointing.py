"""Checkpointing: the only module that imports Orbax.

Orbax's API moves quickly (the version is pinned exactly in ``pyproject.toml``), so everything the project
needs from it is wrapped in the small :class:`Checkpointer` below; the trainer and the evaluator never touch
Orbax directly.

Layout on disk (Orbax's own; the step directories are named by the bare step number)::

    <directory>/<step>/state/        the train state pytree (PyTreeCheckpointHandler, OCDBT format)
    <directory>/<step>/data_state/   the data iterator state as JSON
    <directory>/<step>/metrics/      the metrics used for best-checkpoint keeping (only with ``best_metric``)
    <directory>/<step>/commit_success.txt   Orbax's commit marker, written last
    <directory>/<step>.orbax-checkpoint-tmp*  an unfinished save; never listed as a step

Decisions, and why:

* Retention is "keep the last ``max_to_keep`` checkpoints, plus the single best one by ``best_metric``".
  Orbax's ``max_to_keep`` + ``best_fn`` alone would keep the K *best* and could delete the newest
  checkpoint, which is the one a resumed run needs, so an explicit preservation policy
  (``LatestN(K)`` OR ``BestN(1)``) is used instead.
* Saves happen exactly every ``save_interval_steps`` (or on preemption); Orbax's default extra
  "initial save" of a fresh run is switched off so the interval means what it says.
* The state is saved with ``PyTreeSave`` and restored with ``PyTreeRestore`` against an abstract target
  whose leaves carry shardings, so a checkpoint written on one mesh restores onto any other mesh or
  device count; ``restore_params`` uses ``partial_restore=True`` with a ``{"params": ...}`` target, so
  evaluation needs neither the optimizer nor its state structure.
* A checkpoint that fails to restore (missing commit marker, truncated or deleted files, unreadable
  metadata) is skipped with a warning and the next older one is tried. When training resumes from an
  older step, the unreadable newer steps are deleted: the run will produce those step numbers again, and
  Orbax would otherwise refuse to save them.
"""

from __future__ import annotations

import logging as logging_std
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

_STATE = "state"
_DATA = "data_state"
_COMMIT_MARKER = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE
_MAX_ERROR_CHARS = 500  # TensorStore errors embed whole JSON specs; keep warnings readable.

PyTree = Any


class _OrbaxInfoFilter(logging_std.Filter):
    """Drops Orbax's INFO/DEBUG records (dozens per save) so that training logs stay readable.

    Orbax logs through absl like everything else, so the filter selects by source path; its warnings and
    errors still pass.
    """

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


def _all_processes_agree(ok: bool) -> bool:
    """True only if ``ok`` holds on every process.

    A damaged shard may be read by only some hosts; all hosts must still fall back to the same step.
    """
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, dtype=np.int32))))


def _json_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Metrics as plain floats (they may arrive as JAX or NumPy scalars); non-numeric values are dropped."""
    out = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError):
            logging.warning("Checkpoint metric %r=%r is not a number; not stored.", name, value)
    return out


class Checkpointer:
    """Periodic, asynchronous, resumable checkpoints of ``(state, data_state)`` via Orbax.

    Call the methods from every process: Orbax coordinates multi-process saving itself (the primary host
    writes metadata, every host writes its own shards). Always finish with ``close()`` (or use the object
    as a context manager) so that the background save thread completes before the program exits.

    Args:
      directory: root directory (local path or ``gs://``); created if missing.
      save_interval_steps: ``should_save(step)`` is true when ``step`` is a multiple of this.
      max_to_keep: how many of the most recent checkpoints to keep (``None`` keeps all).
      best_metric: optional metric name; the checkpoint with the best value of it (among those saved
        with ``metrics`` that contain it) is kept in addition to the last ``max_to_keep``.
      best_mode: ``"max"`` or ``"min"``: which direction of ``best_metric`` is better.
      async_save: write checkpoints in a background thread (``save`` only blocks for the copy of the
        arrays off the devices).
    """

    def __init__(
        self,
        directory,
        *,
        save_interval_steps: int,
        max_to_keep: int | None,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.last_restored_step: int | None = None

        policies = ocp.checkpoint_managers
        keep = [policies.LatestN(n=max_to_keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = self._metric_value
            keep.append(
                policies.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,  # those are covered by LatestN
                )
            )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(_STATE, ocp.args.PyTreeSave, ocp.handlers.PyTreeCheckpointHandler)
        registry.add(_STATE, ocp.args.PyTreeRestore, ocp.handlers.PyTreeCheckpointHandler)
        registry.add(_DATA, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler)
        registry.add(_DATA, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_interval_steps), policies.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=policies.AnyPreservationPolicy(keep),
            best_fn=best_fn,  # still needed: Orbax writes metrics and answers best_step() only when set
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
        )
        if "://" not in str(directory):
            directory = os.path.abspath(directory)  # Orbax's OCDBT writer rejects relative paths.
        self._manager = ocp.CheckpointManager(directory, options=options, handler_registry=registry)
        logging.info(
            "Checkpointer at %s: every %d steps, keep last %s, best by %s (%s), async=%s; existing steps %s",
            self.directory, save_interval_steps, max_to_keep, best_metric, best_mode, async_save,
            self.all_steps(),
        )

    def _metric_value(self, metrics: dict[str, Any]) -> float:
        """Orbax's ``best_fn``: a missing or NaN metric ranks worst instead of breaking the sort."""
        worst = -math.inf if self.best_mode == "max" else math.inf
        value = metrics.get(self.best_metric) if isinstance(metrics, dict) else None
        if value is None or math.isnan(float(value)):
            return worst
        return float(value)

    # ----------------------------------------------------------------------------------------------- queries

    @property
    def directory(self):
        return self._manager.directory

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (unfinished ``*.orbax-checkpoint-tmp*`` dirs are never listed)."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest committed step. It may still be unreadable: ``restore`` falls back past such steps."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Step with the best ``best_metric``; ``None`` without a metric or before any metric was saved."""
        if self.best_metric is None:
            return None
        return self._manager.best_step()

    def should_save(self, step: int) -> bool:
        """True at multiples of ``save_interval_steps`` (and on a preemption) past the latest saved step."""
        return self._manager.should_save(int(step))

    # -------------------------------------------------------------------------------------------------- save

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data_state: dict | None = None,
        metrics: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` and ``data_state`` at ``step`` if ``should_save(step)`` or ``force``.

        Returns whether a save was started. With ``async_save`` the write finishes in the background;
        the arrays are copied off the devices before this returns, so ``state`` may be donated afterwards.
        A step that is already saved is skipped (returns False), so a final ``force=True`` save right after
        an interval save at the same step is harmless. ``metrics`` are only stored (and used) when the
        Checkpointer has a ``best_metric``; a checkpoint whose metrics lack it is kept only as "recent".
        ``data_state=None`` is stored as ``{}`` and restored as ``None``.
        """
        step = int(step)
        if step in self._manager.all_steps():
            logging.info("Checkpoint for step %d already exists in %s; not saving it again.", step,
                         self.directory)
            return False
        if not force and not self.should_save(step):
            return False
        orbax_metrics = None
        if self.best_metric is not None and metrics is not None:
            orbax_metrics = _json_metrics(metrics)
            if self.best_metric not in orbax_metrics:
                logging.warning(
                    "Metrics for step %d lack best_metric %r (got %s); it cannot become the best checkpoint.",
                    step, self.best_metric, sorted(orbax_metrics),
                )
                orbax_metrics = None
        args = ocp.args.Composite(
            **{_STATE: ocp.args.PyTreeSave(state), _DATA: ocp.args.JsonSave(dict(data_state or {}))}
        )
        saved = self._manager.save(step, args=args, metrics=orbax_metrics, force=force)
        if saved:
            logging.info(
                "Saving checkpoint for step %d to %s%s.", step, self.directory,
                f" with metrics {orbax_metrics}" if orbax_metrics else "",
            )
        return saved

    def wait_until_finished(self) -> None:
        """Blocks until any background save (and the deletion of old checkpoints) has completed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for outstanding saves and stops Orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- restore

    def _step_dir(self, step: int):
        return self.directory / str(step)

    def _check_committed(self, step: int) -> None:
        if not (self._step_dir(step) / _COMMIT_MARKER).exists():
            raise FileNotFoundError(f"{self._step_dir(step)} has no {_COMMIT_MARKER} (unfinished save)")

    def _restore_step(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict | None]:
        self._check_committed(step)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
                _DATA: ocp.args.JsonRestore(),
            }
        )
        restored = self._manager.restore(step, args=args)
        return restored[_STATE], (restored[_DATA] or None)

    def _restore_params_step(self, step: int, abstract_params: PyTree) -> PyTree:
        """Reads only ``state.params`` (a top-level ``params`` field/key of the saved state)."""
        self._check_committed(step)
        target = {"params": abstract_params}
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            }
        )
        return self._manager.restore(step, args=args)[_STATE]["params"]

    def _newest_readable(self, read_fn, what: str) -> tuple[Any, int, list[int]]:
        """Tries ``read_fn(step)`` from the newest step down; returns (result, step, unreadable steps)."""
        steps = self.all_steps()[::-1]
        if not steps:
            raise FileNotFoundError(f"No checkpoints in {self.directory}")
        failed, last_error = [], None
        for step in steps:
            result, error = None, None
            try:
                result = read_fn(step)
            except Exception as e:  # noqa: BLE001 -- any damage to a checkpoint shows up as some exception
                error = last_error = e
            if _all_processes_agree(error is None):
                return result, step, failed
            logging.warning(
                "Could not restore %s from checkpoint step %d in %s (%s); trying the previous checkpoint.",
                what, step, self.directory,
                _short(error) if error is not None else "failed on another process",
            )
            failed.append(step)
        raise RuntimeError(
            f"No restorable checkpoint in {self.directory} (tried steps {failed}); last error: "
            f"{_short(last_error) if last_error is not None else 'failed on another process'}"
        ) from last_error

    def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict | None, int]:
        """Restores ``(state, data_state, step)``.

        ``abstract_state`` has the structure of the saved state, with ``jax.ShapeDtypeStruct`` leaves whose
        ``.sharding`` says where each array goes (any mesh or device count: Orbax reshards on read).
        With ``step=None`` the newest readable checkpoint is used: unreadable ones are skipped with a
        warning, and then deleted, because training resumes before them and will save those steps again.
        An explicit ``step`` is restored exactly or raises.
        """
        self._manager.wait_until_finished()
        if step is not None:
            state, data_state = self._restore_step(int(step), abstract_state)
        else:
            (state, data_state), step, failed = self._newest_readable(
                lambda s: self._restore_step(s, abstract_state), "the train state"
            )
            for bad in failed:
                logging.warning("Deleting unreadable checkpoint step %d (resuming from step %d).", bad, step)
                self._manager.delete(bad)
        self.last_restored_step = step
        logging.info("Restored train state and data state from step %d in %s.", step, self.directory)
        return state, data_state, step

    def restore_params(self, abstract_params: PyTree, step: str | int = "latest") -> PyTree:
        """Restores only the ``params`` subtree, e.g. for evaluation without any optimizer state.

        ``step`` is ``"latest"`` (newest readable step; unreadable ones are skipped with a warning but not
        deleted), ``"best"`` (``best_step()``) or an int. The step used is logged and kept in
        ``self.last_restored_step``.
        """
        self._manager.wait_until_finished()
        if step == "latest":
            params, step, _ = self._newest_readable(
                lambda s: self._restore_params_step(s, abstract_params), "the params"
            )
        else:
            if step == "best":
                step = self.best_step()
                if step is None:
                    raise ValueError(
                        f"No best checkpoint in {self.directory} (best_metric={self.best_metric!r})"
                    )
            params = self._restore_params_step(int(step), abstract_params)
        self.last_restored_step = int(step)
        logging.info("Restored params from step %d in %s.", step, self.directory)
        return params

    def restore_params_average(self, abstract_params: PyTree, steps: Sequence[int]) -> PyTree:
        """Element-wise mean of the params of ``steps`` (checkpoint averaging), in the dtypes of the target.

        Computed in float32 as a running mean (m += (x - m) / k): one checkpoint is read at a time, and
        averaging identical checkpoints returns them bit for bit (a sum then a division would not).
        """
        steps = [int(s) for s in steps]
        if not steps:
            raise ValueError("restore_params_average needs at least one step")
        self._manager.wait_until_finished()
        mean = None
        for k, step in enumerate(steps, start=1):
            params = self._restore_params_step(step, abstract_params)
            params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
            mean = params if mean is None else jax.tree.map(lambda m, x, k=k: m + (x - m) / k, mean, params)
        logging.info("Restored params averaged over steps %s in %s.", steps, self.directory)
        return jax.tree.map(lambda m, a: m.astype(a.dtype), mean, abstract_params)
