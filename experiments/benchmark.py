"""Measures training and decoding speed, memory and MFU for a config: ``python experiments/benchmark.py``.

    python experiments/benchmark.py --config=experiments/configs/benchmark.py:small
    python experiments/benchmark.py --config.model.dtype=bfloat16 --modes=train --out=bench.jsonl
    python experiments/benchmark.py --config=experiments/configs/benchmark.py:base --config.model.dtype=bfloat16

Takes the same config files and ``--config.*`` overrides as training. Batches are random token ids with no
padding (every token is real), so tokens/s counts real tokens; ``--config.model.vocab_size`` sets the
vocabulary, which training would take from its tokenizer.

* ``train``: the compiled train step (forward, backward, optimizer update) on the config's mesh: compile
  time, then the median, min and max step time over ``--steps`` steps after ``--warmup`` more, as target and
  total (source + target) tokens/s, and MFU = analytic FLOPs (``flaxformer_lite/flops.py``) / step time /
  matmul peak.
* ``greedy`` / ``beam``: cached incremental decoding of ``--decode_batch`` sources of the config's input
  length, exactly ``--decode_length`` tokens each (the end-of-sentence token is disabled so that no row stops
  early, as in the PyTorch peer), as generated tokens/s (beam: tokens of the returned hypotheses).

The matmul peak is measured here (``--peak_size`` square ``jnp.dot``; for bfloat16 with float32 accumulation,
the form the model uses) unless ``--peak_gflops`` gives it. Peak memory is the process's RSS on a CPU and the
device's ``peak_bytes_in_use`` on an accelerator. Prints a table and, with ``--out``, appends one JSON line
per mode. This machine is shared: compare implementations side by side, alternating, and quote medians.
"""

import functools
import json
import os
import platform
import resource
import statistics
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a checkout.

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flaxformer_lite import decoding, flops, sharding, training  # noqa: E402
from flaxformer_lite import config as config_lib  # noqa: E402
from flaxformer_lite.transformer import Transformer  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "benchmark.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file [:variant].",
                                          lock_config=True)
