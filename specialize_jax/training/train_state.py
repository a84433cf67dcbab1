"""The train state (step, parameters, optimizer state), its logical axes, and sharded creation.

Terms:
  train state: `TrainState(step, params, opt_state)`, the whole of what a training step reads
    and writes; checkpoints save exactly this tree (plus the data position).
  state logical axes: a `TrainState` whose leaves are logical `PartitionSpec`s: parameters take
    `network.logical_axes`; an optimizer-state leaf that mirrors a parameter (AdamW's `mu`/`nu`,
    Adafactor's unfactored `v`) takes that parameter's axes; a factored Adafactor moment takes
    the parameter's axes minus the reduced dimension (`v_row` drops optax's `d0`, the largest
    dimension, `v_col` drops `d1`, the second largest); placeholders and counters are replicated.
  born sharded: each device allocates only its shard, because the initializer runs under
    `jax.jit` with `out_shardings`; full parameters never gather on one device.
"""
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
import numpy as np
import optax

from specialize_jax.model import network
from specialize_jax.model.config import T5Config
from specialize_jax.training import partitioning

Params = Any


class TrainState(flax.struct.PyTreeNode):
  """What one training step reads and writes.

  Attributes:
    step: int32 scalar, updates applied so far (the optimizer's own counters agree with it).
    params: float32 parameters in T5X's tree.
    opt_state: the optax state of `params`.
  """
  step: jax.Array
  params: Params
  opt_state: Any


def _model_config(model: Any) -> T5Config:
  """The T5Config of an `EncoderDecoderModel` (or of a config itself)."""
  config = model if isinstance(model, T5Config) else getattr(model, 'config', None)
  if not isinstance(config, T5Config):
    raise ValueError(f'Expected an EncoderDecoderModel or a T5Config, got {type(model)}.')
  return config


def _path_names(path) -> Tuple[Any, ...]:
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path)


def _optimizer_leaf_axes(leaf: Any, names: Tuple[Any, ...], param_axes: dict,
                         param_shapes: dict) -> PartitionSpec:
  """Logical axes of one optimizer-state leaf found at path `names` (see the module docstring)."""
  ndim = len(leaf.shape)
  # The parameter this leaf mirrors: the longest path suffix that names a parameter.
  for start in range(len(names)):
    key = names[start:]
    if key in param_axes:
      break
  else:
    return PartitionSpec(*([None] * ndim))
  axes, shape = param_axes[key], tuple(param_shapes[key].shape)
  field = names[start - 1] if start > 0 else None
  if tuple(leaf.shape) == shape:
    return PartitionSpec(*axes)
  if ndim == len(shape) - 1:
    # A factored moment: the parameter with one dimension reduced. optax removes d0 (the largest
    # dimension by np.argsort, repeated here to break ties its way) from v_row, d1 from v_col.
    order = np.argsort(shape)
    removed = {'v_row': int(order[-1]), 'v_col': int(order[-2])}.get(field)
    candidates = [d for d in range(len(shape)) if shape[:d] + shape[d + 1:] == tuple(leaf.shape)]
    if removed is None and len(candidates) == 1:
      removed = candidates[0]
    if removed in candidates:
      return PartitionSpec(*(axes[:removed] + axes[removed + 1:]))
  # Placeholders (optax keeps `[1]` zeros for the unused moments) and anything unrecognised.
  return PartitionSpec(*([None] * ndim))


def state_logical_axes(model_config: T5Config, optimizer: optax.GradientTransformation,
                       params_shapes: Optional[Params] = None) -> TrainState:
  """Logical `PartitionSpec`s for every leaf of the train state (see the module docstring)."""
  if params_shapes is None:
    params_shapes = network.param_shapes(model_config)
  params_axes = partitioning.as_logical_specs(network.logical_axes(model_config))
  is_spec = lambda x: isinstance(x, PartitionSpec)
  flat_axes = {_path_names(p): tuple(a) for p, a in
               jax.tree_util.tree_flatten_with_path(params_axes, is_leaf=is_spec)[0]}
  flat_shapes = {_path_names(p): s for p, s in
                 jax.tree_util.tree_flatten_with_path(params_shapes)[0]}
  if flat_axes.keys() != flat_shapes.keys():
    raise ValueError(f'params_shapes do not match the parameter tree of the model config: '
                     f'{sorted(flat_axes.keys() ^ flat_shapes.keys())[:5]} differ.')
  opt_shapes = jax.eval_shape(optimizer.init, params_shapes)
  opt_axes = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _optimizer_leaf_axes(leaf, _path_names(path), flat_axes, flat_shapes),
      opt_shapes)
  return TrainState(step=PartitionSpec(), params=params_axes, opt_state=opt_axes)


