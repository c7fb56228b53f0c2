"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017), as Linen modules.

    inputs  -> Embed * sqrt(d) + PE -> dropout -> N x EncoderLayer -> (final LayerNorm if pre-LN) -> encoded
    targets -> shift right -> Embed * sqrt(d) + PE -> dropout -> N x DecoderLayer(encoded) -> (LN) -> logits

Each sub-layer (self-attention, encoder-decoder attention, feed-forward) is wrapped as the paper does,
``LayerNorm(x + Dropout(Sublayer(x)))`` (post-LN), or, with ``pre_layer_norm``, as
``x + Dropout(Sublayer(LayerNorm(x)))`` with one more LayerNorm at the end of each stack (pre-LN, which
trains more stably without a long warm-up).

Packed rows (several examples in one row) are supported through ``*_segmentation`` (1, 2, ... per example,
0 on padding) and ``*_positions`` (position within the example); attention never crosses examples.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite import attention
from flaxformer_lite.backend import ATTENTION_IMPLEMENTATIONS
from flaxformer_lite.layers import (ACTIVATIONS, DenseGeneral, Dropout, Embed, FeedForward, LayerNorm,
                                    PositionalEncoding, constrain, mask_padded_logits)

# Logical layout of the residual stream [batch, length, d_model] (see sharding.DEFAULT_AXIS_RULES).
_RESIDUAL = ("activation_batch", "activation_length", "activation_embed")

_DTYPES = ("float32", "bfloat16")
_POSITION_KINDS = ("sinusoidal", "learned")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of the model. Frozen: derive variants with ``dataclasses.replace`` or ``preset``."""

    vocab_size: int = 32_000  # Size of the (shared, or source) vocabulary.
    output_vocab_size: int | None = None  # Target vocabulary size; None means the same as vocab_size.
    # Embedding and logit tables get rows up to a multiple of this (128: every mesh axis size up to 128
    # that is a power of two divides it, and so do GPU/TPU matrix tiles). Padded ids are never predicted
    # and never in the loss. 1: no padding (runs saved before this field existed).
    vocab_pad_multiple: int = 128
    share_embeddings: bool = True  # One table for encoder input and decoder input (needs equal vocabularies).
    logits_via_embedding: bool = True  # Output logits through the decoder embedding's transpose (paper 3.4).
    d_model: int = 512  # Width of embeddings and of every residual stream.
    num_heads: int = 8  # Attention heads h.
    head_dim: int | None = None  # Size d_k = d_v of each head; None means d_model // num_heads.
    d_ff: int = 2048  # Hidden width of the feed-forward blocks.
    num_encoder_layers: int = 6  # Encoder layers N.
    num_decoder_layers: int = 6  # Decoder layers N.
    dropout_rate: float = 0.1  # P_drop: on embeddings + positions and on each sub-layer output (paper 5.4).
    attention_dropout_rate: float = 0.1  # Dropout on attention probabilities.
    ffn_dropout_rate: float = 0.1  # Dropout on the feed-forward hidden activations.
    activation: str = "relu"  # Feed-forward non-linearity: "relu" (paper) or "gelu".
    pre_layer_norm: bool = False  # False: post-LN as in the paper; True: pre-LN with a final LayerNorm.
    layer_norm_epsilon: float = 1e-6  # Epsilon of every LayerNorm.
    position_embedding: str = "sinusoidal"  # "sinusoidal" (paper) or "learned".
    max_length: int = 512  # Longest sequence the learned position table covers (unused by sinusoids).
    use_attention_bias: bool = False  # Biases on the Q/K/V/output projections (the paper has none).
    pad_id: int = 0  # Padding token id; masked out of attention and of the loss.
    decoder_start_id: int = 0  # Token fed to the decoder at position 0 (shift right), as in T5 / flax wmt.
    # How attention is computed: "auto" (backend.attention_implementation: the einsum path on a CPU, cuDNN's
    # flash attention on a GPU where it applies, XLA's fused form otherwise), "einsum", "xla" or "cudnn".
    # Attention dropout in training and attention maps always take the einsum path.
    attention_implementation: str = "auto"
    dtype: str = "float32"  # Compute dtype of activations and matmuls: "float32" or "bfloat16".
    param_dtype: str = "float32"  # Storage dtype of parameters (keep float32 for training).

    def __post_init__(self):
        def fail(field: str, message: str):
            raise ValueError(f"TransformerConfig.{field}: {message}")

        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_length", "vocab_pad_multiple"):
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.num_heads:
            fail("num_heads", f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                              "set head_dim explicitly")
        if self.share_embeddings and self.output_vocab_size not in (None, self.vocab_size):
            fail("share_embeddings", f"a shared embedding needs output_vocab_size == vocab_size, got "
                                     f"{self.output_vocab_size} != {self.vocab_size}")
        for name in ("dropout_rate", "attention_dropout_rate", "ffn_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            fail("activation", f"{self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.position_embedding not in _POSITION_KINDS:
            fail("position_embedding", f"{self.position_embedding!r} is not one of {_POSITION_KINDS}")
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            fail("attention_implementation",
                 f"{self.attention_implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                fail(name, f"{getattr(self, name)!r} is not one of {_DTYPES}")

    @property
    def target_vocab_size(self) -> int:
        return self.output_vocab_size or self.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the source (or shared) embedding table."""
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def padded_target_vocab_size(self) -> int:
        """Rows of the target embedding table, and width of the logits."""
        return -(-self.target_vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


# The paper's two models (Table 3) and two sizes that train on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_encoder_layers=2,
                 num_decoder_layers=2, dropout_rate=0.0, attention_dropout_rate=0.0, ffn_dropout_rate=0.0),
    "small": dict(vocab_size=8192, d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
                  num_decoder_layers=3, dropout_rate=0.1),
    "base": dict(vocab_size=37_000, d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6,
                 num_decoder_layers=6, dropout_rate=0.1),
    "big": dict(vocab_size=37_000, d_model=1024, num_heads=16, d_ff=4096, num_encoder_layers=6,
                num_decoder_layers=6, dropout_rate=0.3),
}


