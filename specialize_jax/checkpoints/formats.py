"""Reading and writing T5 parameters in the three formats a FlanT5 student meets.

Terms:
  params: the nested dict of float32 numpy arrays named like T5X's T5 v1.1 network
    (`token_embedder/embedding`, `encoder/layers_0/attention/query/kernel`, ...).
  hf: a Hugging Face directory, `config.json` plus `model.safetensors` (or sharded safetensors
    with `model.safetensors.index.json`, or `pytorch_model.bin` when torch is importable).
  t5x (legacy): a T5X checkpoint directory (`checkpoint_<step>/`) holding a msgpack file named
    `checkpoint` (flax msgpack: arrays as ext types) with `{'version': 3, 'optimizer': {'target':
    params, 'state': {'step', 'param_states'}}}`. Each leaf is an inline array or a TensorStore
    spec (a dict, or a `PLACEHOLDER://<name>` string in T5X's orbax-aggregate era) pointing at a
    zarr v2 array (gzip chunks) in the same directory, named like
    `target.encoder.layers_0.attention.key.kernel`. The public FlanT5 checkpoints use this layout.
  orbax: an orbax PyTree checkpoint (OCDBT), either T5X's current `checkpoint_<step>/state` with
    `{'target': params, 'state': ...}` or a params checkpoint written by `save_orbax`.

Loading checks every name and shape before reading array data; a mismatch raises
`CheckpointMismatchError` listing missing, unexpected and wrong-shape parameters. T5X and orbax
checkpoints carry no architecture, so without `config=` it is inferred from the shapes (see
`infer_config`); `save_orbax` stores the config in the checkpoint's custom metadata.

The config returned keeps the compute dtype it was given (`config=`) or stored with (`save_orbax`
metadata), else T5Config's default (float32); an explicit `dtype=` replaces it. Params are float32
whatever the dtype.
"""
import asyncio
import atexit
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from etils import epath
import numpy as np

from specialize_jax.errors import ConfigError
from specialize_jax.data import storage
from specialize_jax.checkpoints import hf_conversion
from specialize_jax.model.config import T5Config

FORMATS = ('hf', 't5x', 'orbax')
HF_CONFIG_FILE = 'config.json'
HF_SAFETENSORS_FILE = 'model.safetensors'
HF_SAFETENSORS_INDEX_FILE = 'model.safetensors.index.json'
HF_TORCH_FILE = 'pytorch_model.bin'
HF_TORCH_INDEX_FILE = 'pytorch_model.bin.index.json'
T5X_CHECKPOINT_FILE = 'checkpoint'
T5X_VERSION = 3
# Orbax CheckpointManager step directories hold one directory per item; T5X names its item
# 'state', StandardSave without a name gives 'default'. Tried in this order.
ORBAX_ITEM_NAMES = ('state', 'params', 'default')
# Files of an orbax PyTree checkpoint (an item directory, or a `save_orbax` directory).
ORBAX_MARKERS = ('_METADATA', 'manifest.ocdbt')
_PLACEHOLDER_PREFIX = 'PLACEHOLDER://'
# Optimizer subtrees mirror the params tree; never take params from them.
_OPTIMIZER_KEYS = ('param_states', 'opt_state', '_optimizer_state')
_CONFIG_METADATA_KEY = 't5_config'
_MAX_LISTED = 20
# T5X aims for ~64 MiB zarr chunks.
_CHUNK_BYTES = 64 * 2**20


class CheckpointMismatchError(ValueError):
  """The checkpoint's parameters do not match the model: names and shapes are in the message."""

  def __init__(self, source: str, missing: Mapping[str, Tuple[int, ...]],
               unexpected: Mapping[str, Tuple[int, ...]],
               wrong_shape: Mapping[str, Tuple[Tuple[int, ...], Tuple[int, ...]]], hint: str):
    self.missing, self.unexpected, self.wrong_shape = dict(missing), dict(unexpected), dict(
        wrong_shape)
    lines = [f'{source} does not match the model:']

    def section(title, items, fmt):
      if not items:
        return
      lines.append(f'  {title} ({len(items)}):')
      for name, value in list(sorted(items.items()))[:_MAX_LISTED]:
        lines.append(f'    {name}: {fmt(value)}')
      if len(items) > _MAX_LISTED:
        lines.append(f'    ... and {len(items) - _MAX_LISTED} more')

    section('missing', self.missing, lambda s: f'expected shape {tuple(s)}')
    section('unexpected', self.unexpected, lambda s: f'found shape {tuple(s)}')
    section('wrong shape', self.wrong_shape,
            lambda s: f'expected shape {tuple(s[0])}, found shape {tuple(s[1])}')
    lines.append(hint)
    super().__init__('\n'.join(lines))


