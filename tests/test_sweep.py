"""Sweeps: the sweep_space helpers, the runner's settings, results and Slurm script, and launch/sweep.py running
the 4-point tiny sweep (one point fails)."""

import csv
import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
from absl import app, flags
from ml_collections import config_flags  # noqa: F401

from flaxformer_lite import run as run_lib
from flaxformer_lite import sweep_space as space
from flaxformer_lite import sweep_runner, train_loop
from flaxformer_lite.sweep_runner import results, slurm
from helpers import FAST, ROOT, TINY, script_env, tiny_config

SWEEP = ROOT / "launch" / "sweep.py"
TINY_SWEEP = ROOT / "experiments" / "sweeps" / "tiny.py"


def test_grid_zip_product_and_random():
    grid = space.grid(**{"config.model.d_model": [32, 64], "train.learning_rate": [1e-3, 1e-2]})
    assert grid == [{"model.d_model": d, "train.learning_rate": lr} for d in (32, 64) for lr in (1e-3, 1e-2)]
    zipped = space.zip_(**{"model.d_model": [32, 64], "model.d_ff": [64, 128]})
    assert zipped == [{"model.d_model": 32, "model.d_ff": 64}, {"model.d_model": 64, "model.d_ff": 128}]
    with pytest.raises(ValueError, match="one length"):
        space.zip_(a=[1, 2], b=[1])
    both = space.product(zipped, space.grid(seed=[0, 1]))
    assert len(both) == 4 and both[1] == {"model.d_model": 32, "model.d_ff": 64, "seed": 1}
    sample = space.random(5, seed=3, **{"train.learning_rate": space.loguniform(1e-4, 1e-2),
                                        "model.activation": ["relu", "gelu"],
                                        "train.warmup_steps": space.randint(1, 9)})
    assert sample == space.random(5, seed=3, **{"train.learning_rate": space.loguniform(1e-4, 1e-2),
                                                 "model.activation": ["relu", "gelu"],
                                                 "train.warmup_steps": space.randint(1, 9)})
    assert sample != space.random(5, seed=4, **{"train.learning_rate": space.loguniform(1e-4, 1e-2),
                                                 "model.activation": ["relu", "gelu"],
                                                 "train.warmup_steps": space.randint(1, 9)})
    assert all(1e-4 <= p["train.learning_rate"] <= 1e-2 and 1 <= p["train.warmup_steps"] <= 9 for p in sample)
    assert space.chain(grid, grid[:1]) == grid  # Duplicates dropped.
    assert space.swept_keys(both) == ["model.d_model", "model.d_ff", "seed"]
    with pytest.raises(ValueError, match="bad sweep key"):
        space.grid(**{"model..x": [1]})


def test_flags_and_names():
    point = {"model.d_model": 32, "train.learning_rate": 0.003, "mesh_shape": (2, 1, 1),
             "model.activation": "gelu", "train.grad_clip_norm": None, "data.pack": False}
    assert space.override_flags(point) == [
        "--config.model.d_model=32", "--config.train.learning_rate=0.003", "--config.mesh_shape=(2,1,1)",
        "--config.model.activation=gelu", "--config.train.grad_clip_norm=None", "--config.data.pack=False"]
    name = space.point_name(point)
    assert name.startswith("d_model=32,learning_rate=0.003,mesh_shape=_2,1,1_,activation=gelu") and "/" not in name
    assert name == space.point_name(dict(point)) != space.point_name({**point, "model.d_model": 64})
    # Two keys with the same last component keep their full paths.
    assert space.point_name({"a.x": 1, "b.x": 2}).startswith("a.x=1,b.x=2-")
    assert len(space.load_sweep(str(ROOT / "experiments" / "sweeps" / "multi30k.py"))) == 8
    assert len(space.load_sweep(str(ROOT / "experiments" / "sweeps" / "multi30k.py") + ":small")) == 4
    cpu = space.load_sweep(str(ROOT / "experiments" / "sweeps" / "multi30k.py") + ":cpu")
    assert len(cpu) == 5 and cpu[0]["model.d_model"] == 256 and cpu[0]["train.learning_rate"] == 1e-3
    assert all(p["train.learning_rate"] == 2e-3 for p in cpu[1:])
    assert space.load_sweep(str(ROOT / "experiments" / "sweeps" / "tatoeba_en_zh.py")) == [
        {"train.learning_rate": 1e-3, "train.warmup_steps": 1000},
        {"train.learning_rate": 2e-3, "train.warmup_steps": 500},
        {"train.learning_rate": 3e-3, "train.warmup_steps": 500}]