def preset(name: str, **overrides: Any) -> TransformerConfig:
    """``TransformerConfig`` of a named size (``tiny``, ``small``, ``base``, ``big``), with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return TransformerConfig(**{**PRESETS[name], **overrides})


def shift_right(targets: jax.Array, start_id: int = 0, segmentation: jax.Array | None = None) -> jax.Array:
    """Decoder inputs for teacher forcing: ``[start, t0, t1, ...]``; packed examples each get ``start``."""
    shifted = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=start_id)[:, :-1]
    if segmentation is not None:
        previous_segment = jnp.pad(segmentation, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
        shifted = jnp.where(segmentation == previous_segment, shifted, start_id)
    return shifted


def _default_positions(tokens: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)


def _residual(cfg: TransformerConfig, x: jax.Array, sublayer, norm_name: str, *, deterministic: bool):
    """Post-LN ``LN(x + drop(f(x)))`` (paper) or pre-LN ``x + drop(f(LN(x)))``.

    Called from inside a module's compact ``__call__``, so the LayerNorm created here belongs to that layer.
    """
    norm = LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=norm_name)
    dropout = Dropout(cfg.dropout_rate)
    if cfg.pre_layer_norm:
        return x + dropout(sublayer(norm(x)), deterministic=deterministic)
    return norm(x + dropout(sublayer(x), deterministic=deterministic))


def _attention(cfg: TransformerConfig, name: str) -> attention.MultiHeadAttention:
    return attention.MultiHeadAttention(
        num_heads=cfg.num_heads, head_dim=cfg.attention_head_dim, dropout_rate=cfg.attention_dropout_rate,
        use_bias=cfg.use_attention_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        implementation=cfg.attention_implementation, name=name)


def _feed_forward_sublayer(cfg: TransformerConfig, x: jax.Array, *, deterministic: bool) -> jax.Array:
    """The feed-forward residual sub-layer that ends every encoder and decoder layer."""
    ffn = FeedForward(cfg.d_ff, cfg.activation, cfg.ffn_dropout_rate, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name="ffn")
    x = _residual(cfg, x, lambda h: ffn(h, deterministic=deterministic), "ffn_norm", deterministic=deterministic)
    return constrain(x, *_RESIDUAL)


class EncoderLayer(nn.Module):
    """Self-attention, then feed-forward, each as a residual sub-layer."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        self_attention = _attention(cfg, "self_attention")
        x = _residual(cfg, x, lambda h: self_attention(h, h, mask, deterministic=deterministic),
                      "self_attention_norm", deterministic=deterministic)
        return _feed_forward_sublayer(cfg, x, deterministic=deterministic)


