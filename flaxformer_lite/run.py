"""A run's directory: its files, saved config and data, the lock of a live run, and restoring it to evaluate.

Every path goes through ``etils.epath``, so a local folder and ``gs://bucket/run`` behave the same. Layout::

    config.json        the resolved configuration (vocabulary size filled in)
    vocab/             the tokenizer(s), trained on the training split at first use
    checkpoints/       Orbax checkpoints: train state + every process's data position (checkpointing.py)
    metrics.jsonl      one JSON object per logged step (train and eval metrics)
    tensorboard/       TensorBoard event files of the same metrics
    compilation_cache/ compiled XLA programs (use_compilation_cache)
    stopped.json       why the last training session ended: its step, and "num_train_steps" or "max_train_seconds"
    eval/              reports and hypotheses of evaluate.py
    visualize/         attention maps and curves of visualize.py
    train.lock         who is training in this directory now (RunLock)
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
from jax.sharding import Mesh

from flaxformer_lite import checkpointing, errors, sharding, storage, train_step
from flaxformer_lite import config as config_lib
from flaxformer_lite.data import datasets
from flaxformer_lite.data import tokenizer as tokenizer_lib
from flaxformer_lite.transformer import Transformer, TransformerConfig


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The files of one run, by name."""

    root: epath.Path

    @classmethod
    def of(cls, workdir) -> RunDir:
        return cls(storage.as_path(workdir))

    config = property(lambda self: self.root / "config.json")
    vocab = property(lambda self: self.root / "vocab")
    checkpoints = property(lambda self: self.root / "checkpoints")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    stopped = property(lambda self: self.root / "stopped.json")
    tensorboard = property(lambda self: self.root / "tensorboard")
    compilation_cache = property(lambda self: self.root / "compilation_cache")
    eval = property(lambda self: self.root / "eval")
    visualize = property(lambda self: self.root / "visualize")
    lock = property(lambda self: self.root / "train.lock")


_MIN_COMPILE_SECONDS = 0.2  # Programs that compile faster than this are not worth a file.


def use_compilation_cache(workdir) -> str:
    """Points JAX's persistent compilation cache at ``workdir/compilation_cache`` unless one is set already
    (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``); returns the directory in use.

    A resumed run, or a second evaluation, then loads its compiled programs instead of compiling them again,
    and the cache lives and dies with the run. Call it before anything is compiled: JAX opens the cache once.
    """
    chosen = jax.config.jax_compilation_cache_dir
    if not chosen:
        chosen = str(RunDir.of(workdir).compilation_cache)
        jax.config.update("jax_compilation_cache_dir", chosen)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX's default threshold leaves out the short programs of evaluation (an encoder per source width),
        # which would then compile again in every run.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    logging.info("XLA compilation cache: %s", chosen)
    return chosen


def save_config(workdir, config: ml_collections.ConfigDict) -> None:
    storage.write(RunDir.of(workdir).config, config_lib.to_json(config))


def save_stopped(workdir, step: int, reason: str) -> None:
    """Records that training ended at ``step`` for ``reason`` ("num_train_steps" or "max_train_seconds"), so a
    sweep can tell a run that spent its time budget from one that was cut short."""
    storage.write(RunDir.of(workdir).stopped, json.dumps({"step": step, "reason": reason}))


def load_stopped(workdir) -> dict | None:
    """What ``save_stopped`` recorded, or None when the last session was preempted, crashed or is running."""
    path = RunDir.of(workdir).stopped
    return json.loads(path.read_text()) if path.exists() else None


def load_config(workdir) -> ml_collections.ConfigDict:
    """The configuration a run saved in its workdir (so evaluation needs no --config)."""
    path = RunDir.of(workdir).config
    if not path.exists():
        raise errors.NotFoundError(f"{path} not found: is {workdir} the workdir of a training run?")
    return config_lib.from_json(path.read_text())


@dataclasses.dataclass
class RunData:
    """The data side of a run: sources, tokenizers and the resolved model config."""

    train_source: Any
    eval_source: Any
    inputs_tokenizer: tokenizer_lib.Tokenizer
    targets_tokenizer: tokenizer_lib.Tokenizer
    model_config: TransformerConfig


def prepare_data(config: ml_collections.ConfigDict, workdir) -> RunData:
    """Builds (once) the dataset, loads or trains the run's vocabulary, and sizes the model to it."""
    dataset = config_lib.build("dataset", config)
    train_source = datasets.load_split(dataset, config.train_split, config.data_dir)
    eval_source = datasets.load_split(dataset, config.eval_split, config.data_dir)
    inputs_tok, targets_tok = tokenizer_lib.load_or_train_tokenizers(
        config_lib.build("tokenizer", config), RunDir.of(workdir).vocab, train_source)
    if inputs_tok is targets_tok:
        model_config = config_lib.build("model", config, vocab_size=inputs_tok.vocab_size)
    else:
        model_config = config_lib.build("model", config, vocab_size=inputs_tok.vocab_size,
                                        output_vocab_size=targets_tok.vocab_size, share_embeddings=False)
    return RunData(train_source, eval_source, inputs_tok, targets_tok, model_config)