def check_shapes(found: Mapping[str, Tuple[int, ...]], expected: Mapping[str, Tuple[int, ...]],
                 source: str, hint: str, optional: Mapping[str, Tuple[int, ...]] = None,
                 ignored: Iterable[str] = ()) -> None:
  """Raises `CheckpointMismatchError` unless `found` has exactly the `expected` names and shapes.

  `optional` names may be absent but must have their shape when present; `ignored` names are
  neither required nor checked.
  """
  optional = dict(optional or {})
  ignored = set(ignored)
  missing = {k: v for k, v in expected.items() if k not in found}
  unexpected = {k: tuple(v) for k, v in found.items()
                if k not in expected and k not in optional and k not in ignored}
  wrong = {}
  for name, shape in found.items():
    want = expected.get(name, optional.get(name))
    if want is not None and tuple(shape) != tuple(want):
      wrong[name] = (tuple(want), tuple(shape))
  if missing or unexpected or wrong:
    raise CheckpointMismatchError(source, missing, unexpected, wrong, hint)


# ---------------------------------------------------------------------------------------------
# Format detection


# An orbax CheckpointManager finishes a step by writing this marker (or, on some file systems, a
# commit timestamp in the step metadata); a step without either was cut short.
ORBAX_COMMIT_MARKER = 'commit_success.txt'
ORBAX_STEP_METADATA_FILE = '_CHECKPOINT_METADATA'


def is_committed_step_dir(step_dir: os.PathLike) -> bool:
  """Whether a step directory is finished: orbax's commit marker or commit timestamp, or a step
  directory no CheckpointManager wrote (no `_CHECKPOINT_METADATA`: T5X, `save_orbax`)."""
  step_dir = epath.Path(step_dir)
  if (step_dir / ORBAX_COMMIT_MARKER).exists():
    return True
  metadata = step_dir / ORBAX_STEP_METADATA_FILE
  if not metadata.exists():
    return True
  try:
    return bool(json.loads(metadata.read_text()).get('commit_timestamp_nsecs'))
  except ValueError:
    return False


def _latest_step_dir(path: epath.Path) -> Optional[epath.Path]:
  """The committed `checkpoint_<N>` (T5X) or `<N>` (orbax CheckpointManager) child with the
  largest N; uncommitted ones (a save cut short) are skipped with a warning."""
  steps = []
  for child in path.iterdir():
    match = re.fullmatch(r'(?:checkpoint_)?(\d+)', child.name)
    if match and child.is_dir():
      steps.append((int(match.group(1)), child))
  for _, step_dir in sorted(steps, key=lambda s: s[0], reverse=True):
    if is_committed_step_dir(step_dir):
      return step_dir
    logging.warning('Skipping %s: the save did not finish (no %s and no commit timestamp).',
                    step_dir, ORBAX_COMMIT_MARKER)
  return None


def _is_orbax_dir(path: epath.Path) -> bool:
  return any((path / marker).exists() for marker in ORBAX_MARKERS)


def _orbax_item_dir(path: epath.Path) -> Optional[epath.Path]:
  """The PyTree item directory inside an orbax step directory, if any."""
  children = [path / name for name in ORBAX_ITEM_NAMES] + sorted(
      (c for c in path.iterdir() if c.name not in ORBAX_ITEM_NAMES), key=lambda c: c.name)
  for child in children:
    if child.is_dir() and _is_orbax_dir(child):
      return child
  return None


