"""Scoring, and the evaluate / translate commands on a freshly trained tiny run."""

import json
import shutil

import pytest

from flaxformer_lite import checkpointing, translation
from helpers import TINY, run_script, script_env


def run(script, *args, stdin=None, devices=1):
    # Every compiled program goes to the run's compilation cache, however quickly it compiled.
    env = script_env(devices, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return run_script(script, *args, stdin=stdin, env=env)


def test_score_bleu_chrf_exact_match():
    references = ["the cat sat on the mat .", "a dog runs"]
    perfect = translation.score(references, references, "de")
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["exact_match"] == 100.0
    assert "tok:13a" in perfect["bleu_signature"]
    half = translation.score(["the cat sat on the mat .", "a cat walks"], references, "de")
    assert half["exact_match"] == 50.0 and 0 < half["bleu"] < 100
    chinese = translation.score(["我是个学生。"], ["我是个学生。"], "zh")
    assert "tok:zh" in chinese["bleu_signature"] and chinese["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="hypotheses"):
        translation.score(["a"], [], "de")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    workdir, data_dir = root / "run", root / "tfds"
    result = run("train.py", f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={data_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exact match" in result.stderr  # Translation metrics during training.
    return workdir


def test_training_logs_translation_metrics_and_keeps_the_best(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    decoded = [r for r in records if "eval/exact_match" in r]
    assert [r["step"] for r in decoded] == [3, 6] and all("eval/bleu" in r for r in decoded)
    assert any((trained_run / "compilation_cache").iterdir())  # JAX's cache, reused by a restart.


@pytest.mark.parametrize("flags", [["--method=greedy"], ["--beam_size=2", "--average_last=2"]])
def test_evaluate_writes_scores_and_one_hypothesis_per_line(trained_run, flags):
    result = run("evaluate.py", f"--workdir={trained_run}", "--split=test[:40]", "--batch_size=16", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    (report_path,) = [p for p in (trained_run / "eval").glob("*.json")
                      if ("greedy" in p.name) == ("--method=greedy" in flags)]
    report = json.loads(report_path.read_text())
    assert report["num_examples"] == 40
    assert report["bleu_signature"].startswith("nrefs:1|") and "tok:13a" in report["bleu_signature"]
    assert {"bleu", "chrf", "exact_match", "decode_seconds", "settings", "checkpoint"} <= set(report)
    if "--average_last=2" in flags:
        assert report["checkpoint"] == "avg2-6" and report["settings"]["beam_size"] == 2
    hypotheses = report_path.with_suffix(".txt").read_text(encoding="utf-8").split("\n")
    assert len(hypotheses) == 41 and hypotheses[-1] == ""  # 40 lines, each newline-terminated.


def test_translate_reads_flags_and_stdin(trained_run):
    result = run("translate.py", f"--workdir={trained_run}", "--text=walk twice", "--text=jump", "--method=greedy")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 2
    piped = run("translate.py", f"--workdir={trained_run}", "--method=greedy", stdin="walk twice\njump\nrun left\n")
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert len(piped.stdout.splitlines()) == 3
    # The same sentences translate the same way whether they come from flags or stdin, alone or batched.
    assert piped.stdout.splitlines()[:2] == result.stdout.splitlines()


@pytest.mark.parametrize("script, flags, message", [
    ("evaluate.py", ["--workdir={empty}"], "error: {empty}/config.json not found: is {empty} the workdir of a "
                                           "training run?"),
    ("translate.py", ["--workdir={empty}", "--text=jump"], "error: {empty}/config.json not found"),
    ("visualize.py", ["--workdir={empty}", "--text=jump"], "error: {empty}/config.json not found"),
    ("visualize.py", ["--workdir={empty}", "--curves"], "error: {empty}/metrics.jsonl not found"),
    ("evaluate.py", ["--workdir={run}", "--split=nosuchsplit"], "error: no split 'nosuchsplit' in "),
    ("evaluate.py", ["--workdir={run}", "--checkpoint=12345"], "error: no checkpoint at step 12345: expected "
                                                               "latest, best or one of [3, 6]"),
    ("translate.py", ["--workdir={run}", "--checkpoint=12345", "--text=jump"], "error: no checkpoint at step 12345"),
])
def test_user_errors_are_one_line_and_exit_2(trained_run, tmp_path, script, flags, message):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    fill = lambda text: text.format(empty=empty, run=trained_run)  # noqa: E731
    result = run(script, *map(fill, flags))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(fill(message)), error


def test_evaluate_restores_the_best_checkpoint(trained_run, tmp_path):
    """``--checkpoint=best`` takes the step with the best saved metric, here one that is not the latest.

    A 6-step run scores 0 at both evaluations, so the copy's step-3 metrics (the file Orbax ranks by) are
    raised above step 6's: evaluating the latest checkpoint instead would read ``best-6``.
    """
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    metric = json.loads((workdir / "config.json").read_text())["checkpoint_best_metric"]
    saved = {step: workdir / "checkpoints" / str(step) / "metrics" / "metrics" for step in (3, 6)}
    values = {step: json.loads(path.read_text()) for step, path in saved.items()}
    values[3][metric] = values[6][metric] + 1
    saved[3].write_text(json.dumps(values[3]))
    result = run("evaluate.py", f"--workdir={workdir}", "--split=test[:8]", "--checkpoint=best",
                 "--method=greedy", "--batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    (report_path,) = (workdir / "eval").glob("test[[]:8]-best-*-greedy.json")
    assert json.loads(report_path.read_text())["checkpoint"] == "best-3"


def test_evaluate_again_compiles_nothing_new(trained_run):
    """The second evaluation finds every program in JAX's cache in the workdir: no new cache entry."""
    args = (f"--workdir={trained_run}", "--split=test[:12]", "--method=greedy", "--batch_size=4")
    first = run("evaluate.py", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    (hypotheses,) = (trained_run / "eval").glob("test[[]:12]-*-greedy.txt")
    translations = hypotheses.read_text()
    entries = sorted(p.name for p in (trained_run / "compilation_cache").iterdir())
    again = run("evaluate.py", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in (trained_run / "compilation_cache").iterdir()) == entries
    assert hypotheses.read_text() == translations


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_evaluate_on_8_devices_gives_the_hypotheses_and_scores_of_one(trained_run, method):
    """The decoding batches split over 8 (virtual) devices, 10 rows padded to 16, parameters replicated."""
    outputs = []
    for devices in (1, 8):
        result = run("evaluate.py", f"--workdir={trained_run}", "--split=test[:30]", f"--method={method}",
                     "--batch_size=10", devices=devices)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"on mesh {{'data': {devices}, 'fsdp': 1, 'tensor': 1}}" in result.stderr
        (report,) = (trained_run / "eval").glob(f"test[[]:30]-*-{'greedy' if method == 'greedy' else 'beam'}*.json")
        scores = json.loads(report.read_text())
        outputs.append((report.with_suffix(".txt").read_text(), scores["bleu"], scores["exact_match"]))
    assert outputs[0] == outputs[1] and outputs[0][0].count("\n") == 30


def test_a_damaged_latest_checkpoint_gives_way_to_the_previous_one(trained_run, tmp_path):
    workdir = tmp_path / "damaged"
    shutil.copytree(trained_run, workdir)
    assert checkpointing.all_steps(workdir / "checkpoints") == [3, 6]
    data_files = [p for p in (workdir / "checkpoints" / "6" / "state" / "d").iterdir()]
    assert data_files  # The arrays of step 6, which --checkpoint=latest reads first.
    for path in data_files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = run("evaluate.py", f"--workdir={workdir}", "--split=test[:8]", "--method=greedy", "--batch_size=8",
                 "--checkpoint=latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Could not restore the params from checkpoint step 6" in result.stderr
    assert "test[:8] 3 greedy" in result.stdout  # The report names the checkpoint used.
    assert checkpointing.all_steps(workdir / "checkpoints") == [3, 6]  # Evaluation deletes nothing.
