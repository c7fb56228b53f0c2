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
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxformer_lite import run as run_lib
from flaxformer_lite import checkpointing, sharding, train_step
from flaxformer_lite.config import build
from flaxformer_lite.data import pipeline
from flaxformer_lite.transformer import Transformer
from helpers import ROOT, TINY, TRAIN, free_port, restored_params as saved_params, script_env

STEPS = 3


class Processes:
    """``num_processes`` train.py processes on localhost, as one per host would be, each logging to a file.

    Flags after the defaults win; ``per_process`` flags are given to one process only. Use as a context
    manager: on leaving, a process still running is killed, so that a hang fails the test instead of
    blocking it.
    """

    def __init__(self, workdir, data_dir, num_processes, devices_per_process, *flags, per_process=None,
                 tag=""):
        env = script_env(devices_per_process)
        port = free_port()
        self.procs, self.logs = [], []
        for index in range(num_processes):
            path = workdir.parent / f"{workdir.name}{tag}.{index}.log"
            command = [sys.executable, str(TRAIN), f"--config={TINY}", f"--workdir={workdir}",
                       f"--config.data_dir={data_dir}", f"--config.num_train_steps={STEPS}",
                       "--config.metrics_every_steps=1", "--config.eval_every_steps=3",
                       "--config.checkpoint_every_steps=3", "--config.decode_eval_examples=4", *flags,
                       *(per_process or {}).get(index, [])]
            if num_processes > 1:
                command += [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
                            f"--process_id={index}"]
            with open(path, "w") as log:
                self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   cwd=ROOT))
            self.logs.append(path)

    def wait(self, timeout=300) -> list[tuple[int, str]]:
        """Waits for every process; returns their (exit code, log) pairs."""
        deadline = time.time() + timeout
        for proc in self.procs:
            proc.wait(timeout=max(deadline - time.time(), 1))
        return [(proc.returncode, path.read_text()) for proc, path in zip(self.procs, self.logs)]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_processes(workdir, data_dir, num_processes, devices_per_process, *flags, timeout=300, **kwargs):
    """Runs the processes to the end; returns their (exit code, log) pairs."""
    with Processes(workdir, data_dir, num_processes, devices_per_process, *flags, **kwargs) as processes:
        return processes.wait(timeout)