_MODES = flags.DEFINE_list("modes", ["train", "greedy", "beam"], "What to measure: train, greedy, beam.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed train steps after the compiling one.")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 32, "Sentences per decoding batch.")
_DECODE_LENGTH = flags.DEFINE_integer("decode_length", 64, "Tokens generated per sentence.")
_DECODE_REPS = flags.DEFINE_integer("decode_reps", 5, "Timed decoding batches.")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 4, "Beam size of the beam mode.")
_PEAK_GFLOPS = flags.DEFINE_float("peak_gflops", 0.0, "Matmul peak in GFLOP/s for MFU; 0: measure it.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 2048, "Matrix size of the peak measurement.")
_TAG = flags.DEFINE_string("tag", "", "Free-form label stored in the JSON lines.")
_OUT = flags.DEFINE_string("out", None, "Append one JSON line per mode to this file.")


def _timings(seconds: list[float]) -> dict[str, float]:
    return dict(median=statistics.median(seconds), min=min(seconds), max=max(seconds), n=len(seconds))


def _time_calls(fn, reps: int) -> list[float]:
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return seconds


def matmul_peak_gflops(dtype: str, size: int, reps: int = 10) -> float:
    """Median GFLOP/s of a compiled ``size x size`` matmul; bfloat16 inputs accumulate in float32."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    product = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    product(a, b).block_until_ready()
    return 2 * size ** 3 / statistics.median(_time_calls(lambda: product(a, b), reps)) / 1e9


def peak_memory_mb() -> float:
    """Peak device memory on an accelerator, peak resident memory of the process on a CPU."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2 ** 20
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def random_batches(rng: np.random.Generator, count: int, batch: int, inputs_length: int, targets_length: int,
                   vocab: int) -> list[dict[str, np.ndarray]]:
    """Batches of random ids in [3, vocab): no padding, EOS or unknown tokens."""
    return [dict(inputs=rng.integers(3, vocab, (batch, inputs_length), dtype=np.int32),
                 targets=rng.integers(3, vocab, (batch, targets_length), dtype=np.int32)) for _ in range(count)]


def bench_train(config, model: Transformer, mesh, peak: float) -> dict:
    train_cfg = config_lib.build("train", config)
    optimizer = training.make_optimizer(train_cfg, model.config.d_model)
    _, state_sharding = training.state_shardings(model, optimizer, mesh)
    train_step, _ = training.make_step_functions(model, optimizer, train_cfg, mesh, state_sharding)
    state = training.create_train_state(config.seed, model, optimizer, state_sharding)
    batch, s, t = config.data.batch_size, config.data.max_inputs_length, config.data.max_targets_length
    batches = [sharding.shard_batch(b, mesh) for b in
               random_batches(np.random.default_rng(0), 4, batch, s, t, model.config.vocab_size)]

    def step(i):
        nonlocal state
        state, metrics = train_step(state, batches[i % len(batches)])
        return metrics

    start = time.perf_counter()
    jax.block_until_ready(step(0))
    first_call = time.perf_counter() - start
    for i in range(_WARMUP.value):
        jax.block_until_ready(step(i + 1))
    counter = iter(range(10 ** 9))
    stats = _timings(_time_calls(lambda: step(next(counter)), _STEPS.value))
    step_flops = flops.training_flops(model.config, batch, s, t)
    return dict(
        step_s=stats, compile_s=first_call - stats["median"],
        tgt_tok_per_s=batch * t / stats["median"], tgt_tok_per_s_min=batch * t / stats["max"],
        tgt_tok_per_s_max=batch * t / stats["min"], total_tok_per_s=batch * (s + t) / stats["median"],
        train_gflop_per_step=step_flops / 1e9, achieved_gflops=step_flops / stats["median"] / 1e9,
        mfu=step_flops / stats["median"] / (peak * 1e9),
        mfu_min=step_flops / stats["max"] / (peak * 1e9), mfu_max=step_flops / stats["min"] / (peak * 1e9))


def bench_decode(config, model: Transformer, method: str) -> dict:
    dummy = jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(jax.jit(lambda: model.init(jax.random.key(config.seed), dummy, dummy)["params"])())
    length, rows = _DECODE_LENGTH.value, _DECODE_BATCH.value
    inputs = random_batches(np.random.default_rng(1), 1, rows, config.data.max_inputs_length, 1,
                            model.config.vocab_size)[0]["inputs"]
    # eos_id=-1 matches no token, so every sentence runs for exactly `length` steps.
    decode = jax.jit(lambda p, x: decoding.decode_batch(
        model, p, x, method=method, beam_size=_BEAM_SIZE.value, max_decode_length=length, extra_length=length,
        eos_id=-1).lengths)
    start = time.perf_counter()
    lengths = np.asarray(decode(params, inputs))
    first_call = time.perf_counter() - start
    if not np.all(lengths == length):
        raise RuntimeError(f"expected {length} generated tokens per sentence, got lengths {sorted(set(lengths))}")
    stats = _timings(_time_calls(lambda: decode(params, inputs), _DECODE_REPS.value))
    generated = rows * length
    return dict(decode_s=stats, compile_s=first_call - stats["median"], decode_batch=rows, decode_length=length,
                beam_size=_BEAM_SIZE.value if method == "beam" else 1,
                tok_per_s=generated / stats["median"], tok_per_s_min=generated / stats["max"],
                tok_per_s_max=generated / stats["min"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_MODES.value) - {"train", "greedy", "beam"})
    if unknown:
        raise app.UsageError(f"--modes: unknown {unknown}; expected train, greedy, beam")
    config = _CONFIG.value
    model_cfg = config_lib.build("model", config)
    config_lib.build("train", config)  # Fails early, naming the field, on a bad training value.
    model = Transformer(model_cfg)
    mesh = sharding.create_mesh(tuple(config.mesh_shape))
    peak = _PEAK_GFLOPS.value or matmul_peak_gflops(model_cfg.dtype, _PEAK_SIZE.value)
    common = dict(config=flags.FLAGS["config"].config_filename, tag=_TAG.value, dtype=model_cfg.dtype,
                  d_model=model_cfg.d_model, layers=[model_cfg.num_encoder_layers, model_cfg.num_decoder_layers],
                  vocab=model_cfg.vocab_size, batch=config.data.batch_size,
                  lengths=[config.data.max_inputs_length, config.data.max_targets_length],
                  mesh=dict(mesh.shape), devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                  jax=jax.__version__, peak_gflops=peak, peak_measured=not _PEAK_GFLOPS.value)
    logging.info("matmul peak (%s): %.0f GFLOP/s", model_cfg.dtype, peak)
    rows = []
    for mode in _MODES.value:
        result = bench_train(config, model, mesh, peak) if mode == "train" else bench_decode(config, model, mode)
        row = dict(common, mode=mode, peak_memory_mb=peak_memory_mb(), **result)
        rows.append(row)
        if _OUT.value:
            with open(_OUT.value, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(format_table(rows))


def format_table(rows: list[dict]) -> str:
    lines = [f"{'mode':7} {'dtype':9} {'tokens/s (median, min-max)':32} {'seconds (median)':17} "
             f"{'MFU':>6} {'compile s':>9} {'peak MB':>8}"]
    for row in rows:
        seconds = row.get("step_s") or row["decode_s"]
        rate = row.get("tgt_tok_per_s") or row["tok_per_s"]
        low = row.get("tgt_tok_per_s_min") or row["tok_per_s_min"]
        high = row.get("tgt_tok_per_s_max") or row["tok_per_s_max"]
        mfu = f"{100 * row['mfu']:5.1f}%" if "mfu" in row else "     -"
        lines.append(f"{row['mode']:7} {row['dtype']:9} {f'{rate:,.0f} ({low:,.0f}-{high:,.0f})':32} "
                     f"{seconds['median']:<17.4f} {mfu:>6} {row['compile_s']:9.1f} {row['peak_memory_mb']:8.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
