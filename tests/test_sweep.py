"""Sweeps: the override helpers, and launch/sweep.py running the 4-point tiny sweep (one point fails)."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401

from flaxformer_lite import sweeps

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = ROOT / "launch" / "sweep.py"
TINY = ROOT / "experiments" / "configs" / "tiny.py"
TINY_SWEEP = ROOT / "experiments" / "sweeps" / "tiny.py"
# Short points: 2 steps, one evaluation (4 decoded examples), one checkpoint.
FAST = ["--config.num_train_steps=2", "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
        "--config.decode_eval_examples=4"]


def test_grid_zip_product_and_random():
    grid = sweeps.grid(**{"config.model.d_model": [32, 64], "train.learning_rate": [1e-3, 1e-2]})
    assert grid == [{"model.d_model": d, "train.learning_rate": lr} for d in (32, 64) for lr in (1e-3, 1e-2)]
    zipped = sweeps.zip_(**{"model.d_model": [32, 64], "model.d_ff": [64, 128]})
    assert zipped == [{"model.d_model": 32, "model.d_ff": 64}, {"model.d_model": 64, "model.d_ff": 128}]
    with pytest.raises(ValueError, match="one length"):
        sweeps.zip_(a=[1, 2], b=[1])
    both = sweeps.product(zipped, sweeps.grid(seed=[0, 1]))
    assert len(both) == 4 and both[1] == {"model.d_model": 32, "model.d_ff": 64, "seed": 1}
    sample = sweeps.random(5, seed=3, **{"train.learning_rate": sweeps.loguniform(1e-4, 1e-2),
                                        "model.activation": ["relu", "gelu"],
                                        "train.warmup_steps": sweeps.randint(1, 9)})
    assert sample == sweeps.random(5, seed=3, **{"train.learning_rate": sweeps.loguniform(1e-4, 1e-2),
                                                 "model.activation": ["relu", "gelu"],
                                                 "train.warmup_steps": sweeps.randint(1, 9)})
    assert sample != sweeps.random(5, seed=4, **{"train.learning_rate": sweeps.loguniform(1e-4, 1e-2),
                                                 "model.activation": ["relu", "gelu"],
                                                 "train.warmup_steps": sweeps.randint(1, 9)})
    assert all(1e-4 <= p["train.learning_rate"] <= 1e-2 and 1 <= p["train.warmup_steps"] <= 9 for p in sample)
    assert sweeps.chain(grid, grid[:1]) == grid  # Duplicates dropped.
    assert sweeps.swept_keys(both) == ["model.d_model", "model.d_ff", "seed"]
    with pytest.raises(ValueError, match="bad sweep key"):
        sweeps.grid(**{"model..x": [1]})


def test_flags_and_names():
    point = {"model.d_model": 32, "train.learning_rate": 0.003, "mesh_shape": (2, 1, 1),
             "model.activation": "gelu", "train.grad_clip_norm": None, "data.pack": False}
    assert sweeps.override_flags(point) == [
        "--config.model.d_model=32", "--config.train.learning_rate=0.003", "--config.mesh_shape=(2,1,1)",
        "--config.model.activation=gelu", "--config.train.grad_clip_norm=None", "--config.data.pack=False"]
    name = sweeps.point_name(point)
    assert name.startswith("d_model=32,learning_rate=0.003,mesh_shape=_2,1,1_,activation=gelu") and "/" not in name
    assert name == sweeps.point_name(dict(point)) != sweeps.point_name({**point, "model.d_model": 64})
    # Two keys with the same last component keep their full paths.
    assert sweeps.point_name({"a.x": 1, "b.x": 2}).startswith("a.x=1,b.x=2-")
    assert len(sweeps.load_sweep(str(ROOT / "experiments" / "sweeps" / "multi30k.py"))) == 8
    assert len(sweeps.load_sweep(str(ROOT / "experiments" / "sweeps" / "multi30k.py") + ":small")) == 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def run_sweep(root, data_dir, *flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, str(SWEEP), f"--config={TINY}", f"--sweep={TINY_SWEEP}", f"--root={root}", "--workers=2",
         "--eval_flags=--max_examples=4", "--poll_secs=1", *flags, "--", f"--config.data_dir={data_dir}", *FAST],
        capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)


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
    assert "TransformerConfig.activation: 'swish' is not one of" in failed["reason"]
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
    again = run_sweep(root, data_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "3 finished, 1 failed (skipped 3 finished before" in again.stdout
    for name, log in logs.items():  # Nothing finished ran again.
        assert (root / name / "train.log").read_text() == log
        assert json.loads((root / name / "status.json").read_text())["attempts"] == 1
    failed_status = json.loads((root / failed["name"] / "status.json").read_text())
    assert failed_status["status"] == "failed" and failed_status["attempts"] == 2  # Failed points are retried.
