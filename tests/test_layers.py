"""layers.py: the policy einsum with its hand-written gradient, dropout, and the kernel layouts of DenseGeneral."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import layers, transformer, train_step

# (equation, shape of x, shape of y): every product the model makes, forward.
PRODUCTS = [
    ("abx,xcd->abcd", (2, 5, 8), (8, 3, 4)),  # Q/K/V projection.
    ("abxy,xyc->abc", (2, 5, 3, 4), (3, 4, 8)),  # Attention output projection.
    ("abx,xc->abc", (2, 5, 8), (8, 16)),  # Feed-forward, first matrix.
    ("abx,cx->abc", (2, 5, 16), (8, 16)),  # Feed-forward, second matrix (kernel stored out-first).
    ("nd,vd->nv", (10, 8), (12, 8)),  # Logits through the shared embedding.
    ("bqhd,bkhd->bhqk", (2, 5, 3, 4), (2, 6, 3, 4)),  # Attention logits.
    ("bhqk,bkhd->bqhd", (2, 3, 5, 6), (2, 6, 3, 4)),  # Attention probabilities x values.
]


@pytest.mark.parametrize("equation,x_shape,y_shape", PRODUCTS)
def test_policy_einsum_gradients_equal_autodiff_of_einsum(equation, x_shape, y_shape):
    kx, ky, kg = jax.random.split(jax.random.key(0), 3)
    x, y = jax.random.normal(kx, x_shape), jax.random.normal(ky, y_shape)
    weights = jax.random.normal(kg, jnp.einsum(equation, x, y).shape)  # A loss that weighs every output.
    ours = jax.grad(lambda a, b: jnp.sum(layers.policy_einsum(equation, a, b, "float32") * weights), (0, 1))(x, y)
    plain = jax.grad(lambda a, b: jnp.sum(jnp.einsum(equation, a, b) * weights), (0, 1))(x, y)
    for got, want in zip(ours, plain):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers.policy_einsum(equation, x, y, "float32"), jnp.einsum(equation, x, y), rtol=1e-6)


def test_einsum_lowers_to_the_program_of_jnp_einsum(monkeypatch):
    """``layers.einsum`` only skips ``jnp.einsum``'s per-call overhead: a bfloat16 gradient of the model and
    a greedy decoder lower to the very same program with either (the operand order matters on CPUs)."""
    from flaxformer_lite import attention, decoding

    cfg = transformer.preset("tiny", dtype="bfloat16", dropout_rate=0.1, attention_dropout_rate=0.1,
                             ffn_dropout_rate=0.1)
    model = transformer.Transformer(cfg)
    inputs = jnp.array([[5, 6, 7, 1, 0, 0], [8, 9, 1, 0, 0, 0]], jnp.int32)
    params = model.init(jax.random.key(0), inputs, inputs)["params"]

    def loss(p):
        logits = model.apply({"params": p}, inputs, inputs, deterministic=False,
                             rngs={"dropout": jax.random.key(1)})
        return train_step.cross_entropy_sums(logits, inputs, 0.1)["loss"]

    def programs():
        gradient = jax.jit(jax.grad(loss)).lower(params)
        greedy = jax.jit(lambda p, x: decoding.decode_batch(
            model, p, x, decoding.DecodeConfig(method="greedy")).tokens).lower(params, inputs)
        return gradient.as_text(debug_info=False), greedy.as_text(debug_info=False)

    ours = programs()
    assert ours[0].count("dot_general") >= 3 * (2 * 6 + 2 * 10 + 1)
    plain = lambda equation, x, y, preferred_element_type=None: jnp.einsum(  # noqa: E731
        equation, x, y, preferred_element_type=preferred_element_type)
    monkeypatch.setattr(layers, "einsum", plain)
    monkeypatch.setattr(attention, "einsum", plain)
    assert programs() == ours


@pytest.mark.parametrize("equation,x_shape,y_shape", PRODUCTS + [("bhd,bhkd->bhk", (2, 3, 4), (2, 3, 6, 4))])
def test_einsum_equals_jnp_einsum(equation, x_shape, y_shape):
    kx, ky = jax.random.split(jax.random.key(0))
    x, y = jax.random.normal(kx, x_shape), jax.random.normal(ky, y_shape)
    np.testing.assert_array_equal(layers.einsum(equation, x, y), jnp.einsum(equation, x, y))


def test_einsum_rejects_an_axis_that_would_be_summed_alone():
    with pytest.raises(ValueError, match="'c' must appear in two"):
        layers.einsum("abc,bd->ad", jnp.ones((2, 3, 4)), jnp.ones((3, 5)))


def _dot_generals(jaxpr):
    """Every dot_general equation in a jaxpr, including those inside nested jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _dot_generals(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _dot_generals(sub)


def test_every_bfloat16_product_of_a_train_step_takes_bfloat16_operands_and_accumulates_in_float32():
    """On CPUs bf16 x bf16 -> f32 is the fast form; f32 operands or a bf16 result are slower than float32."""
    cfg = transformer.preset("tiny", dtype="bfloat16", dropout_rate=0.1, attention_dropout_rate=0.1,
                             ffn_dropout_rate=0.1)
    model = transformer.Transformer(cfg)
    inputs = jnp.ones((2, 6), jnp.int32)
    params = model.init(jax.random.key(0), inputs, inputs)["params"]

    def loss(p):
        logits = model.apply({"params": p}, inputs, inputs, deterministic=False,
                             rngs={"dropout": jax.random.key(1)})
        return train_step.cross_entropy_sums(logits, inputs, 0.1)["loss"]

    dots = list(_dot_generals(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
    # Forward and backward of 2 + 2 layers: at least 3 products per matmul of the forward pass.
    assert len(dots) >= 3 * (2 * 6 + 2 * 10 + 1)
    for eqn in dots:
        operand_dtypes = [v.aval.dtype for v in eqn.invars]
        assert operand_dtypes == [jnp.bfloat16, jnp.bfloat16], (eqn, operand_dtypes)
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn


def test_dropout_keeps_the_right_fraction_and_the_expectation():
    x = jnp.ones((1000, 1001))  # Odd last axis: the 16-bit halves of the last draw are cut.
    for rate in (0.1, 0.3):
        y = layers.dropout(x, rate, jax.random.key(0))
        kept = np.asarray(y != 0)
        n = kept.size
        assert abs(kept.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)
        assert abs(float(y.mean()) - 1.0) < 4 * np.sqrt(rate / (1 - rate) / n)  # E[dropout(x)] = x.
        np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / (1 - round(rate * 65536) / 65536)],
                                   rtol=1e-6)


def test_dropout_masks_are_independent_across_neighbours_and_keys():
    rate, shape = 0.5, (500, 800)
    a = np.asarray(layers.dropout(jnp.ones(shape), rate, jax.random.key(0)) != 0).astype(np.float64)
    b = np.asarray(layers.dropout(jnp.ones(shape), rate, jax.random.key(1)) != 0).astype(np.float64)
    bound = 4 / np.sqrt(a.size)  # Four standard deviations of a correlation estimate of independent masks.
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < bound
    # The two 16-bit halves of one 32-bit draw (neighbours on the last axis), and rows.
    assert abs(np.corrcoef(a[:, 0::2].ravel(), a[:, 1::2].ravel())[0, 1]) < 2 * bound
    assert abs(np.corrcoef(a[0::2].ravel(), a[1::2].ravel())[0, 1]) < 2 * bound


def test_dropout_rate_zero_and_deterministic_are_the_identity():
    x = jax.random.normal(jax.random.key(0), (4, 7))
    np.testing.assert_array_equal(layers.dropout(x, 0.0, jax.random.key(1)), x)
    module = layers.Dropout(0.5)
    np.testing.assert_array_equal(module.apply({}, x, deterministic=True), x)
    dropped = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert 0 < int(jnp.sum(dropped == 0)) < x.size


def test_kernel_out_first_is_the_same_map_with_the_kernel_transposed():
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    usual = layers.DenseGeneral((8,), ("mlp",), ("embed",), use_bias=True)
    out_first = layers.DenseGeneral((8,), ("mlp",), ("embed",), use_bias=True, kernel_out_first=True)
    params = jax.tree_util.tree_map(lambda p: p.value if hasattr(p, "value") else p,
                                    usual.init(jax.random.key(1), x), is_leaf=lambda p: hasattr(p, "value"))
    transposed = {"params": {"kernel": params["params"]["kernel"].T, "bias": params["params"]["bias"]}}
    # Equal up to float32 rounding: XLA may order the two contractions' sums differently (jax 0.12 does), and
    # an output near zero then differs by far more than rtol alone allows; outputs here are O(1).
    np.testing.assert_allclose(out_first.apply(transposed, x), usual.apply(params, x), rtol=1e-6, atol=1e-6)
    shapes = jax.tree_util.tree_map(jnp.shape, out_first.init(jax.random.key(1), x))
    assert shapes["params"]["kernel"].value == (8, 16)
    assert shapes["params"]["kernel"].names == ("embed", "mlp")


def test_a_parameter_of_the_wrong_shape_is_an_error_that_names_it():
    """``param_with_axes`` reads existing parameters without re-tracing their initializer (flax's own shape
    check does that at every use), so it checks the shape itself."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    dense = layers.DenseGeneral((8,), ("mlp",), ("embed",), use_bias=True)
    params = dense.init(jax.random.key(1), x)
    boxed_ok = dense.apply(params, x)  # Boxed (logical axes) parameters, as init returns them...
    plain = jax.tree_util.tree_map(lambda p: p.value if hasattr(p, "value") else p, params,
                                   is_leaf=lambda p: hasattr(p, "value"))
    np.testing.assert_array_equal(dense.apply(plain, x), boxed_ok)  # ...or plain arrays: the same map.
    wrong = {"params": {**plain["params"], "kernel": jnp.zeros((16, 9))}}
    with pytest.raises(ValueError, match=r"kernel has shape \(16, 9\); the model's config needs \(16, 8\)"):
        dense.apply(wrong, x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_add_bias_gradients_are_autodiffs_with_the_bias_gradient_summed_in_float32(dtype):
    y = jax.random.normal(jax.random.key(0), (3, 5, 16), dtype)
    bias = jax.random.normal(jax.random.key(1), (16,), jnp.float32)
    weights = jax.random.normal(jax.random.key(2), (3, 5, 16), dtype)
    dy, dbias = jax.grad(lambda y, b: jnp.sum(layers.add_bias(y, b) * weights).astype(jnp.float32),
                         argnums=(0, 1))(y, bias)
    reference_dy = jax.grad(lambda y: jnp.sum((y + bias.astype(dtype)) * weights).astype(jnp.float32))(y)
    assert layers.add_bias(y, bias).dtype == jnp.dtype(dtype) and dbias.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dy, np.float32), np.asarray(reference_dy, np.float32))
    # The bias gradient is the sum over tokens of the (compute-dtype) upstream gradient, taken in float32.
    expected = np.asarray(weights, np.float64).sum((0, 1))
    np.testing.assert_allclose(np.asarray(dbias), expected, rtol=1e-6, atol=1e-5)
    sums = [e for e in jax.make_jaxpr(jax.grad(lambda b: jnp.sum(layers.add_bias(y, b) * weights)
                                               .astype(jnp.float32)))(bias).jaxpr.eqns
            if e.primitive.name == "reduce_sum" and e.params["axes"] == (0, 1)]
    assert sums and all(e.invars[0].aval.dtype == jnp.float32 for e in sums), sums
