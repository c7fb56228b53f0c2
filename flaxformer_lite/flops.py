"""Analytic FLOP count of the encoder-decoder Transformer, the numerator of MFU.

Only matrix products are counted, at 2 FLOPs per multiply-add; layer norms, softmax, dropout, biases,
embedding look-ups and the optimizer update are left out (well under 1% for the presets). Attention is
charged in full: the causal mask is applied to a ``T x T`` product, not exploited, so the masked half costs
as much as the rest. The backward pass costs twice the forward pass (one product for the gradient of the
activations, one for the gradient of the weights), so a training step is 3 x forward.

This is the accounting of the usual "6 x parameters x tokens" rule, with each weight charged for the
tokens that actually flow through it (encoder weights for source tokens, decoder weights and the output
projection for target tokens, the cross-attention key/value projections for source tokens once per
decoder layer), plus the attention products, which depend on the lengths.

MFU (model FLOPs utilization) = training FLOPs per step / step time / peak FLOP/s of the hardware.
Packing does not change the count: a packed row is charged as a full row of ``length`` tokens.
"""

from __future__ import annotations

from flaxformer_lite.transformer import TransformerConfig


def forward_flops(cfg: TransformerConfig, batch: int, inputs_length: int, targets_length: int) -> dict[str, int]:
    """Matmul FLOPs of one teacher-forced forward pass over ``batch`` rows, by part of the model."""
    d, f = cfg.d_model, cfg.d_ff
    inner = cfg.num_heads * (cfg.head_dim or d // cfg.num_heads)  # Width of the concatenated heads.
    vocab = cfg.output_vocab_size or cfg.vocab_size
    s, t = inputs_length, targets_length

    projections = 2 * (3 * d * inner + inner * d)  # Q, K, V and output projection, per token.
    feed_forward = 2 * 2 * d * f  # Two matrices of d x f, per token.
    encoder = cfg.num_encoder_layers * s * (projections + feed_forward)
    decoder = cfg.num_decoder_layers * (
        t * (projections + feed_forward)  # Self-attention and feed-forward.
        + t * 2 * 2 * d * inner  # Cross-attention query and output projections.
        + s * 2 * 2 * d * inner)  # Cross-attention key and value projections of the encoder output.
    # Q K^T and probabilities x V: 2 products of (queries x keys x inner) each.
    attention = 2 * 2 * inner * (cfg.num_encoder_layers * s * s + cfg.num_decoder_layers * (t * t + t * s))
    logits = t * 2 * d * vocab
    parts = dict(encoder=encoder, decoder=decoder, attention=attention, logits=logits)
    parts = {name: batch * value for name, value in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def training_flops(cfg: TransformerConfig, batch: int, inputs_length: int, targets_length: int) -> int:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward)."""
    return 3 * forward_flops(cfg, batch, inputs_length, targets_length)["total"]


def mfu(cfg: TransformerConfig, batch: int, inputs_length: int, targets_length: int, step_seconds: float,
        peak_flops_per_second: float) -> float:
    """Model FLOPs utilization of a training step that took ``step_seconds``."""
    return training_flops(cfg, batch, inputs_length, targets_length) / step_seconds / peak_flops_per_second
