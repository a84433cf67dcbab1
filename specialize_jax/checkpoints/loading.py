"""Reading a checkpoint of any format: whole on the host, or only this process's shards.

`load_checkpoint` and `load_checkpoint_sharded` resolve a path (`directories.resolve_checkpoint`),
then dispatch once to the reader of its format (`hf`, `t5x_legacy`, `orbax_pytree`). Names and
shapes are checked before any array data is read (`param_tree.CheckpointMismatchError`).

Sharded reads, terms:
  targets: the params tree as `jax.ShapeDtypeStruct`s with a `.sharding` each (the mesh shardings a
    job computes from the config); a sharded read returns `jax.Array`s with exactly these shapes,
    dtypes and shardings.
  this process's shards: the distinct slices its addressable devices hold (replicas on several
    local devices are read once). Nothing else is read: T5X zarr arrays are read slice by slice
    with TensorStore, orbax arrays by orbax with the target shardings, and each slice is cast to
    the target dtype on its own, so no host holds a whole parameter it does not shard fully.
    HF weights are read whole on the host, converted, then only this process's slices are put on
    its devices (the conversion reshapes whole tensors).
  read stats: the parameter bytes of this process's shards against the checkpoint's total (at
    the target dtype), and the bytes TensorStore fetched from storage during the read (its
    `/tensorstore/kvstore/<driver>/bytes_read` counters: compressed bytes, chunk metadata and
    whole chunks included, so an array stored as one chunk is fetched whole).
"""
import dataclasses
import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from specialize_jax.checkpoints import directories
from specialize_jax.checkpoints import hf
from specialize_jax.checkpoints import orbax_pytree
from specialize_jax.checkpoints import param_tree
from specialize_jax.checkpoints import t5x_legacy
from specialize_jax.model.config import T5Config

# {format: (directory, config, dtype) -> (config, float32 numpy params)}.
_LOADERS = {'hf': hf.load_hf, 't5x': t5x_legacy.load_t5x, 'orbax': orbax_pytree.load_orbax}


