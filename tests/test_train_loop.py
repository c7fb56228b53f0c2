"""The training entry point end to end: files of a run, exact resume, preemption, and bad flags."""

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
from flaxformer_lite import train_loop
from helpers import ROOT, TINY, TRAIN, restored_params as final_params, run_script, script_env, tiny_config


def run_train(*args, timeout=240):
    return run_script("train.py", *args, timeout=timeout)


def test_train_script_runs_the_tiny_config_end_to_end(tmp_path, data_dir):
    workdir = tmp_path / "run"
    # --jax_platforms: JAX's own flags reach it (jax.config.config_with_absl). A profile of steps 3-4.
    result = run_train(f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
                       "--jax_platforms=cpu", "--config.profile_steps=2,2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval/loss=" in result.stdout
    assert "Wrote a profile of steps 3-4" in result.stderr
    assert list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["vocab_size"] > 3 and config["dataset"]["kind"] == "scan"
    assert config["train"]["total_steps"] == 6  # The schedule length used: num_train_steps.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records if "train/loss" in r} >= {2, 4, 6}
    assert [r["step"] for r in records if "eval/loss" in r] == [3, 6]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
    assert (workdir / "vocab" / "words.json").exists()
    # Progress lines: step, loss, throughput and ETA.
    assert "step 6/6" in result.stderr and "tok/s" in result.stderr and "ETA" in result.stderr


@pytest.mark.slow
def test_resume_gives_bitwise_the_same_parameters(tmp_path, data_dir):
    overrides = {"model.dropout_rate": 0.1, "data.batch_size": 8}  # Dropout: the rng must resume too.
    straight = tmp_path / "straight"
    train_loop.train_and_evaluate(tiny_config(data_dir, num_train_steps=6, **overrides), str(straight))
    resumed = tmp_path / "resumed"
    first = train_loop.train_and_evaluate(tiny_config(data_dir, num_train_steps=3, **overrides), str(resumed))
    assert first["step"] == 3
    second = train_loop.train_and_evaluate(tiny_config(data_dir, num_train_steps=6, **overrides), str(resumed))
    assert second["step"] == 6
    # CPU XLA is deterministic and the resumed run sees the same batches and dropout keys: bitwise equal.
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_params(resumed, 6), final_params(straight, 6))
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # One run's log, not two interleaved.


def test_time_budget_stops_training_with_a_checkpoint_and_an_evaluation(tmp_path, data_dir):
    workdir = tmp_path / "budget"
    # The first step (which compiles) alone takes longer than the budget: the run stops after it.
    result = train_loop.train_and_evaluate(
        tiny_config(data_dir, num_train_steps=1000, max_train_seconds=1e-3, eval_every_steps=500,
                    checkpoint_every_steps=500), str(workdir))
    assert result["step"] == 1 and "eval/loss" in result
    assert os.listdir(workdir / "checkpoints") == ["1"]
    assert run_lib.load_stopped(workdir) == {"step": 1, "reason": "max_train_seconds"}


def test_sigterm_saves_a_restorable_checkpoint_and_resume_continues(tmp_path, data_dir):
    workdir = tmp_path / "preempted"
    env = script_env()
    process = subprocess.Popen(
        [sys.executable, str(TRAIN), f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
         "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
         "--config.eval_every_steps=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "SIGTERM received" in stderr and "Preempted: saved step" in stderr
    (saved,) = [int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
    assert saved >= 3  # metrics.jsonl had 3 lines (one per step with log_every_secs=0) before SIGTERM.
    params = final_params(workdir, saved)
    assert params["shared_embedding"]["embedding"].shape[1] == 32
    result = run_train(f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
                       f"--config.num_train_steps={saved + 2}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from step {saved}" in result.stderr and f"step={saved + 2}" in result.stdout


@pytest.mark.parametrize("flag, message", [
    ("--config.model.d_modle=64", "d_modle"),
    ("--config.model.d_model=abc", "d_model"),
    ("--config.model.activation=swish", "error: config.model.activation: 'swish' is not one of"),
    ("--config.mesh_shape=(3,1,1)", "error: mesh_shape (3, 1, 1) needs 3 devices"),
    ("--config.train.learning_rate=-1", "error: config.train.learning_rate: must be > 0, got -1.0"),
    ("--config.train.adam_b2=1.5", "error: config.train.adam_b2: must be in [0, 1), got 1.5"),
    ("--config.data.batch_size=0", "error: config.data.batch_size: must be >= 1, got 0"),
    ("--config.model.dropout_rate=1.0", "error: config.model.dropout_rate: must be in [0, 1), got 1.0"),
    ("--config.data.max_targets_length=0", "error: config.data.max_targets_length: must be >= 1, got 0"),
])
def test_bad_flags_fail_clearly_and_write_nothing(tmp_path, data_dir, flag, message):
    workdir = tmp_path / "bad"
    result = run_train(f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={data_dir}", flag)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if message.startswith("error: "):  # Ours (the others are absl's flag parser's): one line, status 2.
        assert result.returncode == 2
        assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
            next(line for line in result.stderr.splitlines() if message in line)]
    assert not workdir.exists()


# A learning rate of 1e4 makes the tiny run's gradient norm infinite within a few steps; evaluating and saving
# every step (in the background) puts a checkpoint right before the step that went wrong.
DIVERGING = ["--config.train.learning_rate=1e4", "--config.num_train_steps=12", "--config.eval_every_steps=1",
             "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=20", "--config.checkpoint_best_metric=",
             "--config.decode_eval_examples=0", "--config.async_checkpoints=true"]


def _all_finite(tree) -> bool:
    return all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def test_a_diverging_run_stops_naming_the_step_and_saves_nothing_nonfinite(tmp_path, data_dir):
    workdir = tmp_path / "diverging"
    result = run_train(f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={data_dir}", *DIVERGING)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    bad_step = int(error.removeprefix("error: step ").split(":")[0])
    records = {}  # Step -> its train and eval metrics together.
    for record in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()):
        records.setdefault(record["step"], {}).update(record)
    assert records[bad_step]["train/nonfinite"] == 1.0  # The fault happened at the step the error names...
    assert all(records[step]["train/nonfinite"] == 0.0 for step in range(1, bad_step))  # ...and not before.
    saved = sorted(int(name) for name in os.listdir(workdir / "checkpoints"))
    assert saved == list(range(1, bad_step))  # Every step before it, none from it on.
    assert f"the latest checkpoint is still step {saved[-1]}" in error
    assert _all_finite(final_params(workdir, saved[-1]))


def test_on_nonfinite_skip_skips_those_updates_and_trains_on(tmp_path, data_dir):
    workdir = tmp_path / "skipping"
    result = run_train(f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={data_dir}", *DIVERGING,
                       "--config.train.on_nonfinite=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("train/nonfinite")]
    assert skipped and records[-1]["step"] == 12
    assert _all_finite(final_params(workdir, 12))


def test_a_second_training_in_a_live_runs_workdir_refuses_and_names_it(tmp_path, data_dir):
    workdir = tmp_path / "live"
    env = script_env()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, str(TRAIN), f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
             "--config.num_train_steps=100000", "--config.checkpoint_every_steps=5",
             "--config.eval_every_steps=100000", "--config.checkpoint_best_metric="],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 180
        while not (workdir / "checkpoints" / "5" / "commit_success.txt").exists():
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        second = run_train(f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
                           "--config.seed=1", timeout=120)
        assert first.poll() is None  # The first run was live all along.
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by a live training run (host {os.uname().nodename}, pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr and "step 1/" not in second.stderr
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert run_lib.restore(workdir).label == str(saved)  # The first run's checkpoints stay restorable.