@dataclasses.dataclass
class RestoredRun:
    """A trained run, ready to translate: its config, data, model and the chosen parameters."""

    config: ml_collections.ConfigDict
    data: RunData
    model: Transformer
    params: Any  # Placed on ``mesh`` by the run's axis rules.
    mesh: Mesh  # The run's mesh where it fits the devices here, otherwise every device data-parallel.
    label: str  # Which checkpoint: "1500", "best-1200" or "avg5-1500" (averaged steps, newest last).


def restore(workdir, checkpoint: str = "latest", average_last: int = 0,
            data_dir: str | None = None) -> RestoredRun:
    """Loads a run's saved config, vocabulary and parameters for evaluation, translation or visualisation.

    ``checkpoint`` is ``latest`` (the newest readable: a damaged one gives way to the one before, with a
    warning), ``best`` or a step; ``average_last=K`` averages the K most recent checkpoints up to it.
    Parameters land on :func:`evaluation_mesh` by the run's axis rules.
    """
    config = load_config(workdir)
    if data_dir:
        config.data_dir = data_dir
    data = prepare_data(config, workdir)
    model = Transformer(data.model_config)
    mesh = evaluation_mesh(config)
    abstract = train_step.abstract_params(model, mesh, rules=config_lib.axis_rules(config))
    params, label = checkpointing.restore_params(
        RunDir.of(workdir).checkpoints, abstract, checkpoint,
        best_metric=config.get("checkpoint_best_metric") or None, average_last=average_last,
        keep_checkpoints=config.get("keep_checkpoints"))
    return RestoredRun(config, data, model, params, mesh, label)


def evaluation_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The run's ``mesh_shape`` over every device here, or, where it does not fit them (a run trained on a
    pod, evaluated on a workstation), every device along ``data``."""
    try:
        return sharding.create_mesh(tuple(config.mesh_shape))
    except ValueError as error:
        logging.info("The run's mesh_shape %s does not fit here (%s): decoding data-parallel over %d devices",
                     tuple(config.mesh_shape), error, jax.device_count())
        return sharding.create_mesh((-1, 1, 1))


class RunInUseError(errors.UserError, RuntimeError):
    """Another live training run holds the workdir."""


class RunLock:
    """Keeps a second training out of a workdir that a live run is writing.

    Local folders use an exclusive ``flock`` on ``train.lock``, which the kernel drops when the holder dies
    (``kill -9`` included), so a rerun after a crash just proceeds. Object stores have no locks: there the
    file is a lease that the holder renews every ``renew_seconds``; a lease not renewed for ``3 *
    renew_seconds`` (a dead run), or one left on this host by a process that no longer exists, is taken
    over. Only process 0 takes it; every process learns the outcome, so all of them stop together.
    """

    def __init__(self, workdir, renew_seconds: float = 30.0):
        self.path = RunDir.of(workdir).lock
        self._renew_seconds = renew_seconds
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._holder = {"host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self) -> RunLock:
        error = None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except RunInUseError as e:
                error = e
        if not sharding.all_processes_agree(error is None):
            raise error or RunInUseError(f"{self.path.parent} is in use by another training run (see the log of "
                                         "process 0)")
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        elif self._thread is not None:
            self.path.unlink(missing_ok=True)

    def _busy(self, holder: dict) -> RunInUseError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return RunInUseError(
            f"{self.path.parent} is in use by a live training run (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, since {since}): wait for it to finish or stop it, or train into another "
            f"--workdir")

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {**self._holder, "started": time.time()}
        if storage.is_local(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(self._read()) from None
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
            self._fd = fd
            return
        holder = self._read()
        if holder and not self._stale(holder):
            raise self._busy(holder)
        record["token"] = f"{record['host']}:{record['pid']}:{record['started']}"
        self._write(record)
        if self._read().get("token") != record["token"]:  # Another run wrote its lease at the same moment.
            raise self._busy(self._read())
        self._thread = threading.Thread(target=self._renew, args=(record,), daemon=True, name="run-lease")
        self._thread.start()

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _write(self, record: dict) -> None:
        self.path.write_text(json.dumps({**record, "renewed": time.time()}))

    def _stale(self, holder: dict) -> bool:
        if time.time() - holder.get("renewed", 0) > 3 * self._renew_seconds:
            return True
        if holder.get("host") == self._holder["host"]:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError):
                return False
        return False

    def _renew(self, record: dict) -> None:
        while not self._stop.wait(self._renew_seconds):
            try:
                self._write(record)
            except Exception as e:  # noqa: BLE001 -- a storage hiccup must not kill training
                logging.warning("Could not renew %s: %s", self.path, e)
