"""Details of "Attention Is All You Need" that a run would silently lose if they broke: gradient clipping,
Adam's betas and epsilon (5.3), pre-/post-LN placement, the feed-forward activation (3.3), the sinusoid
values (3.5) and the sqrt(d_model) embedding scale (3.4). Each test compares with a hand computation."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxformer_lite import Transformer, TransformerConfig, attention, layers, preset, sharding, train_step
from flaxformer_lite import transformer

# The tiny preset (d_model 32, no dropout anywhere, so a training step is deterministic), one layer each side
# to keep compiling fast.
MODEL = Transformer(preset("tiny", num_encoder_layers=1, num_decoder_layers=1))
SMALL = TransformerConfig(vocab_size=16, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1,
                          num_decoder_layers=1, dropout_rate=0.0, attention_dropout_rate=0.0,
                          ffn_dropout_rate=0.0)


def make_batch(seed=0, batch_size=4):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, 64, size=(batch_size, 10)).astype(np.int32)
    targets = rng.integers(3, 64, size=(batch_size, 12)).astype(np.int32)
    for row in range(batch_size):  # Mixed lengths: padding is part of the loss's token count.
        inputs[row, rng.integers(2, 10):] = 0
        targets[row, rng.integers(2, 12):] = 0
    return {"inputs": inputs, "targets": targets}


def _host(tree):
    """A numpy copy (the train step donates its state, so nothing may alias its buffers)."""
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _one_device_training(cfg):
    """(initial state, jitted train step) for MODEL on a one-device mesh."""
    mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
    opt = train_step.make_optimizer(cfg, MODEL.config.d_model)
    _, shardings = train_step.state_shardings(MODEL, opt, mesh)
    state = train_step.create_train_state(0, MODEL, opt, shardings)
    train, _ = train_step.make_step_functions(MODEL, opt, cfg, mesh, shardings)
    return state, train


@functools.partial(jax.jit, static_argnums=2)
def _mean_loss_gradients(params, batch, label_smoothing):
    """The gradient of the mean loss per target token, which train_step hands to the optimizer."""
    def loss(p):
        logits = MODEL.apply({"params": p}, batch["inputs"], batch["targets"])
        sums = train_step.cross_entropy_sums(logits, batch["targets"], label_smoothing, 0.0,
                                             MODEL.config.pad_id, MODEL.config.target_vocab_size)
        return sums["loss"] / sums["tokens"]
    return jax.grad(loss)(params)


def _adam_moments(opt_state):
    """(mu, nu) of the one Adam state inside an optimizer state (possibly chained after clipping)."""
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1, opt_state
    return found[0].mu, found[0].nu


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


def _adam_by_hand(gradients, lr, b1=0.9, b2=0.98, eps=1e-9):
    """Adam's updates (Kingma & Ba, with bias correction) for a sequence of flat float64 gradients."""
    m = v = 0.0
    updates = []
    for t, g in enumerate(gradients, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        updates.append(-lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
    return updates


def _optimizer_updates(opt, gradients):
    """Flat updates of ``opt`` for a sequence of gradient trees, applied to parameters as a step would."""
    params = jax.tree_util.tree_map(jnp.zeros_like, gradients[0])
    state = opt.init(params)
    updates = []
    for g in gradients:
        u, state = opt.update(g, state, params)
        params = optax.apply_updates(params, u)
        updates.append(_flat(u))
    return updates


def _unboxed_params(module, *args):
    return nn.unbox(module.init(jax.random.key(0), *args)["params"])


def _layer_norm(x, scale, bias, eps=1e-6):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


def _randomize_layer_norms(params, seed=1):
    """Non-trivial LayerNorm scales and biases, so that which LayerNorm is applied where shows."""
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name and ("scale" in name or "bias" in name):
            return np.asarray(x) + rng.normal(0.0, 0.3, np.shape(x)).astype(np.float32)
        return x
    return jax.tree_util.tree_map_with_path(perturb, params)


# ---------------------------------------------------------------------------------------------------------
# 1. Gradient clipping
# ---------------------------------------------------------------------------------------------------------
def test_make_optimizer_clips_a_gradient_above_the_clip_norm_and_leaves_one_below_it():
    """Two Adam steps: the first gradient (norm 5) is scaled to norm 1, the second (norm < 1) is not.

    Fails when make_optimizer ignores grad_clip_norm: checked by removing the optax.chain(clip_by_global_norm)
    line (the unclipped first gradient in Adam's moments puts the second update ~20% off)."""
    lr, clip = 0.1, 1.0
    opt = train_step.make_optimizer(train_step.TrainConfig(schedule="constant", learning_rate=lr,
                                                           grad_clip_norm=clip), d_model=8)
    g1 = {"b": jnp.array([4.0]), "w": jnp.array([3.0, 0.0])}  # Norm 5: clipped to norm 1.
    g2 = {"b": jnp.array([0.2]), "w": jnp.array([0.3, -0.1])}  # Norm 0.37: unchanged.
    expected = _adam_by_hand([_flat(g1) * clip / 5.0, _flat(g2)], lr)
    for got, want in zip(_optimizer_updates(opt, [g1, g2]), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    unclipped = _adam_by_hand([_flat(g1), _flat(g2)], lr)[1]
    assert np.abs(unclipped - expected[1]).max() > 1e-3  # The check above can tell the two apart.


@functools.lru_cache(maxsize=None)
def _one_clipped_step():
    """(TrainConfig, parameters before, batch, state after, metrics) of one jitted train step of MODEL with the
    default Adam, a constant rate and clipping to 1e-3 (shared by the tests of clipping and of Adam's betas)."""
    cfg = train_step.TrainConfig(schedule="constant", learning_rate=1e-2, grad_clip_norm=1e-3)
    state, train = _one_device_training(cfg)
    batch = make_batch(0)
    before = _host(state.params)
    state, metrics = train(state, batch)
    return cfg, before, batch, _host(state), jax.device_get(metrics)


def test_train_step_gives_adam_the_gradient_scaled_to_the_clip_norm():
    """After one step Adam's moments are mu = (1 - b1) g_c and nu = (1 - b2) g_c^2 for g_c the gradient of the
    mean loss (computed here) scaled to norm c, as its norm is > 100 c; the grad_norm metric is the unclipped norm.

    Fails when make_optimizer ignores grad_clip_norm: checked by removing the optax.chain(clip_by_global_norm)
    line (mu is then (1 - b1) x the raw gradient, of norm ~2, some 2000 times the clipped one)."""
    cfg, before, batch, after, metrics = _one_clipped_step()
    clip = cfg.grad_clip_norm
    grads = _flat(_mean_loss_gradients(before, batch, cfg.label_smoothing))
    norm = np.linalg.norm(grads)
    assert norm > 100 * clip  # Clipping is active.
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-4)
    clipped = grads * (clip / norm)
    mu, nu = (_flat(m) for m in _adam_moments(after.opt_state))
    # Whole-vector tolerances: the step sums the same float32 gradients in another order than here.
    assert np.linalg.norm(mu - 0.1 * clipped) <= 1e-4 * np.linalg.norm(0.1 * clipped)
    assert np.linalg.norm(nu - 0.02 * clipped ** 2) <= 1e-4 * np.linalg.norm(0.02 * clipped ** 2)
    np.testing.assert_allclose(np.linalg.norm(mu) / 0.1, clip, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# 2. Adam beta1 = 0.9, beta2 = 0.98, epsilon = 1e-9 (paper 5.3)
# ---------------------------------------------------------------------------------------------------------
def test_make_optimizer_is_adam_with_the_papers_betas_and_epsilon_by_default():
    """Three steps of make_optimizer(TrainConfig()) against Adam written out with b1=0.9, b2=0.98, eps=1e-9;
    gradients of 1e-9 make epsilon visible (update lr/2), changing magnitudes make beta2 visible.

    Fails when beta2 is not 0.98: checked by changing TrainConfig's default adam_b2 to 0.999 (the defaults
    assertion fails) and, separately, by hard-coding b2=0.999 in make_optimizer's optax.adam call (updates ~0.5%
    off); also by hard-coding eps=1e-8 there (the update of the 1e-9 gradient is then lr/11, not lr/2)."""
    cfg = train_step.TrainConfig(schedule="constant", learning_rate=0.1)
    assert (cfg.optimizer, cfg.adam_b1, cfg.adam_b2, cfg.adam_eps) == ("adam", 0.9, 0.98, 1e-9)
    opt = train_step.make_optimizer(cfg, d_model=8)
    gradients = [jnp.array([1.0, 1e-9, -0.5, 2.0]), jnp.array([0.01, 1e-9, 0.5, 0.0]),
                 jnp.array([0.01, 1e-9, 0.5, -3.0])]
    expected = _adam_by_hand([np.asarray(g, np.float64) for g in gradients], cfg.learning_rate)
    for got, want in zip(_optimizer_updates(opt, gradients), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(expected[0][1], -cfg.learning_rate / 2, rtol=1e-6)  # eps = |g| = 1e-9.
    other_b2 = _adam_by_hand([np.asarray(g, np.float64) for g in gradients], cfg.learning_rate, b2=0.999)
    # 0.999 moves the last update by ~1%, a hundred times the tolerance above.
    assert np.abs(other_b2[2] - expected[2]).max() > 1e-3 * np.abs(expected[2]).max()


def test_train_step_updates_adam_moments_with_the_papers_betas():
    """One jitted train step (default Adam settings; constant rate, clipping on): Adam's moments are
    mu = (1 - b1) g and nu = (1 - b2) g^2, so nu / mu^2 = 0.02 / 0.01 = 2 on every parameter whatever g is,
    and the update is -lr * g / (|g| + 1e-9) with g = mu / (1 - b1).

    Fails when beta2 is not 0.98 in the train step: checked by changing TrainConfig's default adam_b2 to 0.999
    and, separately, by hard-coding b2=0.999 in make_optimizer (the ratio is then 0.1); also by hard-coding
    eps=1e-8 there (the updates then miss)."""
    cfg, before, _, after, _ = _one_clipped_step()
    mu, nu = (_flat(m) for m in _adam_moments(after.opt_state))
    real = np.abs(mu) > 1e-12  # Padded embedding rows get no gradient; nu of a smaller mu underflows.
    assert real.mean() > 0.5
    np.testing.assert_allclose(nu[real] / mu[real] ** 2, (1 - 0.98) / (1 - 0.9) ** 2, rtol=1e-4)
    g = mu / (1 - 0.9)
    np.testing.assert_allclose(_flat(after.params) - _flat(before), -cfg.learning_rate * g / (np.abs(g) + 1e-9),
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# 3. Pre-LN and post-LN placement
# ---------------------------------------------------------------------------------------------------------
_SUBLAYER_W = np.random.default_rng(2).normal(0.0, 0.7, (8, 8)).astype(np.float32)


def _sublayer(h):
    return jnp.tanh(h @ _SUBLAYER_W) + 0.5


class _OneResidual(nn.Module):
    """One residual sub-layer around a fixed non-linear function, as every Transformer layer builds them."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        return transformer._residual(self.config, x, _sublayer, "norm", deterministic=True)


def test_residual_is_x_plus_f_of_ln_x_in_pre_ln_and_ln_of_x_plus_f_x_in_post_ln():
    """Fails when the two placements are swapped: checked by swapping the pre-LN and post-LN return
    statements of transformer._residual (every output element then misses the hand formula)."""
    x = np.random.default_rng(0).normal(0.0, 2.0, (2, 3, 8)).astype(np.float32)
    f = lambda h: np.tanh(h @ _SUBLAYER_W.astype(np.float64)) + 0.5  # noqa: E731
    outputs = {}
    for pre in (True, False):
        module = _OneResidual(dataclasses.replace(SMALL, pre_layer_norm=pre))
        params = _randomize_layer_norms(_unboxed_params(module, x))
        ln = lambda h: _layer_norm(h, params["norm"]["scale"], params["norm"]["bias"])  # noqa: E731
        expected = x + f(ln(x)) if pre else ln(x + f(x))
        outputs[pre] = np.asarray(module.apply({"params": params}, x))
        np.testing.assert_allclose(outputs[pre], expected, rtol=1e-5, atol=1e-5)
    assert np.abs(outputs[True] - outputs[False]).max() > 0.1


def test_encoder_layer_places_its_layer_norms_as_configured():
    """An EncoderLayer against its own attention and feed-forward sub-modules, applied separately with its
    parameters, composed by hand: pre-LN h = x + Att(LN1(x)), out = h + FFN(LN2(h)); post-LN
    h = LN1(x + Att(x)), out = LN2(h + FFN(h)).

    Fails when the two placements are swapped: checked by swapping the pre-LN and post-LN return statements
    of transformer._residual (every output element then misses the hand composition)."""
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, (2, 5, 8)).astype(np.float32)
    tokens = np.array([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]], np.int32)
    mask = attention.padding_mask(jnp.asarray(tokens), jnp.asarray(tokens), 0)
    for pre in (True, False):
        cfg = dataclasses.replace(SMALL, pre_layer_norm=pre)
        layer = transformer.EncoderLayer(cfg)
        params = _randomize_layer_norms(_unboxed_params(layer, x, mask))
        mha = attention.MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.attention_head_dim,
                                           implementation=cfg.attention_implementation)
        ffn = layers.FeedForward(cfg.d_ff, cfg.activation)
        att = lambda h: np.asarray(mha.apply({"params": params["self_attention"]},  # noqa: E731
                                             jnp.asarray(h, jnp.float32), jnp.asarray(h, jnp.float32), mask))
        ff = lambda h: np.asarray(ffn.apply({"params": params["ffn"]}, jnp.asarray(h, jnp.float32)))  # noqa: E731
        ln1 = lambda h: _layer_norm(h, **params["self_attention_norm"])  # noqa: E731
        ln2 = lambda h: _layer_norm(h, **params["ffn_norm"])  # noqa: E731
        if pre:
            h = x + att(ln1(x))
            expected = h + ff(ln2(h))
        else:
            h = ln1(x + att(x))
            expected = ln2(h + ff(h))
        got = np.asarray(layer.apply({"params": params}, x, mask))
        np.testing.assert_allclose(got[tokens != 0], expected[tokens != 0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 4. ReLU (paper) or GELU in the feed-forward block
# ---------------------------------------------------------------------------------------------------------
def _gelu_tanh(h):
    """GELU in the tanh form that BERT and GPT-2 use (and jax.nn.gelu by default)."""
    return 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))


def test_feed_forward_is_act_of_x_w1_plus_b1_times_w2_plus_b2_for_relu_and_gelu():
    """FFN(x) = act(x W1 + b1) W2 + b2 (paper 3.3) from the module's own (randomized) parameters; the second
    kernel is stored [d_model, d_ff] (kernel_out_first), so W2 is its transpose.

    Fails when "gelu" is not GELU: checked by mapping "gelu" to nn.relu in layers.ACTIVATIONS (the GELU
    output then misses the GELU formula in all 48 elements)."""
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, (2, 3, 8)).astype(np.float32)
    outputs = {}
    for activation, act in (("relu", lambda h: np.maximum(0.0, h)), ("gelu", _gelu_tanh)):
        ffn = layers.FeedForward(d_ff=16, activation=activation)
        params = _unboxed_params(ffn, x)
        params = jax.tree_util.tree_map(  # Non-zero biases, so that b1 and b2 are checked too.
            lambda p: p + rng.normal(0.0, 0.5, p.shape).astype(np.float32), params)
        w1, b1 = np.asarray(params["wi"]["kernel"], np.float64), np.asarray(params["wi"]["bias"], np.float64)
        w2, b2 = np.asarray(params["wo"]["kernel"], np.float64).T, np.asarray(params["wo"]["bias"], np.float64)
        expected = act(x @ w1 + b1) @ w2 + b2
        outputs[activation] = np.asarray(ffn.apply({"params": params}, x))
        np.testing.assert_allclose(outputs[activation], expected, rtol=1e-5, atol=1e-5)
        # The other activation's formula on the same parameters would not pass (the check can tell them apart).
        other = (_gelu_tanh if activation == "relu" else (lambda h: np.maximum(0.0, h)))(x @ w1 + b1) @ w2 + b2
        assert np.abs(other - expected).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# 5. Sinusoidal position encoding values (paper 3.5)
# ---------------------------------------------------------------------------------------------------------
def _paper_sinusoids(positions, d):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), interleaved."""
    pe = np.zeros((len(positions), d))
    for row, pos in enumerate(positions):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            pe[row, 2 * i], pe[row, 2 * i + 1] = np.sin(angle), np.cos(angle)
    return pe


def test_sinusoidal_encoding_has_the_papers_values_interleaved():
    """The library interleaves (sin in even dimensions, cos in odd ones, exactly as the formula indexes
    them), not concatenated halves; checked with d=8 at a few positions, directly and through
    PositionalEncoding on a packed row (positions restarting at 0).

    Fails when the timescale is not 10000: checked by changing sinusoidal_encoding's default max_timescale
    10_000.0 to 1_000.0 (24 of 40 values off); also when the halves are concatenated instead (28 of 40)."""
    positions = [0, 1, 2, 7, 31]
    expected = _paper_sinusoids(positions, 8)
    got = np.asarray(layers.sinusoidal_encoding(jnp.asarray(positions), 8))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    packed = jnp.array([[0, 1, 2, 0, 1]])
    added = layers.PositionalEncoding("sinusoidal", max_length=16).apply({}, jnp.ones((1, 5, 8)), packed)
    np.testing.assert_allclose(np.asarray(added[0]), 1.0 + _paper_sinusoids([0, 1, 2, 0, 1], 8), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 6. Embeddings are multiplied by sqrt(d_model) (paper 3.4)
# ---------------------------------------------------------------------------------------------------------
def test_embed_multiplies_looked_up_rows_by_sqrt_features():
    """Fails when the multiplication is removed: checked by deleting the x * sqrt(features) line of
    Embed.__call__."""
    ids = jnp.array([[1, 3, 9], [0, 2, 2]])
    for features in (16, 12):
        embed = layers.Embed(num_embeddings=10, features=features)
        params = _unboxed_params(embed, ids)
        table = np.asarray(params["embedding"])
        np.testing.assert_allclose(np.asarray(embed.apply({"params": params}, ids)),
                                   table[np.asarray(ids)] * math.sqrt(features), rtol=1e-6)
        plain = layers.Embed(num_embeddings=10, features=features, scale_by_sqrt_features=False)
        np.testing.assert_allclose(np.asarray(plain.apply({"params": params}, ids)), table[np.asarray(ids)],
                                   rtol=1e-6)


def test_transformer_embeds_sources_and_targets_scaled_by_sqrt_d_model_before_adding_positions():
    """In the Transformer (shared table, d_model 32) the encoder's and the decoder's Embed calls give
    table[ids] * sqrt(32), and the encoder's embedder output is that plus the sinusoids.

    Fails when the multiplication is removed: checked by deleting the x * sqrt(features) line of
    Embed.__call__."""
    cfg = MODEL.config
    batch = make_batch(2, batch_size=2)
    inputs, targets = jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])
    shapes = nn.unbox(jax.eval_shape(MODEL.init, jax.random.key(0), inputs, targets)["params"])
    rng = np.random.default_rng(5)  # Any parameters will do (and need no compiled initializer).
    params = jax.tree_util.tree_map(lambda a: rng.normal(0.0, 0.2, a.shape).astype(np.float32), shapes)
    capture = lambda module, method: (method == "__call__" and  # noqa: E731
                                      isinstance(module, (layers.Embed, transformer._Embedder)))
    captured = jax.jit(lambda p: MODEL.apply({"params": p}, inputs, targets, capture_intermediates=capture,
                                             mutable=["intermediates"])[1]["intermediates"])(params)
    table = np.asarray(params["shared_embedding"]["embedding"])
    scale = math.sqrt(cfg.d_model)
    source, decoder_input = captured["shared_embedding"]["__call__"]
    np.testing.assert_allclose(np.asarray(source), table[batch["inputs"]] * scale, rtol=1e-6)
    shifted = np.asarray(transformer.shift_right(targets, cfg.decoder_start_id))
    np.testing.assert_allclose(np.asarray(decoder_input), table[shifted] * scale, rtol=1e-6)
    positions = np.arange(inputs.shape[1])
    (embedded,) = captured["encoder"]["embedder"]["__call__"]
    np.testing.assert_allclose(np.asarray(embedded),
                               table[batch["inputs"]] * scale + _paper_sinusoids(positions, cfg.d_model)[None],
                               atol=1e-5)
