"""The encoder-decoder model: sizes, masks (causal, padding, packing), precision, caching and configuration."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import Transformer, TransformerConfig, preset, shift_right, train_step
from flaxformer_lite.layers import PADDED_LOGIT

INPUTS = np.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 1, 0, 0, 0, 0]], np.int32)
TARGETS = np.array([[11, 12, 13, 1, 0], [14, 1, 0, 0, 0]], np.int32)


def init(cfg, inputs=INPUTS, targets=TARGETS, **kwargs):
    model = Transformer(cfg)
    return model, model.init(jax.random.key(0), inputs, targets, **kwargs)


def count_params(cfg):
    shapes = jax.eval_shape(lambda: init(cfg, np.ones((1, 4), np.int32), np.ones((1, 4), np.int32))[1])
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(nn.unbox(shapes)))


@pytest.mark.parametrize("name, low, high", [("base", 62.5e6, 63.5e6), ("big", 213e6, 214.5e6)])
def test_parameter_counts_match_the_paper(name, low, high):
    cfg = preset(name, vocab_pad_multiple=1)  # The paper's table, without padding it for a mesh.
    d, ff, n, v = cfg.d_model, cfg.d_ff, cfg.num_encoder_layers, cfg.vocab_size
    assert v == 37_000  # The paper's shared source-target BPE vocabulary for WMT En-De.
    attention = 4 * d * d  # Q, K, V, output projections, no biases.
    ffn = d * ff + ff + ff * d + d  # Two dense layers with biases.
    norm = 2 * d  # LayerNorm scale and bias.
    encoder_layer = attention + ffn + 2 * norm
    decoder_layer = 2 * attention + ffn + 3 * norm
    embedding = v * d  # Shared by encoder input, decoder input and the output projection.
    expected = embedding + n * encoder_layer + n * decoder_layer
    assert count_params(cfg) == expected
    # base: 18.94M embedding + 6 x 3.15M + 6 x 4.20M = 63.0M; big: 37.9M + 6 x 12.6M + 6 x 16.8M = 214.2M.
    # The paper's Table 3 reports 65M and 213M without itemising them; base differs by 2M (3%), which a
    # slightly different vocabulary or counting would explain.
    assert low <= expected <= high
    # Padded to a multiple of 128 (37,000 -> 37,120 rows), only the table grows.
    assert count_params(preset(name)) == expected + (37_120 - 37_000) * d


def test_every_parameter_has_logical_axis_names():
    for cfg in (preset("tiny"), preset("tiny", share_embeddings=False, logits_via_embedding=False,
                                       position_embedding="learned", pre_layer_norm=True,
                                       use_attention_bias=True)):
        _, variables = init(cfg)
        leaves = jax.tree_util.tree_leaves_with_path(variables["params"],
                                                     is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert len(leaves) > 10
        for path, leaf in leaves:
            name = jax.tree_util.keystr(path)
            assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} has no logical axis names"
            assert len(leaf.names) == leaf.value.ndim, name
            assert all(isinstance(axis, str) for axis in leaf.names), name
        names = {axis for _, leaf in leaves for axis in leaf.names}
        assert {"vocab", "embed", "heads", "kv", "mlp"} <= names


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_decoder_is_causal(pre_layer_norm):
    model, variables = init(preset("tiny", pre_layer_norm=pre_layer_norm))
    logits = model.apply(variables, INPUTS, TARGETS)
    for t in range(TARGETS.shape[1] - 1):
        changed = TARGETS.copy()
        changed[:, t + 1:] = np.array([[30, 31, 32, 33], [34, 35, 36, 37]])[:, : TARGETS.shape[1] - t - 1]
        changed_logits = model.apply(variables, INPUTS, changed)
        # Position t predicts targets[t] from targets[:t]: later tokens must not change it (at real
        # positions; outputs at padding are never used).
        real = TARGETS[:, : t + 1] != 0
        np.testing.assert_allclose(np.asarray(changed_logits)[:, : t + 1][real],
                                   np.asarray(logits)[:, : t + 1][real], atol=1e-6)
        assert not np.allclose(changed_logits[:, t + 1:], logits[:, t + 1:])  # ...while they do matter later.


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_appending_padding_changes_no_real_position(pre_layer_norm):
    model, variables = init(preset("tiny", pre_layer_norm=pre_layer_norm))
    longer = np.pad(INPUTS, ((0, 0), (0, 6)))
    encoded = model.apply(variables, INPUTS, method=Transformer.encode)
    encoded_longer = model.apply(variables, longer, method=Transformer.encode)
    real = INPUTS != 0
    np.testing.assert_allclose(np.asarray(encoded_longer)[:, : INPUTS.shape[1]][real], np.asarray(encoded)[real],
                               atol=1e-6)
    # The decoder reads the encoder through cross-attention: its logits must not move either.
    logits = model.apply(variables, INPUTS, TARGETS)
    logits_longer = model.apply(variables, longer, np.pad(TARGETS, ((0, 0), (0, 3))))
    real_targets = TARGETS != 0
    np.testing.assert_allclose(np.asarray(logits_longer)[:, : TARGETS.shape[1]][real_targets],
                               np.asarray(logits)[real_targets], atol=1e-5)


def test_packed_row_gives_the_same_logits_as_separate_examples():
    model, variables = init(preset("tiny"))
    a_in, a_out = np.array([5, 6, 7, 1]), np.array([11, 12, 1])
    b_in, b_out = np.array([9, 10, 1]), np.array([14, 15, 16, 1])
    packed = dict(
        inputs=np.concatenate([a_in, b_in, [0]])[None],
        targets=np.concatenate([a_out, b_out, [0]])[None],
        inputs_segmentation=np.array([[1, 1, 1, 1, 2, 2, 2, 0]]),
        targets_segmentation=np.array([[1, 1, 1, 2, 2, 2, 2, 0]]),
        inputs_positions=np.array([[0, 1, 2, 3, 0, 1, 2, 0]]),
        targets_positions=np.array([[0, 1, 2, 0, 1, 2, 3, 0]]),
    )
    packed_logits = np.asarray(model.apply(variables, **packed))[0]
    alone_a = np.asarray(model.apply(variables, a_in[None], a_out[None]))[0]
    alone_b = np.asarray(model.apply(variables, b_in[None], b_out[None]))[0]
    np.testing.assert_allclose(packed_logits[:3], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed_logits[3:7], alone_b, atol=1e-5)


def test_shift_right_restarts_every_packed_example():
    targets = jnp.array([[11, 12, 1, 14, 1, 0]])
    segmentation = jnp.array([[1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(shift_right(targets), [[0, 11, 12, 1, 14, 1]])
    np.testing.assert_array_equal(shift_right(targets, 0, segmentation), [[0, 11, 12, 0, 14, 0]])


def test_jit_equals_eager():
    model, variables = init(preset("tiny"))
    eager = model.apply(variables, INPUTS, TARGETS)
    jitted = jax.jit(model.apply)(variables, INPUTS, TARGETS)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_stays_close_to_float32():
    cfg = preset("tiny")
    model, variables = init(cfg)
    logits32 = np.asarray(model.apply(variables, INPUTS, TARGETS))
    bf16 = Transformer(dataclasses.replace(cfg, dtype="bfloat16"))
    logits16 = bf16.apply(variables, INPUTS, TARGETS)  # Same float32 parameters, bfloat16 compute.
    assert logits16.dtype == jnp.float32  # Logits are always returned in float32 for the loss.
    real = TARGETS != 0
    # bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.4%); through 2+2 layers the largest logit
    # error measured 1.1-1.2% of the largest float32 logit (tiny and small sizes, three seeds). Stated
    # tolerance: 3% of that magnitude. It is not bitwise: a few percent is what bfloat16 buys.
    scale = np.abs(logits32[real]).max()
    error = np.abs(np.asarray(logits16)[real] - logits32[real]).max()
    assert 0 < error <= 0.03 * scale


@pytest.mark.parametrize("logits_via_embedding", [True, False])
def test_bfloat16_logits_keep_their_float32_accumulation(logits_via_embedding):
    """The output product runs in bfloat16 but its result is not rounded to bfloat16 before the loss.

    Rounded logits would all be bfloat16 values (8 significant bits); unrounded ones almost never are.
    Checked to fail with the output product's ``out_dtype`` removed (every logit a bfloat16 value).
    """
    cfg = preset("tiny", dtype="bfloat16", logits_via_embedding=logits_via_embedding)
    model, variables = init(cfg)
    logits = np.asarray(model.apply(variables, INPUTS, TARGETS))[:, :, :cfg.target_vocab_size]
    as_bfloat16 = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
    assert logits.dtype == np.float32
    assert np.mean(logits != as_bfloat16) > 0.9


def test_dropout_is_active_only_when_not_deterministic():
    model, variables = init(preset("tiny", dropout_rate=0.3, attention_dropout_rate=0.3, ffn_dropout_rate=0.3))
    eval_logits = model.apply(variables, INPUTS, TARGETS)
    np.testing.assert_array_equal(eval_logits, model.apply(variables, INPUTS, TARGETS))
    train = lambda seed: model.apply(variables, INPUTS, TARGETS, deterministic=False,  # noqa: E731
                                     rngs={"dropout": jax.random.key(seed)})
    assert not np.allclose(train(1), eval_logits)
    assert not np.allclose(train(1), train(2))
    np.testing.assert_array_equal(train(1), train(1))


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_cached_decoding_reproduces_teacher_forced_logits(pre_layer_norm):
    cfg = preset("tiny", pre_layer_norm=pre_layer_norm)
    model, variables = init(cfg)
    teacher_forced = np.asarray(model.apply(variables, INPUTS, TARGETS))
    encoded = model.apply(variables, INPUTS, method=Transformer.encode)
    cross_kv = model.apply(variables, encoded, method=Transformer.project_cross_kv,
                           mutable=["cross_kv"])[1]["cross_kv"]
    decoder_inputs = np.asarray(shift_right(TARGETS))
    # A step on the whole target length finds no cache and only creates it (at zero).
    cache = model.apply({**variables, "cross_kv": cross_kv}, INPUTS, decoder_inputs, method=Transformer.decode_step,
                        mutable=["cache"])[1]["cache"]
    assert not any(np.any(leaf) for leaf in jax.tree_util.tree_leaves(cache))
    for t in range(TARGETS.shape[1]):
        step_logits, mutated = model.apply({**variables, "cache": cache, "cross_kv": cross_kv}, INPUTS,
                                           decoder_inputs[:, t: t + 1], mutable=["cache"],
                                           method=Transformer.decode_step)
        cache = mutated["cache"]
        real = TARGETS[:, t] != 0
        np.testing.assert_allclose(np.asarray(step_logits)[real, 0], teacher_forced[real, t], atol=1e-5)


def test_separate_vocabularies_and_output_projection():
    cfg = preset("tiny", share_embeddings=False, logits_via_embedding=False, output_vocab_size=40)
    model, variables = init(cfg)
    params = variables["params"]
    assert {"source_embedding", "target_embedding"} <= set(params)
    assert nn.unbox(params["decoder"]["logits"]["kernel"]).shape == (cfg.d_model, 128)
    assert nn.unbox(params["source_embedding"]["embedding"]).shape == (128, cfg.d_model)
    logits = model.apply(variables, INPUTS, TARGETS)
    assert logits.shape == (*TARGETS.shape, 128)  # The padded width; ids 40... are never predicted.
    assert np.all(np.asarray(logits)[..., 40:] == PADDED_LOGIT) and np.all(np.asarray(logits)[..., :40] > -1e6)


def test_padded_vocabulary_ids_are_never_predicted_nor_in_the_loss():
    """A 21-word vocabulary in a 128-row table: same loss and gradients as the unpadded table holding the
    same 21 rows, and no softmax mass on the padded ids."""
    unpadded = preset("tiny", vocab_size=21, vocab_pad_multiple=1)
    padded = dataclasses.replace(unpadded, vocab_pad_multiple=128)
    assert padded.padded_vocab_size == 128 and unpadded.padded_vocab_size == 21
    inputs, targets = np.minimum(INPUTS, 20), np.minimum(TARGETS, 20)
    _, small = init(unpadded, inputs, targets)
    table = nn.unbox(small["params"]["shared_embedding"]["embedding"])
    big = jax.tree_util.tree_map(lambda x: x, nn.unbox(small["params"]))
    big["shared_embedding"]["embedding"] = jnp.concatenate([table, jnp.ones((107, table.shape[1]))], axis=0)

    def loss(cfg, params):
        logits = Transformer(cfg).apply({"params": params}, inputs, targets)
        return train_step.cross_entropy_sums(logits, targets, 0.1, 1e-3, vocab_size=21)["loss"], logits

    (loss_small, logits_small), grads_small = jax.value_and_grad(loss, 1, has_aux=True)(unpadded,
                                                                                         nn.unbox(small["params"]))
    (loss_big, logits_big), grads_big = jax.value_and_grad(loss, 1, has_aux=True)(padded, big)
    np.testing.assert_allclose(loss_big, loss_small, rtol=1e-6)
    np.testing.assert_allclose(logits_big[..., :21], logits_small, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jax.nn.softmax(logits_big)[..., 21:])) == 0.0
    grad_table = grads_big["shared_embedding"]["embedding"]
    np.testing.assert_allclose(grad_table[:21], grads_small["shared_embedding"]["embedding"], atol=1e-6)
    assert float(jnp.max(jnp.abs(grad_table[21:]))) == 0.0  # Padded rows get no gradient: never used.


def test_learned_positions_have_a_table():
    cfg = preset("tiny", position_embedding="learned", max_length=16)
    _, variables = init(cfg)
    table = variables["params"]["encoder"]["embedder"]["positions"]["pos_embedding"]
    assert table.value.shape == (16, cfg.d_model) and table.names == ("position", "embed")
    model = Transformer(cfg)
    params = nn.unbox(variables["params"])
    fits = np.ones((2, 16), np.int32)
    assert np.all(np.isfinite(model.apply({"params": params}, fits, fits)))
    # One position more than the table: refused by name, where jnp.take would have given NaN logits.
    too_long = np.ones((2, 17), np.int32)
    for inputs, targets in ((too_long, fits), (fits, too_long)):
        with pytest.raises(ValueError, match="17 positions does not fit the learned position table of 16 rows"):
            model.apply({"params": params}, inputs, targets)


@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=30, num_heads=4), "num_heads"),
    (dict(activation="swish"), "activation"),
    (dict(position_embedding="rotary"), "position_embedding"),
    (dict(dtype="float16"), "dtype"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(output_vocab_size=10), "share_embeddings"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"TransformerConfig.{field}"):
        preset("tiny", **overrides)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_config_is_frozen_and_presets_follow_the_paper():
    base, big = preset("base"), preset("big")
    assert (base.d_model, base.d_ff, base.num_heads, base.num_encoder_layers, base.dropout_rate) == (
        512, 2048, 8, 6, 0.1)
    assert (big.d_model, big.d_ff, big.num_heads, big.num_decoder_layers, big.dropout_rate) == (
        1024, 4096, 16, 6, 0.3)
    assert not base.pre_layer_norm and base.position_embedding == "sinusoidal"
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.d_model = 1
    assert TransformerConfig().attention_head_dim == 64
