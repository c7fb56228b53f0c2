"""The training loop: data, vocabulary, model, mesh, checkpoints and logs of one run, in its workdir.

A run's workdir holds everything needed to resume or evaluate it:

    config.json      the resolved configuration (vocabulary size filled in)
    vocab/           the tokenizer(s), trained on the training split at first use
    checkpoints/     Orbax checkpoints: train state + data iterator state
    metrics.jsonl    one JSON object per logged step (train and eval metrics)
    tensorboard/     TensorBoard event files of the same metrics

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
from flaxformer_lite import sharding, training
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
    data = prepare_data(config, workdir)
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

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                save_interval_steps=config.checkpoint_every_steps,
                                max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints)
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
                         training.learning_rate_schedule(train_cfg, data.model_config.d_model))
    last_metrics: dict[str, float] = {}
    step = start_step
    try:
        while step < config.num_train_steps and not preemption.requested:
            state, metrics = train_step(state, sharding.shard_batch(next(batches), mesh))
            progress.add(metrics)
            step += 1
            is_last = step == config.num_train_steps
            if step % config.metrics_every_steps == 0 or is_last or progress.seconds_since_log() >= \
                    config.log_every_secs:
                last_metrics = progress.log(step)
                writer.write(step, last_metrics)
            with progress.paused():  # Evaluation and checkpointing don't count against training speed.
                if step % config.eval_every_steps == 0 or is_last:
                    eval_metrics = evaluate_loss(eval_step, state.params, eval_data, mesh, config.eval_max_batches)
                    logging.info("step %d eval (%s): loss %.4f  acc %.4f  ppl %.2f", step, config.eval_split,
                                 eval_metrics["loss"], eval_metrics["accuracy"], eval_metrics["perplexity"])
                    eval_metrics = {f"eval/{k}": v for k, v in eval_metrics.items()}
                    writer.write(step, eval_metrics)
                    last_metrics.update(eval_metrics)
                if checkpointer.should_save(step) or is_last:
                    checkpointer.save(step, state, data_state=batches.get_state(), force=True)
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

    def __init__(self, start_step: int, num_steps: int, schedule):
        self._pending: list[dict] = []
        self._start_step, self._num_steps, self._schedule = start_step, num_steps, schedule
        self._session_start = self._log_time = time.perf_counter()
        self._log_step = start_step
        self._paused = 0.0
        self._train_seconds, self._train_steps = 0.0, 0  # After the first log line (which includes compiling).

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)

    def seconds_since_log(self) -> float:
        return time.perf_counter() - self._log_time

    def session_seconds(self) -> float:
        return time.perf_counter() - self._session_start

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    def log(self, step: int) -> dict[str, float]:
        sums = jax.tree_util.tree_map(lambda *xs: float(np.sum(xs)), *jax.device_get(self._pending))
        steps = step - self._log_step
        elapsed = max(time.perf_counter() - self._log_time - self._paused, 1e-9)
        if self._log_step > self._start_step:
            self._train_seconds += elapsed
            self._train_steps += steps
        rate = self._train_steps / self._train_seconds if self._train_steps else steps / elapsed
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
                     metrics["train/target_tokens_per_sec"], _format_seconds((self._num_steps - step) / rate))
        self._pending, self._log_time, self._log_step, self._paused = [], time.perf_counter(), step, 0.0
        return metrics


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