def resolve_checkpoint(path: os.PathLike, fmt: str = 'auto') -> Tuple[str, epath.Path]:
  """Returns (format, concrete path) for a checkpoint file, step directory or model directory.

  A model directory resolves to its latest `checkpoint_<N>` (or orbax `<N>`) step, as in T5X.
  """
  if fmt not in FORMATS + ('auto',):
    raise ValueError(f'Unknown checkpoint format {fmt!r}; use one of {FORMATS} or "auto".')
  path = epath.Path(path)
  if not path.exists():
    raise ConfigError(f'Checkpoint path {path} does not exist; check the path (CHECKPOINT_PATH, '
                      'INITIAL_CHECKPOINT_PATH or the command line argument).')
  if not path.is_dir():
    if path.name == T5X_CHECKPOINT_FILE and fmt in ('auto', 't5x'):
      return 't5x', path.parent
    if path.name == HF_CONFIG_FILE and fmt in ('auto', 'hf'):
      return 'hf', path.parent
    raise ValueError(f'{path} is a file; pass the checkpoint directory (an HF directory with '
                     f'{HF_CONFIG_FILE}, a T5X checkpoint_<step> directory or an orbax directory).')
  for _ in range(3):  # model dir -> step dir -> orbax item dir
    if (path / HF_CONFIG_FILE).exists() and fmt in ('auto', 'hf'):
      return 'hf', path
    if (path / T5X_CHECKPOINT_FILE).exists() and fmt in ('auto', 't5x'):
      return 't5x', path
    if _is_orbax_dir(path) and fmt in ('auto', 'orbax'):
      return 'orbax', path
    item_dir = _orbax_item_dir(path) if fmt in ('auto', 'orbax') else None
    if item_dir is not None:
      path = item_dir
      continue
    step_dir = _latest_step_dir(path)
    if step_dir is None:
      break
    logging.info('Using the latest step directory %s.', step_dir)
    path = step_dir
  wanted = {'auto': 'any known format', 'hf': f'{HF_CONFIG_FILE} (HF)',
            't5x': f'a msgpack "{T5X_CHECKPOINT_FILE}" file (T5X)',
            'orbax': f'orbax metadata {ORBAX_MARKERS}'}[fmt]
  raise ValueError(f'No checkpoint in {path}: expected {wanted}. Point at the HF directory, the '
                   'T5X checkpoint_<step> directory or the orbax checkpoint directory.')


def detect_format(path: os.PathLike) -> str:
  """'hf', 't5x' or 'orbax' for a checkpoint path (see `resolve_checkpoint`)."""
  return resolve_checkpoint(path)[0]


# ---------------------------------------------------------------------------------------------
# Architecture


def infer_config(shapes: Mapping[str, Tuple[int, ...]], source: str, **overrides) -> T5Config:
  """A `T5Config` from a flat T5X name -> shape dict.

  Not recoverable from shapes, and so taken from `overrides` or T5X's defaults: the activations
  (two MLP inputs: T5 v1.1's gated GELU; one: ReLU), relative_attention_max_distance (128),
  dropout_rate, layer_norm_epsilon and dtype.
  """
  required = ('token_embedder/embedding', 'encoder/relpos_bias/rel_embedding',
              'encoder/layers_0/attention/query/kernel', 'encoder/layers_0/mlp/wo/kernel')
  missing = [n for n in required if n not in shapes]
  if missing:
    raise ValueError(f'{source}: cannot infer the architecture, {missing} are missing; pass the '
                     'model config (config=T5Config(...) or a preset name) to check what else is '
                     'missing.')

  def count(stack):
    layers = {int(m.group(1)) for n in shapes if (m := re.match(rf'{stack}/layers_(\d+)/', n))}
    return max(layers) + 1 if layers else 0

  vocab_size, emb_dim = shapes['token_embedder/embedding']
  num_heads, num_buckets = shapes['encoder/relpos_bias/rel_embedding']
  num_wi = len({n for n in shapes if re.match(r'encoder/layers_0/mlp/wi(_\d+)?/kernel$', n)})
  fields = dict(
      vocab_size=vocab_size, emb_dim=emb_dim, num_heads=num_heads,
      num_encoder_layers=count('encoder'), num_decoder_layers=count('decoder'),
      head_dim=shapes['encoder/layers_0/attention/query/kernel'][1] // num_heads,
      mlp_dim=shapes['encoder/layers_0/mlp/wo/kernel'][0],
      mlp_activations=('relu',) if num_wi == 1 else ('gelu', 'linear'),
      relative_attention_num_buckets=num_buckets,
      logits_via_embedding='decoder/logits_dense/kernel' not in shapes)
  fields.update(overrides)
  return T5Config(**fields)


def as_config(config: Any) -> Optional[T5Config]:
  """`config` (a T5Config, preset name or dict) as a T5Config; None stays None."""
  if config is None or isinstance(config, T5Config):
    return config
  if isinstance(config, str):
    from specialize_jax.model import config as config_lib  # pylint: disable=g-import-not-at-top
    return config_lib.get_config(config)
  if isinstance(config, Mapping):
    return T5Config(**config)
  raise ValueError(f'config must be a T5Config, a preset name or a dict, got {type(config)}.')


def _architecture(config: T5Config) -> Dict[str, Any]:
  """The fields that decide the parameters and the function (not dtype or dropout)."""
  fields = dataclasses.asdict(config)
  for name in ('dtype', 'dropout_rate'):
    fields.pop(name)
  return fields


