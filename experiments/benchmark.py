"""Measures training and decoding speed, memory and MFU for a config: ``python experiments/benchmark.py``.

    python experiments/benchmark.py --config=experiments/configs/benchmark.py:small
    python experiments/benchmark.py --config.model.dtype=bfloat16 --modes=train --out=bench.jsonl
    python experiments/benchmark.py --config=experiments/configs/benchmark.py:base --config.model.dtype=bfloat16

Takes the same config files and ``--config.*`` overrides as training. Batches are random token ids with no
padding (every token is real), so tokens/s counts real tokens; ``--config.model.vocab_size`` sets the
vocabulary, which training would take from its tokenizer.

* ``train``: the compiled train step (forward, backward, optimizer update) on the config's mesh: compile
  time, then the median, min and max step time over ``--steps`` steps after ``--warmup`` more, as target and
  total (source + target) tokens/s, and MFU = analytic FLOPs of the global batch (``flaxformer_lite/flops.py``)
  / step time / (per-device matmul peak x the number of devices of the mesh the step runs on).
* ``greedy`` / ``beam``: cached incremental decoding of ``--decode_batch`` sources of the config's input
  length, exactly ``--decode_length`` tokens each (the end-of-sentence token is disabled so that no row stops
  early, as in the PyTorch peer), as generated tokens/s (beam: tokens of the returned hypotheses).

``--op_profile=N`` also traces each mode a few calls more and prints where its time goes: milliseconds per
call by kind of HLO instruction (matmul, reduce, copy/transpose, elementwise...) and the N slowest
instructions with their shapes and the JAX operations they came from (``flaxformer_lite/op_profile.py``);
the JSON line gets ``op_ms_by_kind``.

The peak is per device. ``--peak=measured`` (the default) times a ``--peak_size`` square ``jnp.dot`` on one device
of the mesh, alone (for bfloat16 with float32 accumulation, the form the model uses); ``--peak=datasheet``
takes the bfloat16 dense tensor-core peak of the GPU from ``DATASHEET_BF16_TFLOPS`` by its ``device_kind``
(H100 SXM / H200 989, H100 PCIe 756, A100 312 TFLOP/s), as MaxText reports MFU; ``--peak_gflops`` gives the
per-device peak directly (e.g. from a datasheet) and wins over both. The peak of the step is that x
``num_devices`` (``mesh.devices.size``); decoding runs on one device. On virtual CPU devices
(``--xla_force_host_platform_device_count``) the devices share the real cores, so measured peak x devices
ignores their contention: it overstates the combined peak, and MFU comes out low.

Each JSON line records ``peak_gflops_per_device``, ``num_devices``, ``peak_gflops`` (= their product, all
devices of the row), ``peak_source`` (flag, measured or datasheet), the measured per-device peak when one was
measured, and the host CPU's model and whether it has AMX, AVX-512 BF16 and AVX-512 at all (``/proc/cpuinfo``
flags ``amx_bf16``, ``avx512_bf16``, ``avx512f``: "AMD EPYC" names both AVX2-only and AVX-512 BF16 parts); the
table's header line repeats them. Peak memory is the process's RSS on a CPU
and the device's ``peak_bytes_in_use`` on an accelerator. Prints a table and, with ``--out``, appends one JSON
line per mode. This machine is shared: compare implementations side by side, alternating, and quote medians.
"""

import functools
import json
import os
import platform
import re
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

from flaxformer_lite import decoding, errors, flops, op_profile, sharding, train_step  # noqa: E402
from flaxformer_lite import backend  # noqa: E402
from flaxformer_lite import config as config_lib  # noqa: E402
from flaxformer_lite.transformer import Transformer  # noqa: E402

config_lib.register_jax_flags()  # --jax_* flags (--jax_platforms=cpu, --jax_log_compiles, ...).
backend.keep_host_memory_for_reuse()  # Before JAX starts its threads: see its docstring.

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
_PEAK = flags.DEFINE_enum("peak", "measured", ["measured", "datasheet"],
                          "Per-device peak for MFU: a measured matmul, or the GPU's datasheet bf16 dense peak.")
_PEAK_GFLOPS = flags.DEFINE_float("peak_gflops", 0.0, "PER-DEVICE matmul peak in GFLOP/s for MFU (e.g. the GPU's "
                                  "bf16 dense datasheet peak); MFU divides by it x the mesh's devices. 0: --peak.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 2048, "Matrix size of the peak measurement.")
_OP_PROFILE = flags.DEFINE_integer("op_profile", 0, "If > 0, also trace each mode and print the time of its HLO "
                                   "instructions by kind and this many of the slowest (flaxformer_lite/op_profile.py).")
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


# Dense (no 2:4 sparsity) bfloat16 tensor-core peaks, TFLOP/s per device, from NVIDIA's datasheets; matched
# against jax's ``device_kind`` (CUDA's device name, e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H200"), first match.
# NVL parts (lower clocks) are left out on purpose: pass --peak_gflops for them.
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"\bh200\b(?!.*nvl)", 989.0, "H200 SXM"),
    (r"\bh100\b.*pcie", 756.0, "H100 PCIe"),
    (r"\bh100\b(?!.*nvl)", 989.0, "H100 SXM"),  # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 ...".
    (r"\ba100\b", 312.0, "A100"),  # SXM and PCIe alike.
)


