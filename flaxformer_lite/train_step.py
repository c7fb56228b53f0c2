"""Train state, loss, optimizer, and the pure ``train_step`` / ``eval_step`` functions.

The step functions are plain module-level functions: bind the static pieces (model, optimizer, ``TrainConfig``)
with ``functools.partial`` and ``jax.jit`` the result with explicit shardings (see ``make_step_functions``).
Metrics are returned as *sums* (of losses, correct tokens, tokens) so that they add up exactly across
microbatches, devices and evaluation batches; ``summarize`` turns sums into means.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from flaxformer_lite import sharding
from flaxformer_lite.transformer import Transformer

_SCHEDULES = ("transformer", "rsqrt", "cosine", "constant")
_OPTIMIZERS = ("adam", "adamw", "adafactor")
_ON_NONFINITE = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization hyperparameters. Defaults are the paper's (5.3, 5.4)."""

    optimizer: str = "adam"  # "adam" (paper), "adamw" or "adafactor".
    schedule: str = "transformer"  # "transformer" (paper), "rsqrt", "cosine" or "constant".
    # The peak rate of rsqrt/cosine/constant (None: 1e-3); for "transformer", a multiplier of the paper's
    # d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (None: 1, the paper's rate).
    learning_rate: float | None = None
    warmup_steps: int = 4000  # Linear warm-up steps (paper: 4000).
    # Length of the schedule: the cosine decays to its end over it. 0 means ``config.num_train_steps``,
    # filled in by ``config.build('train', ...)``; set it to decay over another length.
    total_steps: int = 0
    adam_b1: float = 0.9  # Adam beta1 (paper 0.9).
    adam_b2: float = 0.98  # Adam beta2 (paper 0.98).
    adam_eps: float = 1e-9  # Adam epsilon (paper 1e-9).
    weight_decay: float = 0.0  # Decoupled weight decay (AdamW and Adafactor only).
    grad_clip_norm: float | None = None  # Clip gradients to this global norm; None disables clipping.
    label_smoothing: float = 0.1  # epsilon_ls of the paper (0.1).
    z_loss: float = 0.0  # Weight of log(Z)^2, which keeps the softmax normalizer near 1 (PaLM); 0 disables.
    microbatches: int = 1  # Gradient accumulation: split each batch into this many sequential parts.
    # A step whose loss or gradient norm is not finite: "stop" ends the run with an error naming the step
    # (the latest checkpoint stays the last one saved, from before it); "skip" leaves the parameters and
    # optimizer state as they were and goes on with the next batch (counted in train/nonfinite).
    on_nonfinite: str = "stop"

    def __post_init__(self):
        def fail(field: str, message: str):
            raise ValueError(f"TrainConfig.{field}: {message}, got {getattr(self, field)!r}")

        if self.schedule not in _SCHEDULES:
            fail("schedule", f"must be one of {_SCHEDULES}")
        if self.learning_rate is None:  # Frozen: set the schedule's default the way dataclasses do.
            object.__setattr__(self, "learning_rate", 1.0 if self.schedule == "transformer" else 1e-3)
        if self.optimizer not in _OPTIMIZERS:
            fail("optimizer", f"must be one of {_OPTIMIZERS}")
        if self.on_nonfinite not in _ON_NONFINITE:
            fail("on_nonfinite", f"must be one of {_ON_NONFINITE}")
        if not self.learning_rate > 0:  # Also refuses NaN.
            fail("learning_rate", "must be > 0")
        for name in ("label_smoothing", "adam_b1", "adam_b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, "must be in [0, 1)")
        for name in ("adam_eps", "weight_decay", "z_loss", "warmup_steps", "total_steps"):
            if not getattr(self, name) >= 0:
                fail(name, "must be >= 0" + (" (0: num_train_steps)" if name == "total_steps" else ""))
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            fail("grad_clip_norm", "must be > 0, or None for no clipping")
        if self.microbatches < 1:
            fail("microbatches", "must be >= 1")


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, so it can be sharded, donated and checkpointed."""

    step: jax.Array  # int32 scalar: optimizer updates done so far.
    params: Any  # Model parameters (unboxed).
    opt_state: Any  # Optimizer state.
    rng: jax.Array  # uint32 key data [2]: dropout keys are folded from it and the step.


# ---------------------------------------------------------------------------------------------------------
# Learning rate and optimizer
# ---------------------------------------------------------------------------------------------------------
def learning_rate_schedule(cfg: TrainConfig, d_model: int) -> optax.Schedule:
    """Learning rate as a function of the update count (0-based, as optax passes it)."""
    warmup = max(cfg.warmup_steps, 1)

    def transformer(count):
        # Paper 5.3: lr = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), with step counted from 1.
        step = count.astype(jnp.float32) + 1.0
        return cfg.learning_rate * d_model ** -0.5 * jnp.minimum(step ** -0.5, step * warmup ** -1.5)

    def rsqrt(count):
        step = count.astype(jnp.float32) + 1.0
        return cfg.learning_rate * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))

    if cfg.schedule == "transformer":
        return transformer
    if cfg.schedule == "rsqrt":
        return rsqrt
    if cfg.schedule == "cosine":
        if cfg.total_steps < 1:
            raise ValueError("TrainConfig.total_steps is 0: build the TrainConfig with config.build('train', "
                             "config), which makes it config.num_train_steps, or set it")
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(cfg.total_steps, cfg.warmup_steps + 1))
    return optax.constant_schedule(cfg.learning_rate)


def make_optimizer(cfg: TrainConfig, d_model: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, d_model)
    if cfg.optimizer == "adam":
        optimizer = optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)
    elif cfg.optimizer == "adamw":
        optimizer = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
    else:
        optimizer = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)
    if cfg.grad_clip_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), optimizer)
    return optimizer


# ---------------------------------------------------------------------------------------------------------
# Loss and metrics
# ---------------------------------------------------------------------------------------------------------
def cross_entropy_sums(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0,
                       z_loss: float = 0.0, pad_id: int = 0, vocab_size: int | None = None) -> dict[str, jax.Array]:
    """Summed per-token losses over non-pad targets, for logits over ``vocab_size`` ids (default: all of
    ``logits.shape[-1]``; the ids past it are a padded table's, whose logits the model masks).

    ``loss``: cross-entropy against the label-smoothed distribution (1 - eps on the target, eps / (V - 1) on
    every other real token), minus that distribution's entropy, so that a perfect prediction scores 0; plus
    ``z_loss * log(Z)^2``. ``nll``: plain cross-entropy (its mean gives perplexity). ``correct``: targets
    whose logit is the largest (argmax hits, ties counted as hits).
    """
    weights = (targets != pad_id).astype(jnp.float32)
    loss = _token_loss(logits, targets, label_smoothing, z_loss, vocab_size or logits.shape[-1])
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)  # Cheaper than an argmax.
    return {
        "loss": jnp.sum(loss * weights),
        "nll": jnp.sum(nll * weights),
        "correct": jnp.sum(correct * weights),
        "tokens": jnp.sum(weights),
    }


def _smoothing(label_smoothing: float, vocab: int) -> tuple[float, float, float]:
    """(probability of the target, of every other token, entropy) of the label-smoothed distribution q."""
    if label_smoothing == 0.0:
        return 1.0, 0.0, 0.0
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low))
    return confidence, low, entropy


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _token_loss(logits, targets, label_smoothing, z_loss, vocab_size):
    """Per-token ``sum_v q_v * -log p_v - H(q) + z_loss * log(Z)^2`` for logits ``[..., rows]`` of which
    the first ``vocab_size`` are real (q is 0 on the others).

    Its gradient is written out, ``(p - q) + 2 z_loss log(Z) p``, instead of left to autodiff, which would
    materialize several ``[tokens, V]`` intermediates and make the loss's backward pass slower.
    """
    return _token_loss_fwd(logits, targets, label_smoothing, z_loss, vocab_size)[0]


def _real(logits: jax.Array, vocab_size: int) -> jax.Array | bool:
    """Which ids of the last axis are real vocabulary (True when none is padding)."""
    return True if logits.shape[-1] == vocab_size else jnp.arange(logits.shape[-1]) < vocab_size


def _token_loss_fwd(logits, targets, label_smoothing, z_loss, vocab_size):
    logits32 = logits.astype(jnp.float32)
    confidence, low, entropy = _smoothing(label_smoothing, vocab_size)
    log_z = jax.nn.logsumexp(logits32, axis=-1)
    target_logit = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
    # sum_v q_v * (log Z - l_v), with q = low everywhere except `confidence` on the target.
    loss = log_z - confidence * target_logit - entropy
    if low:
        loss = loss - low * (jnp.sum(jnp.where(_real(logits, vocab_size), logits32, 0.0), axis=-1) - target_logit)
    if z_loss:
        loss = loss + z_loss * jnp.square(log_z)
    return loss, (logits, targets, log_z)


def _token_loss_bwd(label_smoothing, z_loss, vocab_size, residuals, g):
    logits, targets, log_z = residuals
    confidence, low, _ = _smoothing(label_smoothing, vocab_size)
    probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
    if z_loss:
        probs = probs * (1.0 + 2.0 * z_loss * log_z)[..., None]
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    q = jnp.where(is_target, confidence, jnp.where(_real(logits, vocab_size), low, 0.0))
    grad = (probs - q) * g[..., None]
    return grad.astype(logits.dtype), None


_token_loss.defvjp(_token_loss_fwd, _token_loss_bwd)


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Means from summed metrics: loss, accuracy and perplexity per target token."""
    tokens = max(float(sums["tokens"]), 1.0)
    nll = float(sums["nll"]) / tokens
    out = {"loss": float(sums["loss"]) / tokens, "nll": nll, "accuracy": float(sums["correct"]) / tokens,
           "perplexity": float(jnp.exp(jnp.minimum(nll, 50.0))), "tokens": float(sums["tokens"])}
    out.update({k: float(v) for k, v in sums.items() if k not in ("loss", "nll", "correct", "tokens")})
    return out


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------
MODEL_KEYS = ("inputs", "targets", "inputs_positions", "targets_positions", "inputs_segmentation",
              "targets_segmentation")


def _model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def _loss_sums(params, batch, dropout_rng, *, model: Transformer, cfg: TrainConfig):
    logits = model.apply({"params": params}, **_model_inputs(batch), deterministic=dropout_rng is None,
                         rngs=None if dropout_rng is None else {"dropout": dropout_rng})
    return cross_entropy_sums(logits, batch["targets"], cfg.label_smoothing, cfg.z_loss, model.config.pad_id,
                              model.config.target_vocab_size)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: Transformer,
               optimizer: optax.GradientTransformation, cfg: TrainConfig) -> tuple[TrainState, dict]:
    """One optimizer update on the mean loss per non-pad target token of the whole batch.

    With ``cfg.microbatches > 1`` the batch is split along its first axis and the gradients of the summed
    losses are accumulated in a ``lax.scan`` before dividing by the batch's total token count, which is the
    same update as one pass over the full batch, with the activation memory of one microbatch.
    """
    rng = jax.random.fold_in(state.rng, state.step)

    def sums_and_grads(params, microbatch, key):
        def loss_fn(p):
            sums = _loss_sums(p, microbatch, key, model=model, cfg=cfg)
            return sums["loss"], sums
        return jax.grad(loss_fn, has_aux=True)(params)

    if cfg.microbatches == 1:
        grads, sums = sums_and_grads(state.params, batch, rng)
    else:
        split = jax.tree_util.tree_map(
            lambda x: x.reshape(cfg.microbatches, x.shape[0] // cfg.microbatches, *x.shape[1:]), batch)

        def accumulate(carry, indexed):
            index, microbatch = indexed
            grads, sums = sums_and_grads(state.params, microbatch, jax.random.fold_in(rng, index))
            return jax.tree_util.tree_map(jnp.add, carry, (grads, sums)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
            sums_and_grads, state.params, jax.tree_util.tree_map(lambda x: x[0], split), rng))
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(cfg.microbatches), split))

    denominator = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
    if cfg.on_nonfinite == "skip":  # Keep the state as it was; the step counter (and the data) move on.
        params, opt_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                                   (params, opt_state), (state.params, state.opt_state))
    metrics = dict(sums, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict[str, jax.Array], *, model: Transformer, cfg: TrainConfig) -> dict:
    """Summed loss metrics of one batch without dropout (add them up over the split, then ``summarize``)."""
    return _loss_sums(params, batch, None, model=model, cfg=cfg)


