"""One optimizer update, pure and jitted once with explicit shardings, with gradient accumulation.

Terms:
  micro-batch: one of `num_microbatches` equal slices of the batch, processed one after another
    under `lax.scan` so that activations exist for one slice at a time. Slice `i` takes rows
    `i, i + k, i + 2k, ...` (a free reshape `[B, ...] -> [B/k, k, ...]` then an index on axis 1),
    not a contiguous block: each data-parallel device holds a contiguous block of rows, so strided
    slices keep every micro-batch spread over all devices with no data movement (contiguous
    slices, T5X's choice, would leave devices idle or force a reshuffle). Needs
    `B % (data_axis * k) == 0` (`partitioning.check_batch_divisible`).
  accumulation weight: how a micro-batch's loss counts in the batch's loss, chosen so that k
    micro-batches give exactly the full-batch loss and gradient:
      * with a batch-dependent loss normalizing factor (NUM_REAL_TARGET_TOKENS,
        NUM_TOTAL_TARGET_TOKENS, AVERAGE_PER_SEQUENCE) the full loss is `sum_i S_i / sum_i N_i`
        (S: summed token losses, N: the factor) and micro-batch `i` reports `S_i / N_i`, so it is
        weighted by `N_i / sum_j N_j`; a micro-batch with fewer real target tokens counts less.
      * with no factor (a plain sum, T5X's default) or a constant one, the full loss is the sum of
        the micro-batch losses (weight 1).
    Gradients are accumulated as `sum_i N_i * grad_i` and divided once at the end. Extra losses
    (e.g. distillation) are assumed to follow the model's loss normalizing factor; one that
    normalizes differently is averaged with the same weights and matches only approximately.
  skipped micro-batches: with `skip_empty_microbatches`, the micro-batches after the last one with
    a positive loss weight (padding rows of the original's batching, `prepared.micro_batches`, which
    fills micro-batches in order) are not computed: the loop stops there. They would add exactly
    zero to every sum.
  metrics: float32 scalars computed inside the step, each equal for any number of micro-batches
    of the same batch: `loss`, `cross_ent_loss`, `z_loss`, `kl` (and any other extra-loss metric)
    combined like the loss; the per-token means `accuracy` and `teacher_mass` weighted by target
    tokens (`_TOKEN_MEAN_METRICS`; an extra loss reporting another per-token mean adds its name
    there); `num_target_tokens` and `num_examples` (examples, i.e. segments when packed) summed;
    `learning_rate` (the rate this update used); `grad_norm` (global L2 norm of the accumulated
    gradient, before any clipping).
"""
import functools
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from specialize_jax.model import losses
from specialize_jax.training import optimizers
from specialize_jax.training import partitioning
from specialize_jax.training.train_state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = Mapping[str, jax.Array]

# Metrics that add up over micro-batches rather than average like the loss.
_SUMMED_METRICS = ('num_tokens', 'num_examples')
# Means over a micro-batch's weighted target tokens: combined weighted by `num_tokens`, not like
# the loss (with no loss normalizing factor the loss adds up, and these came out multiplied by k).
_TOKEN_MEAN_METRICS = ('accuracy', 'teacher_mass')


def microbatch(batch: Batch, index: Any, num_microbatches: int) -> Batch:
  """Micro-batch `index` of `batch`: rows `index, index + k, ...` (see the module docstring)."""

  def take(x):
    rows = x.shape[0] // num_microbatches
    x = x.reshape((rows, num_microbatches) + x.shape[1:])  # [B/k, k, ...]
    return lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)  # [B/k, ...]

  return {name: take(value) for name, value in batch.items()}


def _uses_batch_factor(model: Any) -> bool:
  """Whether the model divides its loss by a factor computed from the batch."""
  return isinstance(model.loss_normalizing_factor, (str, losses.SpecialLossNormalizingFactor))