def _check_t5x_tree(shapes: Mapping[str, Tuple[int, ...]], config: T5Config, source: str):
  check_shapes(shapes, hf_conversion.t5x_param_shapes(config), source,
               hint=f'Expected the parameters of {config}. If the checkpoint is right, pass the '
               'config it was trained with (config=...); if it is partial, re-export it.')


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


def _hf_tensor_files(directory: epath.Path) -> Tuple[str, Dict[str, epath.Path]]:
  """('safetensors' | 'torch', {tensor name: file}) for an HF directory (index files read)."""
  for kind, single, index in (('safetensors', HF_SAFETENSORS_FILE, HF_SAFETENSORS_INDEX_FILE),
                              ('torch', HF_TORCH_FILE, HF_TORCH_INDEX_FILE)):
    if (directory / index).exists():
      weight_map = json.loads((directory / index).read_text())['weight_map']
      return kind, {name: directory / file for name, file in weight_map.items()}
    if (directory / single).exists():
      return kind, {None: directory / single}
  raise ValueError(f'{directory} has {HF_CONFIG_FILE} but no weights: expected '
                   f'{HF_SAFETENSORS_FILE}, {HF_SAFETENSORS_INDEX_FILE} or {HF_TORCH_FILE}.')


def _local_copy(file: epath.Path) -> str:
  """A local path of `file`: itself, or for a storage URL a copy in the temp area (safetensors
  and torch read local files only), removed when the process exits."""
  if not storage.is_url(file):
    return os.fspath(file)
  handle, path = tempfile.mkstemp(prefix='specialize-', suffix=f'-{file.name}')
  os.close(handle)
  _TEMP_COPIES.append(path)
  storage.copy_file(file, path)
  return path


_TEMP_COPIES = []
atexit.register(lambda: [os.remove(p) for p in _TEMP_COPIES if os.path.exists(p)])  # local: temp


def _read_hf_tensors(directory: epath.Path) -> Tuple[Dict[str, Tuple[int, ...]], Any]:
  """(name -> shape, loader(name) -> np.ndarray) without reading tensor data up front."""
  kind, files = _hf_tensor_files(directory)
  if kind == 'safetensors':
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    shapes, owner = {}, {}
    for file in sorted(set(files.values()), key=str):
      handle = safe_open(_local_copy(file), framework='numpy')
      for name in handle.keys():
        shapes[name] = tuple(handle.get_slice(name).get_shape())
        owner[name] = handle
    return shapes, lambda name: owner[name].get_tensor(name)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f'{directory} holds PyTorch weights ({HF_TORCH_FILE}); install torch to read '
                     'them, or re-save the model with safetensors.') from e
  tensors = {}
  for file in sorted(set(files.values()), key=str):
    tensors.update(torch.load(_local_copy(file), map_location='cpu', weights_only=True))
  shapes = {name: tuple(t.shape) for name, t in tensors.items()}
  return shapes, lambda name: tensors[name].float().numpy()


def load_hf(directory: os.PathLike, config: Any = None,
            dtype: Optional[str] = None) -> Tuple[T5Config, Dict[str, Any]]:
  """Reads an HF T5 directory; `config`, when given, must describe the same architecture."""
  directory = epath.Path(directory)
  hf_config = json.loads((directory / HF_CONFIG_FILE).read_text())
  shapes, load = _read_hf_tensors(directory)
  head = hf_conversion.HF_HEAD_NAME
  # transformers 5.x unties a stored head only when its values differ from the embedding.
  untied_head = head in shapes and (
      hf_conversion.HF_EMBEDDING_NAME not in shapes or
      not np.array_equal(load(head), load(hf_conversion.HF_EMBEDDING_NAME)))
  wanted = as_config(config)
  if dtype is None and wanted is not None:
    dtype = wanted.dtype
  ours = hf_conversion.config_from_hf(hf_config, untied_head=untied_head,
                                      source=os.fspath(directory / HF_CONFIG_FILE))
  if dtype is not None:
    ours = dataclasses.replace(ours, dtype=dtype)
  if wanted is not None and _architecture(wanted) != _architecture(ours):
    raise ValueError(f'{directory} holds {ours}, not the requested {wanted}; drop config= to use '
                     'the checkpoint\'s architecture.')
  embedding_shape = (ours.vocab_size, ours.emb_dim)
  check_shapes(
      shapes, hf_conversion.hf_param_shapes(ours), f'HF checkpoint {directory}',
      hint=f'Expected the tensors that {HF_CONFIG_FILE} describes ({ours}); the weights file is '
      'partial or belongs to another config.',
      optional={name: embedding_shape for name in (head,) + hf_conversion.HF_EMBEDDING_COPIES},
      ignored=hf_conversion.HF_UNUSED_NAMES)
  state_dict = _LazyDict(shapes, load)
  return ours, hf_conversion.params_from_hf(state_dict, ours, hf_config)


