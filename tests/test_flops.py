"""The analytic FLOP count (flaxformer_lite/flops.py), checked by hand and against XLA's own count."""

import jax
import jax.numpy as jnp
import pytest

from flaxformer_lite import flops, transformer


def _hand_count(batch, s, t, *, vocab, d, heads, head_dim, f, enc, dec):
    """Lists every matrix product of the forward pass as (rows, contracted, columns) and sums 2*m*k*n."""
    inner = heads * head_dim
    products = []
    for _ in range(enc):
        products += [(batch * s, d, inner)] * 3  # Q, K, V.
        products += [(batch * heads * s, head_dim, s),  # Q K^T per head.
                     (batch * heads * s, s, head_dim),  # probabilities x V.
                     (batch * s, inner, d),  # Output projection.
                     (batch * s, d, f), (batch * s, f, d)]  # Feed-forward.
    for _ in range(dec):
        products += [(batch * t, d, inner)] * 3  # Self-attention Q, K, V.
        products += [(batch * heads * t, head_dim, t), (batch * heads * t, t, head_dim), (batch * t, inner, d)]
        products += [(batch * t, d, inner),  # Cross-attention Q from the decoder.
                     (batch * s, d, inner), (batch * s, d, inner),  # K, V from the encoder output.
                     (batch * heads * t, head_dim, s), (batch * heads * t, s, head_dim), (batch * t, inner, d)]
        products += [(batch * t, d, f), (batch * t, f, d)]
    products.append((batch * t, d, vocab))  # Logits through the shared embedding.
    return sum(2 * m * k * n for m, k, n in products)


@pytest.mark.parametrize("head_dim", [None, 16])
def test_forward_flops_match_a_hand_count_of_every_product(head_dim):
    cfg = transformer.preset("tiny", head_dim=head_dim)  # vocab 64, d 32, 4 heads, d_ff 64, 2 + 2 layers.
    expected = _hand_count(3, 5, 7, vocab=64, d=32, heads=4, head_dim=head_dim or 8, f=64, enc=2, dec=2)
    counted = flops.forward_flops(cfg, batch=3, inputs_length=5, targets_length=7)
    assert counted["total"] == expected
    assert counted["total"] == sum(v for k, v in counted.items() if k != "total")
    assert flops.training_flops(cfg, 3, 5, 7) == 3 * expected


def test_small_config_is_97_gflop_per_training_step():
    # The figure for vocab 8192, d 256, 4 heads, d_ff 1024, 3 + 3 layers, 32 x (64 + 64) tokens.
    cfg = transformer.preset("small", vocab_size=8192)
    assert flops.training_flops(cfg, 32, 64, 64) == pytest.approx(97.04e9, rel=1e-4)


def test_forward_count_agrees_with_xla_cost_analysis():
    """XLA counts every op of the compiled forward pass; matmuls should be all but a sliver of it."""
    cfg = transformer.preset("small", vocab_size=2048, num_encoder_layers=1, num_decoder_layers=1,
                             dropout_rate=0.0, attention_dropout_rate=0.0, ffn_dropout_rate=0.0)
    model = transformer.Transformer(cfg)
    inputs, targets = jnp.ones((2, 16), jnp.int32), jnp.ones((2, 12), jnp.int32)
    variables = model.init(jax.random.key(0), inputs, targets)
    analysis = jax.jit(lambda v: model.apply(v, inputs, targets)).lower(variables).compile().cost_analysis()
    xla_flops = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]
    analytic = flops.forward_flops(cfg, 2, 16, 12)["total"]
    assert 0.95 * xla_flops <= analytic <= xla_flops


def test_mfu_is_flops_over_time_over_peak():
    cfg = transformer.preset("tiny")
    step_flops = flops.training_flops(cfg, 2, 8, 8)
    assert flops.mfu(cfg, 2, 8, 8, step_seconds=0.5, peak_flops_per_second=4 * step_flops) == pytest.approx(0.5)
