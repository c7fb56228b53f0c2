"""Runs a sweep: every point is its own ``experiments/train.py`` process (then ``experiments/evaluate.py``).

    python launch/sweep.py --config=experiments/configs/tiny.py --sweep=experiments/sweeps/tiny.py \
        --root=/tmp/sweep --workers=2 [--metric=eval/loss] [--backend=local|slurm] -- --config.data_dir=/tmp/tfds

Flags after ``--`` go to every ``train.py`` (common overrides); the sweep's own overrides follow them, so a
point wins over a common flag. Each point trains in ``ROOT/<point name>/`` (a normal workdir, plus
``train.log``, ``eval.log`` and ``status.json``); ``--workers`` points run at a time. Rerunning the same command
skips finished points (trained to ``num_train_steps`` and evaluated) and resumes the others from their latest
checkpoint; a failing point is marked failed with the tail of its log and does not stop the rest.
``ROOT/results.csv``, ``ROOT/results.md`` (sorted by ``--metric``) and ``ROOT/results.png`` (the metric
against each swept hyperparameter) are rewritten as points finish and at the end.

``--backend=slurm`` writes ``ROOT/slurm/sweep.sbatch`` (a job array with one task per unfinished point, at
most ``--workers`` at once; ``--slurm_args`` adds ``#SBATCH`` options), submits it with ``sbatch``, waits for
it while refreshing the results (``--nowait`` returns at once; ``--collect`` later only rewrites them).
Array tasks run this script with ``--run_index``; the repository and ``--root`` must be on a shared file
system.
"""

from __future__ import annotations

import concurrent.futures
import csv
import fcntl
import glob
import json
import math
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # Run from a checkout.

from flaxformer_lite import sweeps  # noqa: E402
from flaxformer_lite import run as run_lib  # noqa: E402

TRAIN = os.path.join(REPO, "experiments", "train.py")
EVALUATE = os.path.join(REPO, "experiments", "evaluate.py")

_CONFIG = flags.DEFINE_string("config", None, "Experiment config file[:variant], as for experiments/train.py.")
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file[:arg] defining get_sweep(); default: the config "
                             "file's own get_sweep().")
_ROOT = flags.DEFINE_string("root", None, "Directory of the sweep: one workdir per point, results.*.",
                            required=True)
_WORKERS = flags.DEFINE_integer("workers", 1, "Points run at the same time (Slurm: array task limit).")
_BACKEND = flags.DEFINE_enum("backend", "local", ["local", "slurm"], "Where points run.")
_METRIC = flags.DEFINE_string("metric", "eval/loss", "Metric to sort and plot by: a metrics.jsonl key "
                              "(eval/loss, eval/bleu, train/loss, ...) or evaluate/<key> from evaluate.py "
                              "(evaluate/bleu, evaluate/exact_match, evaluate/chrf).")
_MODE = flags.DEFINE_enum("mode", "auto", ["auto", "min", "max"], "Whether lower or higher --metric is better; "
                          "auto: lower for loss/perplexity/nll, higher otherwise.")
_EVALUATE = flags.DEFINE_bool("evaluate", True, "Run experiments/evaluate.py on each trained point.")
_EVAL_FLAGS = flags.DEFINE_multi_string("eval_flags", [], "Flags for evaluate.py, e.g. --eval_flags=--split=test.")
_RETRY_FAILED = flags.DEFINE_bool("retry_failed", True, "Rerun points that failed before (they resume).")
_GPUS_PER_WORKER = flags.DEFINE_integer("gpus_per_worker", 0, "Local backend: give each running point its own "
                                        "CUDA_VISIBLE_DEVICES slice of this many GPUs (0: leave it alone).")
_SLURM_ARGS = flags.DEFINE_string("slurm_args", "", "Extra sbatch options, e.g. '--partition=gpu --gres=gpu:1 "
                                  "--time=4:00:00 --cpus-per-task=8'.")