def wait_for(condition, processes: Processes, timeout=240, what=""):
    """Polls ``condition()`` while every process is still running; fails if one ends or time runs out."""
    deadline = time.time() + timeout
    while not condition():
        for proc, path in zip(processes.procs, processes.logs):
            assert proc.poll() is None, f"a process ended (code {proc.returncode}) before {what}:\n" \
                                        f"{path.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def reference_run(workdir, steps):
    """1 process x 8 devices fed, each step, the concatenation of the two processes' batches; returns the
    initial and the final parameters and the losses."""
    config = run_lib.load_config(workdir)
    data = run_lib.prepare_data(config, workdir)  # Reads the vocabulary the 2-process run trained.
    model = Transformer(data.model_config)
    train_cfg = build("train", config)
    optimizer = train_step.make_optimizer(train_cfg, data.model_config.d_model)
    mesh = sharding.create_mesh((-1, 1, 1))
    assert mesh.devices.size == 8
    _, state_sharding = train_step.state_shardings(model, optimizer, mesh)
    train_fn, _ = train_step.make_step_functions(model, optimizer, train_cfg, mesh, state_sharding)
    state = train_step.create_train_state(config.seed, model, optimizer, state_sharding)
    initial = jax.device_get(state.params)
    data_cfg = build("data", config)
    shards = [iter(pipeline.make_train_data(data.train_source, data.inputs_tokenizer, data.targets_tokenizer,
                                            data_cfg, process_index=i, process_count=2)) for i in range(2)]
    losses = []
    for _ in range(steps):
        parts = [next(shard) for shard in shards]
        batch = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        state, metrics = train_fn(state, sharding.shard_batch(batch, mesh))
        losses.append(float(train_step.summarize(jax.device_get(metrics))["loss"]))
    return initial, jax.device_get(state.params), losses


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

    initial, params, losses = reference_run(workdir, STEPS)
    np.testing.assert_allclose([r["train/loss"] for r in records if "train/loss" in r], losses, rtol=1e-5)
    # The two runs' updates agree to 1% in norm, leaf by leaf. Not element by element: Adam divides each
    # gradient by its own RMS, so where a gradient is near zero a rounding difference in the all-reduced sum
    # moves that one parameter by a fraction of a step (2.7e-5, 1.2e-4 in two CI runs on an AVX2-only CPU,
    # one element of 64 and of 2,048). A sharding error changes whole updates.
    def check(saved, reference, start):
        update = np.linalg.norm(reference - start)
        assert np.linalg.norm(saved - reference) <= 1e-2 * update, (np.linalg.norm(saved - reference), update)

    jax.tree_util.tree_map(check, saved_params(workdir, STEPS), params, initial)

    # Evaluation by both processes (rows split over all 8 devices, one report by process 0) equals one
    # process of 8 devices. (Not one device: after 3 steps many logits nearly tie, and other per-device
    # shapes round differently; tests/test_evaluate.py compares 8 devices with 1 on a 6-step run.)
    evaluate = [sys.executable, str(ROOT / "experiments" / "evaluate.py"), f"--workdir={workdir}",
                "--split=test[:20]", "--method=beam", "--beam_size=2", "--batch_size=6"]
    report = workdir / "eval" / f"test[:20]-{STEPS}-beam2-a0.6.json"
    single = subprocess.run(evaluate, capture_output=True, text=True, timeout=300, cwd=ROOT, env=script_env(8))
    assert single.returncode == 0, single.stderr[-3000:]
    expected = (json.loads(report.read_text()), report.with_suffix(".txt").read_text())
    report.unlink()
    port, env = free_port(), script_env(4)
    procs = [subprocess.Popen([*evaluate, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                               f"--process_id={index}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=ROOT) for index in range(2)]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    assert "on mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in outputs[0]
    assert ("BLEU" in outputs[0]) and ("BLEU" not in outputs[1])  # Only process 0 reports.
    scores, hypotheses = json.loads(report.read_text()), report.with_suffix(".txt").read_text()
    assert hypotheses == expected[1] and hypotheses.count("\n") == 20
    assert {k: scores[k] for k in ("bleu", "chrf", "exact_match")} == \
        {k: expected[0][k] for k in ("bleu", "chrf", "exact_match")}


# ----------------------------------------------------------------------------------- surviving a cluster
# Two processes of 4 devices on a split whose shards differ in size (256 and 255 examples), long enough to be
# interrupted: a checkpoint every 5 steps (each a collective save), a metrics line every step, and an
# agreement on stopping every 3 steps.
LONG = 25
LONG_FLAGS = ("--config.train_split=train[:511]", f"--config.num_train_steps={LONG}",
              "--config.checkpoint_every_steps=5", "--config.keep_checkpoints=20",
              "--config.eval_every_steps=1000", "--config.decode_eval_examples=0",
              "--config.checkpoint_best_metric=", "--config.model.dropout_rate=0.1",
              "--config.stop_check_every_steps=3")


def train_losses(workdir) -> dict[int, float]:
    """Step -> training loss from metrics.jsonl, which must log every step once, in order (one run's log)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == list(range(1, len(steps) + 1)), steps
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def assert_same_run(workdir, reference):
    """Per-step losses and final parameters bit for bit those of the uninterrupted ``reference`` run."""
    assert train_losses(workdir) == train_losses(reference)
    jax.tree_util.tree_map(np.testing.assert_array_equal, saved_params(workdir, LONG), saved_params(reference, LONG))


def uninterrupted_run(workdir, data_dir):
    start = time.time()
    results = run_processes(workdir, data_dir, 2, 4, *LONG_FLAGS)
    for index, (code, log) in enumerate(results):
        assert code == 0, f"process {index} failed:\n{log[-4000:]}"
    print(f"uninterrupted 2-process run of {LONG} steps: {time.time() - start:.1f} s")
    assert len(train_losses(workdir)) == LONG


def resumed_from(results) -> int:
    """The step every process of a rerun says it resumed from (the same on all of them)."""
    resumed = set()
    for index, (code, log) in enumerate(results):
        assert code == 0, f"process {index} failed:\n{log[-4000:]}"
        (line,) = [line for line in log.splitlines() if "Resumed from step" in line]
        resumed.add(int(line.split("Resumed from step ")[1].split()[0]))
    (step,) = resumed
    return step


@pytest.mark.slow
def test_interrupted_runs_resume_to_the_uninterrupted_run_bit_for_bit(tmp_path, data_dir):
    """Both processes killed (kill -9), or one of them sent SIGTERM: the rerun ends where an uninterrupted
    run does, with the same loss at every step and the same parameters. One test, so that the uninterrupted
    reference (the expensive part) is trained once."""
    reference = tmp_path / "uninterrupted"
    uninterrupted_run(reference, data_dir)

    # kill -9 of both processes after the first checkpoint.
    killed = tmp_path / "killed"
    with Processes(killed, data_dir, 2, 4, *LONG_FLAGS) as processes:
        wait_for(lambda: (killed / "checkpoints" / "5" / "commit_success.txt").exists(), processes,
                 what="the first checkpoint")
        for proc in processes.procs:  # The training processes themselves, still running (wait_for checked).
            proc.send_signal(signal.SIGKILL)
        results = processes.wait(60)
    assert [code for code, _ in results] == [-signal.SIGKILL] * 2
    assert all(f"step {LONG}/{LONG}" not in log for _, log in results)  # Killed before the end.
    step = resumed_from(run_processes(killed, data_dir, 2, 4, *LONG_FLAGS, tag="-rerun"))
    assert 5 <= step < LONG and step % 5 == 0
    assert_same_run(killed, reference)

    # SIGTERM to one process only, after two steps: both stop after the same step and save it.
    preempted = tmp_path / "preempted"
    with Processes(preempted, data_dir, 2, 4, *LONG_FLAGS) as processes:
        wait_for(lambda: (preempted / "metrics.jsonl").exists()
                 and (preempted / "metrics.jsonl").read_text().count("\n") >= 2, processes, what="two steps")
        processes.procs[1].send_signal(signal.SIGTERM)  # One host preempted; the other hears nothing.
        results = processes.wait(120)
    saved = set()
    for index, (code, log) in enumerate(results):
        assert code == 0, f"process {index} failed:\n{log[-4000:]}"
        (line,) = [line for line in log.splitlines() if "Preempted: saved step" in line]
        saved.add(int(line.split("saved step ")[1].split(";")[0]))
    assert "SIGTERM received" in results[1][1] and "SIGTERM received" not in results[0][1]
    (step,) = saved
    assert step < LONG and step % 3 == 0  # Agreed at a check every 3 steps, before the end.
    assert max(train_losses(preempted)) == step
    assert step in checkpointing.all_steps(preempted / "checkpoints")
    assert resumed_from(run_processes(preempted, data_dir, 2, 4, *LONG_FLAGS, tag="-rerun")) == step
    assert_same_run(preempted, reference)


@pytest.mark.slow
def test_time_budget_of_one_process_stops_both_after_the_same_step(tmp_path, data_dir):
    workdir = tmp_path / "budget"
    # Process 0's budget runs out at its first step, process 1's never: both stop at the first agreement.
    results = run_processes(workdir, data_dir, 2, 4, *LONG_FLAGS,
                            per_process={0: ["--config.max_train_seconds=0.001"],
                                         1: ["--config.max_train_seconds=100000"]})
    for index, (code, log) in enumerate(results):
        assert code == 0, f"process {index} failed:\n{log[-4000:]}"
        assert "Stopping at step 3: the time budget" in log
    assert checkpointing.all_steps(workdir / "checkpoints") == [3]
    assert max(train_losses(workdir)) == 3
