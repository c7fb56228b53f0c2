"""Multi-process training: 2 processes x 4 CPU devices (jax.distributed on localhost, gloo collectives).

What "the same parameters as 1 process x 8 devices" means here: in a multi-process run each process feeds its
own rows, built from its shard ``source[process_index::process_count]`` of the training split, and the global
batch is the concatenation of the processes' rows (process 0's rows land on process 0's devices, which come
first along the mesh's data axis). A single process with 8 devices sees that same global batch when it is fed
the concatenation of both shards' batches, which this test builds directly from the pipeline
(``make_train_data(process_index=i, process_count=2)``). Running ``train.py`` once with ``batch_size=16`` would
not do: one shard of the whole split packs into different rows. Equality is up to float rounding: the
cross-process all-reduce (gloo) sums the gradient in a different order than the in-process one.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxformer_lite import run as run_lib
from flaxformer_lite import sharding, training
from flaxformer_lite.config import build
from flaxformer_lite.data import pipeline
from flaxformer_lite.transformer import Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ROOT / "experiments" / "train.py"
TINY = ROOT / "experiments" / "configs" / "tiny.py"
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(workdir, data_dir, num_processes, devices_per_process, *flags, timeout=300):
    """Starts ``num_processes`` train.py processes like one per host would be; returns their (rc, log) pairs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    port = free_port()
    procs = []
    for index in range(num_processes):
        log = open(workdir.parent / f"{workdir.name}.{index}.log", "w+")
        command = [sys.executable, str(TRAIN), f"--config={TINY}", f"--workdir={workdir}",
                   f"--config.data_dir={data_dir}", f"--config.num_train_steps={STEPS}",
                   "--config.metrics_every_steps=1", "--config.eval_every_steps=3",
                   "--config.checkpoint_every_steps=3", "--config.decode_eval_examples=4", *flags]
        if num_processes > 1:
            command += [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
                        f"--process_id={index}"]
        procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
    results = []
    try:
        for proc, log in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.seek(0)
            results.append((proc.returncode, log.read()))
            log.close()
    return results


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def reference_run(workdir, steps):
    """1 process x 8 devices fed, each step, the concatenation of the two processes' batches."""
    config = run_lib.load_config(workdir)
    data = run_lib.prepare_data(config, workdir)  # Reads the vocabulary the 2-process run trained.
    model = Transformer(data.model_config)
    train_cfg = build("train", config)
    optimizer = training.make_optimizer(train_cfg, data.model_config.d_model)
    mesh = sharding.create_mesh((-1, 1, 1))
    assert mesh.devices.size == 8
    _, state_sharding = training.state_shardings(model, optimizer, mesh)
    train_step, _ = training.make_step_functions(model, optimizer, train_cfg, mesh, state_sharding)
    state = training.create_train_state(config.seed, model, optimizer, state_sharding)
    data_cfg = build("data", config)
    shards = [iter(pipeline.make_train_data(data.train_source, data.inputs_tokenizer, data.targets_tokenizer,
                                            data_cfg, process_index=i, process_count=2)) for i in range(2)]
    losses = []
    for _ in range(steps):
        parts = [next(shard) for shard in shards]
        batch = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
        losses.append(float(training.summarize(jax.device_get(metrics))["loss"]))
    return jax.device_get(state.params), losses


def saved_params(workdir, step):
    return jax.device_get(run_lib.restore(workdir, str(step)).params)


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path, data_dir):
    workdir = tmp_path / "two"
    results = run_processes(workdir, data_dir, 2, 4)
    for index, (code, log) in enumerate(results):
        assert code == 0, f"process {index} failed:\n{log[-4000:]}"
        assert f"jax.distributed: process {index} of 2, 4 local / 8 global devices" in log
    # One writer: process 0 writes config.json, metrics.jsonl and TensorBoard, each step logged once.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [1, 2, 3]
    eval_records = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in eval_records] == [3] and "eval/bleu" in eval_records[0]
    # Orbax's multi-process save: one committed checkpoint, readable by a single process.
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(STEPS)]
    # Both processes logged the same (global) numbers, including the decoded-BLEU of the same examples.
    finals = [log.strip().splitlines()[-1] for _, log in results]
    assert finals[0].split("train/steps_per_sec")[0] == finals[1].split("train/steps_per_sec")[0]
    assert finals[0].split("eval/bleu=")[1].split()[0] == finals[1].split("eval/bleu=")[1].split()[0]

    params, losses = reference_run(workdir, STEPS)
    np.testing.assert_allclose([r["train/loss"] for r in records if "train/loss" in r], losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           saved_params(workdir, STEPS), params)
