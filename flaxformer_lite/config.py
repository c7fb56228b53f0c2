"""The experiment configuration: one ``ml_collections.ConfigDict`` with a section per frozen dataclass.

Sections ``model``, ``train``, ``data``, ``tokenizer`` and ``dataset`` hold every field of
``TransformerConfig``, ``TrainConfig``, ``PipelineConfig``, ``TokenizerConfig`` and ``DatasetConfig``
(each field is documented where its dataclass defines it), so ``--config.model.d_model=128`` reaches the
model and a misspelt key fails at the command line. The remaining top-level fields, documented in
``default_config``, drive the run itself. Config files under ``experiments/configs/`` start from
``default_config()`` and change what their experiment needs.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from flaxformer_lite import errors, sharding
from flaxformer_lite.data.datasets import DatasetConfig
from flaxformer_lite.data.pipeline import PipelineConfig
from flaxformer_lite.data.tokenizer import TokenizerConfig
from flaxformer_lite.train_step import TrainConfig
from flaxformer_lite.transformer import TransformerConfig

SECTIONS: dict[str, type] = {
    "model": TransformerConfig,
    "train": TrainConfig,
    "data": PipelineConfig,
    "tokenizer": TokenizerConfig,
    "dataset": DatasetConfig,
}


def _section(cls: type) -> ml_collections.ConfigDict:
    """A ConfigDict of the dataclass's fields and defaults; ``X | None`` fields become typed placeholders."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for field in dataclasses.fields(cls):
        value = field.default
        if value is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        if value is None or value is dataclasses.MISSING:
            # A None (or required) field cannot be set from the command line unless its type is declared.
            hint = hints[field.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            value = config_dict.placeholder(args[0] if isinstance(args[0], type) else str)
        fields[field.name] = value
    return ml_collections.ConfigDict(fields)


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    for name, cls in SECTIONS.items():
        config[name] = _section(cls)
    config.model_preset = ""  # Informational: the TransformerConfig preset the config file started from.
    config.seed = 0  # Seeds parameter initialization and dropout.
    config.data_dir = config_dict.placeholder(str)  # Where tfds builds datasets; None: tfds's default.
    config.train_split = "train"  # Split (or tfds split expression) to train on.
    config.eval_split = "test"  # Split for periodic evaluation; tune on a validation split, never on test.
    config.num_train_steps = 10_000  # Optimizer updates in the whole run.
    # Stop earlier, with a checkpoint and an evaluation, after this many seconds of training in one session
    # (evaluation and checkpointing not counted; a resumed run starts a new budget). 0: no limit.
    config.max_train_seconds = 0.0
    # Multi-process runs agree every this many steps whether to stop early (SIGTERM on a host, time budget):
    # a collective that waits for the step, so not every step. A single process decides after every step.
    config.stop_check_every_steps = 10
    config.mesh_shape = (-1, 1, 1)  # Devices along ('data', 'fsdp', 'tensor'); -1 takes what is left.
    # Logical axis -> comma-separated mesh axes ("": replicated), for parameters and activations alike;
    # the names and defaults are sharding.DEFAULT_AXIS_RULES'. E.g. --config.axis_rules.embed='' keeps
    # parameters whole on every fsdp device.
    config.axis_rules = ml_collections.ConfigDict(dict(sharding.DEFAULT_AXIS_RULES))
    config.log_every_secs = 5.0  # Progress (loss, tokens/s, ETA) to the log at most this often.
    config.metrics_every_steps = 50  # Training metrics to metrics.jsonl / TensorBoard every this many steps.
    config.eval_every_steps = 1000  # Validation loss/accuracy every this many steps (and at the end).
    config.eval_max_batches = 0  # Cap on validation batches per evaluation; 0 means the whole split.
    config.decode_eval_examples = 0  # Translate this many eval examples at each evaluation (BLEU, exact match).
    config.decode_eval_method = "greedy"  # Decoding used for those: greedy is fast; "beam" is what is reported.
    config.num_logged_translations = 3  # Sample translations shown in the log at each evaluation.
    config.checkpoint_best_metric = ""  # Also keep the best checkpoint by this eval metric (e.g. "eval/bleu").
    config.checkpoint_every_steps = 1000  # Save a checkpoint every this many steps (and at the end).
    config.keep_checkpoints = 3  # Keep this many most recent checkpoints.
    config.async_checkpoints = True  # Write checkpoints in the background while training goes on.
    # "START,COUNT": a jax.profiler trace of train steps START+1 ... START+COUNT into WORKDIR/tensorboard
    # (TensorBoard's Profile tab, or xprof / Perfetto). "": no profile.
    config.profile_steps = ""
    return config


def register_jax_flags() -> None:
    """Makes JAX's own settings command-line flags (``--jax_platforms=cpu``, ``--jax_log_compiles``) of an
    absl program; once per process, however many entry points a process loads (tests load several)."""
    import jax
    from absl import flags

    if "jax_platforms" not in flags.FLAGS:
        jax.config.config_with_absl()


def with_preset(config: ml_collections.ConfigDict, preset_name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """Sets ``config.model`` to a ``transformer.PRESETS`` size, then applies ``overrides``."""
    from flaxformer_lite.transformer import PRESETS  # Local: keeps the module's import list short.
    config.model_preset = preset_name
    config.model.update({**PRESETS[preset_name], **overrides})
    return config


def build(section: str, config: ml_collections.ConfigDict, **replace: Any):
    """The frozen dataclass of one section, e.g. ``build('model', config, vocab_size=...)``.

    Errors name the section and field (``config.model.d_model: ...``), so a bad flag value is reported in
    the terms the user typed. ``train.total_steps`` 0 becomes ``config.num_train_steps`` here, the one place
    a TrainConfig is made from a config.
    """
    cls = SECTIONS[section]
    values = {**config[section].to_dict(), **replace}
    if section == "train" and not values.get("total_steps"):
        values["total_steps"] = config.num_train_steps  # The schedule spans the run unless told otherwise.
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise errors.ConfigError(f"config.{section}: unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        # "TrainConfig.learning_rate: must be > 0" -> "config.train.learning_rate: must be > 0", the flag's name.
        message = str(error).removeprefix(f"{cls.__name__}.")
        where = f"config.{section}." if message != str(error) else f"config.{section}: "
        raise errors.ConfigError(where + message) from error


def axis_rules(config: ml_collections.ConfigDict) -> tuple:
    """The run's logical-axis rules (``config.axis_rules``) in flax's form."""
    return sharding.axis_rules(config.axis_rules.to_dict())


def profile_steps(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """``config.profile_steps`` as (start, count), or None when no profile is asked for."""
    text = str(config.get("profile_steps") or "").strip()
    if not text:
        return None
    try:
        start, count = (int(part) for part in text.split(","))
    except ValueError:
        start, count = -1, 0
    if start < 0 or count < 1:
        raise errors.ConfigError(f"config.profile_steps={text!r}: expected START,COUNT with START >= 0 and COUNT >= 1, "
                                 "e.g. --config.profile_steps=10,5")
    return start, count


def validate(config: ml_collections.ConfigDict) -> None:
    """Builds every section once, so that a bad value fails before anything is written to disk."""
    for section in SECTIONS:
        build(section, config)
    if config.num_train_steps < 1:
        raise errors.ConfigError(f"config.num_train_steps must be >= 1, got {config.num_train_steps}")
    if config.max_train_seconds < 0:
        raise errors.ConfigError(f"config.max_train_seconds must be >= 0 (0: no limit), got {config.max_train_seconds}")
    if config.checkpoint_best_metric and not config.decode_eval_examples:
        raise errors.ConfigError("config.checkpoint_best_metric needs config.decode_eval_examples > 0")
    if config.checkpoint_best_metric and config.checkpoint_every_steps % config.eval_every_steps:
        raise errors.ConfigError("config.checkpoint_best_metric needs checkpoint_every_steps to be a multiple of "
                                 "eval_every_steps, so that every checkpoint has a metric")
    axis_rules(config)
    profile_steps(config)
    for name in ("eval_every_steps", "checkpoint_every_steps", "metrics_every_steps", "keep_checkpoints",
                 "stop_check_every_steps"):
        if config[name] < 1:
            raise errors.ConfigError(f"config.{name} must be >= 1, got {config[name]}")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_default)


def from_json(text: str) -> ml_collections.ConfigDict:
    """The inverse of ``to_json``: rebuilds a run's config from its ``config.json``."""
    restored = default_config()
    values = json.loads(text)
    # Runs saved before the vocabulary was padded have unpadded tables: keep reading them as they are.
    values.setdefault("model", {}).setdefault("vocab_pad_multiple", 1)
    for key, value in values.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                restored[key][sub_key] = sub_value
        else:
            restored[key] = tuple(value) if isinstance(value, list) else value
    return restored


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, types.SimpleNamespace)):
        return list(value)
    return str(value)
