"""Loss, schedule, gradient accumulation, and the same training result on every mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import Transformer, preset, sharding, train_step

MODEL = Transformer(preset("tiny"))


def make_batch(seed=0, batch_size=8):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, 64, size=(batch_size, 10)).astype(np.int32)
    targets = rng.integers(3, 64, size=(batch_size, 12)).astype(np.int32)
    for row in range(batch_size):  # Mixed lengths, so that padding is part of every test.
        inputs[row, rng.integers(2, 10):] = 0
        targets[row, rng.integers(2, 12):] = 0
    return {"inputs": inputs, "targets": targets}


def test_label_smoothed_loss_matches_hand_computation():
    logits = np.array([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]]], np.float32)
    targets = np.array([[2, 0]])  # The second position is padding and must not count.
    eps, vocab = 0.1, 4
    sums = train_step.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=eps)
    log_p = logits[0, 0] - np.log(np.exp(logits[0, 0]).sum())
    q = np.full(vocab, eps / (vocab - 1))
    q[2] = 1 - eps
    expected = -(q * log_p).sum() + (q * np.log(q)).sum()  # cross-entropy minus the entropy of q
    np.testing.assert_allclose(float(sums["loss"]), expected, rtol=1e-6)
    np.testing.assert_allclose(float(sums["nll"]), -log_p[2], rtol=1e-6)
    assert float(sums["tokens"]) == 1.0 and float(sums["correct"]) == 0.0


def test_smoothed_loss_is_zero_at_its_minimum_and_z_loss_adds():
    eps, vocab = 0.1, 5
    q = np.full(vocab, eps / (vocab - 1))
    q[3] = 1 - eps
    logits = jnp.asarray(np.log(q)[None, None], jnp.float32)  # The prediction equal to the smoothed target.
    targets = jnp.array([[3]])
    assert abs(float(train_step.cross_entropy_sums(logits, targets, eps)["loss"])) < 1e-6
    shifted = logits + 2.0  # Same softmax, log Z = 2.
    with_z = train_step.cross_entropy_sums(shifted, targets, eps, z_loss=1e-2)["loss"]
    np.testing.assert_allclose(float(with_z), 1e-2 * 4.0, atol=1e-5)


def test_paper_learning_rate_schedule():
    cfg = train_step.TrainConfig(schedule="transformer", learning_rate=1.0, warmup_steps=4000)
    lr = train_step.learning_rate_schedule(cfg, d_model=512)
    for step in (1, 100, 4000, 16000):
        expected = 512 ** -0.5 * min(step ** -0.5, step * 4000 ** -1.5)
        np.testing.assert_allclose(float(lr(jnp.asarray(step - 1))), expected, rtol=1e-5)
    assert float(lr(jnp.asarray(3999))) > float(lr(jnp.asarray(3998)))  # Rising during warm-up...
    assert float(lr(jnp.asarray(4001))) < float(lr(jnp.asarray(4000)))  # ...then decaying.
    rsqrt = train_step.learning_rate_schedule(dataclasses.replace(cfg, schedule="rsqrt", learning_rate=1e-3), 512)
    np.testing.assert_allclose(float(rsqrt(jnp.asarray(3999))), 1e-3, rtol=1e-6)


def test_the_default_schedule_gives_the_papers_rate():
    """Paper 5.3 with d_model 512 and 4000 warm-up steps peaks at 512^-0.5 * 4000^-0.5 = 7.0e-4 (not x 1e-3)."""
    lr = train_step.learning_rate_schedule(train_step.TrainConfig(), d_model=512)
    np.testing.assert_allclose(float(lr(jnp.asarray(3999))), 512 ** -0.5 * 4000 ** -0.5, rtol=1e-5)
    assert train_step.TrainConfig(schedule="cosine").learning_rate == 1e-3  # A peak rate elsewhere.
    assert train_step.TrainConfig(learning_rate=2.0).learning_rate == 2.0


@pytest.mark.parametrize("optimizer", ["adam", "adafactor"])
def test_gradient_accumulation_equals_the_full_batch(optimizer):
    full_cfg = train_step.TrainConfig(optimizer=optimizer, schedule="constant", learning_rate=1e-2,
                                    weight_decay=0.01 if optimizer != "adam" else 0.0)
    mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
    results = []
    for microbatches in (1, 4):
        cfg = dataclasses.replace(full_cfg, microbatches=microbatches)
        opt = train_step.make_optimizer(cfg, MODEL.config.d_model)
        _, shardings = train_step.state_shardings(MODEL, opt, mesh)
        state = train_step.create_train_state(0, MODEL, opt, shardings)
        train, _ = train_step.make_step_functions(MODEL, opt, cfg, mesh, shardings)
        state, metrics = train(state, make_batch())
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (params_full, metrics_full), (params_acc, metrics_acc) = results
    assert metrics_full["tokens"] == metrics_acc["tokens"]
    np.testing.assert_allclose(metrics_acc["loss"], metrics_full["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_acc["grad_norm"], metrics_full["grad_norm"], rtol=1e-5)
    # Within 1/1000 of one step (the learning rate): Adam's first update, lr * g / (|g| + eps), turns float32
    # rounding in the order of the summed gradients into ~1e-6 differences where |g| is only ~100 eps.
    tolerance = 1e-3 * full_cfg.learning_rate
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=tolerance), params_acc, params_full)


def _train_three_steps(mesh_shape):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.create_mesh(mesh_shape, devices)
    cfg = train_step.TrainConfig(schedule="constant", learning_rate=3e-3, grad_clip_norm=1.0)
    opt = train_step.make_optimizer(cfg, MODEL.config.d_model)
    _, shardings = train_step.state_shardings(MODEL, opt, mesh)
    state = train_step.create_train_state(0, MODEL, opt, shardings)
    train, evaluate = train_step.make_step_functions(MODEL, opt, cfg, mesh, shardings)
    losses = []
    for step in range(3):
        state, metrics = train(state, sharding.shard_batch(make_batch(step), mesh))
        losses.append(float(metrics["loss"]) / float(metrics["tokens"]))
    eval_sums = evaluate(state.params, sharding.shard_batch(make_batch(9), mesh))
    kernel = state.params["decoder"]["layer_0"]["ffn"]["wi"]["kernel"]
    return losses, jax.device_get(state.params), float(eval_sums["loss"]), kernel.sharding.spec


def test_data_fsdp_tensor_meshes_train_like_one_device():
    single_losses, single_params, single_eval, _ = _train_three_steps((1, 1, 1))
    assert single_losses[2] < single_losses[0]  # It learns something in 3 steps.
    for shape in ((8, 1, 1), (2, 2, 2)):
        losses, params, eval_loss, spec = _train_three_steps(shape)
        assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # ('embed', 'mlp') by the rules.
        # Tolerance: sharded reductions add the same float32 numbers in a different order (relative error
        # ~1e-7 per op); after 3 Adam steps parameters agree to ~1e-6.
        np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
        np.testing.assert_allclose(eval_loss, single_eval, rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, single_params)


@pytest.mark.parametrize("field, value, message", [
    ("schedule", "linear", "must be one of"),
    ("optimizer", "sgd", "must be one of"),
    ("on_nonfinite", "ignore", "must be one of"),
    ("learning_rate", -1.0, "must be > 0"),
    ("learning_rate", 0.0, "must be > 0"),
    ("learning_rate", float("nan"), "must be > 0"),
    ("adam_b1", 1.0, r"must be in \[0, 1\)"),
    ("adam_b2", -0.1, r"must be in \[0, 1\)"),
    ("label_smoothing", 1.0, r"must be in \[0, 1\)"),
    ("adam_eps", -1e-9, "must be >= 0"),
    ("weight_decay", -0.1, "must be >= 0"),
    ("warmup_steps", -1, "must be >= 0"),
    ("grad_clip_norm", 0.0, "must be > 0, or None"),
    ("microbatches", 0, "must be >= 1"),
])
def test_bad_train_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}: {message}.*, got"):
        train_step.TrainConfig(**{field: value})


def test_a_bad_mesh_shape_names_itself():
    with pytest.raises(ValueError, match="mesh_shape"):
        sharding.create_mesh((3, 1, 1))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nonfinite_step_is_flagged_and_skip_leaves_the_state_as_it_was(policy):
    cfg = train_step.TrainConfig(schedule="constant", learning_rate=1e-2, on_nonfinite=policy)
    mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
    opt = train_step.make_optimizer(cfg, MODEL.config.d_model)
    _, shardings = train_step.state_shardings(MODEL, opt, mesh)
    train, _ = train_step.make_step_functions(MODEL, opt, cfg, mesh, shardings)
    state = train_step.create_train_state(0, MODEL, opt, shardings)
    state, metrics = train(state, make_batch(0))
    assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    # An infinite weight in the last layer's feed-forward makes the loss (and every gradient) NaN.
    params = jax.tree_util.tree_map(np.array, jax.device_get(state.params))
    params["decoder"]["layer_1"]["ffn"]["wo"]["kernel"][0, 0] = np.inf
    before = jax.device_get(state.replace(params=params))
    state, metrics = train(jax.device_put(before, shardings), make_batch(1))
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state)
    assert int(after.step) == int(before.step) + 1  # The data moves on either way.
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b, equal_nan=True),
                                  (after.params, after.opt_state), (before.params, before.opt_state))
    # Skipping keeps every parameter and optimizer moment; without it the NaN gradients reach them.
    assert all(jax.tree_util.tree_leaves(same)) == (policy == "skip")


_SHARDED_STEPS = """
import sys
import jax, numpy as np
from flaxformer_lite import Transformer, preset, sharding, train_step
constrained = sys.argv[2] == "constrained"
model = Transformer(preset("tiny", vocab_size=21))  # 21 ids: the table is padded to 128 rows.
for shape in sys.argv[1].split(":"):  # Mesh shapes, e.g. 1,1,1:2,2,2
    shape = tuple(int(n) for n in shape.split(","))
    mesh = sharding.create_mesh(shape, jax.devices()[: int(np.prod(shape))])
    cfg = train_step.TrainConfig(schedule="constant", learning_rate=3e-3)
    opt = train_step.make_optimizer(cfg, model.config.d_model)
    _, shardings = train_step.state_shardings(model, opt, mesh)
    state = train_step.create_train_state(0, model, opt, shardings)
    train, _ = train_step.make_step_functions(model, opt, cfg, mesh, shardings)
    train = train if constrained else train.__wrapped__  # The bare jitted step: constraints do nothing.
    rng = np.random.default_rng(0)
    for step in range(3):
        batch = {k: rng.integers(3, 21, (8, 12)).astype(np.int32) for k in ("inputs", "targets")}
        state, metrics = train(state, sharding.shard_batch(batch, mesh))
        print(f"loss {shape} {float(metrics['loss']) / float(metrics['tokens'])}", flush=True)
    print(f"compiled {shape}", file=sys.stderr, flush=True)