_NOWAIT = flags.DEFINE_bool("nowait", False, "Slurm: submit and return without waiting for the array.")
_COLLECT = flags.DEFINE_bool("collect", False, "Only rewrite the results from what is in --root.")
_POLL_SECS = flags.DEFINE_float("poll_secs", 10.0, "How often results are refreshed while points run.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each point's command and exit.")
_RUN_INDEX = flags.DEFINE_integer("run_index", None, "Internal (Slurm array tasks): run point N of "
                                  "ROOT/sweep.json.")

_TAIL_LINES = 15
_STATUS_ORDER = {"finished": 0, "running": 1, "interrupted": 2, "pending": 3, "failed": 4}


# ------------------------------------------------------------------------------------------------ helpers


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _tail(path: str, lines: int = _TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def failure_reason(tail: list[str]) -> str:
    """The most telling line of a failed run's log: the last exception-looking line, else the last line."""
    for line in reversed(tail):
        stripped = line.strip()
        head = stripped.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit", "Interrupt")) or stripped.startswith("FATAL"):
            return stripped[:400]
    return tail[-1].strip()[:400] if tail else "no output"


def metric_mode(metric: str, mode: str = "auto") -> str:
    if mode != "auto":
        return mode
    return "min" if any(word in metric for word in ("loss", "perplexity", "nll")) else "max"


class Sweep:
    """The points of a sweep, their workdirs and how each is run; saved as ROOT/sweep.json."""

    def __init__(self, root: str, config: str, points: list[dict], train_flags: list[str], evaluate: bool,
                 eval_flags: list[str], python: str = sys.executable):
        self.root, self.config, self.points = os.path.abspath(root), config, points
        self.train_flags, self.evaluate, self.eval_flags, self.python = train_flags, evaluate, eval_flags, python
        self.names = [sweeps.point_name(p) for p in points]

    def save(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        _write_atomic(os.path.join(self.root, "sweep.json"), json.dumps({
            "config": self.config, "train_flags": self.train_flags, "evaluate": self.evaluate,
            "eval_flags": self.eval_flags, "python": self.python,
            "points": [{"name": n, "overrides": p} for n, p in zip(self.names, self.points)]}, indent=1))

    @classmethod
    def load(cls, root: str) -> Sweep:
        spec = _read_json(os.path.join(root, "sweep.json"))
        if spec is None:
            raise FileNotFoundError(f"{root}/sweep.json not found: run the sweep once first")
        return cls(root, spec["config"], [p["overrides"] for p in spec["points"]], spec["train_flags"],
                   spec["evaluate"], spec["eval_flags"], spec.get("python", sys.executable))

    def workdir(self, index: int) -> str:
        return os.path.join(self.root, self.names[index])

    def train_command(self, index: int) -> list[str]:
        return [self.python, TRAIN, f"--config={self.config}", f"--workdir={self.workdir(index)}",
                *self.train_flags, *sweeps.override_flags(self.points[index])]

    def eval_command(self, index: int) -> list[str]:
        return [self.python, EVALUATE, f"--workdir={self.workdir(index)}", *self.eval_flags]

    # -------------------------------------------------------------------------------------- point state

    def trained(self, index: int) -> bool:
        files = run_lib.RunDir.of(self.workdir(index))
        config = _read_json(str(files.config))
        if not config:
            return False
        return (files.checkpoints / str(config["num_train_steps"])).is_dir()

    def evaluated(self, index: int) -> bool:
        return bool(glob.glob(str(run_lib.RunDir.of(self.workdir(index)).eval / "*.json")))

    def finished(self, index: int) -> bool:
        return self.trained(index) and (not self.evaluate or self.evaluated(index))

    def status(self, index: int) -> dict:
        return _read_json(os.path.join(self.workdir(index), "status.json"), {}) or {}

    def set_status(self, index: int, **fields) -> dict:
        os.makedirs(self.workdir(index), exist_ok=True)
        status = {**self.status(index), **fields}
        _write_atomic(os.path.join(self.workdir(index), "status.json"), json.dumps(status, indent=1))
        return status


# ----------------------------------------------------------------------------------------- running points


class _Children:
    """Live child processes, so that SIGINT/SIGTERM of the launcher reaches them (train.py checkpoints)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, command: list[str], log_path: str, env: dict, startup_lock: str | None = None,
            started: str | None = None) -> int:
        """Runs ``command`` with output appended to ``log_path``; returns its exit code.

        With ``startup_lock``, the command starts only while holding that file lock (``flock``: across
        threads, processes and, on a shared file system, Slurm tasks), and keeps it until the file
        ``started`` exists or the command exits.
        """
        lock = None
        if startup_lock:
            lock = open(startup_lock, "a")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return self._run(command, log_path, env, lock, started)
        finally:
            if lock is not None:
                lock.close()

    def _run(self, command, log_path, env, lock, started) -> int:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: "
                      f"{shlex.join(command)}\n")
            log.flush()
            with self._lock:
                if self.stopping:
                    return -signal.SIGTERM
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                        start_new_session=True)
                self._procs.add(proc)
            try:
                if lock is not None:
                    while proc.poll() is None and not (started and os.path.exists(started)):
                        time.sleep(0.2)
                    lock.close()  # Releases the flock.
                return proc.wait()
            finally:
                with self._lock:
                    self._procs.discard(proc)

    def terminate(self) -> None:
        with self._lock:
            self.stopping = True
            for proc in self._procs:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass


def run_point(sweep: Sweep, index: int, children: _Children, env: dict | None = None,
              retry_failed: bool = True) -> str:
    """Trains (or resumes) and evaluates one point; returns its final status. Never raises for a failed run."""
    name, workdir = sweep.names[index], sweep.workdir(index)
    if sweep.finished(index):
        status = sweep.status(index)
        if status.get("status") != "finished":
            sweep.set_status(index, status="finished")
        logging.info("[%s] already finished: skipped", name)
        return "skipped"
    if children.stopping:  # The launcher is shutting down: leave the point as it is.
        return "interrupted"
    previous = sweep.status(index)
    if previous.get("status") == "failed" and not retry_failed:
        logging.info("[%s] failed before (%s): not retried", name, previous.get("reason"))
        return "failed"
    env = dict(os.environ if env is None else env)
    start = time.time()
    spent = float(previous.get("wall_seconds", 0.0))
    sweep.set_status(index, status="running", name=name, overrides=sweep.points[index], host=socket.gethostname(),
                     attempts=int(previous.get("attempts", 0)) + 1, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                     reason=None, log_tail=None, slurm_job=os.environ.get("SLURM_ARRAY_JOB_ID"))

    def finish(status: str, log: str | None = None, stage: str = "") -> str:
        fields: dict[str, Any] = {"status": status, "wall_seconds": spent + time.time() - start}
        if log is not None:
            tail = _tail(log)
            fields.update(reason=f"{stage}: {failure_reason(tail)}", log_tail=tail)
        sweep.set_status(index, **fields)
        level = logging.info if status == "finished" else logging.warning
        level("[%s] %s%s (%.0f s)", name, status, f": {fields.get('reason')}" if log else "",
              time.time() - start)
        return status

    resuming = run_lib.RunDir.of(workdir).checkpoints.is_dir()
    logging.info("[%s] %s", name, "resuming" if resuming else "starting")
    train_log = os.path.join(workdir, "train.log")
    if not sweep.trained(index):
        # Points start one at a time, each until its config.json is written: by then it has built (or
        # found) the tfds dataset, which concurrent first builds of one data_dir would race on.
        code = children.run(sweep.train_command(index), train_log, env,
                            startup_lock=os.path.join(sweep.root, ".startup.lock"),
                            started=str(run_lib.RunDir.of(workdir).config))
        if children.stopping:
            return finish("interrupted")
        if code != 0 or not sweep.trained(index):
            return finish("failed", train_log, f"train exit {code}")
    if sweep.evaluate and not sweep.evaluated(index):
        eval_log = os.path.join(workdir, "eval.log")
        code = children.run(sweep.eval_command(index), eval_log, env)
        if children.stopping:
            return finish("interrupted")
        if code != 0 or not sweep.evaluated(index):
            return finish("failed", eval_log, f"evaluate exit {code}")
    return finish("finished")


# ------------------------------------------------------------------------------------------------ results


def _metrics(workdir: str) -> tuple[dict[str, float], dict[str, list[float]], int]:
    """(final value of each metric, all values of each metric, last step) from metrics.jsonl."""
    final: dict[str, float] = {}
    series: dict[str, list[float]] = {}
    step = 0
    try:
        with open(run_lib.RunDir.of(workdir).metrics, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # A line being written right now.
                step = max(step, int(record.get("step", 0)))
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        final[key] = float(value)
                        series.setdefault(key, []).append(float(value))
    except OSError:
        pass
    return final, series, step


def _evaluate_metrics(workdir: str) -> dict[str, float]:
    reports = sorted(glob.glob(str(run_lib.RunDir.of(workdir).eval / "*.json")), key=os.path.getmtime)
    report = _read_json(reports[-1], {}) if reports else {}
    return {f"evaluate/{k}": float(v) for k, v in report.items()
            if k in ("bleu", "chrf", "exact_match") and isinstance(v, (int, float))}


def collect(sweep: Sweep, metric: str, mode: str = "auto") -> list[dict]:
    """One row per point, best ``metric`` first; failed points last."""
    mode = metric_mode(metric, mode)
    keys = sweeps.swept_keys(sweep.points) or sorted({k for p in sweep.points for k in p})
    rows = []
    for index, point in enumerate(sweep.points):
        workdir = sweep.workdir(index)
        status = sweep.status(index)
        final, series, step = _metrics(workdir)
        final.update(_evaluate_metrics(workdir))
        state = status.get("status", "pending")
        if state != "failed" and sweep.finished(index):
            state = "finished"
        row: dict[str, Any] = {"name": sweep.names[index]}
        row.update({k: point.get(k) for k in keys})
        values = series.get(metric) or ([final[metric]] if metric in final else [])
        row.update({
            "status": state, "steps": step,
            "wall_s": round(float(status.get("wall_seconds", 0.0)), 1),
            f"{metric} (final)": values[-1] if values else None,
            f"{metric} (best)": (min(values) if mode == "min" else max(values)) if values else None,
        })
        for extra in ("train/loss", "eval/loss", "eval/accuracy", "evaluate/bleu", "evaluate/exact_match"):
            if extra != metric:
                row[extra] = final.get(extra)
        row["reason"] = status.get("reason") if state == "failed" else None
        row["_tail"] = status.get("log_tail") if state == "failed" else None
        rows.append(row)

    def order(row):
        value = row[f"{metric} (final)"]
        has = isinstance(value, float) and math.isfinite(value)
        score = (value if mode == "min" else -value) if has else 0.0
        return (row["status"] == "failed", not has, score, _STATUS_ORDER.get(row["status"], 9), row["name"])

    return sorted(rows, key=order)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_results(sweep: Sweep, metric: str, mode: str = "auto") -> list[dict]:
    """Writes ROOT/results.csv, ROOT/results.md and ROOT/results.png; returns the rows."""
    rows = collect(sweep, metric, mode)
    columns = [c for c in rows[0] if not c.startswith("_")]
    path = os.path.join(sweep.root, "results")
    tmp = f"{path}.csv.tmp.{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path + ".csv")

    counts = {s: sum(r["status"] == s for r in rows) for s in _STATUS_ORDER}
    lines = [f"# Sweep {os.path.basename(sweep.root)}", "",
             f"config `{sweep.config}`, {len(rows)} points: "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
             + f"; sorted by {metric} ({metric_mode(metric, mode)}). "
             f"Updated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
             "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        for row in failed:
            lines += [f"### {row['name']}", "", f"{row['reason']}", "", "```",
                      *(row["_tail"] or []), "```", ""]
    _write_atomic(path + ".md", "\n".join(lines) + "\n")

    scored = [r for r in rows if isinstance(r[f"{metric} (final)"], float)]
    params = [k for k in sweeps.swept_keys(sweep.points)
              if len({json.dumps(r[k], default=str) for r in scored}) > 1]
    if params and scored:
        try:
            from flaxformer_lite import plotting

            figure = plotting.plot_metric_vs_params(rows, f"{metric} (final)", params, path + ".png")
            import matplotlib.pyplot as plt

            plt.close(figure)
        except Exception as e:  # noqa: BLE001 -- a plot must never stop a sweep
            logging.warning("results.png not written: %s", e)
    return rows


# ------------------------------------------------------------------------------------------------ backends


def run_local(sweep: Sweep, indices: list[int], workers: int, metric: str, mode: str, retry_failed: bool,
              gpus_per_worker: int = 0, poll_secs: float = 10.0) -> dict[int, str]:
    children = _Children()
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def job(index: int) -> str:
        slot = slots.get()
        try:
            env = dict(os.environ)
            if gpus_per_worker:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(
                    str(slot * gpus_per_worker + g) for g in range(gpus_per_worker))
            return run_point(sweep, index, children, env, retry_failed)
        finally:
            slots.put(slot)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def stop(signum, frame):
        logging.warning("Signal %d: stopping the running points (they save a checkpoint); rerun to resume.",
                        signum)
        children.terminate()

    for s in previous:
        signal.signal(s, stop)
    results: dict[int, str] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(job, i): i for i in indices}
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=poll_secs,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    try:
                        results[futures[future]] = future.result()
                    except Exception as e:  # noqa: BLE001 -- a launcher bug on one point must not stop the rest
                        logging.exception("point %s: %s", sweep.names[futures[future]], e)
                        sweep.set_status(futures[future], status="failed", reason=f"launcher: {e!r}")
                        results[futures[future]] = "failed"
                write_results(sweep, metric, mode)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return results


def slurm_script(sweep: Sweep, indices: list[int], workers: int, slurm_args: str) -> str:
    array = ",".join(str(i) for i in indices) + (f"%{workers}" if workers else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{os.path.basename(sweep.root)}",
             f"#SBATCH --array={array}", f"#SBATCH --output={sweep.root}/slurm/%A_%a.out",
             "#SBATCH --ntasks=1"]
    lines += [f"#SBATCH {arg}" for arg in shlex.split(slurm_args)]
    lines += ["set -euo pipefail", f"cd {shlex.quote(REPO)}",
              f"exec {shlex.quote(sweep.python)} {shlex.quote(os.path.abspath(__file__))} "
              f"--root={shlex.quote(sweep.root)} --run_index=\"$SLURM_ARRAY_TASK_ID\" "
              f"--metric={shlex.quote(_METRIC.value)} --mode={_MODE.value}"
              + ("" if _RETRY_FAILED.value else " --noretry_failed")]
    return "\n".join(lines) + "\n"


def _squeue_active(job_id: str) -> list[str]:
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], capture_output=True, text=True)
    if result.returncode != 0:  # The job left squeue's memory (MinJobAge): it is over.
        return []
    return [line for line in result.stdout.splitlines() if line.strip()]


def run_slurm(sweep: Sweep, indices: list[int], workers: int, metric: str, mode: str, slurm_args: str,
              wait: bool, poll_secs: float) -> str | None:
    if not indices:
        return None
    slurm_dir = os.path.join(sweep.root, "slurm")
    os.makedirs(slurm_dir, exist_ok=True)
    script = os.path.join(slurm_dir, "sweep.sbatch")
    _write_atomic(script, slurm_script(sweep, indices, workers, slurm_args))
    for index in indices:
        if sweep.status(index).get("status") != "failed" or _RETRY_FAILED.value:
            sweep.set_status(index, status="pending", name=sweep.names[index], overrides=sweep.points[index])
    result = subprocess.run(["sbatch", "--parsable", script], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    jobs = _read_json(os.path.join(slurm_dir, "jobs.json"), []) + [{"job_id": job_id, "indices": indices,
                                                                  "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}]
    _write_atomic(os.path.join(slurm_dir, "jobs.json"), json.dumps(jobs, indent=1))
    logging.info("Submitted array job %s (%d tasks, %s at a time): %s", job_id, len(indices), workers, script)
    print(f"submitted slurm array job {job_id}", flush=True)
    if not wait:
        return job_id
    while _squeue_active(job_id):
        write_results(sweep, metric, mode)
        time.sleep(poll_secs)
    # Tasks killed by Slurm (time limit, node failure, scancel) never wrote a final status.
    for index in indices:
        if sweep.status(index).get("status") in ("pending", "running") and not sweep.finished(index):
            out = os.path.join(slurm_dir, f"{job_id}_{index}.out")
            tail = _tail(out)
            sweep.set_status(index, status="failed", log_tail=tail,
                             reason=f"slurm task {job_id}_{index} ended without finishing: {failure_reason(tail)}")
    return job_id


# ---------------------------------------------------------------------------------------------------- main


def main(argv):
    root = os.path.abspath(_ROOT.value)
    if _RUN_INDEX.value is not None:  # One Slurm array task.
        sweep = Sweep.load(root)
        status = run_point(sweep, _RUN_INDEX.value, _Children(), retry_failed=_RETRY_FAILED.value)
        write_results(sweep, _METRIC.value, _MODE.value)
        sys.exit(0 if status in ("finished", "skipped") else 1)
    if _COLLECT.value:
        sweep = Sweep.load(root)
    else:
        if not _CONFIG.value:
            raise app.UsageError("--config is required")
        points = sweeps.load_sweep(_SWEEP.value or "", _CONFIG.value)
        config = _CONFIG.value
        file, sep, variant = config.partition(":")
        sweep = Sweep(root, os.path.abspath(file) + sep + variant, points, list(argv[1:]), _EVALUATE.value,
                      list(_EVAL_FLAGS.value))
        if _DRY_RUN.value:
            for index in range(len(points)):
                print(shlex.join(sweep.train_command(index)))
            return
        sweep.save()
    indices = [i for i in range(len(sweep.points)) if not sweep.finished(i)]
    skipped = len(sweep.points) - len(indices)
    logging.info("Sweep %s: %d points, %d finished already, %d to run", root, len(sweep.points), skipped,
                 len(indices))
    start = time.time()
    if not _COLLECT.value and indices:
        if _BACKEND.value == "local":
            run_local(sweep, indices, max(1, _WORKERS.value), _METRIC.value, _MODE.value, _RETRY_FAILED.value,
                      _GPUS_PER_WORKER.value, _POLL_SECS.value)
        else:
            run_slurm(sweep, indices, _WORKERS.value, _METRIC.value, _MODE.value, _SLURM_ARGS.value,
                      not _NOWAIT.value, _POLL_SECS.value)
    rows = write_results(sweep, _METRIC.value, _MODE.value)
    counts = {s: sum(r["status"] == s for r in rows) for s in _STATUS_ORDER}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"sweep {root}: {summary} (skipped {skipped} finished before; {time.time() - start:.0f} s) "
          f"-> {root}/results.md", flush=True)
    for row in rows:
        if row["status"] == "failed":
            print(f"FAILED {row['name']}: {row['reason']}", flush=True)


if __name__ == "__main__":
    app.run(main)
