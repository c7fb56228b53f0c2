"""Tests for flaxformer_lite.checkpointing (CPU, 8 virtual devices from conftest.py; small states, fast)."""

from __future__ import annotations

import functools
import gc
import logging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import grain

from flaxformer_lite import checkpointing
from flaxformer_lite.checkpointing import CheckpointWriter

# After a failed restore Orbax leaves the cancelled sibling reads (coroutines) to the garbage collector, which
# pytest reports as warnings; the tests that damage checkpoints collect them before they end.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


_TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.linear_schedule(1e-3, 0.0, 100)))


def make_params(seed: int) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "encoder": {"kernel": jax.random.normal(k1, (16, 32)), "bias": jax.random.normal(k2, (32,))},
        "embedding": jax.random.normal(k3, (64, 16)),
    }


def make_state(seed: int = 0, step: int = 7) -> TrainState:
    params = make_params(seed)
    opt_state = _TX.init(params)
    # Make the optimizer state non-trivial (count > 0, non-zero moments), as after real training steps.
    _, opt_state = _TX.update(params, opt_state, params)
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(jax.random.PRNGKey(seed + 100)),
    )


class Position(grain.DatasetIterator):
    """A data iterator that is only a position, to see what a checkpoint restores into it."""

    def __init__(self, pos=0):
        super().__init__()
        self.pos = pos

    def __next__(self):
        self.pos += 1
        return self.pos

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]


