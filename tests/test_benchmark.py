"""experiments/benchmark.py end to end on the tiny config: every mode measured, JSON lines and a table."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmark_measures_train_greedy_and_beam(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "benchmark.py"),
         f"--config={ROOT / 'experiments' / 'configs' / 'tiny.py'}", "--config.data.batch_size=4",
         "--steps=3", "--warmup=1", "--decode_reps=2", "--decode_batch=3", "--decode_length=5", "--peak_size=128",
         f"--out={out}"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["train", "greedy", "beam"]
    train, greedy, beam = rows
    assert train["step_s"]["n"] == 3 and 0 < train["step_s"]["min"] <= train["step_s"]["median"]
    # tokens/s and MFU follow from the step time, the batch shape and the analytic FLOPs.
    batch, (_, targets_length) = train["batch"], train["lengths"]
    assert train["tgt_tok_per_s"] == batch * targets_length / train["step_s"]["median"]
    assert abs(train["mfu"] - train["train_gflop_per_step"] / train["step_s"]["median"] / train["peak_gflops"]) < 1e-9
    assert train["peak_gflops"] > 0 and train["peak_memory_mb"] > 0
    assert greedy["tok_per_s"] == 3 * 5 / greedy["decode_s"]["median"] and beam["beam_size"] == 4
    assert "MFU" in result.stdout and "greedy" in result.stdout
