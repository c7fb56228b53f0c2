"""Attention against a plain NumPy implementation, and the mask builders."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import attention, backend


def numpy_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v per head, written out with NumPy for q/k/v of shape [b, len, h, d]."""
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    weights = np.exp(logits)
    weights = weights / weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v), weights


def random_tokens(rng, lengths, max_length):
    tokens = np.zeros((len(lengths), max_length), np.int32)
    for row, length in enumerate(lengths):
        tokens[row, :length] = rng.integers(1, 50, size=length)
    return tokens


def test_mask_builders():
    tokens = jnp.array([[5, 6, 0], [7, 0, 0]])
    pad = attention.padding_mask(tokens, tokens)
    assert pad.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(pad[1, 0], [[True, False, False], [False, False, False], [False, False, False]])
    np.testing.assert_array_equal(attention.causal_mask(3)[0, 0], np.tril(np.ones((3, 3), bool)))
    segments = jnp.array([[1, 1, 2]])
    np.testing.assert_array_equal(attention.segment_mask(segments, segments)[0, 0],
                                  [[True, True, False], [True, True, False], [False, False, True]])
    combined = attention.combine_masks(attention.segment_mask(segments, segments), None, attention.causal_mask(3))
    np.testing.assert_array_equal(combined[0, 0], [[True, False, False], [True, True, False], [False, False, True]])
    assert attention.combine_masks(None, None) is None


@pytest.mark.parametrize("causal", [False, True])
def test_dot_product_attention_matches_numpy(causal):
    rng = np.random.default_rng(0)
    b, length, h, d = 3, 7, 2, 8
    q, k, v = (rng.normal(size=(b, length, h, d)).astype(np.float32) for _ in range(3))
    tokens = random_tokens(rng, [7, 4, 1], length)
    mask = attention.padding_mask(tokens, tokens)
    if causal:
        mask = attention.combine_masks(mask, attention.causal_mask(length))
    # NumPy cannot take a row with no allowed key; real keys exist for every real query, so compare those.
    mask_np = np.asarray(mask) | ~np.asarray(mask).any(-1, keepdims=True)
    expected, expected_weights = numpy_attention(q, k, v, mask_np)
    out, weights = attention.dot_product_attention(q, k, v, mask, return_weights=True)
    real_queries = tokens != 0
    np.testing.assert_allclose(np.asarray(out)[real_queries], expected[real_queries], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(weights).transpose(0, 2, 1, 3)[real_queries],
                               expected_weights.transpose(0, 2, 1, 3)[real_queries], atol=1e-5)


def test_masked_keys_get_exactly_zero_weight_and_rows_sum_to_one():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 5, 2, 4)).astype(np.float32)
    tokens = random_tokens(rng, [5, 2], 5)
    weights = attention.dot_product_attention_weights(q, q, attention.padding_mask(tokens, tokens))
    assert np.all(np.asarray(weights)[1, :, :2, 2:] == 0.0)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)


def test_softmax_is_float32_for_bfloat16_inputs():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.bfloat16) for _ in range(3))
    out, weights = attention.dot_product_attention(q, k, v, return_weights=True)
    assert weights.dtype == jnp.float32
    assert out.dtype == jnp.bfloat16
    reference, _ = numpy_attention(*(np.asarray(x, np.float32) for x in (q, k, v)), np.ones((1, 1, 6, 6), bool))
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=2e-2)


def test_attention_dropout_zeroes_or_rescales_probabilities():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(2, 6, 2, 4)).astype(np.float32)
    v = np.eye(6, dtype=np.float32)[None, :, None, :].repeat(2, 0).repeat(2, 2)[..., :4]  # picks out weights
    rate = 0.5
    out = attention.dot_product_attention(q, q, v, dropout_rate=rate, dropout_rng=jax.random.key(0),
                                          deterministic=False)
    plain = attention.dot_product_attention(q, q, v)
    ratio = np.asarray(out) / np.asarray(plain)
    assert np.all(np.isclose(ratio, 0.0) | np.isclose(ratio, 1.0 / (1.0 - rate), rtol=1e-5))
    assert np.isclose(ratio, 0.0).any() and not np.isclose(ratio, 0.0).all()
    with pytest.raises(ValueError, match="dropout_rng"):
        attention.dot_product_attention(q, q, v, dropout_rate=rate, deterministic=False)


