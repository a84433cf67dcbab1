"""The device mesh, logical-axis rules and the shardings of parameters and batches.

Terms:
  mesh: the devices arranged as a 2-D grid with axes `('data', 'model')`; `model` has
    `num_partitions` devices (tensor parallelism), `data` the rest (data parallelism, and with the
    FSDP rules parameter sharding too). Axis types are Auto, so XLA propagates shardings through
    T5X-style layers (Explicit axes would need every layer annotated).
  logical axis: a name the model gives an array dimension (`batch`, `length`, `embed`, `mlp`,
    `heads`, `kv`, `joined_kv`, `vocab`, `relpos_buckets`); models never name mesh axes.
  logical axis rules: an ordered table `((logical_name, mesh_axis_or_None), ...)`. Each dimension
    takes the first rule naming it whose mesh axis is not yet used by another dimension of the same
    array (flax's resolution, as T5X); unnamed or unmatched dimensions are replicated.
  FSDP rules: T5X's `parameter_partitioning_dims=2`: `embed` maps to `data` as well, so parameters
    shard over both mesh axes while activations, whose `batch` dimension claims `data` first, keep
    `embed` unsharded.
  partitioning context: the logical rules plus the mesh, which flax's `nn.with_logical_constraint`
    needs *while tracing* to turn the model's activation annotations into sharding constraints;
    without both it silently does nothing.

Multi-host: every process runs the same program; `runtime.distributed` connects them,
`data_layout` says which rows of each global batch a process feeds (its data shard), and
`global_batch` assembles every process's rows into one global array.
"""
import contextlib
import dataclasses
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from specialize_jax.errors import ConfigError

LogicalAxisRules = Tuple[Tuple[str, Any], ...]

MESH_AXES = ('data', 'model')

# Logical axes that are never sharded whatever the plan (T5X's common replicated rules).
_REPLICATED_RULES = (
    ('relpos_buckets', None),
    ('abspos_buckets', None),
    ('length', None),
    ('layers', None),
    ('stack', None),
    ('mlp_activations', None),
)


def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1) -> LogicalAxisRules:
  """T5X's standard rules table for the `('data', 'model')` mesh.

  Args:
    activation_partitioning_dims: 2 also shards activations' `embed` on `model`.
    parameter_partitioning_dims: 2 also shards parameters' `embed` on `data` (FSDP / ZeRO-3).
  """
  rules = [('batch', 'data'), ('vocab', 'model'), ('mlp', 'model'), ('heads', 'model'),
           ('kv', None), ('joined_kv', 'model')]
  dims = (activation_partitioning_dims, parameter_partitioning_dims)
  if dims == (1, 1):
    rules.append(('embed', None))
  elif dims == (2, 1):
    rules.append(('embed', 'model'))
  elif dims == (1, 2):
    rules.append(('embed', 'data'))
  elif dims == (2, 2):
    rules += [('embed', 'model'), ('embed', 'data')]
  else:
    raise ConfigError(f'activation_partitioning_dims={activation_partitioning_dims}, '
                      f'parameter_partitioning_dims={parameter_partitioning_dims} is not '
                      'supported; each must be 1 or 2.')
  return tuple(rules) + _REPLICATED_RULES


STANDARD_LOGICAL_AXIS_RULES = standard_logical_axis_rules()


def fsdp_logical_axis_rules() -> LogicalAxisRules:
  """Standard rules with parameters' `embed` sharded on `data` (T5X's
  `parameter_partitioning_dims=2`): each parameter is split over all devices."""
  return standard_logical_axis_rules(parameter_partitioning_dims=2)


def _normalize_rules(rules: Sequence[Sequence[Any]]) -> LogicalAxisRules:
  """Rules as a hashable tuple of pairs (gin and json hand over lists), checked."""
  normalized = []
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'Logical axis rule {rule!r} must be a pair (logical_name, mesh_axis); '
                       'check PartitioningConfig.logical_axis_rules.')
    name, mesh_axes = rule
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    for axis in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f'Logical axis rule {rule!r} names mesh axis {axis!r}; the mesh has '
                         f'{MESH_AXES} (or None for replicated). Fix '
                         'PartitioningConfig.logical_axis_rules.')
    normalized.append((name, mesh_axes))
  return tuple(normalized)