def _accumulation_weight(model: Any, batch: Batch) -> jax.Array:
  """`N_i` of the module docstring: the micro-batch's loss normalizing factor, or 1."""
  if not _uses_batch_factor(model):
    return jnp.ones((), jnp.float32)
  factor, _ = losses.get_loss_normalizing_factor_and_weights(model.loss_normalizing_factor, batch)
  return jnp.asarray(factor, jnp.float32)


def _accumulate_gradients(model: Any, params: Any, batch: Batch, dropout_rng: jax.Array,
                          num_microbatches: int, grad_shardings: Any = None,
                          skip_empty_microbatches: bool = False
                          ) -> Tuple[Any, Mapping[str, jax.Array]]:
  """Gradients and metrics of the whole batch, one micro-batch at a time."""
  grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
  if num_microbatches == 1:
    (_, metrics), grads = grad_fn(params, batch, dropout_rng)
    return grads, dict(metrics)

  def one(index):
    micro = microbatch(batch, index, num_microbatches)
    (_, metrics), grads = grad_fn(params, micro, jax.random.fold_in(dropout_rng, index))
    return _accumulation_weight(model, micro), grads, metrics

  def constrain(grads):
    if grad_shardings is None:
      return grads
    return lax.with_sharding_constraint(grads, grad_shardings)

  _, grad_shapes, metric_shapes = jax.eval_shape(one, 0)
  zeros = lambda tree: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)

  def body(carry, index):
    weight_sum, grad_sum, metric_sum = carry
    weight, grads, metrics = one(index)
    # A micro-batch without real targets divides 0 by 0 in the model's loss; it weighs nothing
    # in the full batch, so its NaNs are dropped rather than poisoning the sums.
    weighted = lambda x: jnp.where(weight > 0, weight * x, 0.0)
    grad_sum = constrain(jax.tree_util.tree_map(lambda a, g: a + weighted(g), grad_sum, grads))
    new_metric_sum = {}
    for name, value in metrics.items():
      if name in _TOKEN_MEAN_METRICS:
        value = value * metrics['num_tokens']
      elif name not in _SUMMED_METRICS:
        value = weighted(value)
      new_metric_sum[name] = metric_sum[name] + value.astype(jnp.float32)
    return (weight_sum + weight, grad_sum, new_metric_sum), None

  init = (jnp.zeros((), jnp.float32), constrain(zeros(grad_shapes)), zeros(metric_shapes))
  if skip_empty_microbatches:
    # Up to the last micro-batch with a weighted token; a loop with a traced trip count, so XLA
    # still hoists the FSDP weight gathers out of it (a `lax.cond` per micro-batch would keep one
    # gather per micro-batch inside its branch).
    weights = batch['decoder_loss_weights']
    weights = weights.reshape((weights.shape[0] // num_microbatches, num_microbatches, -1))
    has_weight = jnp.any(weights > 0, axis=(0, 2))  # [num_microbatches]
    used = jnp.max(jnp.where(has_weight, jnp.arange(num_microbatches) + 1, 0))
    weight_sum, grad_sum, metric_sum = lax.fori_loop(
        0, used, lambda index, carry: body(carry, index)[0], init)
  else:
    (weight_sum, grad_sum, metric_sum), _ = lax.scan(body, init, jnp.arange(num_microbatches))

  divisor = weight_sum if _uses_batch_factor(model) else jnp.ones((), jnp.float32)
  grads = jax.tree_util.tree_map(lambda g: g / divisor, grad_sum)
  metrics = {}
  for name, value in metric_sum.items():
    if name in _SUMMED_METRICS:
      metrics[name] = value
    elif name in _TOKEN_MEAN_METRICS:
      metrics[name] = value / jnp.maximum(metric_sum['num_tokens'], 1e-8)
    else:
      metrics[name] = value / divisor
  return grads, metrics


def _learning_rate(opt_state: Any, step: jax.Array,
                   learning_rate_fn: Optional[Callable[[Any], Any]]) -> jax.Array:
  """The rate of this update: `learning_rate_fn(step)`, else the one `make_optimizer` records."""
  if learning_rate_fn is not None:
    return jnp.asarray(learning_rate_fn(step), jnp.float32)
  return optimizers.current_learning_rate(opt_state)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, model: Any,
               optimizer: optax.GradientTransformation, num_microbatches: int = 1,
               learning_rate_fn: Optional[Callable[[Any], Any]] = None,
               grad_shardings: Any = None,
               skip_empty_microbatches: bool = False) -> Tuple[TrainState, Metrics]:
  """One update of `state` on `batch`; pure (jit it, or use `make_train_step`).

  Args:
    state: the current train state.
    batch: `[batch, ...]` features (see `models`); the batch size must divide by
      `num_microbatches`.
    rng: the run's base key; dropout uses `fold_in(rng, state.step)` (and the micro-batch index).
    model: an `EncoderDecoderModel` (anything with `loss_fn` and `loss_normalizing_factor`).
    optimizer: the optax transformation whose state `state.opt_state` is.
    num_microbatches: gradient accumulation steps (see the module docstring).
    learning_rate_fn: the schedule, for the `learning_rate` metric; by default it is read from
      the optimizer state that `optimizers.make_optimizer` builds.
    grad_shardings: optional shardings the accumulated gradients are constrained to (the params').
    skip_empty_microbatches: skip micro-batches without loss weight (see the module docstring).

  Returns:
    `(new_state, metrics)`; metrics as in the module docstring.
  """
  batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]
  if num_microbatches < 1 or batch_size % num_microbatches:
    raise ValueError(f'The batch of {batch_size} rows does not split into num_microbatches='
                     f'{num_microbatches} equal micro-batches; change --gin.BATCH_SIZE or '
                     'num_microbatches.')
  dropout_rng = jax.random.fold_in(rng, state.step)
  grads, model_metrics = _accumulate_gradients(model, state.params, batch, dropout_rng,
                                               num_microbatches, grad_shardings,
                                               skip_empty_microbatches)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)

  metrics = {('num_target_tokens' if name == 'num_tokens' else name): value.astype(jnp.float32)
             for name, value in model_metrics.items()}
  metrics['learning_rate'] = _learning_rate(opt_state, state.step, learning_rate_fn)
  metrics['grad_norm'] = grad_norm.astype(jnp.float32)
  return new_state, metrics