def _mha_inputs(seed=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    memory = rng.normal(size=(2, 7, 16)).astype(np.float32)
    return rng, x, memory


@pytest.mark.parametrize("use_bias", [False, True])
def test_multi_head_attention_matches_numpy(use_bias):
    rng, x, memory = _mha_inputs()
    mha = attention.MultiHeadAttention(num_heads=4, head_dim=4, use_bias=use_bias)
    memory_tokens = random_tokens(rng, [7, 3], 7)
    mask = attention.padding_mask(np.ones((2, 5), np.int32), memory_tokens)
    variables = mha.init(jax.random.key(0), x, memory, mask)
    params = nn.unbox(variables)["params"]
    assert ("bias" in params["query"]) == use_bias

    def project(name, inputs):
        kernel = np.asarray(params[name]["kernel"])
        y = np.einsum("bld,dhk->blhk", inputs, kernel)
        return y + np.asarray(params[name]["bias"]) if use_bias else y

    heads, _ = numpy_attention(project("query", x), project("key", memory), project("value", memory),
                               np.asarray(mask))
    expected = np.einsum("blhk,hkd->bld", heads, np.asarray(params["out"]["kernel"]))
    if use_bias:
        expected = expected + np.asarray(params["out"]["bias"])
    np.testing.assert_allclose(np.asarray(mha.apply(variables, x, memory, mask)), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_modes_project_once_then_attend_as_the_full_mode():
    """PROJECT_CROSS_KV stores the keys/values of the memory; CROSS_STEP attends over them as FULL does."""
    rng, x, memory = _mha_inputs()
    mha = attention.MultiHeadAttention(num_heads=4, head_dim=4)
    mask = attention.padding_mask(np.ones((2, 5), np.int32), random_tokens(rng, [7, 3], 7))
    variables = mha.init(jax.random.key(0), x, memory, mask)
    out, stored = mha.apply(variables, None, memory, mode=attention.Mode.PROJECT_CROSS_KV, mutable=["cross_kv"])
    assert out is None and stored["cross_kv"]["key"].shape == (2, 4, 7, 4)  # Heads-first [b, h, s, d].
    step = mha.apply({**variables, **stored}, x, None, mask, mode=attention.Mode.CROSS_STEP)
    np.testing.assert_allclose(step, mha.apply(variables, x, memory, mask), atol=1e-5)


def test_cross_step_with_beams_reads_one_sentence_row_as_its_tiled_copies():
    """CROSS_STEP queries of 3 beams per sentence over the sentences' own keys/values and mask attend as
    over copies tiled for every beam (what beam search did before), and a row count that is no multiple
    of the sentences' is refused."""
    rng, x, memory = _mha_inputs()
    mha = attention.MultiHeadAttention(num_heads=4, head_dim=4)
    mask = attention.padding_mask(np.ones((2, 1), np.int32), random_tokens(rng, [7, 3], 7))
    variables = mha.init(jax.random.key(0), x, memory, mask)
    _, stored = mha.apply(variables, None, memory, mode=attention.Mode.PROJECT_CROSS_KV, mutable=["cross_kv"])
    beams = jnp.asarray(rng.normal(size=(6, 1, x.shape[-1])), jnp.float32)  # Rows 0-2: sentence 0; 3-5: 1.
    shared = mha.apply({**variables, **stored}, beams, None, mask, mode=attention.Mode.CROSS_STEP)
    tiled_kv = jax.tree_util.tree_map(lambda a: jnp.repeat(a, 3, axis=0), stored)
    tiled = mha.apply({**variables, **tiled_kv}, beams, None, jnp.repeat(mask, 3, axis=0),
                      mode=attention.Mode.CROSS_STEP)
    assert shared.shape == (6, 1, x.shape[-1])
    np.testing.assert_allclose(shared, tiled, atol=1e-6)
    # Each sentence's beams read that sentence: swapping the sentences' keys/values changes their output.
    swapped = jax.tree_util.tree_map(lambda a: a[::-1], stored)
    other = mha.apply({**variables, **swapped}, beams, None, mask[::-1], mode=attention.Mode.CROSS_STEP)
    assert not np.allclose(other, shared, atol=1e-3)
    with pytest.raises(ValueError, match="not a multiple"):
        mha.apply({**variables, **stored}, beams[:5], None, mask, mode=attention.Mode.CROSS_STEP)


@pytest.mark.parametrize("mode, inputs_q, inputs_kv, message", [
    (attention.Mode.FULL, True, False, "FULL needs inputs_kv"),
    (attention.Mode.SELF_STEP, True, True, "SELF_STEP takes no inputs_kv"),
    (attention.Mode.CROSS_STEP, True, True, "CROSS_STEP takes no inputs_kv"),
    (attention.Mode.PROJECT_CROSS_KV, True, True, "PROJECT_CROSS_KV takes no inputs_q"),
    (attention.Mode.PROJECT_CROSS_KV, False, False, "PROJECT_CROSS_KV needs inputs_kv"),
    ("decode", True, True, "not one of"),
    (attention.Mode.CROSS_STEP, True, False, "PROJECT_CROSS_KV first"),  # Nothing projected yet.
])
def test_impossible_attention_modes_raise(mode, inputs_q, inputs_kv, message):
    _, x, memory = _mha_inputs()
    mha = attention.MultiHeadAttention(num_heads=4, head_dim=4)
    variables = mha.init(jax.random.key(0), x, memory)
    with pytest.raises(ValueError, match=message):
        mha.apply(variables, x if inputs_q else None, memory if inputs_kv else None, mode=mode)


def test_multi_head_attention_sows_weights_only_when_asked():
    _, x, _ = _mha_inputs()
    mha = attention.MultiHeadAttention(num_heads=4, head_dim=4)
    variables = mha.init(jax.random.key(0), x, x)
    assert "intermediates" not in variables
    plain = mha.apply(variables, x, x)
    captured, state = mha.apply(variables, x, x, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(captured))
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)


def _mask_kinds(rng, b, q, k):
    """Every mask the model builds: none, padding, causal + padding, packed segments (+ causal)."""
    q_tokens, k_tokens = random_tokens(rng, [q, q - 2, 3], q), random_tokens(rng, [k, 4, k - 1], k)
    q_segments = np.array([[1] * (q // 2) + [2] * (q - q // 2)] * b, np.int32)
    k_segments = np.array([[1] * (k // 2) + [2] * (k - k // 2)] * b, np.int32)
    return {
        "none": None,
        "padding": attention.padding_mask(q_tokens, k_tokens),
        "causal": attention.combine_masks(attention.padding_mask(q_tokens, q_tokens),
                                          attention.causal_mask(q)) if q == k else None,
        "segments": attention.combine_masks(attention.segment_mask(q_segments, k_segments),
                                            attention.causal_mask(q, k) if q == k else None),
    }


@pytest.mark.parametrize("dtype, tolerance", [("float32", 2e-6), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("kind", ["none", "padding", "causal", "segments"])
def test_fused_attention_equals_the_einsum_path_forward_and_backward(kind, dtype, tolerance):
    """jax.nn.dot_product_attention (XLA's form, what a GPU falls back to and a TPU runs) against the einsum
    path, on the rows that have a key to attend to, for outputs and for the gradients of q, k and v."""
    rng = np.random.default_rng(0)
    b, q, h, d = 3, 6, 2, 8
    mask = _mask_kinds(rng, b, q, q)[kind]
    query, key, value = (jnp.asarray(rng.normal(size=(b, q, h, d)), dtype) for _ in range(3))
    # Rows without a real key (queries at padding) differ by convention only; their outputs are never read.
    live = np.ones((b, q, 1, 1)) if mask is None else np.asarray(mask).any(-1).transpose(0, 2, 1)[..., None]
    weight = jnp.asarray(rng.normal(size=(b, q, h, d)) * live, jnp.float32)

    def loss(fn, *qkv):
        return jnp.sum(fn(*qkv).astype(jnp.float32) * weight)

    einsum = lambda *qkv: attention.dot_product_attention(*qkv, mask)  # noqa: E731
    fused = lambda *qkv: attention.fused_attention(*qkv, mask, "xla")  # noqa: E731
    out_e, out_f = einsum(query, key, value), fused(query, key, value)
    assert out_f.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.float32(out_f) * live, np.float32(out_e) * live, atol=tolerance, rtol=tolerance)
    grads_e = jax.grad(functools.partial(loss, einsum), argnums=(0, 1, 2))(query, key, value)
    grads_f = jax.grad(functools.partial(loss, fused), argnums=(0, 1, 2))(query, key, value)
    for g_e, g_f in zip(grads_e, grads_f):
        scale = float(jnp.max(jnp.abs(g_e.astype(jnp.float32)))) or 1.0
        np.testing.assert_allclose(np.float32(g_f), np.float32(g_e), atol=tolerance * 2 * scale)


def test_auto_attention_takes_the_einsum_path_where_probabilities_are_needed(monkeypatch):
    """On a CPU "auto" is the einsum path; on another backend it is the fused one, except with attention
    dropout in training or weights sown for attention maps."""
    choose = lambda **kw: backend.attention_implementation("auto", dtype=jnp.bfloat16, head_dim=64, **kw)  # noqa
    assert choose(needs_probabilities=False) == "einsum"  # This CPU.
    monkeypatch.setattr(backend, "is_cpu", lambda: False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert choose(needs_probabilities=False) == "cudnn"
    assert choose(needs_probabilities=True) == "einsum"
    assert backend.attention_implementation("auto", dtype=jnp.float32, head_dim=64,
                                            needs_probabilities=False) == "xla"
    assert backend.attention_implementation("auto", dtype=jnp.bfloat16, head_dim=256,
                                            needs_probabilities=False) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert choose(needs_probabilities=False) == "xla"
    with pytest.raises(ValueError, match="flash"):
        backend.attention_implementation("flash", dtype=jnp.float32, head_dim=8, needs_probabilities=False)
