"""The local backend: a pool of ``--workers`` threads, each running one point at a time on this machine."""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal

from absl import logging

from flaxformer_lite.sweep_runner import results
from flaxformer_lite.sweep_runner.point import Children, run_point
from flaxformer_lite.sweep_runner.settings import Settings
from flaxformer_lite.sweep_runner.spec import Sweep


def run_local(sweep: Sweep, indices: list[int], settings: Settings) -> dict[int, str]:
    """Runs the points ``indices``, rewriting the results as they finish; returns each point's final status.

    SIGINT/SIGTERM stop the running points (each saves a checkpoint) and start no new ones.
    """
    workers = settings.local_workers
    children = Children(cwd=settings.repo)
    slots: queue.Queue[int] = queue.Queue()  # A slot is a worker's GPU slice (with --gpus_per_worker).
    for slot in range(workers):
        slots.put(slot)

    def job(index: int) -> str:
        slot = slots.get()
        try:
            env = dict(os.environ)
            if settings.gpus_per_worker:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(
                    str(slot * settings.gpus_per_worker + g) for g in range(settings.gpus_per_worker))
            return run_point(sweep, index, children, env, settings.retry_failed)
        finally:
            slots.put(slot)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def stop(signum, frame):
        logging.warning("Signal %d: stopping the running points (they save a checkpoint); rerun to resume.",
                        signum)
        children.terminate()

    for s in previous:
        signal.signal(s, stop)
    statuses: dict[int, str] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(job, i): i for i in indices}
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=settings.poll_secs,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    index = futures[future]
                    try:
                        statuses[index] = future.result()
                    except Exception as e:  # noqa: BLE001 -- a launcher bug on one point must not stop the rest
                        logging.exception("point %s: %s", sweep.names[index], e)
                        sweep.set_status(index, status="failed", reason=f"launcher: {e!r}")
                        statuses[index] = "failed"
                results.write_results(sweep, settings.metric, settings.mode)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return statuses