def make_train_step(model: Any, optimizer: optax.GradientTransformation,
                    state_shardings: TrainState, mesh: Mesh, num_microbatches: int = 1, *,
                    rules: partitioning.LogicalAxisRules = partitioning.STANDARD_LOGICAL_AXIS_RULES,
                    learning_rate_fn: Optional[Callable[[Any], Any]] = None,
                    skip_empty_microbatches: bool = False
                    ) -> Callable[[TrainState, Batch, jax.Array], Tuple[TrainState, Metrics]]:
  """`train_step` jitted once: state donated, batch split on `data`, key and metrics replicated.

  The model's activation constraints are traced under `rules` and `mesh`. Drop your reference to
  the old state after each call (its buffers are donated).
  """
  step_fn = functools.partial(train_step, model=model, optimizer=optimizer,
                              num_microbatches=num_microbatches, learning_rate_fn=learning_rate_fn,
                              grad_shardings=state_shardings.params,
                              skip_empty_microbatches=skip_empty_microbatches)

  def traced(state, batch, rng):
    # Shapes are static here, so this fails before compiling.
    partitioning.check_batch_divisible(jax.tree_util.tree_leaves(batch)[0].shape[0], mesh,
                                       num_microbatches)
    with partitioning.partitioning_context(mesh, rules):
      return step_fn(state, batch, rng)

  replicated = partitioning.replicated(mesh)
  return jax.jit(traced, in_shardings=(state_shardings, partitioning.batch_sharding(mesh),
                                       replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