class _LazyDict(Mapping):
  """A read-only mapping that loads a tensor when it is looked up (keeps peak memory low)."""

  def __init__(self, shapes, load):
    self._shapes, self._load = shapes, load

  def __getitem__(self, name):
    if name not in self._shapes:
      raise KeyError(name)
    return self._load(name)

  def __iter__(self):
    return iter(self._shapes)

  def __len__(self):
    return len(self._shapes)


def _replace_dir(tmp: str, directory: str, overwrite: bool) -> None:
  """Moves the finished local `tmp` directory to `directory` (the old one goes only after the
  move). For a storage URL the files are uploaded one object each, the top-level index a reader
  opens first (config.json, T5X's `checkpoint`) last, and the staging directory is removed."""
  if storage.is_url(directory):
    try:
      if storage.exists(directory):
        if not overwrite:
          raise ValueError(f'{directory} exists; choose a new destination or pass overwrite=True.')
        storage.rmtree(directory)
      storage.copy_tree(tmp, directory)
    finally:
      storage.rmtree(os.path.dirname(tmp))
    return
  if os.path.exists(directory):  # local: not a URL (above)
    if not overwrite:
      shutil.rmtree(tmp)  # local: staging dir
      raise ValueError(f'{directory} exists; choose a new destination or pass overwrite=True.')
    old = tempfile.mkdtemp(prefix='.old-', dir=os.path.dirname(directory) or '.')
    os.replace(directory, os.path.join(old, 'x'))  # local: not a URL (above)
    os.replace(tmp, directory)  # local: not a URL (above)
    shutil.rmtree(old)  # local: not a URL (above)
  else:
    os.replace(tmp, directory)  # local: not a URL (above)


def _staging_dir(directory: os.PathLike, overwrite: bool) -> Tuple[str, str]:
  """(the absolute output directory, a fresh temporary directory to write it in): beside it on
  local disk (so the final rename is atomic), or in the local temp area for a storage URL.
  Refused early (without overwrite) when the output is present."""
  directory = storage.absolute(directory)
  if storage.exists(directory) and not overwrite:
    raise ValueError(f'{directory} exists; choose a new destination or pass overwrite=True.')
  name = storage.basename(directory)
  if storage.is_url(directory):
    return directory, tempfile.mkdtemp(prefix=f'{name}.tmp-', dir=tempfile.mkdtemp())
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)  # local: staging dir
  return directory, tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=parent)


