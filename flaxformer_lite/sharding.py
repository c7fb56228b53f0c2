"""The device mesh and how arrays are laid out on it. The only module that builds a mesh.

One mesh with three axes serves every strategy:

* ``data``: pure data parallelism (each device holds a full copy of the parameters);
* ``fsdp``: data parallelism whose parameters and optimizer state are sharded (ZeRO-3 / FSDP);
* ``tensor``: tensor (model) parallelism inside attention heads, the feed-forward width and the vocabulary.

Parameters carry logical axis names (see ``layers.param_with_axes``) and the model constrains its
activations by logical names too (``layers.constrain``); the rules (``DEFAULT_AXIS_RULES``, overridable as
``config.axis_rules``) map each name to mesh axes (or to replication). Batches are split over ``data``
and ``fsdp`` together.
"""

from __future__ import annotations

import os
import contextlib
import functools
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxformer_lite import errors

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, as comma-separated names ("": replicated). ``config.axis_rules`` starts from
# this (``--config.axis_rules.embed=''`` replicates the embedding width of every parameter, for example).
# Parameters use the plain names; activations the ``activation_*`` ones, so that a batch split over
# ``fsdp`` does not also split its features there. ``activation_heads`` and ``activation_mlp`` follow the
# parameters' ``heads`` and ``mlp`` (tensor parallelism splits the work, not only the weights).
DEFAULT_AXIS_RULES: dict[str, str] = {
    "batch": "data,fsdp",
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": "",
    "position": "",
    "length": "",
    "activation_batch": "data,fsdp",
    "activation_length": "",
    "activation_embed": "",
    "activation_heads": "tensor",
    "activation_kv": "",
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
}


def axis_rules(mapping: Mapping[str, str] | None = None) -> tuple[tuple[str, Any], ...]:
    """flax's logical-axis rules from a ``{logical: "mesh,axes"}`` mapping (default: DEFAULT_AXIS_RULES).

    Raises ValueError naming ``config.axis_rules.<name>`` for a mesh axis that does not exist.
    """
    rules = []
    for name, value in (DEFAULT_AXIS_RULES if mapping is None else mapping).items():
        axes = tuple(a.strip() for a in str(value or "").split(",") if a.strip())
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise errors.ConfigError(
                f"config.axis_rules.{name}={value!r}: {unknown} not among the mesh axes {MESH_AXES}")
        rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(rules)


LOGICAL_AXIS_RULES = axis_rules()


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts JAX's multi-controller runtime when this is one of several processes (one per host).

    Explicit arguments win; otherwise JAX detects the cluster itself (Slurm with more than one task, where
    JAX's default is one process per GPU; Cloud TPU pods with more than one worker, ...). A single process
    needs nothing and is left alone.
    ``FLAXFORMER_DISTRIBUTED=1`` in the environment forces JAX's own detection where the variables checked
    here are not set (Cloud TPU VM slices started over ssh: ``launch/tpu_vm.sh`` sets it).
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    tpu_hosts = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h])
    forced = os.environ.get("FLAXFORMER_DISTRIBUTED", "") not in ("", "0")
    if not explicit and not forced and slurm_tasks <= 1 and tpu_hosts <= 1:
        return
    if explicit and None not in (coordinator_address, num_processes, process_id):
        # All given: no cluster detection, which on Slurm would also restrict each process to the one GPU
        # numbered SLURM_LOCALID (JAX's one-process-per-GPU default); here a process uses all its host's.
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   cluster_detection_method="deactivate")
    elif explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def define_distributed_flags() -> Callable[[], None]:
    """Registers --coordinator_address, --num_processes and --process_id (the entry points share them);
    returns a function that starts ``jax.distributed`` from them (call it first in ``main``)."""
    from absl import flags  # Only the command-line programs need flags.

    coordinator = flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 for multi-process runs; unset: detected on Slurm "
        "and Cloud TPU, single process otherwise.")
    processes = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    process_id = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
    return lambda: initialize_distributed(coordinator.value, processes.value, process_id.value)


def all_processes_agree(ok: bool) -> bool:
    """True only if ``ok`` holds on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, dtype=np.int32))))


def any_process(flag: bool) -> bool:
    """True if ``flag`` holds on some process (a collective: every process must call it)."""
    return not all_processes_agree(not flag)


def create_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh over all (or the given) devices; one entry may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise errors.ConfigError(f"mesh_shape {tuple(mesh_shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise errors.ConfigError(f"mesh_shape {tuple(mesh_shape)}: at most one entry may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise errors.ConfigError(f"mesh_shape {tuple(mesh_shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise errors.ConfigError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                                 f"but {len(devices)} are available")
    return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree whose leaves are (abstract) ``nn.LogicallyPartitioned`` boxes or arrays.

    Leaves without logical names (optimizer counters, the step, the rng) are replicated. A dimension that
    its mesh axes do not divide fails here, naming the parameter and the rule, not later inside XLA.
    """
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    flat_boxes = jax.tree_util.tree_flatten_with_path(
        boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    for path, box in flat_boxes:
        if not isinstance(box, nn.LogicallyPartitioned):
            continue
        shape = np.shape(box.value)
        for size, name in zip(shape, box.names):
            mesh_axes = dict(rules).get(name)
            mesh_axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            parts = int(np.prod([mesh.shape[a] for a in mesh_axes]))
            if size % parts:
                raise errors.ConfigError(
                            f"parameter {jax.tree_util.keystr(path)} of shape {shape}: its {name!r} axis ({size}) is "
                            f"split over mesh axes {mesh_axes} ({parts} devices), which do not divide it; change "
                            f"--config.mesh_shape or --config.axis_rules.{name}")
    return shardings


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Makes the model's logical activation constraints (``nn.with_logical_constraint``) bind to ``mesh``.

    Enter it around the first call (the trace) of a jitted function; outside it the constraints do nothing.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def under_rules(jitted: Callable, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Callable:
    """``jitted`` called (and so traced) under :func:`activation_rules`."""
    @functools.wraps(jitted)
    def call(*args, **kwargs):
        with activation_rules(mesh, rules):
            return jitted(*args, **kwargs)

    return call


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are ``[batch, length]``: split the batch over ``data`` x ``fsdp``, replicate over ``tensor``."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_rows(array: np.ndarray, rows: NamedSharding) -> jax.Array:
    """A global array of ``array``, which every process holds whole, with its rows laid out by ``rows``."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, rows, lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
    """The whole of a global array as NumPy on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of the batch (each process feeds its own data shard)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
