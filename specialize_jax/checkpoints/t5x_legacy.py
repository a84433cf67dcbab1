"""T5X's legacy checkpoint layout: a msgpack file plus zarr arrays (the public FlanT5 checkpoints).

On disk, a step directory `checkpoint_<step>/` holds a msgpack file named `checkpoint` (flax
msgpack: arrays as ext types) with `{'version': 3, 'optimizer': {'target': params, 'state':
{'step', 'param_states'}}}`. Each leaf is an inline array or a TensorStore spec (a dict, or a
`PLACEHOLDER://<name>` string in T5X's orbax-aggregate era) pointing at a zarr v2 array (gzip
chunks) in the same directory, named like `target.encoder.layers_0.attention.key.kernel`.

Only `target` (the params) is read; optimizer state is skipped. The layout carries no architecture,
so without `config=` it is inferred from the shapes (`param_tree.infer_config`). `save_t5x` writes
what T5X's `Checkpointer.save` writes (version 3), for tests and for handing params to T5X.
"""
import asyncio
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

from etils import epath
import numpy as np

from specialize_jax.errors import ConfigError
from specialize_jax.checkpoints import param_tree
from specialize_jax.checkpoints import staging
from specialize_jax.model.config import T5Config

CHECKPOINT_FILE = 'checkpoint'
VERSION = 3
_PLACEHOLDER_PREFIX = 'PLACEHOLDER://'
# T5X aims for ~64 MiB zarr chunks.
_CHUNK_BYTES = 64 * 2**20


def _is_ts_spec(value: Any) -> bool:
  return isinstance(value, Mapping) and 'driver' in value and (
      'kvstore' in value or 'path' in value)


def _ts_kvstore(checkpoint_dir: str, relative: str) -> Dict[str, Any]:
  """A TensorStore kvstore for the zarr directory `relative` under a local or gs:// directory."""
  relative = relative.strip('/') + '/'
  match = re.fullmatch(r'gs://([^/]+)/?(.*)', checkpoint_dir, re.DOTALL)
  if match:
    return {'driver': 'gcs', 'bucket': match.group(1),
            'path': os.path.join(match.group(2), relative)}
  return {'driver': 'file', 'path': os.path.join(checkpoint_dir, relative)}


def _zarr_spec(leaf: Any, checkpoint_dir: str) -> Optional[Dict[str, Any]]:
  """The TensorStore spec to open for a msgpack leaf, or None for an inline array.

  Relative paths are resolved against the checkpoint directory whatever driver wrote them
  (file, gfile or gcs with T5X's dummy bucket), so checkpoints copied between disks and buckets
  still open.
  """
  if isinstance(leaf, str):
    if not leaf.startswith(_PLACEHOLDER_PREFIX):
      raise ValueError(f'Unknown string leaf {leaf!r} in {checkpoint_dir}/checkpoint.')
    relative = leaf[len(_PLACEHOLDER_PREFIX):]
    return {'driver': 'zarr', 'kvstore': _ts_kvstore(checkpoint_dir, relative)}
  if not _is_ts_spec(leaf):
    return None
  kvstore = leaf.get('kvstore', {})
  relative = kvstore.get('path') if isinstance(kvstore, Mapping) else None
  relative = relative or leaf.get('path')  # tensorstore<0.1.14 kept the path at the top level
  if not relative:
    raise ValueError(f'TensorStore spec without a path in {checkpoint_dir}/checkpoint: {leaf}')
  spec = {'driver': leaf['driver'], 'kvstore': _ts_kvstore(checkpoint_dir, relative)}
  return spec


def _leaf_shape(leaf: Any, spec: Optional[Dict[str, Any]]) -> Optional[Tuple[int, ...]]:
  if spec is None:
    return tuple(np.shape(leaf))
  if isinstance(leaf, Mapping) and 'shape' in leaf.get('metadata', {}):
    return tuple(leaf['metadata']['shape'])
  return None  # PLACEHOLDER leaves: the zarr metadata has the shape


async def _read_zarr_leaves(specs: Mapping[str, Dict[str, Any]]) -> Dict[str, np.ndarray]:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  context = ts.Context({'file_io_concurrency': {'limit': 64}})

  async def read(spec):
    store = await ts.open(spec, open=True, read=True, context=context)
    return await store.read()

  names = list(specs)
  arrays = await asyncio.gather(*(read(specs[n]) for n in names))
  return dict(zip(names, arrays))