@dataclasses.dataclass(frozen=True)
class PartitioningConfig:
  """How the devices are split and the model's logical axes mapped onto them.

  Attributes:
    num_partitions: devices on the `model` mesh axis; the `data` axis gets
      `num_devices // num_partitions`.
    logical_axis_rules: the rules table (see the module docstring).
  """
  num_partitions: int = 1
  logical_axis_rules: LogicalAxisRules = STANDARD_LOGICAL_AXIS_RULES

  def __post_init__(self):
    if self.num_partitions < 1:
      raise ConfigError(f'PartitioningConfig.num_partitions={self.num_partitions} must be >= 1.')
    object.__setattr__(self, 'logical_axis_rules', _normalize_rules(self.logical_axis_rules))


def make_mesh(config: PartitioningConfig,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A `('data', 'model')` mesh with Auto axis types over `devices` (default: all devices).

  The device order is `jax.make_mesh`'s: on TPU it follows the chips' torus positions, so that
  neighbours along the mesh axes are neighbours on the interconnect and the step's collectives
  (the gradient reduction over `data`, FSDP's gathers, the model axis's reductions) run on short
  rings. One host's chips then sit at interleaved `data` coordinates (a v4 host's 2x2 chips: rows
  0, 4, 8 and 12 of a v4-32 data axis), which `DataLayout` feeds as they are. The alternative, a
  host-by-host order (a contiguous data block per host), is never shorter: around the `data` axis
  it takes 30 chip-grid hops against 16 on a v5e-16, 22 against 14 on the v5p-64 XXL mesh, and as
  many on v4 slices (`topologies.ring_hops`; `specialize plan` prints both). `devices` may be
  stand-ins (`topologies.stand_in_devices`).
  """
  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  if num_devices % config.num_partitions:
    raise ConfigError(f'PartitioningConfig.num_partitions={config.num_partitions} does not '
                      f'divide the {num_devices} devices; set '
                      f'--gin.PartitioningConfig.num_partitions to a divisor of {num_devices}.')
  shape = (num_devices // config.num_partitions, config.num_partitions)
  devices = _ordered_for_test(devices)
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except NotImplementedError:
    # jax.make_mesh splits physical axes on v5e only; a v6e 8x8 torus needs it for a model axis
    # of 4 (no logical axis of 16 x 4 matches whole physical axes): split them, as on v5e.
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


# Test hook: CPU fake devices always come in process order; `interleaved` gives mesh position i to
# process i % P (its local device i // P), the way a TPU slice interleaves hosts along `data`, so
# multi-process CPU tests run the layouts a slice gets through the same feeding code.
DEVICE_ORDER_ENV = 'SPECIALIZE_TEST_DEVICE_ORDER'


def _ordered_for_test(devices: Sequence[Any]) -> Sequence[Any]:
  order = os.environ.get(DEVICE_ORDER_ENV, '')
  if not order:
    return devices
  if order != 'interleaved':
    raise ConfigError(f'{DEVICE_ORDER_ENV}={order!r}: the only order is "interleaved" (or unset).')
  by_process: Dict[int, list] = {}
  for device in sorted(devices, key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(device.process_index, []).append(device)
  hosts = list(by_process.values())
  if len({len(h) for h in hosts}) != 1:
    raise ConfigError(f'{DEVICE_ORDER_ENV}=interleaved needs the same device count per process.')
  return [hosts[i % len(hosts)][i // len(hosts)] for i in range(len(devices))]


def _is_logical_leaf(x: Any) -> bool:
  """A logical spec: a PartitionSpec or a tuple of names/None (as `network.logical_axes` gives).

  Exactly `tuple`: optax states are NamedTuples, and an empty one (EmptyState) is no spec.
  """
  is_plain_tuple = type(x) is tuple  # pylint: disable=unidiomatic-typecheck
  return isinstance(x, PartitionSpec) or (
      is_plain_tuple and all(a is None or isinstance(a, str) for a in x))


def as_logical_specs(logical_axes_tree: Any) -> Any:
  """The tree with every tuple of logical names turned into a (logical) `PartitionSpec` leaf."""
  return jax.tree_util.tree_map(lambda x: PartitionSpec(*x), logical_axes_tree,
                                is_leaf=_is_logical_leaf)


def logical_to_mesh_specs(logical_axes_tree: Any, rules: LogicalAxisRules) -> Any:
  """Mesh `PartitionSpec`s for a tree of logical specs."""
  return nn.logical_to_mesh(as_logical_specs(logical_axes_tree), rules)


def param_shardings(logical_axes_tree: Any, mesh: Mesh, rules: LogicalAxisRules) -> Any:
  """`NamedSharding`s for a tree of logical specs (tuples of names or PartitionSpecs)."""
  return nn.logical_to_mesh_sharding(as_logical_specs(logical_axes_tree), mesh, rules)


def check_shardable(shapes: Any, shardings: Any, what: str = 'parameter') -> None:
  """Raises before compiling when a sharded dimension does not divide its mesh axes.

  Args:
    shapes: a tree of arrays or `ShapeDtypeStruct`s.
    shardings: the matching tree of `NamedSharding`s.
    what: the kind of array, for the message.
  """
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_shardings = jax.tree_util.tree_leaves(shardings)
  for (path, leaf), sharding in zip(flat_shapes, flat_shardings):
    for dim, axes in enumerate(sharding.spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
      if leaf.shape[dim] % size:
        raise ValueError(
            f'{what} {jax.tree_util.keystr(path)} of shape {tuple(leaf.shape)} has dimension {dim} '
            f'of size {leaf.shape[dim]}, sharded on mesh axes {axes} of {size} devices, which do '
            f'not divide it; choose --gin.PartitioningConfig.num_partitions dividing the model '
            'dimensions, or change the logical_axis_rules.')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data`, the rest replicated; valid for any rank >= 1."""
  return NamedSharding(mesh, PartitionSpec('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (scalars, keys, metrics)."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(batch_size: int, mesh: Mesh, num_microbatches: int = 1) -> None:
  """Raises unless `batch_size` splits evenly over the data axis (per micro-batch)."""
  data_size = mesh.shape['data']
  if batch_size % data_size:
    raise ConfigError(f'BATCH_SIZE={batch_size} is not divisible by the data axis ({data_size} '
                      f'devices); set --gin.BATCH_SIZE to a multiple of {data_size}.')
  if num_microbatches < 1:
    raise ConfigError(f'num_microbatches={num_microbatches} must be >= 1.')
  if batch_size % (data_size * num_microbatches):
    multiple = data_size * num_microbatches
    raise ConfigError(f'BATCH_SIZE={batch_size} does not split into {num_microbatches} '
                      f'micro-batches that each divide the data axis ({data_size} devices); set '
                      f'--gin.BATCH_SIZE to a multiple of {multiple} or change num_microbatches.')


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """Which rows of every global batch this process feeds (T5X's data layout, for any device order).

  The mesh's `data` axis has `data_size` coordinates; coordinate c holds rows
  `[c * R, (c + 1) * R)` of every global batch (`R = rows_per_coordinate = batch_size / data_size`).
  A process feeds the rows of every coordinate its devices hold, concatenated in global order,
  which is what `jax.make_array_from_process_local_data` takes (it places a process's
  non-contiguous slices itself). On CPU and GPU hosts the coordinates are one contiguous block per
  process; on a TPU slice they are interleaved (`make_mesh`). Processes holding the same
  coordinates (the `model` axis spans hosts) are replicas and feed identical rows.

  Attributes:
    batch_size: rows of the global batch.
    data_size: coordinates of the mesh's `data` axis.
    coordinates: the sorted `data` coordinates this process's devices hold.
  """
  batch_size: int
  data_size: int
  coordinates: Tuple[int, ...]

  @property
  def rows_per_coordinate(self) -> int:
    return self.batch_size // self.data_size

  @property
  def local_batch_size(self) -> int:
    return len(self.coordinates) * self.rows_per_coordinate

  @property
  def row_ranges(self) -> Tuple[Tuple[int, int], ...]:
    """`(start, stop)` of each run of consecutive global rows this process feeds, in order."""
    ranges = []
    for c in self.coordinates:
      start, stop = c * self.rows_per_coordinate, (c + 1) * self.rows_per_coordinate
      if ranges and ranges[-1][1] == start:
        ranges[-1] = (ranges[-1][0], stop)
      else:
        ranges.append((start, stop))
    return tuple(ranges)

  @property
  def row_indices(self) -> np.ndarray:
    """int64 `[local_batch_size]`: the global rows this process feeds, in feeding order."""
    return np.concatenate([np.arange(a, b) for a, b in self.row_ranges])

  @property
  def shards(self) -> Tuple[Tuple[int, int], ...]:
    """The fewest equal, aligned blocks of the global batch covering this process's rows, as
    `(index, count)`: block `index` of `count` is rows `[index * B / count, (index + 1) * B /
    count)`.

    One block when the coordinates are contiguous and aligned (CPU, GPU, one TPU host): exactly
    the one-shard-per-process reading of T5X. An input pipeline reads each block as a data shard
    of its own and concatenates them (`input_pipeline.TrainIterator`).
    """
    held = self.coordinates
    for size in range(len(held), 0, -1):
      if len(held) % size or self.data_size % size:
        continue
      blocks = [held[i:i + size] for i in range(0, len(held), size)]
      if all(b[0] % size == 0 and list(b) == list(range(b[0], b[0] + size)) for b in blocks):
        return tuple((b[0] // size, self.data_size // size) for b in blocks)
    raise AssertionError(f'unreachable: blocks of one coordinate always fit {held}')

  def describe(self) -> str:
    """One line for the logs, e.g. `rows 0-1, 8-9 of 16 (data coordinates [0, 4] of 8)`."""
    rows = ', '.join(f'{a}-{b - 1}' if b - a > 1 else f'{a}' for a, b in self.row_ranges)
    return (f'rows {rows} of {self.batch_size} (data coordinates {list(self.coordinates)} of '
            f'{self.data_size})')


def data_rows_by_process(device_grid: np.ndarray) -> Dict[int, Tuple[int, ...]]:
  """`{process_index: sorted data coordinates its devices hold}` of a `[data, model]` grid."""
  rows: dict = {}
  for (data_index, _), device in np.ndenumerate(device_grid):
    rows.setdefault(device.process_index, set()).add(data_index)
  return {p: tuple(sorted(r)) for p, r in sorted(rows.items())}


def data_layout(mesh: Mesh, batch_size: int, process_index: Optional[int] = None) -> DataLayout:
  """This process's `DataLayout` from which `data` coordinates of `mesh` its devices hold.

  Raises when `batch_size` does not divide the data axis.
  """
  process_index = jax.process_index() if process_index is None else process_index
  return layout_of_grid(np.asarray(mesh.devices), batch_size, process_index)


def layout_of_grid(device_grid: np.ndarray, batch_size: int, process_index: int) -> DataLayout:
  """`data_layout` of a `[data, model]` grid of anything with a `process_index` (devices, or
  stand-ins for the hosts of a topology this process does not run on: `topologies`)."""
  data_size = device_grid.shape[0]
  if batch_size % data_size:
    raise ConfigError(f'BATCH_SIZE={batch_size} is not divisible by the data axis ({data_size} '
                      f'devices); set --gin.BATCH_SIZE to a multiple of {data_size}.')
  rows = data_rows_by_process(device_grid)
  if process_index not in rows:
    raise ValueError(f'Process {process_index} holds no device of the mesh; every process must '
                     'contribute devices (check PartitioningConfig and the process count).')
  return DataLayout(batch_size=batch_size, data_size=data_size, coordinates=rows[process_index])


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 layout: Optional[DataLayout] = None) -> dict:
  """One global `jax.Array` per feature, batch-sharded on `data`, from this process's rows.

  Each process passes its `layout.local_batch_size` rows, `layout.row_indices` of the global batch
  in that order (replicas pass the same rows); the global shape is explicit, so JAX places them on
  the right devices also when the coordinates are interleaved or the model axis spans processes.
  Without `layout` (one process only), the rows are the whole batch.
  """
  sharding = batch_sharding(mesh)
  result = {}
  for name, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f'Batch feature {name!r} is a scalar; every feature needs a leading batch '
                       'dimension.')
    if layout is None:
      if jax.process_count() > 1:
        raise ValueError('global_batch needs the data layout with several processes (what each '
                         'feeds depends on the device order): pass data_layout(mesh, batch_size).')
      layout = data_layout(mesh, value.shape[0])
    if value.shape[0] != layout.local_batch_size:
      raise ValueError(f'Batch feature {name!r} has {value.shape[0]} rows; this process feeds '
                       f'{layout.local_batch_size} of the global batch of {layout.batch_size} '
                       f'({layout.describe()}).')
    global_shape = (layout.batch_size,) + value.shape[1:]
    result[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return result




@contextlib.contextmanager
def axis_rules(rules: LogicalAxisRules) -> Iterator[None]:
  """Makes `rules` the active logical axis rules (flax's `nn.logical_axis_rules`)."""
  with nn.logical_axis_rules(rules):
    yield


@contextlib.contextmanager
def partitioning_context(mesh: Mesh, rules: LogicalAxisRules) -> Iterator[None]:
  """Rules plus the mesh, so the model's `nn.with_logical_constraint` calls take effect.

  Enter it *inside* the function given to `jax.jit` (it is read at trace time). It sets the
  abstract mesh, which is allowed while tracing; `jax.set_mesh` is not (it raises inside jit).
  """
  with axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield
