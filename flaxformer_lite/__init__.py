"""flaxformer_lite: the encoder-decoder Transformer of "Attention Is All You Need" in JAX/Flax Linen."""

from flaxformer_lite.attention import (MultiHeadAttention, causal_mask, combine_masks, dot_product_attention,
                                       dot_product_attention_weights, padding_mask, segment_mask)
from flaxformer_lite.transformer import (PRESETS, Decoder, DecoderLayer, Encoder, EncoderLayer, Transformer,
                                         TransformerConfig, preset, shift_right)

__version__ = "0.1.0"
