"""The config files and config.py: each file's values, the schedule length that follows num_train_steps, and
old runs' config.json read as before."""

import json
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from flaxformer_lite import config as config_lib
from flaxformer_lite import train_step

# ml_collections loads config files with importlib's deprecated load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def parse(*args):
    """The config that ``train.py ARGS`` would train, parsed as train.py parses its flags."""
    values, argv = flags.FlagValues(), ["train.py", *args]
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


def schedule(config):
    train_cfg = config_lib.build("train", config)
    return train_cfg, train_step.learning_rate_schedule(train_cfg, config.model.d_model)


def test_the_schedule_spans_num_train_steps_unless_total_steps_is_set():
    train_cfg, lr = schedule(parse(f"--config={CONFIGS / 'scan.py'}", "--config.num_train_steps=500"))
    assert train_cfg.total_steps == 500
    assert float(lr(500)) == 0.0 < float(lr(499))  # The cosine ends with the run.
    train_cfg, lr = schedule(parse(f"--config={CONFIGS / 'scan.py'}", "--config.num_train_steps=500",
                                   "--config.train.total_steps=2000"))
    assert train_cfg.total_steps == 2000
    assert float(lr(500)) > 0.0 == float(lr(2000))


def test_a_cosine_schedule_needs_a_length():
    with pytest.raises(ValueError, match="total_steps"):
        train_step.learning_rate_schedule(train_step.TrainConfig(schedule="cosine"), 64)
    with pytest.raises(ValueError, match="config.train.total_steps: must be >= 0"):
        config_lib.build("train", parse(f"--config={CONFIGS / 'scan.py'}", "--config.train.total_steps=-1"))


@pytest.mark.parametrize("saved, total_steps", [
    ({"num_train_steps": 4000, "train": {"schedule": "cosine", "total_steps": 4000}}, 4000),
    # Before total_steps followed num_train_steps, a config that did not set it saved the old default.
    ({"num_train_steps": 6, "train": {"schedule": "constant", "total_steps": 100_000}}, 100_000),
    ({"num_train_steps": 500, "train": {"schedule": "cosine", "total_steps": 4000}}, 4000),
])
def test_an_old_runs_config_json_keeps_its_schedule(saved, total_steps):
    config = config_lib.from_json(json.dumps(saved))
    assert config_lib.build("train", config).total_steps == total_steps


# What each config file sets, as on main before total_steps followed num_train_steps (which then had
# total_steps equal to num_train_steps in the four files that set it). Every other field keeps its default.
_PRESETS = {
    "small": {"model.d_model": 256, "model.num_heads": 4, "model.d_ff": 1024, "model.num_encoder_layers": 3,
              "model.num_decoder_layers": 3, "model.vocab_size": 8192, "model_preset": "small"},
    "base": {"model.d_model": 512, "model.num_heads": 8, "model.d_ff": 2048, "model.num_encoder_layers": 6,
             "model.num_decoder_layers": 6, "model.vocab_size": 37_000, "model_preset": "base"},
    "big": {"model.d_model": 1024, "model.num_heads": 16, "model.d_ff": 4096, "model.num_encoder_layers": 6,
            "model.num_decoder_layers": 6, "model.vocab_size": 37_000, "model_preset": "big"},
}
_ROWS_OF_64 = {"data.max_inputs_length": 64, "data.max_targets_length": 64}
_RSQRT = {"train.schedule": "rsqrt", "train.learning_rate": 1e-3, "train.warmup_steps": 1000}
_SMALL_TRANSLATION = {
    **_PRESETS["small"], **_ROWS_OF_64, **_RSQRT, "model.pre_layer_norm": True, "model.dropout_rate": 0.1,
    "model.dtype": "bfloat16", "data.batch_size": 32, "num_train_steps": 20_000, "eval_every_steps": 500,
    "checkpoint_every_steps": 500, "checkpoint_best_metric": "eval/bleu", "dataset.kind": "local",
    "dataset.source_lang": "en", "tokenizer.kind": "sentencepiece", "tokenizer.vocab_size": 8000,
}
_MULTI30K = {**_SMALL_TRANSLATION, "dataset.path": "../shared/data/multi30k", "eval_split": "val",
             "decode_eval_examples": 1014, "keep_checkpoints": 4, "model.d_model": 128, "model.d_ff": 512,
             "model.num_encoder_layers": 4, "model.num_decoder_layers": 4, "train.learning_rate": 2e-3,
             "train.warmup_steps": 500, "max_train_seconds": 2400}