def load_checkpoint(path: os.PathLike, fmt: str = 'auto', config: Any = None,
                    dtype: Optional[str] = None) -> Tuple[T5Config, Dict[str, Any]]:
  """(config, float32 numpy params) from an HF, T5X legacy or orbax checkpoint.

  `path` may be a model directory (its latest step is used), a step directory or the T5X
  `checkpoint` file; `config` (T5Config, preset name or dict) is checked against the checkpoint
  and, for T5X and orbax, replaces shape inference; `dtype` ('float32' or 'bfloat16') is the
  compute dtype of the returned config (None: `config`'s, else the stored config's, else float32).
  """
  fmt, resolved = directories.resolve_checkpoint(path, fmt)
  return _LOADERS[fmt](resolved, config=config, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Sharded reads


# Kvstore drivers that store bytes themselves; the others (ocdbt, zip, ...) read through them.
_STORAGE_DRIVERS = ('file', 'gcs', 'gcs_grpc', 's3', 'http', 'memory')


@dataclasses.dataclass(frozen=True)
class ReadStats:
  """What a sharded read asked for and fetched, in bytes ("read stats" in the module docstring)."""
  shard_bytes: int
  total_bytes: int
  fetched_bytes: int

  def describe(self) -> str:
    mb = lambda n: f'{n / 1e6:.2f} MB'
    return (f'fetched {mb(self.fetched_bytes)} from storage for this process\'s shards '
            f'({mb(self.shard_bytes)} of the {mb(self.total_bytes)} of parameters)')


def storage_bytes_read() -> int:
  """Bytes TensorStore has read from storage in this process so far (all drivers)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  total = 0
  for metric in ts.experimental_collect_matching_metrics('/tensorstore/kvstore/'):
    parts = metric['name'].strip('/').split('/')
    if len(parts) == 4 and parts[3] == 'bytes_read' and parts[2] in _STORAGE_DRIVERS:
      total += sum(int(v.get('value', 0)) for v in metric.get('values', []))
  return total


def _index_key(index: Tuple[slice, ...]) -> Tuple[Tuple[Any, Any, Any], ...]:
  return tuple((s.start, s.stop, s.step) for s in index)


def _local_shards(target: Any) -> Dict[Tuple, Tuple[slice, ...]]:
  """{key: index} of the distinct slices of `target` this process's devices hold."""
  shards = {}
  for index in target.sharding.addressable_devices_indices_map(tuple(target.shape)).values():
    shards.setdefault(_index_key(index), index)
  return shards


def _slice_size(shape: Tuple[int, ...], index: Tuple[slice, ...]) -> int:
  return int(np.prod([len(range(*s.indices(d))) for s, d in zip(index, shape)]))


def _make_array(target: Any, shard_values: Mapping[Tuple, np.ndarray]) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.make_array_from_callback(tuple(target.shape), target.sharding,
                                      lambda index: shard_values[_index_key(index)],
                                      dtype=target.dtype)


def _check_targets(flat_targets: Mapping[str, Any], shapes: Mapping[str, Tuple[int, ...]],
                   source: str) -> None:
  param_tree.check_shapes(
      shapes, {n: tuple(t.shape) for n, t in flat_targets.items()}, source,
      hint='The targets (the model\'s params with their shardings) must name every parameter of '
      'the checkpoint with its shape; check the model config.')
  for name, target in flat_targets.items():
    if getattr(target, 'sharding', None) is None:
      raise ValueError(f'Target {name} has no sharding; give every leaf a '
                       'jax.ShapeDtypeStruct(shape, dtype, sharding=...).')


# What a per-format sharded reader returns: the config, the flat targets, {name: {shard key:
# index}} of this process's shards, and the flat params as `jax.Array`s.
_ShardedRead = Tuple[T5Config, Dict[str, Any], Dict[str, Dict[Tuple, Tuple[slice, ...]]],
                     Dict[str, Any]]


def _targets(targets_fn: Callable[[T5Config], Any], config: T5Config,
             shapes: Mapping[str, Tuple[int, ...]], source: str):
  """(targets, flat targets, this process's shards), the targets checked against `shapes`."""
  targets = targets_fn(config)
  flat_targets = param_tree.flatten_params(targets)
  _check_targets(flat_targets, shapes, source)
  return targets, flat_targets, {n: _local_shards(t) for n, t in flat_targets.items()}


def _make_arrays(flat_targets: Mapping[str, Any],
                 values: Dict[str, Dict[Tuple, np.ndarray]]) -> Dict[str, Any]:
  """{name: jax.Array} from {name: {shard key: slice}}; host slices freed leaf by leaf."""
  return {n: _make_array(flat_targets[n], values.pop(n)) for n in list(values)}


def _read_t5x_shards(directory, targets_fn, config, dtype, source) -> _ShardedRead:
  config, flat, specs, shapes = t5x_legacy.open_t5x(directory, config, dtype)
  _, flat_targets, shards = _targets(targets_fn, config, shapes, source)
  values = t5x_legacy.read_slices(flat, specs, shards,
                                  {n: t.dtype for n, t in flat_targets.items()})
  return config, flat_targets, shards, _make_arrays(flat_targets, values)


def _read_orbax_shards(directory, targets_fn, config, dtype, source) -> _ShardedRead:
  config, path, subtree = orbax_pytree.open_orbax(directory, config, dtype)
  shapes = {n: tuple(m.shape) for n, m in param_tree.flatten_params(subtree).items()}
  targets, flat_targets, shards = _targets(targets_fn, config, shapes, source)
  restored = orbax_pytree.restore_sharded(directory, path, targets)
  return config, flat_targets, shards, param_tree.flatten_params(restored)


def _read_hf_shards(directory, targets_fn, config, dtype, source) -> _ShardedRead:
  config, host_params = hf.load_hf(directory, config=config, dtype=dtype)
  host_flat = param_tree.flatten_params(host_params)
  shapes = {n: tuple(np.shape(v)) for n, v in host_flat.items()}
  _, flat_targets, shards = _targets(targets_fn, config, shapes, source)
  values = {n: {k: np.asarray(v[i], flat_targets[n].dtype) for k, i in shards[n].items()}
            for n, v in host_flat.items()}
  return config, flat_targets, shards, _make_arrays(flat_targets, values)


# {format: (directory, targets_fn, config, dtype, source) -> _ShardedRead}.
_SHARDED_READERS = {'hf': _read_hf_shards, 't5x': _read_t5x_shards,
                    'orbax': _read_orbax_shards}


def load_checkpoint_sharded(path: os.PathLike, targets_fn: Callable[[T5Config], Any],
                            fmt: str = 'auto', config: Any = None, dtype: Optional[str] = None
                            ) -> Tuple[T5Config, Dict[str, Any], ReadStats]:
  """(config, params as sharded `jax.Array`s, read stats), reading only this process's shards.

  Args:
    path, fmt, config, dtype: as for `load_checkpoint` (names and shapes are checked before any
      array data is read).
    targets_fn: config -> targets (see the module docstring); called once the config is known,
      since T5X and orbax checkpoints may imply their architecture only by their shapes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  fmt, resolved = directories.resolve_checkpoint(path, fmt)
  source = f'{fmt} checkpoint {resolved}'
  fetched_before = storage_bytes_read()
  config, flat_targets, shards, flat_params = _SHARDED_READERS[fmt](
      resolved, targets_fn, config, dtype, source)
  itemsize = lambda t: np.dtype(t.dtype).itemsize
  stats = ReadStats(
      shard_bytes=sum(_slice_size(tuple(t.shape), i) * itemsize(t)
                      for n, t in flat_targets.items() for i in shards[n].values()),
      total_bytes=sum(int(np.prod(t.shape)) * itemsize(t) for t in flat_targets.values()),
      fetched_bytes=storage_bytes_read() - fetched_before)
  logging.info('Read %s (process %d): %s.', source, jax.process_index(), stats.describe())
  return config, param_tree.unflatten_params(flat_params), stats