def datasheet_peak_gflops(device_kind: str) -> float:
    """The per-device bf16 dense datasheet peak of ``device_kind`` in GFLOP/s; ValueError when unknown."""
    for pattern, tflops, _ in DATASHEET_BF16_TFLOPS:
        if re.search(pattern, device_kind.lower()):
            return tflops * 1e3
    known = ", ".join(name for _, _, name in DATASHEET_BF16_TFLOPS)
    raise ValueError(f"--peak=datasheet: no datasheet peak for device_kind {device_kind!r} (known: {known}); "
                     "pass the per-device peak with --peak_gflops, or use --peak=measured")


def cpu_info() -> dict:
    """The host CPU's model and whether it has AMX, AVX-512 BF16, AVX-512 (None: unknown, no /proc/cpuinfo)."""
    model, cpu_flags = backend.host_cpu()
    has = (lambda flag: None) if cpu_flags is None else (lambda flag: flag in cpu_flags)
    return dict(cpu_model=model, cpu_amx_bf16=has("amx_bf16"), cpu_avx512_bf16=has("avx512_bf16"),
                cpu_avx512f=has("avx512f"))


def matmul_peak_gflops(dtype: str, size: int, reps: int = 10, device: jax.Device | None = None) -> float:
    """Median GFLOP/s of a compiled ``size x size`` matmul on one device (default: the first one), alone.

    bfloat16 inputs accumulate in float32.
    """
    device = device or jax.devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), dtype), device)
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


def bench_train(config, model: Transformer, mesh, peak_per_device: float) -> dict:
    train_cfg = config_lib.build("train", config)
    optimizer = train_step.make_optimizer(train_cfg, model.config.d_model)
    _, state_sharding = train_step.state_shardings(model, optimizer, mesh)
    jitted_step, _ = train_step.make_step_functions(model, optimizer, train_cfg, mesh, state_sharding)
    state = train_step.create_train_state(config.seed, model, optimizer, state_sharding)
    batch, s, t = config.data.batch_size, config.data.max_inputs_length, config.data.max_targets_length
    batches = [sharding.shard_batch(b, mesh) for b in
               random_batches(np.random.default_rng(0), 4, batch, s, t, model.config.vocab_size)]

    def step(i):
        nonlocal state
        state, metrics = jitted_step(state, batches[i % len(batches)])
        return metrics

    start = time.perf_counter()
    jax.block_until_ready(step(0))
    first_call = time.perf_counter() - start
    for i in range(_WARMUP.value):
        jax.block_until_ready(step(i + 1))
    counter = iter(range(10 ** 9))
    stats = _timings(_time_calls(lambda: step(next(counter)), _STEPS.value))
    profiled = {}
    if _OP_PROFILE.value:
        with sharding.activation_rules(mesh, sharding.LOGICAL_AXIS_RULES):  # As make_step_functions traces.
            hlo = jitted_step.__wrapped__.lower(state, batches[0]).compile().as_text()
        profiled = _op_profile("train", lambda: step(next(counter)), hlo)
    step_flops = flops.training_flops(model.config, batch, s, t)  # The global batch, over all devices.
    num_devices = mesh.devices.size
    peak = peak_per_device * num_devices * 1e9  # FLOP/s of all the devices the step runs on.
    return dict(
        step_s=stats, compile_s=first_call - stats["median"],
        tgt_tok_per_s=batch * t / stats["median"], tgt_tok_per_s_min=batch * t / stats["max"],
        tgt_tok_per_s_max=batch * t / stats["min"], total_tok_per_s=batch * (s + t) / stats["median"],
        train_gflop_per_step=step_flops / 1e9, achieved_gflops=step_flops / stats["median"] / 1e9,
        num_devices=num_devices, peak_gflops=peak / 1e9,
        mfu=step_flops / stats["median"] / peak,
        mfu_min=step_flops / stats["max"] / peak, mfu_max=step_flops / stats["min"] / peak, **profiled)