_SCAN = {
    **_PRESETS["small"], **_ROWS_OF_64, "model.d_model": 128, "model.num_heads": 4, "model.d_ff": 512,
    "model.num_encoder_layers": 2, "model.num_decoder_layers": 2, "model.pre_layer_norm": True,
    "model.dropout_rate": 0.0, "model.attention_dropout_rate": 0.0, "model.ffn_dropout_rate": 0.0,
    "data.batch_size": 32, "dataset.kind": "scan", "tokenizer.kind": "word", "train.schedule": "cosine",
    "train.learning_rate": 2e-3, "train.warmup_steps": 200, "train.label_smoothing": 0.0, "num_train_steps": 4000,
    "eval_every_steps": 1000, "checkpoint_every_steps": 1000, "decode_eval_examples": 1000,
}
_WMT14 = {
    **_ROWS_OF_64, "model.pre_layer_norm": False, "data.batch_size": 768, "dataset.kind": "tfds",
    "dataset.name": "wmt14_translate/de-en", "dataset.source_lang": "en", "dataset.target_lang": "de",
    "eval_split": "validation", "tokenizer.kind": "sentencepiece", "tokenizer.model_type": "bpe",
    "tokenizer.vocab_size": 37_000, "train.schedule": "transformer", "train.learning_rate": 1.0,
    "train.warmup_steps": 4000, "train.label_smoothing": 0.1, "eval_every_steps": 5000, "eval_max_batches": 50,
    "checkpoint_every_steps": 5000, "decode_eval_examples": 500, "checkpoint_best_metric": "eval/bleu",
}
_BENCHMARK = {**_ROWS_OF_64, **_RSQRT, "model.pre_layer_norm": True, "model.dropout_rate": 0.1,
              "model.attention_dropout_rate": 0.1, "model.dtype": "float32", "num_train_steps": 10_000}
EXPECTED = {
    "scan.py": {**_SCAN, "dataset.name": "simple"},
    "scan.py:length": {**_SCAN, "dataset.name": "length"},
    "scan.py:addprim_jump": {**_SCAN, "dataset.name": "addprim_jump"},
    "multi30k.py": {**_MULTI30K, "dataset.target_lang": "de"},
    "multi30k.py:fr": {**_MULTI30K, "dataset.target_lang": "fr"},
    "multi30k.py:cs": {**_MULTI30K, "dataset.target_lang": "cs"},
    "tatoeba_en_zh.py": {**_SMALL_TRANSLATION, "dataset.path": "../shared/data/tatoeba_en_zh",
                         "dataset.target_lang": "zh", "eval_split": "dev", "decode_eval_examples": 1050,
                         "max_train_seconds": 1200, "train.learning_rate": 2e-3, "train.warmup_steps": 500},
    "wmt14_ende.py": {**_WMT14, **_PRESETS["base"], "model.dropout_rate": 0.1, "num_train_steps": 100_000,
                      "keep_checkpoints": 5},
    "wmt14_ende.py:big": {**_WMT14, **_PRESETS["big"], "model.dropout_rate": 0.3, "num_train_steps": 300_000,
                          "keep_checkpoints": 20},
    "tiny.py": {
        "model.d_model": 32, "model.num_heads": 4, "model.d_ff": 64, "model.num_encoder_layers": 2,
        "model.num_decoder_layers": 2, "model.vocab_size": 64, "model_preset": "tiny", "model.dropout_rate": 0.0,
        "model.attention_dropout_rate": 0.0, "model.ffn_dropout_rate": 0.0, "model.pre_layer_norm": False,
        "dataset.kind": "scan", "dataset.name": "simple", "train_split": "train[:512]", "eval_split": "test[:64]",
        "tokenizer.kind": "word", "data.batch_size": 8, "data.max_inputs_length": 16,
        "data.max_targets_length": 64, "train.schedule": "constant", "train.learning_rate": 3e-3,
        "num_train_steps": 6, "log_every_secs": 0.0, "metrics_every_steps": 2, "eval_every_steps": 3,
        "checkpoint_every_steps": 3, "async_checkpoints": False, "decode_eval_examples": 16,
        "checkpoint_best_metric": "eval/exact_match"},
    "benchmark.py": {**_BENCHMARK, **_PRESETS["small"], "data.batch_size": 32, "model.vocab_size": 8192},
    "benchmark.py:base": {**_BENCHMARK, **_PRESETS["base"], "data.batch_size": 16, "model.vocab_size": 32_000},
    "benchmark.py:base_gpu": {**_BENCHMARK, **_PRESETS["base"], "data.batch_size": 128,
                              "model.vocab_size": 32_000, "model.attention_dropout_rate": 0.0},
    "benchmark.py:big": {**_BENCHMARK, **_PRESETS["big"], "data.batch_size": 64, "model.vocab_size": 32_000,
                         "model.attention_dropout_rate": 0.0},
}


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_file_sets_what_it_did_and_nothing_else(name):
    config = parse(f"--config={CONFIGS / name}")
    values, defaults = flat(config.to_dict()), flat(config_lib.default_config().to_dict())
    expected = EXPECTED[name]
    assert {key: values[key] for key in expected} == expected
    changed = {key for key in values if values[key] != defaults[key]}
    assert changed <= set(expected), f"{name} also sets {sorted(changed - set(expected))}"
    assert config_lib.build("train", config).total_steps == expected["num_train_steps"]
    if not name.startswith("benchmark.py"):  # The benchmark's configs have no dataset: it makes its batches.
        config_lib.validate(config)  # What train.py checks before it writes anything.


def test_every_config_file_is_checked_above():
    files = {path.name for path in CONFIGS.glob("*.py")} - {"common.py"}
    assert files == {name.split(":")[0] for name in EXPECTED}