def save_hf(params: Mapping[str, Any], config: T5Config, directory: os.PathLike,
            overwrite: bool = False, dtype: Any = np.float32) -> str:
  """Writes config.json + model.safetensors that `T5ForConditionalGeneration` loads as is.

  Written to a temporary directory beside `directory`, then renamed into place.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  _check_t5x_tree({k: np.shape(v) for k, v in hf_conversion.flatten_params(params).items()},
                  config, 'params to export')
  state_dict = hf_conversion.params_to_hf(params, config, dtype)
  directory, tmp = _staging_dir(directory, overwrite)
  try:
    with open(os.path.join(tmp, HF_CONFIG_FILE), 'w') as f:  # local: staging dir
      json.dump(hf_conversion.config_to_hf(config), f, indent=2, sort_keys=True)
      f.write('\n')
    save_file(state_dict, os.path.join(tmp, HF_SAFETENSORS_FILE), metadata={'format': 'pt'})
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)  # local: staging dir
    raise
  _replace_dir(tmp, directory, overwrite)
  return directory


# ---------------------------------------------------------------------------------------------
# T5X legacy (msgpack + zarr)


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


def _find_params(tree: Mapping[str, Any], source: str) -> Tuple[Tuple[str, ...], Mapping]:
  """(path, subtree) of the shallowest dict with token_embedder/encoder/decoder keys.

  Breadth first, so `target`/`params` win over optimizer mirrors, which are skipped anyway.
  """
  queue = [((), tree)]
  while queue:
    path, node = queue.pop(0)
    if {'token_embedder', 'encoder', 'decoder'} <= set(node):
      return path, node
    for key, child in node.items():
      if isinstance(child, Mapping) and key not in _OPTIMIZER_KEYS:
        queue.append((path + (key,), child))
  raise ValueError(f'{source} holds no T5 parameters: no subtree with token_embedder, encoder '
                   f'and decoder (top-level keys: {sorted(tree)}).')


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


def _open_t5x(directory: os.PathLike, config: Any, dtype: Optional[str]):
  """(config, flat msgpack leaves, {name: zarr spec or None}, {name: shape}) of a legacy T5X
  checkpoint, names and shapes checked; only the msgpack file and zarr metadata are read."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  directory = epath.Path(directory)
  ckpt_dir = os.fspath(directory)
  source = f'T5X checkpoint {ckpt_dir}'
  contents = serialization.msgpack_restore((directory / T5X_CHECKPOINT_FILE).read_bytes())
  if not isinstance(contents, Mapping):
    raise ValueError(f'{ckpt_dir}/{T5X_CHECKPOINT_FILE} is not a T5X msgpack checkpoint.')
  if contents.get('version', 0) and 'optimizer' in contents:
    contents = contents['optimizer']
  _, target = _find_params(contents, source)
  flat = hf_conversion.flatten_params(target, is_leaf=_is_ts_spec)
  specs = {name: _zarr_spec(leaf, ckpt_dir) for name, leaf in flat.items()}
  shapes = {name: _leaf_shape(flat[name], specs[name]) for name in flat}
  unknown = {n: specs[n] for n, shape in shapes.items() if shape is None}
  if unknown:
    # PLACEHOLDER leaves: the shapes are in the zarr metadata (opening reads only that).
    shapes.update(_run(_zarr_shapes(unknown)))
  config = _resolve_config(config, shapes, source, dtype)
  _check_t5x_tree(shapes, config, source)
  return config, flat, specs, shapes


async def _zarr_shapes(specs: Mapping[str, Dict[str, Any]]) -> Dict[str, Tuple[int, ...]]:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  names = list(specs)
  stores = await asyncio.gather(*(ts.open(specs[n], open=True, read=True) for n in names))
  return {n: tuple(store.shape) for n, store in zip(names, stores)}


def load_t5x(directory: os.PathLike, config: Any = None,
             dtype: Optional[str] = None) -> Tuple[T5Config, Dict[str, Any]]:
  """Reads the params (`target`) of a legacy T5X checkpoint directory, skipping optimizer state."""
  config, flat, specs, _ = _open_t5x(directory, config, dtype)
  arrays = _run(_read_zarr_leaves({n: s for n, s in specs.items() if s is not None}))
  params = {n: np.asarray(arrays[n] if specs[n] is not None else flat[n], np.float32)
            for n in flat}
  return config, hf_conversion.unflatten_params(params)


def _resolve_config(config: Any, shapes, source: str, dtype: Optional[str]) -> T5Config:
  """`config` (else inferred from `shapes`), its dtype replaced by `dtype` when one is given."""
  config = as_config(config)
  if config is None:
    config = infer_config(shapes, source)
  return config if dtype is None else dataclasses.replace(config, dtype=dtype)


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
  directory, tmp = _staging_dir(directory, overwrite)

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
              for n, v in hf_conversion.flatten_params(params).items()}
    if optimizer_state:
      for name, value in list(arrays.items()):
        state = 'state/param_states/' + name[len('target/'):]
        if value.ndim == 2:
          arrays[f'{state}/v_row'] = np.zeros(value.shape[:1], np.float32)
          arrays[f'{state}/v_col'] = np.zeros(value.shape[1:], np.float32)
        else:
          arrays[f'{state}/v'] = np.zeros(value.shape, np.float32)
    written = hf_conversion.unflatten_params(_run(write_all(arrays)))
    written.setdefault('state', {})['step'] = np.int32(step)
    with open(os.path.join(tmp, T5X_CHECKPOINT_FILE), 'wb') as f:  # local: staging dir
      f.write(serialization.msgpack_serialize({'version': T5X_VERSION, 'optimizer': written}))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)  # local: staging dir
    raise
  _replace_dir(tmp, directory, overwrite)
  return directory


# ---------------------------------------------------------------------------------------------
# Orbax


