"""The training loop: data, vocabulary, model, mesh, checkpoints and logs of one run, in its workdir.

``train_and_evaluate`` resumes from the latest checkpoint when there is one, each process's data iterator
included, so an interrupted run continues with exactly the batches an uninterrupted one would have seen.
Stopping early is agreed by all processes: a SIGTERM (preemption) on any host, or the time budget running
out on any, stops every host after the same step, which they save together before returning. The files of
a run are laid out by :mod:`flaxformer_lite.run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
from typing import Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxformer_lite import config as config_lib
from flaxformer_lite import backend, errors, sharding, storage, train_step, translation
from flaxformer_lite import run as run_lib
from flaxformer_lite.checkpointing import CheckpointWriter
from flaxformer_lite.data import pipeline
from flaxformer_lite.transformer import Transformer


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; only process 0 writes.

    Object stores cannot append to a file, so there the whole file is written again each time (a few
    hundred kB for a long run); locally lines are appended.
    """

    def __init__(self, workdir, resume_step: int):
        self._active = jax.process_index() == 0
        self._path = run_lib.RunDir.of(workdir).metrics
        self._tensorboard = None
        self._lines: list[str] = []
        if not self._active:
            return
        if self._path.exists():
            # Steps after the checkpoint we resume from will be trained (and logged) again: drop them so
            # that the file reads as one run.
            self._lines = [line + "\n" for line in self._path.read_text().splitlines()
                           if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            storage.write(self._path, "".join(self._lines))
        from tensorboardX import SummaryWriter, record_writer  # Imported here: only process 0 needs it.
        # Event files on gs:// through epath, like every other file of a run (tensorboardX's own GCS
        # writer would need google-cloud-storage and its credentials besides).
        record_writer.register_writer_factory("gs", storage.WholeObjectWriterFactory())
        self._tensorboard = SummaryWriter(str(run_lib.RunDir.of(workdir).tensorboard), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self._active:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if storage.is_local(self._path):
            with self._path.open("a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            self._path.write_text("".join(self._lines))
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


class StopAgreement:
    """Decides, the same way on every process, whether training stops early after a step.

    A SIGTERM (preemption) on any host, or the time budget (``max_seconds`` of training on its own clock)
    running out on any host, stops them all after the same step, so that they enter the collective save
    together. Agreeing takes a collective that waits for the step to finish, so several processes agree
    every ``every_steps`` steps only; one process decides after every step on its own.
    """

    def __init__(self, max_seconds: float, every_steps: int):
        self._max_seconds, self._every_steps = max_seconds, every_steps
        self._sigterm = False
        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self._sigterm = True

    def check(self, step: int, training_seconds: float) -> str | None:
        """``"preempted"``, ``"out_of_time"`` or ``None`` (go on), after ``step``."""
        flags = np.array([self._sigterm, 0 < self._max_seconds <= training_seconds], np.int32)
        if jax.process_count() > 1:
            if step % self._every_steps:
                return None
            from jax.experimental import multihost_utils
            flags = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 2).max(axis=0)
        return "preempted" if flags[0] else "out_of_time" if flags[1] else None

    def close(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


def eval_loss_over(eval_fn, params, eval_data: pipeline.EvalData, mesh, max_batches: int = 0) -> dict[str, float]:
    """Loss, accuracy and perplexity per target token over the eval split (or its first ``max_batches``)."""
    totals = None
    for i, batch in enumerate(eval_data):
        if max_batches and i >= max_batches:
            break
        model_batch, _ = pipeline.split_eval_batch(batch)
        sums = eval_fn(params, sharding.shard_batch(model_batch, mesh))
        totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    return train_step.summarize(jax.device_get(totals))


def _eval_and_log(config, eval_fn, decode_fn, params, eval_data, decode_data, data: run_lib.RunData, mesh,
              step: int) -> dict:
    """Validation loss/accuracy on the eval split and, if configured, translation metrics on its start."""
    metrics = eval_loss_over(eval_fn, params, eval_data, mesh, config.eval_max_batches)
    logging.info("step %d eval (%s): loss %.4f  acc %.4f  ppl %.2f", step, config.eval_split, metrics["loss"],
                 metrics["accuracy"], metrics["perplexity"])
    if decode_fn is not None:
        scores, rows = translation.translate_and_score(
            decode_fn, params, decode_data, data.targets_tokenizer, config.dataset.target_lang,
            max_examples=config.decode_eval_examples)
        logging.info("step %d eval (%s, first %d, %s): BLEU %.2f  chrF %.2f  exact match %.2f%%  (%.1f s)", step,
                     config.eval_split, scores["num_examples"], config.decode_eval_method, scores["bleu"],
                     scores["chrf"], scores["exact_match"], scores["decode_seconds"])
        for source, reference, hypothesis in rows[: config.num_logged_translations]:
            logging.info("  src: %s | ref: %s | hyp: %s", source, reference, hypothesis)
        metrics.update({k: scores[k] for k in ("bleu", "chrf", "exact_match", "decode_seconds")})
    return {f"eval/{k}": v for k, v in metrics.items()}


def _process_zero_first(fn, name: str):
    """``fn()`` on process 0 first, then (after a barrier) on the other processes; one process: just ``fn()``."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        result = fn()
        multihost_utils.sync_global_devices(name)
        return result
    multihost_utils.sync_global_devices(name)
    return fn()


def _check_batch(config: ml_collections.ConfigDict, mesh) -> None:
    global_batch = config.data.batch_size * jax.process_count()
    if global_batch % sharding.data_parallel_size(mesh):
        raise errors.ConfigError(f"config.data.batch_size={config.data.batch_size} x {jax.process_count()} processes "
                                 f"is not divisible by the {sharding.data_parallel_size(mesh)} data-parallel devices "
                                 f"of mesh {dict(mesh.shape)}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict[str, float]:
    """Trains (or resumes) the run in ``workdir`` for ``config.num_train_steps``; returns the last metrics."""
    config_lib.validate(config)  # Before anything touches the workdir.
    mesh = sharding.create_mesh(tuple(config.mesh_shape))
    _check_batch(config, mesh)
    with run_lib.RunLock(workdir):
        return _train(config, workdir, mesh)


def _train(config: ml_collections.ConfigDict, workdir, mesh) -> dict[str, float]:
    run_dir = run_lib.RunDir.of(workdir)
    # Several processes: process 0 builds the dataset and trains the vocabulary, the others then read them.
    data = _process_zero_first(lambda: run_lib.prepare_data(config, workdir), "prepare_data")
    config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy with the resolved model and train fields.
    config.model.update(dataclasses.asdict(data.model_config))
    train_cfg = config_lib.build("train", config)
    config.train.update(dataclasses.asdict(train_cfg))  # config.json records the schedule length used.
    if jax.process_index() == 0:
        run_lib.save_config(workdir, config)
        run_dir.stopped.unlink(missing_ok=True)  # Written again only if this session ends as planned.

    model = Transformer(data.model_config)
    if jnp.dtype(data.model_config.dtype) == jnp.bfloat16 and backend.emulated_bfloat16():
        logging.warning("model.dtype=bfloat16 on a CPU without AVX-512 BF16 or AMX (no avx512_bf16 or amx_bf16 "
                        "in /proc/cpuinfo): bfloat16 is emulated here and trains slower than float32; "
                        "--config.model.dtype=float32 is faster on this machine")
    optimizer = train_step.make_optimizer(train_cfg, data.model_config.d_model)
    rules = config_lib.axis_rules(config)
    abstract_state, state_sharding = train_step.state_shardings(model, optimizer, mesh, rules=rules)
    train_fn, eval_fn = train_step.make_step_functions(model, optimizer, train_cfg, mesh, state_sharding, rules)

    pipeline_cfg = config_lib.build("data", config)
    train_data = pipeline.make_train_data(data.train_source, data.inputs_tokenizer, data.targets_tokenizer,
                                          pipeline_cfg)
    eval_data = pipeline.make_eval_data(data.eval_source, data.inputs_tokenizer, data.targets_tokenizer,
                                        pipeline_cfg)
    batches: Iterator = iter(train_data)

    decode_fn, decode_data = None, None
    if config.decode_eval_examples:
        decode_fn = translation.make_decode_fn(model, translation.DecodeConfig(method=config.decode_eval_method),
                                              mesh)
        # The first decode_eval_examples examples, longest first. Every process decodes the same (whole)
        # batches, so that the jitted decoder gets identical inputs everywhere and every process scores all
        # of them.
        decode_data = pipeline.make_eval_data(data.eval_source, data.inputs_tokenizer, data.targets_tokenizer,
                                              pipeline_cfg, process_index=0, process_count=1,
                                              max_examples=config.decode_eval_examples, longest_first=True)

    checkpoints = CheckpointWriter(run_dir.checkpoints, save_interval_steps=config.checkpoint_every_steps,
                                   max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints,
                                   best_metric=config.checkpoint_best_metric or None)
    if checkpoints.latest_step() is not None:
        state, start_step = checkpoints.restore(abstract_state, batches)
        logging.info("Resumed from step %d in %s", start_step, run_dir.root)
    else:
        state, start_step = train_step.create_train_state(config.seed, model, optimizer, state_sharding), 0
        logging.info("Starting a new run in %s", run_dir.root)

    writer = MetricsWriter(workdir, start_step)
    stopping = StopAgreement(config.max_train_seconds, config.stop_check_every_steps)
    progress = _Progress(start_step, config.num_train_steps,
                         train_step.learning_rate_schedule(train_cfg, data.model_config.d_model),
                         config.max_train_seconds)
    last_metrics: dict[str, float] = {}
    step = start_step
    profiler = _Profiler(config_lib.profile_steps(config), run_dir.tensorboard)

    def committed_checkpoint() -> int | None:
        checkpoints.wait_until_finished()  # A background save of an earlier (finite) step counts.
        return checkpoints.latest_step()

    guard = _NonfiniteGuard(train_cfg.on_nonfinite, committed_checkpoint)
    stop = None
    try:
        while step < config.num_train_steps:
            profiler.before(step)
            state, metrics = train_fn(state, sharding.shard_batch(next(batches), mesh))
            profiler.after(step + 1, metrics)
            progress.add(metrics)
            step += 1
            guard.add(step, metrics)
            stop = stopping.check(step, progress.training_seconds())
            is_last = step == config.num_train_steps or stop is not None
            if step % config.metrics_every_steps == 0 or is_last or progress.seconds_since_log() >= \
                    config.log_every_secs:
                last_metrics = progress.log(step)
                writer.write(step, last_metrics)
            with progress.paused():  # Evaluation and checkpointing don't count against training speed.
                eval_metrics = {}
                evaluate = step % config.eval_every_steps == 0 or (is_last and stop != "preempted")
                if evaluate or checkpoints.should_save(step) or is_last:
                    guard.check_all()  # Never evaluate or save parameters that a non-finite step made.
                if evaluate:
                    eval_metrics = _eval_and_log(config, eval_fn, decode_fn, state.params, eval_data, decode_data,
                                             data, mesh, step)
                    writer.write(step, eval_metrics)
                    last_metrics.update(eval_metrics)
                if checkpoints.should_save(step) or is_last:
                    checkpoints.save(step, state, data_iterator=batches, force=True, metrics=eval_metrics or None)
            if stop == "out_of_time":
                logging.info("Stopping at step %d: the time budget (config.max_train_seconds=%g) ran out%s "
                             "after %.0f s of training here.", step, config.max_train_seconds,
                             " on some process" if jax.process_count() > 1 else "", progress.training_seconds())
                break
            if stop == "preempted":
                logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
                break
    finally:
        profiler.stop()
        checkpoints.wait_until_finished()
        checkpoints.close()
        writer.close()
        stopping.close()
    reason = "num_train_steps" if step == config.num_train_steps else "max_train_seconds" if stop == "out_of_time" \
        else None
    if reason and jax.process_index() == 0:
        run_lib.save_stopped(workdir, step, reason)
    logging.info("Done: step %d in %s (this session %.0f s).", step, run_dir.root, progress.session_seconds())
    return {"step": step, **last_metrics}


class TrainingDivergedError(RuntimeError):
    """A step's loss or gradient norm was not finite, under ``TrainConfig.on_nonfinite="stop"``."""


class _NonfiniteGuard:
    """Finds the first step whose loss or gradient norm was not finite (the step's ``nonfinite`` metric).

    Each step is checked once it has finished: two steps after it was dispatched (``_Progress.add`` has
    waited for it by then), or all at once before the parameters are evaluated or saved. Every process
    checks the same steps at the same points, so all of them stop together.
    """

    def __init__(self, policy: str, latest_checkpoint: Callable[[], int | None]):
        self._stop, self._latest_checkpoint = policy == "stop", latest_checkpoint
        self._unchecked: list[tuple[int, jax.Array]] = []

    def add(self, step: int, metrics: dict) -> None:
        if self._stop:
            self._unchecked.append((step, metrics["nonfinite"]))
            self._check(len(self._unchecked) - 2)

    def check_all(self) -> None:
        """Raises ``TrainingDivergedError`` if any step so far was not finite (waits for them to finish)."""
        self._check(len(self._unchecked))

    def _check(self, count: int) -> None:
        if count <= 0:
            return
        checked, self._unchecked = self._unchecked[:count], self._unchecked[count:]
        flags = jax.device_get([flag for _, flag in checked])
        bad = [step for (step, _), flag in zip(checked, flags) if flag]
        if bad:
            latest = self._latest_checkpoint()
            kept = "no checkpoint was saved" if latest is None else f"the latest checkpoint is still step {latest}"
            raise TrainingDivergedError(
                f"step {bad[0]}: the loss or the gradient norm is not finite, so training stopped ({kept}). "
                "Lower --config.train.learning_rate, set --config.train.grad_clip_norm, or skip such steps "
                "with --config.train.on_nonfinite=skip")


class _Profiler:
    """A ``jax.profiler`` trace of train steps ``start + 1 ... start + count`` (``config.profile_steps``)."""

    def __init__(self, steps: tuple[int, int] | None, directory):
        self._steps, self._directory, self._running = steps, directory, False

    def before(self, step: int) -> None:
        if self._steps and step == self._steps[0]:
            jax.profiler.start_trace(str(self._directory))
            self._running = True

    def after(self, step: int, metrics) -> None:
        if self._running and step == sum(self._steps):
            jax.block_until_ready(metrics)  # The traced steps have run, not only been dispatched.
            self.stop()
            logging.info("Wrote a profile of steps %d-%d to %s: tensorboard --logdir %s (Profile tab)",
                         self._steps[0] + 1, step, self._directory, self._directory)

    def stop(self) -> None:
        if self._running:
            jax.profiler.stop_trace()
            self._running = False


class _Progress:
    """Accumulates step metrics on the device and turns them into log lines, rates and an ETA.

    Metrics stay on the device until a log line needs them, so the loop never waits for a step to finish
    just to read its loss. Time spent inside ``paused()`` (evaluation, checkpoints) is left out of rates.
    """

    def __init__(self, start_step: int, num_steps: int, schedule, max_seconds: float = 0.0):
        self._pending: list[dict] = []
        self._max_seconds = max_seconds  # The session's training-time budget (0: none), for the ETA.
        self._start_step, self._num_steps, self._schedule = start_step, num_steps, schedule
        self._session_start = self._log_time = time.perf_counter()
        self._log_step = start_step
        self._paused = self._paused_total = 0.0
        self._train_seconds, self._train_steps = 0.0, 0  # After the first log line (which includes compiling).

    def add(self, metrics: dict) -> None:
        """Records a dispatched step's metrics; waits until the step before the previous one is done.

        Steps are dispatched asynchronously; without a bound the loop would run far ahead of the device,
        and every time-based decision (log lines, ``max_train_seconds``) would be taken at dispatch time,
        long before the steps ran. Two steps in flight keep the device busy and the clock honest.
        """
        self._pending.append(metrics)
        if len(self._pending) >= 3:
            jax.block_until_ready(self._pending[-3])

    def seconds_since_log(self) -> float:
        return time.perf_counter() - self._log_time

    def session_seconds(self) -> float:
        return time.perf_counter() - self._session_start

    def training_seconds(self) -> float:
        """Wall time of this session outside ``paused()``: training, compiling included."""
        return self.session_seconds() - self._paused_total

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start
            self._paused_total += time.perf_counter() - start

    def log(self, step: int) -> dict[str, float]:
        sums = jax.tree_util.tree_map(lambda *xs: float(np.sum(xs)), *jax.device_get(self._pending))
        steps = step - self._log_step
        elapsed = max(time.perf_counter() - self._log_time - self._paused, 1e-9)
        if self._log_step > self._start_step:
            self._train_seconds += elapsed
            self._train_steps += steps
        rate = self._train_steps / self._train_seconds if self._train_steps else steps / elapsed
        eta = (self._num_steps - step) / rate
        if self._max_seconds:
            eta = min(eta, max(self._max_seconds - self.training_seconds(), 0.0))
        summary = train_step.summarize(sums)
        metrics = {f"train/{k}": v for k, v in summary.items()}
        metrics.update({
            "train/grad_norm": sums["grad_norm"] / max(steps, 1),  # Mean over the steps of this line.
            "train/learning_rate": float(self._schedule(np.int32(step - 1))),
            "train/steps_per_sec": steps / elapsed,
            "train/target_tokens_per_sec": sums["tokens"] / elapsed,
        })
        logging.info("step %d/%d  loss %.4f  acc %.4f  %.1f steps/s  %.0f tok/s  ETA %s", step, self._num_steps,
                     summary["loss"], summary["accuracy"], metrics["train/steps_per_sec"],
                     metrics["train/target_tokens_per_sec"], _format_seconds(eta))
        self._pending, self._log_time, self._log_step, self._paused = [], time.perf_counter(), step, 0.0
        return metrics


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
