"""What the end-to-end tests share: the checkout's paths, the tiny config, and running its scripts."""

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ROOT / "experiments" / "train.py"
TINY = ROOT / "experiments" / "configs" / "tiny.py"
# Flags of a short run of the tiny config (a sweep point): 2 steps, one evaluation of 4 decoded examples, one
# checkpoint.
FAST = ["--config.num_train_steps=2", "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
        "--config.decode_eval_examples=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def script_env(devices: int = 1, **extra) -> dict:
    """The environment of a script run on ``devices`` virtual CPU devices (one: XLA's default)."""
    xla_flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, **extra)


def run_script(script: str, *args, devices: int = 1, timeout: float = 300, stdin: str | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """``python experiments/SCRIPT ARGS`` from the checkout, its output captured."""
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=env or script_env(devices), cwd=ROOT, input=stdin)


def tiny_config(data_dir, **overrides):
    """``experiments/configs/tiny.py``'s config, with ``overrides`` such as ``{"model.dropout_rate": 0.1}``."""
    spec = importlib.util.spec_from_file_location("tiny_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data_dir = str(data_dir)
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def restored_params(workdir, step):
    """The parameters of checkpoint ``step`` of a run, on the host."""
    from flaxformer_lite import run as run_lib

    return jax.device_get(run_lib.restore(workdir, str(step)).params)