def state_shardings(model_config: T5Config, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: partitioning.LogicalAxisRules) -> TrainState:
  """`NamedSharding`s of the train state on `mesh` under `rules`."""
  return partitioning.param_shardings(state_logical_axes(model_config, optimizer), mesh, rules)


def _init_state(config: T5Config, optimizer: optax.GradientTransformation,
                rng: jax.Array) -> TrainState:
  params = nn.meta.unbox(network.init_boxed(config, rng))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def abstract_train_state(model: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
                         rules: partitioning.LogicalAxisRules) -> Tuple[TrainState, TrainState]:
  """`(ShapeDtypeStruct tree with .sharding, shardings)` of the state, allocating nothing;
  the target for restoring a checkpoint straight into its shards."""
  config = _model_config(model)
  params = network.param_shapes(config)  # Traced once per config.
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(optimizer.init, params))
  shardings = state_shardings(config, optimizer, mesh, rules)
  partitioning.check_shardable(shapes, shardings, 'train state leaf')
  abstract = jax.tree_util.tree_map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes,
      shardings)
  return abstract, shardings


def abstract_params(model: Any, mesh: Mesh, rules: partitioning.LogicalAxisRules) -> Params:
  """The params tree as `ShapeDtypeStruct`s with their mesh shardings (what the train state's
  params are), allocating nothing: the targets for reading a checkpoint straight into its shards.
  Raises before compiling when a sharded dimension does not divide its mesh axes."""
  config = _model_config(model)
  shapes = network.param_shapes(config)
  shardings = partitioning.param_shardings(network.logical_axes(config), mesh, rules)
  partitioning.check_shardable(shapes, shardings)
  return jax.tree_util.tree_map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes,
      shardings)


def _host_params(params: Params, shapes: Params) -> Params:
  """`params` checked against the model's tree and cast to its (float32) dtypes on the host."""
  flat_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  flat_params = {_path_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  expected = {_path_names(p) for p, _ in flat_shapes}
  if flat_params.keys() != expected:
    missing = sorted(expected - flat_params.keys())[:5]
    extra = sorted(flat_params.keys() - expected)[:5]
    raise ValueError(f'Initial parameters do not match the model: missing {missing}, unexpected '
                     f'{extra}; check the checkpoint against the model gin file.')
  leaves = []
  for path, shape in flat_shapes:
    value = flat_params[_path_names(path)]
    if tuple(value.shape) != tuple(shape.shape):
      raise ValueError(f'Initial parameter {"/".join(map(str, _path_names(path)))} has shape '
                       f'{tuple(value.shape)}, the model expects {tuple(shape.shape)}; check the '
                       'model config (e.g. vocab_size) against the checkpoint.')
    leaves.append(value if isinstance(value, jax.Array) and value.dtype == shape.dtype
                  else np.asarray(value, shape.dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def create_train_state(model: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
                       rules: partitioning.LogicalAxisRules, rng: jax.Array,
                       init_params_fn: Optional[Callable[[], Params]] = None
                       ) -> Tuple[TrainState, TrainState]:
  """A born-sharded train state at step 0 and its shardings.

  Args:
    model: an `EncoderDecoderModel` (or a `T5Config`).
    optimizer: the optax transformation.
    mesh, rules: where and how to shard (see `partitioning`).
    rng: initializer key (unused when `init_params_fn` is given).
    init_params_fn: returns initial parameters (e.g. a checkpoint's host numpy arrays); they are
      put straight onto their shards and only the optimizer state is initialised under jit.

  Returns:
    `(state, state_shardings)`.
  """
  config = _model_config(model)
  abstract, shardings = abstract_train_state(config, optimizer, mesh, rules)
  if init_params_fn is None:
    init = jax.jit(lambda key: _init_state(config, optimizer, key), out_shardings=shardings)
    return init(rng), shardings
  params = _host_params(init_params_fn(), abstract.params)
  params = jax.device_put(params, shardings.params)

  def init_optimizer(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))

  init = jax.jit(init_optimizer, in_shardings=(shardings.params,), out_shardings=shardings,
                 donate_argnums=(0,))
  return init(params), shardings