def _orbax_checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp, ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _open_orbax(directory: os.PathLike, config: Any, dtype: Optional[str]):
  """(config, path to the params subtree, its metadata subtree) of an orbax PyTree checkpoint,
  names and shapes checked; reads metadata only."""
  _, checkpointer = _orbax_checkpointer()
  source = f'orbax checkpoint {directory}'
  metadata = checkpointer.metadata(os.fspath(directory)).item_metadata
  path, subtree = _find_params(metadata.tree, source)
  shapes = {n: tuple(m.shape) for n, m in hf_conversion.flatten_params(subtree).items()}
  if config is None and metadata.custom_metadata and _CONFIG_METADATA_KEY in (
      metadata.custom_metadata):
    config = metadata.custom_metadata[_CONFIG_METADATA_KEY]
  config = _resolve_config(config, shapes, source, dtype)
  _check_t5x_tree(shapes, config, source)
  return config, path, subtree


def _restore_orbax_subtree(directory: os.PathLike, path: Tuple[str, ...], item: Any,
                           restore_args: Any) -> Any:
  """Restores only the subtree at `path` (`item` and `restore_args` are that subtree's)."""
  ocp, checkpointer = _orbax_checkpointer()

  def nest(value):
    for key in reversed(path):
      value = {key: value}
    return value

  restored = checkpointer.restore(
      os.fspath(directory), args=ocp.args.PyTreeRestore(
          item=nest(item), restore_args=nest(restore_args), partial_restore=True))
  for key in path:
    restored = restored[key]
  return restored


def load_orbax(directory: os.PathLike, config: Any = None,
               dtype: Optional[str] = None) -> Tuple[T5Config, Dict[str, Any]]:
  """Reads the params of an orbax PyTree checkpoint (T5X `state` item or `save_orbax` output).

  Only the params subtree is restored (as numpy, on the host); optimizer state stays on disk.
  """
  import jax  # pylint: disable=g-import-not-at-top
  ocp, _ = _orbax_checkpointer()
  config, path, subtree = _open_orbax(directory, config, dtype)
  restored = _restore_orbax_subtree(
      directory, path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), subtree),
      jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), subtree))
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), restored)
  return config, params


def save_orbax(params: Mapping[str, Any], config: T5Config, directory: os.PathLike,
               overwrite: bool = False) -> str:
  """Writes params as an orbax PyTree checkpoint, the config in its custom metadata.

  Orbax writes to a temporary directory and renames it when complete.
  """
  ocp, checkpointer = _orbax_checkpointer()
  directory = epath.Path(directory)
  _check_t5x_tree({k: np.shape(v) for k, v in hf_conversion.flatten_params(params).items()},
                  config, 'params to export')
  if directory.exists() and not overwrite:
    raise ValueError(f'{directory} exists; choose a new destination or pass overwrite=True.')
  tree = {k: v for k, v in params.items()}
  checkpointer.save(
      directory, args=ocp.args.PyTreeSave(
          tree, custom_metadata={_CONFIG_METADATA_KEY: dataclasses.asdict(config)}),
      force=overwrite)
  return os.fspath(directory)


# ---------------------------------------------------------------------------------------------
# Entry point