"""


def _run_sharded_steps(shapes: str, constrained: bool = True) -> tuple[dict[str, list[float]], str]:
    """Losses of 3 steps on each mesh shape of ``shapes`` (one process), and its stderr."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _SHARDED_STEPS, shapes,
                             "constrained" if constrained else "bare"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = {}
    for line in result.stdout.splitlines():
        if line.startswith("loss"):
            shape, loss = line[len("loss "):].rsplit(" ", 1)
            losses.setdefault(shape, []).append(float(loss))
    return losses, result.stderr


def test_the_2x2x2_mesh_compiles_without_resharding_activations_and_trains_like_one_device():
    """XLA's SPMD partitioner logs "Involuntary full rematerialization" (to stderr, from C++) when it must
    replicate an activation to change its layout. The model's activation constraints prevent it; without
    them (the bare jitted step, the control) the same program logs it on jax 0.10, so the check can fail."""
    losses, log = _run_sharded_steps("1,1,1:2,2,2")
    sharded_log = log.split("compiled (1, 1, 1)")[1]  # What the (2, 2, 2) programs logged.
    assert "Involuntary full rematerialization" not in sharded_log, sharded_log[-2000:]
    assert len(losses["(2, 2, 2)"]) == 3
    np.testing.assert_allclose(losses["(2, 2, 2)"], losses["(1, 1, 1)"], rtol=1e-5)
    if jax.__version_info__ < (0, 11):
        # jax 0.12's XLA reshards the bare program without replicating anything, so logs nothing there.
        _, bare_log = _run_sharded_steps("2,2,2", constrained=False)
        assert "Involuntary full rematerialization" in bare_log


def test_a_dimension_the_mesh_does_not_divide_is_refused_by_name():
    mesh = sharding.create_mesh((1, 1, 8), jax.devices()[:8])
    opt = train_step.make_optimizer(train_step.TrainConfig(), MODEL.config.d_model)
    with pytest.raises(ValueError, match=r"'heads' axis \(4\).*axis_rules.heads"):
        train_step.state_shardings(MODEL, opt, mesh)