class DecoderMode(enum.Enum):
    """What a decoder call does (``mode=`` of :class:`DecoderLayer` and :class:`Decoder`).

    * ``TEACHER_FORCED``: training: every target position at once, attending to the encoder output.
    * ``STEP``: one decoding position: self-attention on the ``cache`` collection, encoder-decoder attention
      on the keys/values in the ``cross_kv`` collection; no encoder output.
    * ``PROJECT_CROSS_KV``: only projects the encoder output into every layer's ``cross_kv``; no targets.
    """

    TEACHER_FORCED = "teacher_forced"
    STEP = "step"
    PROJECT_CROSS_KV = "project_cross_kv"


def _check_inputs(where: str, mode: DecoderMode, **inputs: Any) -> None:
    """Raises unless ``mode`` is a :class:`DecoderMode` whose inputs are exactly the non-``None`` ones:
    the encoder output (``encoded``) except in ``STEP``, the targets except in ``PROJECT_CROSS_KV``."""
    if not isinstance(mode, DecoderMode):
        raise ValueError(f"{where}: decoder mode {mode!r} is not one of {[m.name for m in DecoderMode]}")
    for name, value in inputs.items():
        wanted = mode is not (DecoderMode.STEP if name == "encoded" else DecoderMode.PROJECT_CROSS_KV)
        if (value is not None) != wanted:
            raise ValueError(f"{where}: mode {mode.name} {'needs' if wanted else 'takes no'} {name}")


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention, then feed-forward, each as a residual sub-layer.

    ``mode`` (:class:`DecoderMode`) picks training, one decoding step (self-attention appends to its cache,
    the encoder-decoder attention reads the keys/values projected once per sentence), or only projecting
    ``encoded`` into those keys/values.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, y: jax.Array | None, encoded: jax.Array | None, self_mask: jax.Array | None,
                 cross_mask: jax.Array | None, *, deterministic: bool = True,
                 mode: DecoderMode = DecoderMode.TEACHER_FORCED) -> jax.Array | None:
        cfg = self.config
        _check_inputs("DecoderLayer", mode, y=y, encoded=encoded)
        if mode is DecoderMode.PROJECT_CROSS_KV:
            _attention(cfg, "cross_attention")(None, encoded, mode=attention.Mode.PROJECT_CROSS_KV)
            return None
        step = mode is DecoderMode.STEP
        self_attention = _attention(cfg, "self_attention")
        y = _residual(cfg, y, lambda h: self_attention(
            h, None if step else h, self_mask, deterministic=deterministic,
            mode=attention.Mode.SELF_STEP if step else attention.Mode.FULL),
            "self_attention_norm", deterministic=deterministic)
        cross_attention = _attention(cfg, "cross_attention")
        y = _residual(cfg, y, lambda h: cross_attention(
            h, encoded, cross_mask, deterministic=deterministic,
            mode=attention.Mode.CROSS_STEP if step else attention.Mode.FULL),
            "cross_attention_norm", deterministic=deterministic)
        return _feed_forward_sublayer(cfg, y, deterministic=deterministic)


class _Embedder(nn.Module):
    """Token embedding (possibly the shared table) plus positions, then dropout (paper 5.4)."""

    config: TransformerConfig
    embed: Embed

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        x = self.embed(tokens)
        x = PositionalEncoding(cfg.position_embedding, cfg.max_length, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, name="positions")(x, positions)
        return constrain(Dropout(cfg.dropout_rate)(x, deterministic=deterministic), *_RESIDUAL)


def _final_norm(cfg: TransformerConfig) -> LayerNorm | None:
    if not cfg.pre_layer_norm:
        return None
    return LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="final_norm")