def load_checkpoint(path: os.PathLike, fmt: str = 'auto', config: Any = None,
                    dtype: Optional[str] = None) -> Tuple[T5Config, Dict[str, Any]]:
  """(config, float32 numpy params) from an HF, T5X legacy or orbax checkpoint.

  `path` may be a model directory (its latest step is used), a step directory or the T5X
  `checkpoint` file; `config` (T5Config, preset name or dict) is checked against the checkpoint
  and, for T5X and orbax, replaces shape inference; `dtype` ('float32' or 'bfloat16') is the
  compute dtype of the returned config (None: `config`'s, else the stored config's, else float32).
  """
  fmt, resolved = resolve_checkpoint(path, fmt)
  loader = {'hf': load_hf, 't5x': load_t5x, 'orbax': load_orbax}[fmt]
  return loader(resolved, config=config, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Sharded reads
#
# Terms:
#   targets: the params tree as `jax.ShapeDtypeStruct`s with a `.sharding` each (the mesh
#     shardings a job computes from the config); a sharded read returns `jax.Array`s with exactly
#     these shapes, dtypes and shardings.
#   this process's shards: the distinct slices its addressable devices hold (replicas on several
#     local devices are read once). Nothing else is read: T5X zarr arrays are read slice by slice
#     with TensorStore, orbax arrays by orbax with the target shardings, and each slice is cast to
#     the target dtype on its own, so no host holds a whole parameter it does not shard fully.
#     HF weights are read whole on the host, converted, then only this process's slices are put on
#     its devices (the conversion reshapes whole tensors).
#   read stats: the parameter bytes of this process's shards against the checkpoint's total (at
#     the target dtype), and the bytes TensorStore fetched from storage during the read (its
#     `/tensorstore/kvstore/<driver>/bytes_read` counters: compressed bytes, chunk metadata and
#     whole chunks included, so an array stored as one chunk is fetched whole).

# Kvstore drivers that store bytes themselves; the others (ocdbt, zip, ...) read through them.
_STORAGE_DRIVERS = ('file', 'gcs', 'gcs_grpc', 's3', 'http', 'memory')


@dataclasses.dataclass(frozen=True)
class ReadStats:
  """What a sharded read asked for and fetched, in bytes (see "read stats" above)."""
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


def _check_targets(flat_targets: Mapping[str, Any], shapes: Mapping[str, Tuple[int, ...]],
                   source: str) -> None:
  check_shapes(shapes, {n: tuple(t.shape) for n, t in flat_targets.items()}, source,
               hint='The targets (the model\'s params with their shardings) must name every '
               'parameter of the checkpoint with its shape; check the model config.')
  for name, target in flat_targets.items():
    if getattr(target, 'sharding', None) is None:
      raise ValueError(f'Target {name} has no sharding; give every leaf a '
                       'jax.ShapeDtypeStruct(shape, dtype, sharding=...).')


def load_checkpoint_sharded(path: os.PathLike, targets_fn: Any, fmt: str = 'auto',
                            config: Any = None, dtype: Optional[str] = None
                            ) -> Tuple[T5Config, Dict[str, Any], ReadStats]:
  """(config, params as sharded `jax.Array`s, read stats), reading only this process's shards.

  Args:
    path, fmt, config, dtype: as for `load_checkpoint` (names and shapes are checked before any
      array data is read).
    targets_fn: config -> targets (see "Sharded reads" above); called once the config is known,
      since T5X and orbax checkpoints may imply their architecture only by their shapes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  fmt, resolved = resolve_checkpoint(path, fmt)
  source = f'{fmt} checkpoint {resolved}'
  fetched_before = storage_bytes_read()
  if fmt == 't5x':
    config, flat, specs, shapes = _open_t5x(resolved, config, dtype)
  elif fmt == 'orbax':
    config, orbax_path, subtree = _open_orbax(resolved, config, dtype)
    shapes = {n: tuple(m.shape) for n, m in hf_conversion.flatten_params(subtree).items()}
  else:
    config, host_params = load_hf(resolved, config=config, dtype=dtype)
    host_flat = hf_conversion.flatten_params(host_params)
    shapes = {n: tuple(np.shape(v)) for n, v in host_flat.items()}
  targets = targets_fn(config)
  flat_targets = hf_conversion.flatten_params(targets)
  _check_targets(flat_targets, shapes, source)
  shards = {n: _local_shards(t) for n, t in flat_targets.items()}

  if fmt == 'orbax':
    ocp, _ = _orbax_checkpointer()
    restored = _restore_orbax_subtree(
        resolved, orbax_path, targets,
        jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype,
                                                    global_shape=tuple(t.shape)), targets))
    flat_params = hf_conversion.flatten_params(restored)
  else:
    if fmt == 't5x':
      zarr = {n: s for n, s in specs.items() if s is not None}
      values = _run(_read_zarr_shards(zarr, {n: shards[n] for n in zarr},
                                      {n: flat_targets[n].dtype for n in zarr}))
      for name in flat:
        if specs[name] is None:  # inline in the msgpack file, already in memory
          host = np.asarray(flat[name])
          values[name] = {k: np.asarray(host[i], flat_targets[name].dtype)
                          for k, i in shards[name].items()}
    else:
      values = {n: {k: np.asarray(v[i], flat_targets[n].dtype) for k, i in shards[n].items()}
                for n, v in host_flat.items()}
    flat_params = {n: _make_array(flat_targets[n], values.pop(n)) for n in list(values)}

  itemsize = lambda t: np.dtype(t.dtype).itemsize
  stats = ReadStats(
      shard_bytes=sum(_slice_size(tuple(t.shape), i) * itemsize(t)
                      for n, t in flat_targets.items() for i in shards[n].values()),
      total_bytes=sum(int(np.prod(t.shape)) * itemsize(t) for t in flat_targets.values()),
      fetched_bytes=storage_bytes_read() - fetched_before)
  logging.info('Read %s (process %d): %s.', source, jax.process_index(), stats.describe())
  return config, hf_conversion.unflatten_params(flat_params), stats