def bench_decode(config, model: Transformer, method: str) -> dict:
    dummy = jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(jax.jit(lambda: model.init(jax.random.key(config.seed), dummy, dummy)["params"])())
    length, rows = _DECODE_LENGTH.value, _DECODE_BATCH.value
    inputs = random_batches(np.random.default_rng(1), 1, rows, config.data.max_inputs_length, 1,
                            model.config.vocab_size)[0]["inputs"]
    # eos_id=-1 matches no token, so every sentence runs for exactly `length` steps.
    decode = jax.jit(lambda p, x: decoding.decode_batch(model, p, x, decoding.DecodeConfig(
        method=method, beam_size=_BEAM_SIZE.value, max_decode_length=length, extra_length=length,
        eos_id=-1)).lengths)
    start = time.perf_counter()
    lengths = np.asarray(decode(params, inputs))
    first_call = time.perf_counter() - start
    if not np.all(lengths == length):
        raise RuntimeError(f"expected {length} generated tokens per sentence, got lengths {sorted(set(lengths))}")
    stats = _timings(_time_calls(lambda: decode(params, inputs), _DECODE_REPS.value))
    profiled = {}
    if _OP_PROFILE.value:
        hlo = decode.lower(params, inputs).compile().as_text()
        profiled = _op_profile(method, lambda: decode(params, inputs), hlo)
    generated = rows * length
    return dict(decode_s=stats, compile_s=first_call - stats["median"], decode_batch=rows, decode_length=length,
                num_devices=1,  # Unsharded: the jitted decode runs on the default device.
                beam_size=_BEAM_SIZE.value if method == "beam" else 1,
                tok_per_s=generated / stats["median"], tok_per_s_min=generated / stats["max"],
                tok_per_s_max=generated / stats["min"], **profiled)


def _op_profile(mode: str, call, hlo_text: str) -> dict:
    """Prints the instruction profile of ``call``; returns its milliseconds per call by kind for the JSON line."""
    rows = op_profile.profile(call, hlo_text)
    print(op_profile.format_profile(rows, _OP_PROFILE.value, f"{mode} profile"), flush=True)
    return dict(op_ms_by_kind=op_profile.by_kind(rows))


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
    first_device = mesh.devices.flat[0]
    source = "flag" if _PEAK_GFLOPS.value else _PEAK.value
    if source == "datasheet" and first_device.platform != "gpu":
        raise app.UsageError(f"--peak=datasheet: only GPUs have a datasheet table, this is "
                             f"{first_device.platform}; use --peak=measured or --peak_gflops")
    # The datasheet look-up fails (unknown device) before anything is timed. A datasheet peak is recorded with
    # a measured one beside it, to show how far a plain matmul gets.
    datasheet = datasheet_peak_gflops(first_device.device_kind) if source == "datasheet" else None
    measured = None if source == "flag" else matmul_peak_gflops(model_cfg.dtype, _PEAK_SIZE.value,
                                                                device=first_device)
    peak_per_device = dict(flag=_PEAK_GFLOPS.value, measured=measured, datasheet=datasheet)[source]
    common = dict(config=flags.FLAGS["config"].config_filename, tag=_TAG.value, dtype=model_cfg.dtype,
                  d_model=model_cfg.d_model, layers=[model_cfg.num_encoder_layers, model_cfg.num_decoder_layers],
                  vocab=model_cfg.vocab_size, batch=config.data.batch_size,
                  lengths=[config.data.max_inputs_length, config.data.max_targets_length],
                  mesh=dict(mesh.shape), devices=f"{jax.device_count()} x {first_device.device_kind}",
                  jax=jax.__version__, peak_gflops_per_device=peak_per_device, peak_source=source,
                  peak_measured=source == "measured", measured_peak_gflops_per_device=measured, **cpu_info())
    logging.info("matmul peak (%s, %s): %.0f GFLOP/s per device", model_cfg.dtype, source, peak_per_device)
    rows = []
    for mode in _MODES.value:
        if mode == "train":
            result = bench_train(config, model, mesh, peak_per_device)
        else:
            result = bench_decode(config, model, mode)
            result["peak_gflops"] = peak_per_device * result["num_devices"]
        row = dict(common, mode=mode, peak_memory_mb=peak_memory_mb(), **result)
        rows.append(row)
        if _OUT.value:
            with open(_OUT.value, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(format_table(rows))


def _yes_no(flag) -> str:
    return "?" if flag is None else ("yes" if flag else "no")


def format_header(row: dict) -> str:
    """One line: devices, mesh, the per-device peak and its source, and the host CPU."""
    mesh = " ".join(f"{axis}={size}" for axis, size in row["mesh"].items())
    devices = int(np.prod(list(row["mesh"].values())))  # mesh.devices.size: what the train step runs on.
    return (f"# {row['devices']} | mesh {mesh} | peak {row['peak_gflops_per_device']:,.0f} GFLOP/s per device "
            f"({row['peak_source']}) x {devices} = {row['peak_gflops_per_device'] * devices:,.0f} for train; "
            f"decoding on 1 | CPU {row['cpu_model']}, amx_bf16 {_yes_no(row['cpu_amx_bf16'])}, "
            f"avx512_bf16 {_yes_no(row['cpu_avx512_bf16'])}, avx512f {_yes_no(row.get('cpu_avx512f'))}")


def format_table(rows: list[dict]) -> str:
    lines = [format_header(rows[0])] if rows else []
    lines.append(f"{'mode':7} {'dtype':9} {'tokens/s (median, min-max)':32} {'seconds (median)':17} "
                 f"{'MFU':>6} {'compile s':>9} {'peak MB':>8}")
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
    errors.run(main)