def _run(coroutine):
  """Runs a coroutine whether or not an event loop is running in this thread (e.g. Jupyter)."""
  try:
    asyncio.get_running_loop()
  except RuntimeError:
    return asyncio.run(coroutine)
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(asyncio.run, coroutine).result()


def open_t5x(directory: os.PathLike, config: Any, dtype: Optional[str]):
  """(config, flat msgpack leaves, {name: zarr spec or None}, {name: shape}) of a legacy T5X
  checkpoint, names and shapes checked; only the msgpack file and zarr metadata are read."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  directory = epath.Path(directory)
  ckpt_dir = os.fspath(directory)
  source = f'T5X checkpoint {ckpt_dir}'
  contents = serialization.msgpack_restore((directory / CHECKPOINT_FILE).read_bytes())
  if not isinstance(contents, Mapping):
    raise ConfigError(f'{ckpt_dir}/{CHECKPOINT_FILE} is not a T5X msgpack checkpoint.')
  if contents.get('version', 0) and 'optimizer' in contents:
    contents = contents['optimizer']
  _, target = param_tree.find_params(contents, source)
  flat = param_tree.flatten_params(target, is_leaf=_is_ts_spec)
  specs = {name: _zarr_spec(leaf, ckpt_dir) for name, leaf in flat.items()}
  shapes = {name: _leaf_shape(flat[name], specs[name]) for name in flat}
  unknown = {n: specs[n] for n, shape in shapes.items() if shape is None}
  if unknown:
    # PLACEHOLDER leaves: the shapes are in the zarr metadata (opening reads only that).
    shapes.update(_run(_zarr_shapes(unknown)))
  config = param_tree.resolve_config(config, shapes, source, dtype)
  param_tree.check_params(shapes, config, source)
  return config, flat, specs, shapes


async def _zarr_shapes(specs: Mapping[str, Dict[str, Any]]) -> Dict[str, Tuple[int, ...]]:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  names = list(specs)
  stores = await asyncio.gather(*(ts.open(specs[n], open=True, read=True) for n in names))
  return {n: tuple(store.shape) for n, store in zip(names, stores)}


def load_t5x(directory: os.PathLike, config: Any = None,
             dtype: Optional[str] = None) -> Tuple[T5Config, Dict[str, Any]]:
  """Reads the params (`target`) of a legacy T5X checkpoint directory, skipping optimizer state."""
  config, flat, specs, _ = open_t5x(directory, config, dtype)
  arrays = _run(_read_zarr_leaves({n: s for n, s in specs.items() if s is not None}))
  params = {n: np.asarray(arrays[n] if specs[n] is not None else flat[n], np.float32)
            for n in flat}
  return config, param_tree.unflatten_params(params)


def _chunk_shape(shape: Tuple[int, ...], itemsize: int, chunk_bytes: int) -> Tuple[int, ...]:
  """Halves the largest divisible dimension until a chunk fits `chunk_bytes` (T5X's aim)."""
  chunk = list(shape)
  while chunk and np.prod(chunk) * itemsize > chunk_bytes:
    dims = [i for i in range(len(chunk)) if chunk[i] % 2 == 0 and chunk[i] > 1]
    if not dims:
      break
    largest = max(dims, key=lambda i: chunk[i])
    chunk[largest] //= 2
  return tuple(chunk)


def save_t5x(params: Mapping[str, Any], directory: os.PathLike, step: int = 0,
             optimizer_state: bool = True, inline_max_size: int = 0,
             chunk_bytes: int = _CHUNK_BYTES, overwrite: bool = False,
             durable: bool = True) -> str:
  """Writes params in T5X's legacy layout (what T5X's `Checkpointer.save` writes, version 3).

  `directory` is the step directory (`.../checkpoint_<step>`). Leaves with at most
  `inline_max_size` elements go inline into the msgpack (T5X does this for unpartitioned
  arrays); the rest are gzip zarr arrays named `target.<path with dots>`. With
  `optimizer_state`, zero Adafactor-style factored moments (`state.param_states.*.v_row/v_col/v`)
  are written too, as in the public checkpoints. `durable=False` skips fsync per array (fast
  for tests; a crash may then leave a renamed but incomplete directory). Mainly for tests and for
  handing params to T5X.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top
  directory, tmp = staging.staging_dir(directory, overwrite)

  context = ts.Context({'file_io_sync': durable})

  async def write_all(arrays: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    async def write(name, array):
      if array.size <= inline_max_size:
        return array
      relative = name.replace('/', '.')
      spec = {'driver': 'zarr', 'dtype': array.dtype.name,
              'kvstore': {'driver': 'file', 'path': relative},
              'metadata': {'compressor': {'id': 'gzip'}, 'shape': list(array.shape),
                           'chunks': list(_chunk_shape(array.shape, array.dtype.itemsize,
                                                       chunk_bytes))}}
      absolute = dict(spec, kvstore={'driver': 'file', 'path': os.path.join(tmp, relative)})
      store = await ts.open(absolute, create=True, open=True, context=context)
      await store.write(array)
      return ts.Spec(spec).to_json()  # relative, so the checkpoint can move

    names = list(arrays)
    written = await asyncio.gather(*(write(n, arrays[n]) for n in names))
    return dict(zip(names, written))

  try:
    arrays = {f'target/{n}': np.asarray(v)
              for n, v in param_tree.flatten_params(params).items()}
    if optimizer_state:
      for name, value in list(arrays.items()):
        state = 'state/param_states/' + name[len('target/'):]
        if value.ndim == 2:
          arrays[f'{state}/v_row'] = np.zeros(value.shape[:1], np.float32)
          arrays[f'{state}/v_col'] = np.zeros(value.shape[1:], np.float32)
        else:
          arrays[f'{state}/v'] = np.zeros(value.shape, np.float32)
    written = param_tree.unflatten_params(_run(write_all(arrays)))
    written.setdefault('state', {})['step'] = np.int32(step)
    with open(os.path.join(tmp, CHECKPOINT_FILE), 'wb') as f:  # local: staging dir
      f.write(serialization.msgpack_serialize({'version': VERSION, 'optimizer': written}))
  except BaseException:
    staging.remove_staging(tmp)
    raise
  staging.replace_dir(tmp, directory, overwrite)
  return directory


# ---------------------------------------------------------------------------------------------
# Sharded reads (see `loading.load_checkpoint_sharded`)


def read_slices(flat: Mapping[str, Any], specs: Mapping[str, Optional[Dict[str, Any]]],
                slices: Mapping[str, Mapping[Any, Tuple[slice, ...]]],
                dtypes: Mapping[str, Any]) -> Dict[str, Dict[Any, np.ndarray]]:
  """{name: {key: array}}: the requested slices of every parameter, each cast to its dtype.

  Args:
    flat, specs: as `open_t5x` returns them.
    slices: {name: {key: index}}, the slices to read of each parameter.
    dtypes: {name: dtype} to cast each slice to, slice by slice.

  Zarr arrays are read slice by slice with TensorStore (all concurrently), so no whole array is
  fetched unless it is stored as one chunk; inline leaves are already in memory.
  """
  zarr = {n: s for n, s in specs.items() if s is not None}
  values = _run(_read_zarr_shards(zarr, {n: slices[n] for n in zarr},
                                  {n: dtypes[n] for n in zarr}))
  for name in flat:
    if specs[name] is None:  # inline in the msgpack file
      host = np.asarray(flat[name])
      values[name] = {k: np.asarray(host[i], dtypes[name]) for k, i in slices[name].items()}
  return values


async def _read_zarr_shards(specs: Mapping[str, Dict[str, Any]],
                            shards: Mapping[str, Mapping[Tuple, Tuple[slice, ...]]],
                            dtypes: Mapping[str, Any]) -> Dict[str, Dict[Tuple, np.ndarray]]:
  """{name: {shard key: array}}: every leaf's slices read concurrently, each cast on its own."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  context = ts.Context({'file_io_concurrency': {'limit': 64}})

  async def read(name):
    store = await ts.open(specs[name], open=True, read=True, context=context)
    keys = list(shards[name])
    values = await asyncio.gather(*(store[shards[name][k]].read() for k in keys))
    return {k: np.asarray(v, dtypes[name]) for k, v in zip(keys, values)}

  names = list(specs)
  results = await asyncio.gather(*(read(n) for n in names))
  return dict(zip(names, results))
