"""A sweep's results: one row per point from its workdir, written as ROOT/results.csv, .md and .png.

Rows are read from what the points left (``metrics.jsonl``, ``eval/*.json`` of evaluate.py, ``status.json``),
so the tables can be rewritten at any time: while points run, at the end, or later with ``--collect``.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import time
from typing import Any

from absl import logging

from flaxformer_lite import run as run_lib
from flaxformer_lite import sweep_space
from flaxformer_lite.sweep_runner import files
from flaxformer_lite.sweep_runner.spec import STATES, Sweep

# Columns every row has besides the sorting metric, when that metric is not one of them.
EXTRA_METRICS = ("train/loss", "eval/loss", "eval/accuracy", "evaluate/bleu", "evaluate/exact_match")
EVALUATE_KEYS = ("bleu", "chrf", "exact_match")  # Keys of evaluate.py's report, as evaluate/<key>.


def metric_mode(metric: str, mode: str = "auto") -> str:
    """``min`` or ``max``: ``auto`` is min for losses, perplexities and NLLs, max for everything else."""
    if mode != "auto":
        return mode
    return "min" if any(word in metric for word in ("loss", "perplexity", "nll")) else "max"


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
    report = files.read_json(reports[-1], {}) if reports else {}
    return {f"evaluate/{k}": float(v) for k, v in report.items()
            if k in EVALUATE_KEYS and isinstance(v, (int, float))}


def collect(sweep: Sweep, metric: str, mode: str = "auto") -> list[dict]:
    """One row per point, best ``metric`` first; failed points last."""
    mode = metric_mode(metric, mode)
    keys = sweep_space.swept_keys(sweep.points) or sorted({k for p in sweep.points for k in p})
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
        for extra in EXTRA_METRICS:
            if extra != metric:
                row[extra] = final.get(extra)
        row["reason"] = status.get("reason") if state == "failed" else None
        row["_tail"] = status.get("log_tail") if state == "failed" else None
        rows.append(row)

    def order(row):
        value = row[f"{metric} (final)"]
        has = isinstance(value, float) and math.isfinite(value)
        score = (value if mode == "min" else -value) if has else 0.0
        return (row["status"] == "failed", not has, score, rank.get(row["status"], len(STATES)), row["name"])

    rank = {state: i for i, state in enumerate(STATES)}

    return sorted(rows, key=order)


def summary(rows: list[dict]) -> str:
    """How many points are in each state, e.g. ``3 finished, 1 failed``."""
    counts = {s: sum(r["status"] == s for r in rows) for s in STATES}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _markdown(sweep: Sweep, rows: list[dict], columns: list[str], metric: str, mode: str) -> str:
    lines = [f"# Sweep {os.path.basename(sweep.root)}", "",
             f"config `{sweep.config}`, {len(rows)} points: {summary(rows)}; sorted by {metric} "
             f"({metric_mode(metric, mode)}). Updated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
             "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        for row in failed:
            lines += [f"### {row['name']}", "", f"{row['reason']}", "", "```", *(row["_tail"] or []), "```", ""]
    return "\n".join(lines) + "\n"


CONFIG_VALUE = "(config)"  # The plot's label for a swept key that a point does not set.


def _plot(sweep: Sweep, rows: list[dict], metric: str, path: str) -> None:
    """The metric against every swept hyperparameter that varies among the scored points."""
    scored = [r for r in rows if isinstance(r[f"{metric} (final)"], float)]
    params = [k for k in sweep_space.swept_keys(sweep.points)
              if len({json.dumps(r[k], default=str) for r in scored}) > 1]
    if not (params and scored):
        return
    # A point that leaves a swept key alone trains with the config's value: say so on the axis, not "None".
    rows = [{**r, **{k: CONFIG_VALUE for k in params if r[k] is None}} for r in rows]
    try:
        from flaxformer_lite import plotting

        figure = plotting.plot_metric_vs_params(rows, f"{metric} (final)", params, path)
        import matplotlib.pyplot as plt

        plt.close(figure)
    except Exception as e:  # noqa: BLE001 -- a plot must never stop a sweep
        logging.warning("%s not written: %s", os.path.basename(path), e)


def write_results(sweep: Sweep, metric: str, mode: str = "auto") -> list[dict]:
    """Writes ROOT/results.csv, ROOT/results.md and ROOT/results.png; returns the rows."""
    rows = collect(sweep, metric, mode)
    columns = [c for c in rows[0] if not c.startswith("_")]
    path = os.path.join(sweep.root, "results")
    _write_csv(path + ".csv", rows, columns)
    files.write_atomic(path + ".md", _markdown(sweep, rows, columns, metric, mode))
    _plot(sweep, rows, metric, path + ".png")
    return rows
