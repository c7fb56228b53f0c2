"""The shapes of the speed benchmark; ``small`` and ``base`` are those ``../shared/bench/torch_peer.py`` uses.

    python experiments/benchmark.py --config=experiments/configs/benchmark.py:small
    python experiments/benchmark.py --config=experiments/configs/benchmark.py:base --config.model.dtype=bfloat16
    python experiments/benchmark.py --config=experiments/configs/benchmark.py:big --config.model.dtype=bfloat16 \\
        --peak=datasheet

Measured (``small``, float32, the three modes in under 3 minutes on a 2-core CPU): train / greedy / beam-4 target
tokens/s 1,857 / 2,905 / 800 on an AVX2-only AMD EPYC, 1.74x / 1.32x / 1.08x the PyTorch peer (2026-12-04,
``a9dcfcc``); beam 4 at 1.21-1.42x the peer after ``2043c77`` there; ``docs/performance.md`` has the other CPUs.
``small``: shared vocabulary 8192, d_model 256, 4 heads, d_ff 1024, 3 + 3 layers, 32 pairs x (64 + 64) tokens.
``base``: the paper's base model with a 32,000 vocabulary, 16 pairs x (64 + 64) tokens (the peer's shape).
``base_gpu``: ``base`` with 128 pairs x (64 + 64) tokens, a batch sized for one H100 / H200 in bfloat16.
``big``: the paper's big model (d_model 1024, 16 heads, d_ff 4096, 6 + 6 layers) with a 32,000 vocabulary,
64 pairs x (64 + 64) tokens, which fits one H100 / H200 in bfloat16; too slow for a CPU beyond a few steps.
All pre-LN with dropout 0.1 and label smoothing 0.1, as the peer (``big`` too, not the paper's 0.3 for
En-De: dropout costs no matmul FLOPs, and one rate keeps the variants comparable). Every token of a benchmark
batch is real (random ids, no padding), so tokens/s counts real tokens. The GPU variants (``base_gpu``,
``big``) have no dropout on attention probabilities, so that training takes fused attention (cuDNN's flash
attention in bfloat16), as MaxText's GPU recipes do.
"""

from experiments.configs import common
from flaxformer_lite import config as config_lib

_SHAPES = {
    "small": dict(preset="small", vocab_size=8192, batch_size=32),
    "base": dict(preset="base", vocab_size=32_000, batch_size=16),
    "base_gpu": dict(preset="base", vocab_size=32_000, batch_size=128, attention_dropout_rate=0.0),
    "big": dict(preset="big", vocab_size=32_000, batch_size=64, attention_dropout_rate=0.0),
}


def get_config(size: str = "small"):
    if size not in _SHAPES:
        raise ValueError(f"benchmark.py:{size}: expected one of {sorted(_SHAPES)}")
    shape = _SHAPES[size]
    config = config_lib.default_config()
    config_lib.with_preset(config, shape["preset"], vocab_size=shape["vocab_size"], pre_layer_norm=True,
                           dropout_rate=0.1, attention_dropout_rate=shape.get("attention_dropout_rate", 0.1))
    common.packed_rows(config, shape["batch_size"])
    common.rsqrt_schedule(config)
    return config
