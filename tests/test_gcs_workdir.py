"""A ``gs://`` workdir end to end, against a GCS emulator on localhost (tests/gcs_emulator.py).

Every file of a run goes through etils.epath (gcsfs) or Orbax's TensorStore: nothing may land in a local
folder named ``gs:``. The emulator is a separate process; each command is a real train.py / evaluate.py /
translate.py process pointed at it by environment variables, as a user's would be at GCS.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

import gcs_emulator  # noqa: E402  (tests/ is on sys.path under pytest)
from helpers import ROOT, TINY, free_port, script_env  # noqa: E402

WORKDIR = "gs://bucket/runs/tiny"


@pytest.fixture(scope="module")
def emulator():
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port), "bucket"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "the GCS emulator did not start"
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=30)


def objects(url, prefix="runs/tiny/") -> list[str]:
    with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o?prefix={prefix}") as response:
        return [item["name"] for item in json.load(response).get("items", [])]


def command(url, cwd, script, *args, **popen):
    env = script_env(**gcs_emulator.environment(url))
    return subprocess.Popen([sys.executable, str(ROOT / "experiments" / script), *args], env=env, cwd=cwd,
                            text=True, **popen)


def run(url, cwd, script, *args, timeout=300):
    process = command(url, cwd, script, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def test_a_gs_workdir_trains_resumes_evaluates_and_translates(emulator, tmp_path):
    data_dir = tmp_path / "tfds"
    train = (f"--config={TINY}", f"--workdir={WORKDIR}", f"--config.data_dir={data_dir}",
             "--config.checkpoint_every_steps=5", "--config.eval_every_steps=100000",
             "--config.checkpoint_best_metric=")
    with open(tmp_path / "first.log", "w") as log:
        first = command(emulator, tmp_path, "train.py", *train, "--config.num_train_steps=100000",
                        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while "runs/tiny/checkpoints/5/commit_success.txt" not in objects(emulator):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        # While the first run is live, its lease keeps a second one out.
        code, _, stderr = run(emulator, tmp_path, "train.py", *train, "--config.seed=1")
        assert code == 2, stderr[-3000:]
        assert f"{WORKDIR} is in use by a live training run (host {os.uname().nodename}, pid {first.pid}" in stderr
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)  # The training process itself: no lease release, no final save.
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL

    saved = max(int(name.split("/")[3]) for name in objects(emulator, "runs/tiny/checkpoints/")
                if name.endswith("/commit_success.txt") and name.count("/") == 4)
    final = saved + 3
    # The dead run's lease (same host, no such process) is taken over; training resumes from the bucket.
    code, stdout, stderr = run(emulator, tmp_path, "train.py", *train, f"--config.num_train_steps={final}")
    assert code == 0, stderr[-3000:]
    assert f"Resumed from step {saved} " in stderr and f"step={final}" in stdout
    names = objects(emulator)
    for name in ("config.json", "metrics.jsonl", "vocab/words.json", f"checkpoints/{final}/commit_success.txt",
                 f"checkpoints/{final}/data/process_0-of-1.json"):
        assert f"runs/tiny/{name}" in names, name
    assert any(n.startswith("runs/tiny/tensorboard/events.out.tfevents") for n in names)
    assert any(n.startswith("runs/tiny/compilation_cache/") for n in names)
    assert "runs/tiny/train.lock" not in names  # Released at the end.

    code, stdout, stderr = run(emulator, tmp_path, "evaluate.py", f"--workdir={WORKDIR}", "--split=test[:8]",
                               "--method=greedy")
    assert code == 0, stderr[-3000:]
    assert f"-> {WORKDIR}/eval/test[:8]-{final}-greedy.json" in stdout
    assert f"runs/tiny/eval/test[:8]-{final}-greedy.json" in objects(emulator)

    code, stdout, stderr = run(emulator, tmp_path, "translate.py", f"--workdir={WORKDIR}", "--text=walk twice",
                               "--text=jump", "--method=greedy")
    assert code == 0, stderr[-3000:]
    assert len(stdout.splitlines()) == 2
    assert not [p for p in (tmp_path, ROOT) if (p / "gs:").exists()]  # No local stand-in folder.
