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
  gradient reduction (`gradient_reduction`, GRADIENT_REDUCTION in gin): where the sum of the
    gradient over the `data` mesh axis (each data shard holds other rows of the batch) happens.
      * 'per_microbatch' (default): every micro-batch's gradient is reduced over `data` to the
        parameters' sharding before it is added to the accumulator, so the loop holds one gradient
        reduction per micro-batch (a reduce-scatter under FSDP, an all-reduce under data
        parallelism), and the accumulator is sharded like the parameters.
      * 'once': each micro-batch is split into its data shards' rows, `[data, rows / data, ...]`,
        and the gradient is computed per shard under `jax.vmap(..., spmd_axis_name='data')` (the
        model's activation rules lose their `data` axis, which the vmapped axis takes), so each
        device computes the partial gradient of its own rows and nothing is reduced in the loop.
        The accumulator is `[data, *param]`, sharded on `data` along its first axis and like the
        parameters (without `data`) along the rest: every device holds a full-size (under FSDP,
        not data-sharded) float32 partial gradient, and one more for the micro-batch being added.
        After the loop one sum over that axis, constrained to the parameters' sharding, reduces
        once per step. Each data shard's rows count as a micro-batch of their own (accumulation
        weight and all), which gives the same sums; dropout masks differ from 'per_microbatch'
        (a shard's key folds in its index too), with the same distribution. With one micro-batch,
        or without `grad_shardings` (no mesh), the two are the same computation.
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import flax.linen as nn
import optax

from specialize_jax.errors import ConfigError
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

# Where the gradient is reduced over the data axis (see the module docstring).
GRADIENT_REDUCTIONS = ('per_microbatch', 'once')


def check_gradient_reduction(gradient_reduction: str) -> None:
  """Raises a `ConfigError` naming the choices unless `gradient_reduction` is one of them."""
  if gradient_reduction not in GRADIENT_REDUCTIONS:
    raise ConfigError(f'gradient_reduction={gradient_reduction!r} is not one of '
                      f'{", ".join(repr(c) for c in GRADIENT_REDUCTIONS)}; set '
                      "--gin.GRADIENT_REDUCTION=\"'per_microbatch'\" or \"'once'\".")


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


def _without_data(mesh_axes: Any) -> Any:
  """A `PartitionSpec` entry with the `data` mesh axis left out."""
  if mesh_axes == 'data':
    return None
  if isinstance(mesh_axes, tuple):
    kept = tuple(a for a in mesh_axes if a != 'data')
    return kept if len(kept) > 1 else (kept[0] if kept else None)
  return mesh_axes


def partial_gradient_shardings(grad_shardings: Any) -> Any:
  """The shardings of the 'once' accumulator `[data, *param]` (see the module docstring): the
  first axis on `data`, the rest like the parameters without `data`."""
  return jax.tree_util.tree_map(
      lambda s: NamedSharding(s.mesh, PartitionSpec('data', *map(_without_data, s.spec))),
      grad_shardings)


def _rules_without_data(rules: Any) -> Any:
  """Logical-axis rules with the `data` mesh axis mapped to nothing (for the per-shard vmap,
  whose vmapped axis takes `data`)."""
  return tuple((name, _without_data(mesh_axes)) for name, mesh_axes in rules)


def _accumulate_gradients(model: Any, params: Any, batch: Batch, dropout_rng: jax.Array,
                          num_microbatches: int, grad_shardings: Any = None,
                          skip_empty_microbatches: bool = False,
                          gradient_reduction: str = 'per_microbatch'
                          ) -> Tuple[Any, Mapping[str, jax.Array]]:
  """Gradients and metrics of the whole batch, one micro-batch at a time."""
  check_gradient_reduction(gradient_reduction)
  grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
  if num_microbatches == 1:
    (_, metrics), grads = grad_fn(params, batch, dropout_rng)
    return grads, dict(metrics)
  # 'once': the sums are kept per data shard (a leading `data` axis) and reduced after the loop.
  per_shard = gradient_reduction == 'once' and grad_shardings is not None
  if per_shard:
    mesh = jax.tree_util.tree_leaves(grad_shardings)[0].mesh
    data = mesh.shape['data']
    on_data = NamedSharding(mesh, PartitionSpec('data'))
    accumulator_shardings = partial_gradient_shardings(grad_shardings)
  else:
    accumulator_shardings = grad_shardings

  def one(index):
    micro = microbatch(batch, index, num_microbatches)
    key = jax.random.fold_in(dropout_rng, index)
    if not per_shard:
      (_, metrics), grads = grad_fn(params, micro, key)
      return _accumulation_weight(model, micro), grads, metrics
    # Rows of data shard `s` of the micro-batch: `[data, rows / data, ...]`, a local reshape.
    shards = lax.with_sharding_constraint(
        {name: value.reshape((data, value.shape[0] // data) + value.shape[1:])
         for name, value in micro.items()}, on_data)

    def shard_gradient(rows, shard):
      (_, metrics), grads = grad_fn(params, rows, jax.random.fold_in(key, shard))
      return _accumulation_weight(model, rows), grads, metrics

    with nn.logical_axis_rules(_rules_without_data(nn.get_logical_axis_rules())):
      return jax.vmap(shard_gradient, spmd_axis_name='data')(shards, jnp.arange(data))

  def constrain(tree, shardings):
    if shardings is None:
      return tree
    return lax.with_sharding_constraint(tree, shardings)

  def constrain_sums(weight_sum, grad_sum, metric_sum):
    grad_sum = constrain(grad_sum, accumulator_shardings)
    if per_shard:  # Every sum stays on its shard inside the loop.
      weight_sum, metric_sum = constrain((weight_sum, metric_sum), on_data)
    return weight_sum, grad_sum, metric_sum

  weight_shape, grad_shapes, metric_shapes = jax.eval_shape(one, 0)
  zeros = lambda tree: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)

  def body(carry, index):
    weight_sum, grad_sum, metric_sum = carry
    # `weight` and metrics: scalars, or `[data]` (one per shard) with 'once'.
    weight, grads, metrics = one(index)
    # A micro-batch (with 'once': a shard's rows of it) without real targets divides 0 by 0 in the
    # model's loss; it weighs nothing in the full batch, so its NaNs are dropped rather than
    # poisoning the sums.

    def weighted(x):
      w = weight.reshape(weight.shape + (1,) * (x.ndim - weight.ndim))
      return jnp.where(w > 0, w * x, 0.0)

    grad_sum = jax.tree_util.tree_map(lambda a, g: a + weighted(g), grad_sum, grads)
    new_metric_sum = {}
    for name, value in metrics.items():
      if name in _TOKEN_MEAN_METRICS:
        value = value * metrics['num_tokens']
      elif name not in _SUMMED_METRICS:
        value = weighted(value)
      new_metric_sum[name] = metric_sum[name] + value.astype(jnp.float32)
    return constrain_sums(weight_sum + weight, grad_sum, new_metric_sum), None

  init = constrain_sums(zeros(weight_shape), zeros(grad_shapes), zeros(metric_shapes))
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

  if per_shard:  # The one reduction over `data` of the step.
    total = lambda x: jnp.sum(x, axis=0)
    weight_sum = total(weight_sum)
    grad_sum = constrain(jax.tree_util.tree_map(total, grad_sum), grad_shardings)
    metric_sum = {name: total(value) for name, value in metric_sum.items()}
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
               skip_empty_microbatches: bool = False,
               gradient_reduction: str = 'per_microbatch') -> Tuple[TrainState, Metrics]:
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
    gradient_reduction: 'per_microbatch' or 'once', where the gradient is reduced over the data
      axis (see the module docstring); without `grad_shardings` (no mesh) both are the same.

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
                                               skip_empty_microbatches, gradient_reduction)
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
                    skip_empty_microbatches: bool = False,
                    gradient_reduction: str = 'per_microbatch'
                    ) -> Callable[[TrainState, Batch, jax.Array], Tuple[TrainState, Metrics]]:
  """`train_step` jitted once: state donated, batch split on `data`, key and metrics replicated.

  The model's activation constraints are traced under `rules` and `mesh`. Drop your reference to
  the old state after each call (its buffers are donated). `gradient_reduction`: see the module
  docstring.
  """
  check_gradient_reduction(gradient_reduction)
  step_fn = functools.partial(train_step, model=model, optimizer=optimizer,
                              num_microbatches=num_microbatches, learning_rate_fn=learning_rate_fn,
                              grad_shardings=state_shardings.params,
                              skip_empty_microbatches=skip_empty_microbatches,
                              gradient_reduction=gradient_reduction)

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