def abstract(tree, sharding_fn):
    """ShapeDtypeStructs with shardings, as the training loop builds them from jax.eval_shape."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)),
        jax.eval_shape(lambda: tree),
    )


def one_device(x):
    return SingleDeviceSharding(jax.devices()[0])


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_interval_and_keep_last_k(tmp_path):
    directory = tmp_path / "ckpt"
    state = make_state()
    with CheckpointWriter(directory, save_interval_steps=2, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == [] and ckpt.best_step() is None
        assert not ckpt.should_save(1) and ckpt.should_save(2)
        saved = [s for s in range(1, 10) if ckpt.save(s, state, data_iterator=Position(s))]
        assert saved == [2, 4, 6, 8]  # the interval, and no extra "initial" save at step 1
        assert ckpt.save(9, state, data_iterator=Position(90), force=True)  # final save
        assert not ckpt.save(9, state, force=True)  # already saved: skipped, not an error
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [8, 9] and ckpt.latest_step() == 9
        assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["8", "9"]

    # A fresh Checkpointer (a resumed run) sees the same steps and restores bit for bit.
    with CheckpointWriter(directory, save_interval_steps=2, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [8, 9]
        position = Position()
        restored, step = ckpt.restore(abstract(state, one_device), position)
        assert step == 9 and position.pos == 90
        assert isinstance(restored, TrainState)
        assert_trees_equal(restored, state)
    assert (directory / "9" / "data" / "process_0-of-1.json").exists()  # One file per process.


def test_a_checkpoint_of_another_process_count_is_refused_with_what_to_do(tmp_path):
    state = make_state()
    with CheckpointWriter(tmp_path, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
        ckpt.save(1, state, data_iterator=Position(5))
    data = tmp_path / "1" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")  # As two processes write it.
    (data / "process_1-of-2.json").write_text('{"pos": 6}')
    with CheckpointWriter(tmp_path, save_interval_steps=1, max_to_keep=None) as ckpt:
        with pytest.raises(ValueError, match="written by 2 processes but this run has 1.*Rerun with 2"):
            ckpt.restore(abstract(state, one_device), Position())
        assert ckpt.all_steps() == [1]  # Refused, not taken for damage: nothing deleted.


def test_synchronous_save_without_a_data_iterator(tmp_path):
    state = make_state()
    with CheckpointWriter(tmp_path, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
        assert ckpt.save(3, state)
        assert ckpt.all_steps() == [3]
        restored, step = ckpt.restore(abstract(state, one_device))
        with pytest.raises(ValueError, match="holds no data iterator positions"):
            ckpt.restore(abstract(state, one_device), Position())
    assert step == 3
    assert_trees_equal(restored, state)


def test_restore_onto_other_meshes(tmp_path):
    mesh8 = jax.make_mesh((8,), ("data",))
    state = make_state()
    # Shard every array whose leading dimension divides by 8 over all 8 devices.
    def shard8(x):
        return jax.device_put(x, NamedSharding(mesh8, P("data") if x.shape and x.shape[0] % 8 == 0 else P()))

    sharded = jax.tree.map(shard8, state)
    assert sharded.params["embedding"].sharding.spec == P("data")
    with CheckpointWriter(tmp_path, save_interval_steps=1, max_to_keep=3) as ckpt:
        ckpt.save(1, sharded, data_iterator=Position(1))
        ckpt.wait_until_finished()

        on_one, _ = ckpt.restore(abstract(state, one_device))
        assert_trees_equal(on_one, state)
        assert on_one.params["embedding"].sharding.device_set == {jax.devices()[0]}

        mesh222 = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
        specs = {2: P("fsdp", "tensor"), 1: P("tensor")}
        position = Position()
        on_cube, _ = ckpt.restore(abstract(state, lambda x: NamedSharding(mesh222, specs.get(x.ndim, P()))),
                                  position)
        assert position.pos == 1
        assert_trees_equal(on_cube, state)
        kernel = on_cube.params["encoder"]["kernel"]
        assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
        assert kernel.sharding.spec == P("fsdp", "tensor")
        assert kernel.addressable_shards[0].data.shape == (8, 16)


def test_restore_params_and_average(tmp_path):
    same, other = make_state(seed=0), make_state(seed=1)
    abstract_params = abstract(same.params, one_device)
    with CheckpointWriter(tmp_path, save_interval_steps=1, max_to_keep=None) as ckpt:
        for step, state in [(1, same), (2, same), (3, same), (4, other)]:
            ckpt.save(step, state)
    params, label = checkpointing.restore_params(tmp_path, abstract_params)  # latest
    assert_trees_equal(params, other.params)
    assert label == "4"
    params, label = checkpointing.restore_params(tmp_path, abstract_params, "1")
    assert_trees_equal(params, same.params)
    assert label == "1"
    params, label = checkpointing.restore_params(tmp_path, abstract_params, 3, average_last=3)
    assert_trees_equal(params, same.params)
    assert label == "avg3-3"
    mean, label = checkpointing.restore_params(tmp_path, abstract_params, average_last=2)
    assert label == "avg2-4"
    expected = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, same.params, other.params)
    for x, y in zip(jax.tree.leaves(mean), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(x), y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no best checkpoint"):
        checkpointing.restore_params(tmp_path, abstract_params, "best")  # no best_metric
    with pytest.raises(ValueError, match=r"expected latest, best or one of \[1, 2, 3, 4\]"):
        checkpointing.restore_params(tmp_path, abstract_params, "12345")


def test_average_last_leaves_out_an_old_best_checkpoint_kept_beside_the_recent_ones(tmp_path):
    good, recent = make_state(seed=0), make_state(seed=1)
    abstract_params = abstract(good.params, one_device)
    with CheckpointWriter(tmp_path, save_interval_steps=1, max_to_keep=2, best_metric="bleu") as ckpt:
        for step, state, bleu in [(1, good, 9.0), (2, recent, 1.0), (3, recent, 2.0), (4, recent, 3.0)]:
            ckpt.save(step, state, metrics={"bleu": bleu})
    assert ckpt.all_steps() == [1, 3, 4]  # The last two, and the best (1) kept beside them.
    restore = functools.partial(checkpointing.restore_params, tmp_path, abstract_params, best_metric="bleu")
    params, label = restore(average_last=3, keep_checkpoints=2)
    assert label == "avg2-4"  # Steps 3 and 4 only: the recent series has two.
    assert_trees_equal(params, recent.params)
    _, label = restore(average_last=3)  # Without the run's keep_checkpoints every retained step counts.
    assert label == "avg3-4"
    params, label = restore("best", average_last=3, keep_checkpoints=2)
    assert label == "best-avg1-1"
    assert_trees_equal(params, good.params)


def _truncate_data_files(step_dir):
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            if f"{os.sep}d" in root:  # OCDBT data files live in .../d/
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)


def _delete_largest_data_file(step_dir):
    files = [os.path.join(r, n) for r, _, fs in os.walk(step_dir / "state") for n in fs if f"{os.sep}d" in r]
    os.remove(max(files, key=os.path.getsize))


def _remove_commit_marker(step_dir):
    os.remove(step_dir / "commit_success.txt")


@pytest.mark.parametrize("damage", [_truncate_data_files, _delete_largest_data_file, _remove_commit_marker])
def test_damaged_latest_falls_back_with_warning(tmp_path, caplog, damage):
    states = {step: make_state(seed=step, step=step) for step in (1, 2, 3)}
    with CheckpointWriter(tmp_path, save_interval_steps=1, max_to_keep=5) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, data_iterator=Position(step))
    damage(tmp_path / "3")
    # A crashed save leaves a tmp directory: it must never be taken for a checkpoint.
    (tmp_path / "4.orbax-checkpoint-tmp").mkdir()
    (tmp_path / "4.orbax-checkpoint-tmp" / "junk").write_text("partial")

    caplog.set_level(logging.WARNING)
    # Evaluation reads only the params: it skips step 3 if the damage touches them (a deleted file may
    # hold only optimizer state), and never deletes anything.
    params, label = checkpointing.restore_params(tmp_path, abstract(states[1].params, one_device))
    assert label in ("2", "3")
    assert_trees_equal(params, states[int(label)].params)
    assert checkpointing.all_steps(tmp_path) == [1, 2, 3]
    with CheckpointWriter(tmp_path, save_interval_steps=1, max_to_keep=5) as ckpt:
        assert ckpt.latest_step() == 3
        caplog.clear()
        position = Position()
        restored, step = ckpt.restore(abstract(states[1], one_device), position)
        assert step == 2 and position.pos == 2
        assert_trees_equal(restored, states[2])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("checkpoint step 3" in w and "trying the previous" in w for w in warnings), warnings
        # Resuming from step 2 discards the unreadable step 3, so the run can save step 3 again.
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.save(3, states[3], force=True)
        ckpt.wait_until_finished()
        assert ckpt.restore(abstract(states[1], one_device))[1] == 3
    gc.collect()


def test_all_checkpoints_unreadable_raises(tmp_path):
    state = make_state()
    with CheckpointWriter(tmp_path, save_interval_steps=1, max_to_keep=5) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
        _remove_commit_marker(tmp_path / "1")
        with pytest.raises(RuntimeError, match="No restorable checkpoint"):
            ckpt.restore(abstract(state, one_device))
        assert ckpt.all_steps() == [1]  # nothing is deleted when nothing could be restored
    gc.collect()


@pytest.mark.parametrize(
    "mode, values, max_to_keep, expected_steps, expected_best",
    [
        ("max", [1.0, 5.0, 2.0, 3.0, 4.0], 2, [2, 4, 5], 2),
        ("min", [3.0, 1.0, 2.0, 4.0], 1, [2, 4], 2),
    ],
)
def test_best_checkpoint_survives_keep_last_k(
    tmp_path, mode, values, max_to_keep, expected_steps, expected_best
):
    state = make_state()
    with CheckpointWriter(
        tmp_path, save_interval_steps=1, max_to_keep=max_to_keep, best_metric="bleu", best_mode=mode
    ) as ckpt:
        for step, value in enumerate(values, start=1):
            ckpt.save(step, state, metrics={"bleu": np.float32(value), "loss": 0.5})
        ckpt.wait_until_finished()
        assert ckpt.best_step() == expected_best
        assert ckpt.all_steps() == expected_steps
    with CheckpointWriter(
        tmp_path, save_interval_steps=1, max_to_keep=max_to_keep, best_metric="bleu", best_mode=mode
    ) as ckpt:
        assert ckpt.best_step() == expected_best  # metrics are read back from disk
    params, label = checkpointing.restore_params(tmp_path, abstract(state.params, one_device), "best",
                                                 best_metric="bleu", best_mode=mode)
    assert label == f"best-{expected_best}"
    assert_trees_equal(params, state.params)


def test_relative_directory_is_accepted(tmp_path, monkeypatch):
    """The default workdir is relative (workdir/scan); Orbax itself only takes absolute paths."""
    monkeypatch.chdir(tmp_path)
    state = {"params": {"w": np.arange(4, dtype=np.float32)}}
    with CheckpointWriter("relative/checkpoints", save_interval_steps=1, max_to_keep=2, async_save=False) as ckpt:
        assert ckpt.save(1, state, force=True)
    with CheckpointWriter("relative/checkpoints", save_interval_steps=1, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 1
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
                jax.devices()[0])), state)
        restored, step = ckpt.restore(abstract)
    assert step == 1
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert (tmp_path / "relative" / "checkpoints" / "1").is_dir()