class Encoder(nn.Module):
    """A stack of encoder layers over embedded source tokens."""

    config: TransformerConfig
    embed: Embed

    @nn.compact
    def __call__(self, inputs: jax.Array, *, inputs_positions: jax.Array | None = None,
                 inputs_segmentation: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        positions = _default_positions(inputs) if inputs_positions is None else inputs_positions
        x = _Embedder(cfg, self.embed, name="embedder")(inputs, positions, deterministic=deterministic)
        mask = attention.padding_mask(inputs, inputs, cfg.pad_id)
        if inputs_segmentation is not None:
            mask = attention.combine_masks(
                mask, attention.segment_mask(inputs_segmentation, inputs_segmentation))
        for i in range(cfg.num_encoder_layers):
            x = EncoderLayer(cfg, name=f"layer_{i}")(x, mask, deterministic=deterministic)
        norm = _final_norm(cfg)
        return x if norm is None else norm(x)


class Decoder(nn.Module):
    """A stack of decoder layers over embedded (already shifted) target tokens; returns float32 logits
    over the padded vocabulary (``TransformerConfig.padded_target_vocab_size``), padded ids masked."""

    config: TransformerConfig
    embed: Embed

    @nn.compact
    def __call__(self, encoded: jax.Array | None, inputs: jax.Array | None, decoder_inputs: jax.Array | None, *,
                 targets: jax.Array | None = None, targets_positions: jax.Array | None = None,
                 inputs_segmentation: jax.Array | None = None, targets_segmentation: jax.Array | None = None,
                 deterministic: bool = True, mode: DecoderMode = DecoderMode.TEACHER_FORCED) -> jax.Array | None:
        """Logits for ``decoder_inputs`` (``TEACHER_FORCED``: all positions; ``STEP``: one, ``encoded=None``),
        or, in ``PROJECT_CROSS_KV``, only every layer's cross-attention keys/values of ``encoded`` (``None``
        back). ``inputs`` (the sources) give the padding mask of the encoder-decoder attention."""
        cfg = self.config
        _check_inputs("Decoder", mode, encoded=encoded, decoder_inputs=decoder_inputs)
        if mode is DecoderMode.PROJECT_CROSS_KV:
            for i in range(cfg.num_decoder_layers):
                DecoderLayer(cfg, name=f"layer_{i}")(None, encoded, None, None, mode=mode)
            return None
        if inputs is None:
            raise ValueError(f"Decoder: mode {mode.name} needs inputs (the sources, for the padding mask)")
        if mode is DecoderMode.STEP:
            # One new position per call; the position counter lives in the cache next to the keys/values.
            initialized = self.has_variable("cache", "position_index")
            index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
            positions = index.value[None, None]  # [1, 1]: every row is at this position (broadcasts).
            if initialized:
                index.value = index.value + 1
            self_mask = None  # The cache admits only the positions decoded so far.
            cross_mask = (inputs != cfg.pad_id)[:, None, None, :]  # Every step may read every real source token.
        else:
            positions = _default_positions(decoder_inputs) if targets_positions is None else targets_positions
            # Padding comes from the unshifted targets: decoder position t is real when target t is, even
            # though the shifted input there is the start token (= pad id).
            real = decoder_inputs if targets is None else targets
            self_mask = attention.combine_masks(
                attention.padding_mask(real, real, cfg.pad_id),
                attention.causal_mask(decoder_inputs.shape[-1]))
            cross_mask = attention.padding_mask(real, inputs, cfg.pad_id)
            if targets_segmentation is not None:
                self_mask = attention.combine_masks(
                    self_mask, attention.segment_mask(targets_segmentation, targets_segmentation))
                cross_mask = attention.combine_masks(
                    cross_mask, attention.segment_mask(targets_segmentation, inputs_segmentation))

        y = _Embedder(cfg, self.embed, name="embedder")(decoder_inputs, positions, deterministic=deterministic)
        for i in range(cfg.num_decoder_layers):
            y = DecoderLayer(cfg, name=f"layer_{i}")(y, encoded, self_mask, cross_mask,
                                                    deterministic=deterministic, mode=mode)
        norm = _final_norm(cfg)
        y = y if norm is None else norm(y)
        if cfg.logits_via_embedding:
            logits = self.embed.attend(y)
        else:
            logits = DenseGeneral((cfg.padded_target_vocab_size,), ("embed",), ("vocab",), dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype, out_dtype="float32", name="logits")(y)
        logits = constrain(logits, "activation_batch", "activation_length", "activation_vocab")
        return mask_padded_logits(logits, cfg.target_vocab_size)


class Transformer(nn.Module):
    """Encoder-decoder Transformer. ``__call__`` (= ``encode`` + ``decode``) trains with teacher forcing;
    ``encode``, ``project_cross_kv`` and ``decode_step`` are the parts of incremental decoding."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        embed = lambda vocab, rows, name: Embed(vocab, cfg.d_model, padded_size=rows,  # noqa: E731
                                                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        if cfg.share_embeddings:
            self.source_embed = self.target_embed = embed(cfg.vocab_size, cfg.padded_vocab_size,
                                                          "shared_embedding")
        else:
            self.source_embed = embed(cfg.vocab_size, cfg.padded_vocab_size, "source_embedding")
            self.target_embed = embed(cfg.target_vocab_size, cfg.padded_target_vocab_size, "target_embedding")
        self.encoder = Encoder(cfg, self.source_embed)
        self.decoder = Decoder(cfg, self.target_embed)

    def encode(self, inputs: jax.Array, *, inputs_positions: jax.Array | None = None,
               inputs_segmentation: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """Source token ids ``[b, s]`` (0 = pad) to encoder outputs ``[b, s, d_model]``."""
        return self.encoder(inputs, inputs_positions=inputs_positions, inputs_segmentation=inputs_segmentation,
                            deterministic=deterministic)

    def decode(self, encoded: jax.Array, inputs: jax.Array, targets: jax.Array, *,
               targets_positions: jax.Array | None = None, inputs_segmentation: jax.Array | None = None,
               targets_segmentation: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """Teacher-forced float32 logits ``[b, t, vocab]`` predicting ``targets`` (shifted right inside)."""
        decoder_inputs = shift_right(targets, self.config.decoder_start_id, targets_segmentation)
        return self.decoder(encoded, inputs, decoder_inputs, targets=targets, targets_positions=targets_positions,
                            inputs_segmentation=inputs_segmentation, targets_segmentation=targets_segmentation,
                            deterministic=deterministic)

    def decode_step(self, inputs: jax.Array, tokens: jax.Array) -> jax.Array:
        """One decoding step: float32 logits ``[b, 1, vocab]`` after the decoder inputs ``tokens [b, 1]``.

        Reads the encoder-decoder keys/values from the ``cross_kv`` collection (see
        :meth:`project_cross_kv`) and appends to the self-attention keys/values in the ``cache`` collection,
        which must be mutable (see ``attention.MultiHeadAttention``). ``inputs`` (the sources ``[b, s]``, or
        ``[b / g, s]`` with a ``cross_kv`` of one row per sentence for its ``g`` beams) give the padding mask
        of the encoder-decoder attention.
        """
        return self.decoder(None, inputs, tokens, mode=DecoderMode.STEP)

    def project_cross_kv(self, encoded: jax.Array) -> None:
        """Projects ``encoded [b, s, d_model]`` into every decoder layer's encoder-decoder attention
        keys/values, stored in the ``cross_kv`` collection (which must be mutable)::

            cross_kv = model.apply({'params': params}, encoded, method=Transformer.project_cross_kv,
                                   mutable=['cross_kv'])[1]['cross_kv']

        Decoding steps read them (:meth:`decode_step`), so the encoder output is projected once per
        sentence; ``decoding.project_cross_kv`` wraps this.
        """
        self.decoder(encoded, None, None, mode=DecoderMode.PROJECT_CROSS_KV)

    def __call__(self, inputs: jax.Array, targets: jax.Array, *, inputs_positions: jax.Array | None = None,
                 targets_positions: jax.Array | None = None, inputs_segmentation: jax.Array | None = None,
                 targets_segmentation: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """Teacher-forced logits ``[b, t, vocab]``: position t predicts ``targets[:, t]``."""
        encoded = self.encode(inputs, inputs_positions=inputs_positions, inputs_segmentation=inputs_segmentation,
                              deterministic=deterministic)
        return self.decode(encoded, inputs, targets, targets_positions=targets_positions,
                           inputs_segmentation=inputs_segmentation, targets_segmentation=targets_segmentation,
                           deterministic=deterministic)