def test_old_module_name_is_the_same_module():
    from flaxformer_lite import sweeps

    assert sweeps is space and sweeps.grid(a=[1]) == [{"a": 1}]


def parse_settings(*argv):
    flag_values = flags.FlagValues()
    sweep_runner.define_flags(flag_values)
    rest = flag_values(["sweep.py", *argv])
    return sweep_runner.Settings.from_flags(flag_values, rest, repo=str(ROOT), launcher=str(SWEEP))


def test_settings_from_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = parse_settings(
        "--config=cfg.py:small", "--sweep=s.py:x", "--root=out", "--workers=3", "--backend=slurm",
        "--metric=evaluate/bleu", "--mode=max", "--noevaluate", "--eval_flags=--split=test",
        "--eval_flags=--max_examples=4", "--noretry_failed", "--gpus_per_worker=2",
        "--slurm_args=--partition=gpu --comment='a b'", "--nowait", "--poll_secs=0.5", "--",
        "--config.data_dir=/tmp/tfds", "--config.num_train_steps=2")
    assert settings == sweep_runner.Settings(
        root=str(tmp_path / "out"), repo=str(ROOT), launcher=str(SWEEP), config=f"{tmp_path}/cfg.py:small",
        sweep="s.py:x", train_flags=("--config.data_dir=/tmp/tfds", "--config.num_train_steps=2"), workers=3,
        backend="slurm", metric="evaluate/bleu", mode="max", evaluate=False,
        eval_flags=("--split=test", "--max_examples=4"), retry_failed=False, gpus_per_worker=2,
        slurm_args=("--partition=gpu", "--comment=a b"), wait=False, collect=False, poll_secs=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.workers = 1  # type: ignore[misc]

    defaults = parse_settings("--config=cfg.py", "--root=out")
    assert (defaults.workers, defaults.local_workers, defaults.backend, defaults.metric, defaults.mode) == (
        1, 1, "local", "eval/loss", "auto")
    assert defaults.evaluate and defaults.retry_failed and defaults.wait and not defaults.collect
    assert defaults.train_flags == defaults.eval_flags == defaults.slurm_args == () and defaults.sweep == ""
    assert parse_settings("--config=c.py", "--root=r", "--workers=0").local_workers == 1
    # --collect and Slurm array tasks (--run_index) read the saved spec: no --config needed.
    assert parse_settings("--root=out", "--collect").config is None
    assert parse_settings("--root=out", "--run_index=3").run_index == 3


@pytest.mark.parametrize("argv, message", [
    (["--root=out"], "--config is required"),
    (["--config=c.py", "--root=out", "--workers=-1"], "--workers=-1"),
    (["--config=c.py", "--root=out", "--gpus_per_worker=-2"], "--gpus_per_worker=-2"),
    (["--config=c.py", "--root=out", "--poll_secs=0"], "--poll_secs=0"),
    (["--root=out", "--run_index=-1"], "--run_index=-1"),
    (["--config=c.py", "--root=out", "--metric="], "--metric is empty"),
    (["--config=c.py", "--root=out", "--slurm_args=--comment='a"], "--slurm_args"),
])
def test_bad_settings_name_the_flag(argv, message):
    with pytest.raises(app.UsageError, match=message):
        parse_settings(*argv)


def test_slurm_script_from_settings(tmp_path):
    points = [{"train.learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
    sweep = sweep_runner.Sweep(tmp_path / "sw", "cfg.py", points, [], True, [], repo=str(ROOT))
    settings = sweep_runner.Settings(root=str(tmp_path / "sw"), repo=str(ROOT), launcher=str(SWEEP),
                                     config="cfg.py", workers=2, metric="evaluate/bleu", retry_failed=False,
                                     slurm_args=("--partition=gpu", "--time=4:00:00"))
    script = slurm.slurm_script(sweep, [1, 3], settings)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and "#SBATCH --array=1,3%2" in lines
    assert f"#SBATCH --output={tmp_path}/sw/slurm/%A_%a.out" in lines
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --time=4:00:00" in lines
    assert f"cd {ROOT}" in lines
    assert lines[-1] == (f'exec {sys.executable} {SWEEP} --root={tmp_path}/sw --run_index="$SLURM_ARRAY_TASK_ID" '
                         "--metric=evaluate/bleu --mode=auto --noretry_failed")
    unlimited = slurm.slurm_script(sweep, [0], dataclasses.replace(settings, workers=0, retry_failed=True))
    assert "#SBATCH --array=0\n" in unlimited and "--noretry_failed" not in unlimited


def fake_point(sweep, index, *, eval_losses=(), bleu=None, trained=False, status=None):
    """A workdir as a point leaves it, without training: metrics.jsonl, a checkpoint, an eval report."""
    workdir = pathlib.Path(sweep.workdir(index))
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"num_train_steps": 4}))
    lines = [{"step": 2 * (i + 1), "train/loss": 5.0 - i, "eval/loss": loss} for i, loss in enumerate(eval_losses)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 9, "tr')
    if trained:
        (workdir / "checkpoints" / "4").mkdir(parents=True)
    if bleu is not None:
        (workdir / "eval").mkdir()
        (workdir / "eval" / "validation.json").write_text(json.dumps({"bleu": bleu, "chrf": 40.0, "split": "x"}))
    if status:
        sweep.set_status(index, **status)


def test_plot_labels_a_key_a_point_leaves_alone_as_the_configs_value(tmp_path, monkeypatch):
    from flaxformer_lite import plotting

    points = [{}, {"model.d_model": 128}, {"model.d_model": 192}]  # The first trains the config as it is.
    sweep = sweep_runner.Sweep(tmp_path / "sw", "cfg.py", points, [], True, [], repo=str(ROOT))
    for index, loss in enumerate((3.0, 2.0, 2.5)):
        fake_point(sweep, index, eval_losses=(loss,), trained=True, status={"status": "finished"})
    plotted = {}
    monkeypatch.setattr(plotting, "plot_metric_vs_params",
                        lambda rows, metric, params, path: plotted.update(rows=rows, params=params))
    monkeypatch.setattr("matplotlib.pyplot.close", lambda figure: None)
    rows = results.write_results(sweep, "eval/loss")
    assert plotted["params"] == ["model.d_model"]
    assert {r["name"]: r["model.d_model"] for r in plotted["rows"]} == {
        sweep.names[0]: "(config)", sweep.names[1]: 128, sweep.names[2]: 192}
    assert {r["name"]: r["model.d_model"] for r in rows}[sweep.names[0]] is None  # The table leaves it blank.


def test_results_writer_on_a_fake_root(tmp_path):
    points = [{"train.learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2)]
    points.append({"train.learning_rate": 3e-3, "model.activation": "swish"})
    points.append({"train.learning_rate": 3e-2})
    sweep = sweep_runner.Sweep(tmp_path / "sw", "cfg.py", points, [], True, [], repo=str(ROOT))
    fake_point(sweep, 0, eval_losses=(3.0, 2.5), bleu=10.0, trained=True,
               status={"status": "finished", "wall_seconds": 12.34})
    fake_point(sweep, 1, eval_losses=(3.0, 1.5, 2.0), bleu=20.0, trained=True, status={"status": "running"})
    fake_point(sweep, 2, eval_losses=(4.0,), status={"status": "running", "wall_seconds": 3.0})
    fake_point(sweep, 3, status={"status": "failed", "reason": "train exit 1: ValueError: 'swish'",
                                 "log_tail": ["Traceback", "ValueError: 'swish'"]})
    # Point 4 has no workdir at all: pending.

    rows = results.write_results(sweep, "eval/loss")
    assert results.summary(rows) == "2 finished, 1 running, 1 pending, 1 failed"
    with open(tmp_path / "sw" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [sweep.names[i] for i in (1, 0, 2, 4, 3)]
    assert [r["status"] for r in table] == ["finished", "finished", "running", "pending", "failed"]
    best = table[0]
    assert best["eval/loss (final)"] == "2.0" and best["eval/loss (best)"] == "1.5" and best["steps"] == "6"
    assert best["train/loss"] == "3.0" and best["evaluate/bleu"] == "20.0" and best["reason"] == ""
    assert table[1]["wall_s"] == "12.3" and table[1]["train.learning_rate"] == "0.001"
    assert table[-1]["model.activation"] == "swish" and table[-1]["reason"] == "train exit 1: ValueError: 'swish'"
    assert "eval/loss" not in table[0]  # The sorting metric is not repeated as an extra column.

    markdown = (tmp_path / "sw" / "results.md").read_text()
    assert markdown.startswith("# Sweep sw\n") and "5 points: 2 finished, 1 running, 1 pending, 1 failed" in markdown
    assert "sorted by eval/loss (min)" in markdown and markdown.count("| finished |") == 2
    assert f"## Failures\n\n### {sweep.names[3]}\n" in markdown
    assert "```\nTraceback\nValueError: 'swish'\n```" in markdown
    assert (tmp_path / "sw" / "results.png").stat().st_size > 1000

    by_bleu = results.collect(sweep, "evaluate/bleu")  # "auto": higher BLEU is better.
    assert [r["name"] for r in by_bleu[:2]] == [sweep.names[1], sweep.names[0]]
    assert by_bleu[0]["eval/loss"] == 2.0 and "evaluate/bleu" not in by_bleu[0]
    lowest_first = results.collect(sweep, "evaluate/bleu", mode="min")
    assert [r["name"] for r in lowest_first[:2]] == [sweep.names[0], sweep.names[1]]
    assert results.metric_mode("eval/perplexity") == "min" and results.metric_mode("eval/accuracy") == "max"


def run_sweep(root, data_dir, *flags):
    return subprocess.run(
        [sys.executable, str(SWEEP), f"--config={TINY}", f"--sweep={TINY_SWEEP}", f"--root={root}", "--workers=2",
         "--eval_flags=--max_examples=4", "--poll_secs=1", *flags, "--", f"--config.data_dir={data_dir}", *FAST],
        capture_output=True, text=True, timeout=400, env=script_env(), cwd=ROOT)


@pytest.mark.slow
def test_tiny_sweep_reports_a_failed_point_and_reruns_nothing_finished(tmp_path, data_dir):
    root = tmp_path / "sweep"
    result = run_sweep(root, data_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "3 finished, 1 failed" in result.stdout
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished"] * 3 + ["failed"]
    failed = rows[-1]
    assert failed["model.activation"] == "swish"
    assert "config.model.activation: 'swish' is not one of" in failed["reason"]
    for row in rows[:3]:
        assert row["steps"] == "2" and float(row["wall_s"]) > 0
        assert float(row["eval/loss (final)"]) > 0 and row["evaluate/bleu"] != ""
    finals = [float(r["eval/loss (final)"]) for r in rows[:3]]
    assert finals == sorted(finals)  # Best (lowest eval/loss) first.
    markdown = (root / "results.md").read_text()
    assert "## Failures" in markdown and "swish" in markdown and markdown.count("| finished |") == 3
    assert (root / "results.png").stat().st_size > 1000
    for row in rows[:3]:
        workdir = root / row["name"]
        assert (workdir / "checkpoints" / "2").is_dir() and list((workdir / "eval").glob("*.json"))

    logs = {r["name"]: (root / r["name"] / "train.log").read_text() for r in rows[:3]}
    # Two workers started on a fresh data_dir: exactly one point built SCAN, the others read it (the build
    # lock; tests/test_datasets.py shows three processes failing without it).
    assert sum("Building flaxformer_lite_scan" in log for log in logs.values()) == 1
    again = run_sweep(root, data_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "3 finished, 1 failed (skipped 3 finished before" in again.stdout
    for name, log in logs.items():  # Nothing finished ran again.
        assert (root / name / "train.log").read_text() == log
        assert json.loads((root / name / "status.json").read_text())["attempts"] == 1
    failed_status = json.loads((root / failed["name"] / "status.json").read_text())
    assert failed_status["status"] == "failed" and failed_status["attempts"] == 2  # Failed points are retried.


def test_a_point_that_spent_its_time_budget_is_trained(tmp_path, data_dir):
    sweep = sweep_runner.Sweep(tmp_path / "sw", str(TINY), [{"seed": 1}], [], True, [], repo=str(ROOT))
    workdir = pathlib.Path(sweep.workdir(0))
    budget = dict(num_train_steps=1000, eval_every_steps=500, checkpoint_every_steps=500)
    # The first step (which compiles) alone takes longer than the budget: the session stops after it.
    train_loop.train_and_evaluate(tiny_config(data_dir, max_train_seconds=1e-3, **budget), str(workdir))
    assert run_lib.load_stopped(workdir) == {"step": 1, "reason": "max_train_seconds"}
    assert sweep.trained(0) and not sweep.finished(0)  # Trained; evaluate.py has not run on it yet.
    (workdir / "checkpoints" / "1").rename(workdir / "moved")
    assert not sweep.trained(0)  # The budget counts only with the checkpoint of the step it ran out at.
    (workdir / "moved").rename(workdir / "checkpoints" / "1")

    # A later session replaces the record: this one runs to num_train_steps.
    train_loop.train_and_evaluate(tiny_config(data_dir, **{**budget, "num_train_steps": 3}), str(workdir))
    assert run_lib.load_stopped(workdir) == {"step": 3, "reason": "num_train_steps"}
    assert sweep.trained(0)
