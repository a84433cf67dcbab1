"""Orbax PyTree checkpoints of the params: T5X's current layout and our own exports.

On disk: an orbax PyTree checkpoint (OCDBT), a directory with `_METADATA` and `manifest.ocdbt`
(`MARKERS`) plus the array data. Two trees are read: T5X's current `checkpoint_<step>/state` item,
`{'target': params, 'state': ...}`, and a params-only checkpoint written by `save_orbax`, which
stores the model config in the checkpoint's custom metadata (key `t5_config`). A step directory of
an orbax CheckpointManager holds one such directory per item (`ITEM_NAMES`); the training
checkpoints (`training.checkpoint_manager`) are read this way too.

Only the params subtree is restored; optimizer state stays on disk. Without `config=` the config is
the stored one, else inferred from the shapes (`param_tree.infer_config`).
"""
import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from etils import epath
import numpy as np

from specialize_jax.errors import ConfigError
from specialize_jax.checkpoints import param_tree
from specialize_jax.model.config import T5Config

# Orbax CheckpointManager step directories hold one directory per item; T5X names its item
# 'state', StandardSave without a name gives 'default'. Tried in this order.
ITEM_NAMES = ('state', 'params', 'default')
# Files of an orbax PyTree checkpoint (an item directory, or a `save_orbax` directory).
MARKERS = ('_METADATA', 'manifest.ocdbt')
_CONFIG_METADATA_KEY = 't5_config'


def _orbax_checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp, ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def open_orbax(directory: os.PathLike, config: Any, dtype: Optional[str]):
  """(config, path to the params subtree, its metadata subtree) of an orbax PyTree checkpoint,
  names and shapes checked; reads metadata only."""
  _, checkpointer = _orbax_checkpointer()
  source = f'orbax checkpoint {directory}'
  metadata = checkpointer.metadata(os.fspath(directory)).item_metadata
  path, subtree = param_tree.find_params(metadata.tree, source)
  shapes = {n: tuple(m.shape) for n, m in param_tree.flatten_params(subtree).items()}
  if config is None and metadata.custom_metadata and _CONFIG_METADATA_KEY in (
      metadata.custom_metadata):
    config = metadata.custom_metadata[_CONFIG_METADATA_KEY]
  config = param_tree.resolve_config(config, shapes, source, dtype)
  param_tree.check_params(shapes, config, source)
  return config, path, subtree


def _restore_subtree(directory: os.PathLike, path: Tuple[str, ...], item: Any,
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
  config, path, subtree = open_orbax(directory, config, dtype)
  restored = _restore_subtree(
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
  param_tree.check_params(
      {k: np.shape(v) for k, v in param_tree.flatten_params(params).items()}, config,
      'params to export')
  if directory.exists() and not overwrite:
    raise ConfigError(f'{directory} exists; choose a new destination or pass overwrite=True.')
  tree = {k: v for k, v in params.items()}
  checkpointer.save(
      directory, args=ocp.args.PyTreeSave(
          tree, custom_metadata={_CONFIG_METADATA_KEY: dataclasses.asdict(config)}),
      force=overwrite)
  return os.fspath(directory)


def restore_sharded(directory: os.PathLike, path: Tuple[str, ...], targets: Any) -> Any:
  """The params subtree at `path` as `jax.Array`s with the shapes, dtypes and shardings of
  `targets`; orbax reads only this process's shards and casts them (see `loading`)."""
  import jax  # pylint: disable=g-import-not-at-top
  ocp, _ = _orbax_checkpointer()
  return _restore_subtree(
      directory, path, targets,
      jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype,
                                                  global_shape=tuple(t.shape)), targets))