# ---------------------------------------------------------------------------------------------------------
# Initialization and compilation on a mesh
# ---------------------------------------------------------------------------------------------------------
def _init_state(rng: jax.Array, batch_shape: tuple[int, int], *, model: Transformer,
                optimizer: optax.GradientTransformation) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.ones(batch_shape, jnp.int32)
    boxed = model.init(init_rng, dummy, dummy)["params"]
    params = nn.unbox(boxed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=state_rng)


def abstract_params(model: Transformer, mesh: Mesh, batch_shape: tuple[int, int] = (1, 8),
                    rules=sharding.LOGICAL_AXIS_RULES) -> Any:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves placed on ``mesh`` by the logical axis rules."""
    dummy = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
    boxed = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, x)["params"], dummy)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  nn.unbox(boxed), shardings)


def state_shardings(model: Transformer, optimizer: optax.GradientTransformation, mesh: Mesh,
                    batch_shape: tuple[int, int] = (1, 8),
                    rules=sharding.LOGICAL_AXIS_RULES) -> tuple[TrainState, TrainState]:
    """(abstract state, NamedShardings) for a TrainState, placed by the logical axis rules.

    Optimizer moments have the structure of the parameters and take their shardings; scalars (counts,
    step) and the rng are replicated.
    """
    init = functools.partial(_init_state, batch_shape=batch_shape, model=model, optimizer=optimizer)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    param_shardings = jax.tree_util.tree_map(lambda p: p.sharding,
                                             abstract_params(model, mesh, batch_shape, rules))
    # Optimizer moments mirror the parameters and take their shardings; counters and factored statistics
    # (Adafactor's row/column second moments, whose shapes differ from the parameter's) are replicated.
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda leaf, shard, param: shard if leaf.shape == param.shape else replicated,
        abstract.opt_state, param_shardings, abstract.params, transform_non_params=lambda _: replicated)
    shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings,
                           rng=sharding.replicated(mesh))
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings)
    return abstract, shardings


def create_train_state(seed: int, model: Transformer, optimizer: optax.GradientTransformation,
                       state_sharding: TrainState) -> TrainState:
    """Initializes parameters and optimizer state directly in their shards (never whole on one device)."""
    init = jax.jit(functools.partial(_init_state, batch_shape=(1, 8), model=model, optimizer=optimizer),
                   out_shardings=state_sharding)
    return init(jax.random.PRNGKey(seed))


def make_step_functions(model: Transformer, optimizer: optax.GradientTransformation, cfg: TrainConfig,
                        mesh: Mesh, state_sharding: TrainState,
                        rules=sharding.LOGICAL_AXIS_RULES) -> tuple[Callable, Callable]:
    """``jax.jit``-compiled (train_step, eval_step) with explicit shardings; the train state is donated.

    Both trace under ``sharding.activation_rules``, so the model's activation constraints hold on ``mesh``.
    """
    batch = sharding.batch_sharding(mesh)
    metrics = sharding.replicated(mesh)
    train = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer, cfg=cfg),
                    in_shardings=(state_sharding, batch), out_shardings=(state_sharding, metrics),
                    donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, model=model, cfg=cfg),
                       in_shardings=(state_sharding.params, batch), out_shardings=metrics)
    return sharding.under_rules(train, mesh, rules), sharding.under_rules(evaluate, mesh, rules)
