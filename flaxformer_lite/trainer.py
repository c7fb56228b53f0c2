"""The training loop: data, vocabulary, model, mesh, checkpoints and logs of one run, in its workdir.

A run's workdir holds everything needed to resume or evaluate it:

    config.json      the resolved configuration (vocabulary size filled in)
    vocab/           the tokenizer(s), trained on the training split at first use
    checkpoints/     Orbax checkpoints: train state + data iterator state
    metrics.jsonl    one JSON object per logged step (train and eval metrics)
    tensorboard/     TensorBoard event files of the same metrics
    compilation_cache/  XLA programs compiled for it (flaxformer_lite.compilation_cache): JAX's persistent
                     cache of train.py, so a restart skips compiling; programs/ holds the whole decoding
                     programs of evaluate.py and translate.py, which later evaluations load as they are

``train_and_evaluate`` resumes from the latest checkpoint when there is one, including the data iterator,
so an interrupted run continues with exactly the batches an uninterrupted one would have seen. SIGTERM
(preemption) saves a checkpoint and returns cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

from flaxformer_lite import config as config_lib
from flaxformer_lite import evaluation, sharding, training
from flaxformer_lite.checkpointing import Checkpointer
from flaxformer_lite.data import datasets, pipeline
from flaxformer_lite.data import tokenizer as tokenizer_lib
from flaxformer_lite.transformer import Transformer, TransformerConfig


@dataclasses.dataclass
class RunData:
    """The data side of a run: sources, tokenizers and the resolved model config."""

    train_source: Any
    eval_source: Any
    inputs_tokenizer: tokenizer_lib.Tokenizer
    targets_tokenizer: tokenizer_lib.Tokenizer
    model_config: TransformerConfig


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> RunData:
    """Builds (once) the dataset, loads or trains the vocabulary, and sizes the model to it."""
    dataset = config_lib.build("dataset", config)
    train_source = datasets.load_split(dataset, config.train_split, config.data_dir)
    eval_source = datasets.load_split(dataset, config.eval_split, config.data_dir)
    inputs_tok, targets_tok = tokenizer_lib.load_or_train_tokenizers(
        config_lib.build("tokenizer", config), os.path.join(workdir, "vocab"), train_source)
    if inputs_tok is targets_tok:
        model_config = config_lib.build("model", config, vocab_size=inputs_tok.vocab_size)
    else:
        model_config = config_lib.build("model", config, vocab_size=inputs_tok.vocab_size,
                                        output_vocab_size=targets_tok.vocab_size, share_embeddings=False)
    return RunData(train_source, eval_source, inputs_tok, targets_tok, model_config)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The configuration a run saved in its workdir (so evaluation needs no --config)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a training run?")
    with open(path) as f:
        return config_lib.from_json(f.read())


@dataclasses.dataclass
class RestoredRun:
    """A trained run, ready to translate: its config, data, model and the chosen parameters."""

    config: ml_collections.ConfigDict
    data: RunData
    model: Transformer
    params: Any
    label: str  # Which checkpoint: "1500", "best-1200" or "avg5-1500" (averaged steps, newest last).


def restore_run(workdir: str, checkpoint: str = "latest", average_last: int = 0,
                data_dir: str | None = None) -> RestoredRun:
    """Loads a run's saved config, vocabulary and parameters (``checkpoint``: latest, best or a step).

    ``average_last=K`` averages the parameters of the K most recent checkpoints up to the chosen one, as
    the paper does (5 for base, 20 for big). Parameters land on one device: decoding here is per sentence
    batch and small enough; the decoding functions themselves also run sharded under ``jax.jit``.
    """
    config = load_run_config(workdir)
    if data_dir:
        config.data_dir = data_dir
    data = prepare_data(config, workdir)
    model = Transformer(data.model_config)
    mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
    abstract = training.abstract_params(model, mesh)
    with Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1, max_to_keep=None,
                      best_metric=config.get("checkpoint_best_metric") or None) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
        if checkpoint == "latest":
            step, prefix = steps[-1], ""
        elif checkpoint == "best":
            step, prefix = ckpt.best_step(), "best-"
            if step is None:
                raise ValueError(f"{workdir} has no best checkpoint (the run tracked no metric)")
        else:
            if not checkpoint.isdigit() or int(checkpoint) not in steps:
                raise ValueError(f"--checkpoint={checkpoint}: expected latest, best or one of {steps}")
            step, prefix = int(checkpoint), ""
        if average_last > 1:
            chosen = [s for s in steps if s <= step][-average_last:]
            if len(chosen) < average_last:
                logging.warning("only %d checkpoints up to step %d to average (asked for %d): %s", len(chosen),
                                step, average_last, chosen)
            params = ckpt.restore_params_average(abstract, chosen)
            label = f"{prefix}avg{len(chosen)}-{step}"
        else:
            params = ckpt.restore_params(abstract, step=step)
            label = f"{prefix}{ckpt.last_restored_step}"
    return RestoredRun(config, data, model, params, label)


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; only process 0 writes."""

    def __init__(self, workdir: str, resume_step: int):
        self._active = jax.process_index() == 0
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._tensorboard = None
        if not self._active:
            return
        if os.path.exists(self._path):
            # Steps after the checkpoint we resume from will be trained (and logged) again: drop them so
            # that the file reads as one run.
            with open(self._path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self._path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self._path + ".tmp", self._path)
        from tensorboardX import SummaryWriter  # Imported here: only the writing process needs it.
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self._active:
            return
        with open(self._path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


class _PreemptionFlag:
    """Set by SIGTERM; the loop checks it between steps, saves, and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate_loss(evaluate, params, eval_data: pipeline.EvalData, mesh, max_batches: int = 0) -> dict[str, float]:
    """Loss, accuracy and perplexity per target token over the eval split (or its first ``max_batches``)."""
    totals = None
    for i, batch in enumerate(eval_data):
        if max_batches and i >= max_batches:
            break
        model_batch, _ = pipeline.split_eval_batch(batch)
        sums = evaluate(params, sharding.shard_batch(model_batch, mesh))
        totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    return training.summarize(jax.device_get(totals))


def _evaluate(config, eval_step, decode_fn, params, eval_data, decode_data, data: RunData, mesh,
              step: int) -> dict:
    """Validation loss/accuracy on the eval split and, if configured, translation metrics on its start."""
    metrics = evaluate_loss(eval_step, params, eval_data, mesh, config.eval_max_batches)
    logging.info("step %d eval (%s): loss %.4f  acc %.4f  ppl %.2f", step, config.eval_split, metrics["loss"],
                 metrics["accuracy"], metrics["perplexity"])
    if decode_fn is not None:
        scores, rows = evaluation.evaluate_translations(
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
        raise ValueError(f"config.data.batch_size={config.data.batch_size} x {jax.process_count()} processes "
                         f"is not divisible by the {sharding.data_parallel_size(mesh)} data-parallel devices "
                         f"of mesh {dict(mesh.shape)}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run in ``workdir`` for ``config.num_train_steps``; returns the last metrics."""
    config_lib.validate(config)  # Before anything touches the workdir.
    mesh = sharding.create_mesh(tuple(config.mesh_shape))
    _check_batch(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    # Several processes: process 0 builds the dataset and trains the vocabulary, the others then read them.
    data = _process_zero_first(lambda: prepare_data(config, workdir), "prepare_data")
    config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy with the resolved model fields.
    config.model.update(dataclasses.asdict(data.model_config))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json.tmp"), "w") as f:
            f.write(config_lib.to_json(config))
        os.replace(os.path.join(workdir, "config.json.tmp"), os.path.join(workdir, "config.json"))

    model = Transformer(data.model_config)
    train_cfg = config_lib.build("train", config)
    optimizer = training.make_optimizer(train_cfg, data.model_config.d_model)
    abstract_state, state_sharding = training.state_shardings(model, optimizer, mesh)
    train_step, eval_step = training.make_step_functions(model, optimizer, train_cfg, mesh, state_sharding)

    pipeline_cfg = config_lib.build("data", config)
    train_data = pipeline.make_train_data(data.train_source, data.inputs_tokenizer, data.targets_tokenizer,
                                          pipeline_cfg)
    eval_data = pipeline.make_eval_data(data.eval_source, data.inputs_tokenizer, data.targets_tokenizer,
                                        pipeline_cfg)
    batches: Iterator = iter(train_data)

    decode_fn, decode_data = None, None
    if config.decode_eval_examples:
        decode_fn = evaluation.make_decode_fn(model, evaluation.DecodeConfig(method=config.decode_eval_method))
        # The first decode_eval_examples examples, longest first. Every process decodes the same (whole)
        # batches, so that the jitted decoder gets identical inputs everywhere and every process scores all
        # of them.
        decode_data = pipeline.make_eval_data(data.eval_source, data.inputs_tokenizer, data.targets_tokenizer,
                                              pipeline_cfg, process_index=0, process_count=1,
                                              max_examples=config.decode_eval_examples, longest_first=True)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                save_interval_steps=config.checkpoint_every_steps,
                                max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints,
                                best_metric=config.checkpoint_best_metric or None)
    if checkpointer.latest_step() is not None:
        state, data_state, start_step = checkpointer.restore(abstract_state)
        if data_state:
            batches.set_state(data_state)
        logging.info("Resumed from step %d in %s", start_step, workdir)
    else:
        state, start_step = training.create_train_state(config.seed, model, optimizer, state_sharding), 0
        logging.info("Starting a new run in %s", workdir)

    writer = MetricsWriter(workdir, start_step)
    preemption = _PreemptionFlag()
    progress = _Progress(start_step, config.num_train_steps,
                         training.learning_rate_schedule(train_cfg, data.model_config.d_model),
                         config.max_train_seconds)
    last_metrics: dict[str, float] = {}
    step = start_step
    try:
        while step < config.num_train_steps and not preemption.requested:
            state, metrics = train_step(state, sharding.shard_batch(next(batches), mesh))
            progress.add(metrics)
            step += 1
            out_of_time = 0 < config.max_train_seconds <= progress.training_seconds()
            is_last = step == config.num_train_steps or out_of_time
            if step % config.metrics_every_steps == 0 or is_last or progress.seconds_since_log() >= \
                    config.log_every_secs:
                last_metrics = progress.log(step)
                writer.write(step, last_metrics)
            with progress.paused():  # Evaluation and checkpointing don't count against training speed.
                eval_metrics = {}
                if step % config.eval_every_steps == 0 or is_last:
                    eval_metrics = _evaluate(config, eval_step, decode_fn, state.params, eval_data, decode_data,
                                             data, mesh, step)
                    writer.write(step, eval_metrics)
                    last_metrics.update(eval_metrics)
                if checkpointer.should_save(step) or is_last:
                    checkpointer.save(step, state, data_state=batches.get_state(), force=True,
                                      metrics=eval_metrics or None)
            if out_of_time:
                logging.info("Stopping at step %d: %.0f s of training reached config.max_train_seconds.",
                             step, progress.training_seconds())
                break
        if preemption.requested and step > start_step:
            checkpointer.save(step, state, data_state=batches.get_state(), force=True)
            logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
    finally:
        checkpointer.wait_until_finished()
        checkpointer.close()
        writer.close()
        preemption.restore()
    logging.info("Done: step %d in %s (this session %.0f s).", step, workdir, progress.session_seconds())
    return {"step": step, **last_metrics}


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
        summary = training.summarize(sums)
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
