"""Writing a checkpoint directory so that no reader ever sees a partial one.

A writer (`hf.save_hf`, `t5x_legacy.save_t5x`) fills a fresh staging directory from
`staging_dir`, then `replace_dir` moves it into place. On local disk the staging directory sits
beside the destination, so the final move is one atomic rename. For a storage URL (gs://, ...) it
is in the local temp area and is uploaded one object each, the top-level file a reader opens first
(config.json, T5X's `checkpoint`) last.
"""
import os
import shutil
import tempfile
from typing import Tuple

from specialize_jax.errors import ConfigError
from specialize_jax.data import storage


def staging_dir(directory: os.PathLike, overwrite: bool) -> Tuple[str, str]:
  """(the absolute output directory, a fresh temporary directory to write it in).

  Refused early (without `overwrite`) when the output is present.
  """
  directory = storage.absolute(directory)
  if storage.exists(directory) and not overwrite:
    raise ConfigError(f'{directory} exists; choose a new destination or pass overwrite=True.')
  name = storage.basename(directory)
  if storage.is_url(directory):
    return directory, tempfile.mkdtemp(prefix=f'{name}.tmp-', dir=tempfile.mkdtemp())
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)  # local: staging dir
  return directory, tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=parent)


def replace_dir(tmp: str, directory: str, overwrite: bool) -> None:
  """Moves the finished local `tmp` directory to `directory` (the old one goes only after the
  move). For a storage URL the files are uploaded (index file last, see the module docstring) and
  the staging directory is removed."""
  if storage.is_url(directory):
    try:
      if storage.exists(directory):
        if not overwrite:
          raise ConfigError(f'{directory} exists; choose a new destination or pass overwrite=True.')
        storage.rmtree(directory)
      storage.copy_tree(tmp, directory)
    finally:
      storage.rmtree(os.path.dirname(tmp))
    return
  if os.path.exists(directory):  # local: not a URL (above)
    if not overwrite:
      shutil.rmtree(tmp)  # local: staging dir
      raise ConfigError(f'{directory} exists; choose a new destination or pass overwrite=True.')
    old = tempfile.mkdtemp(prefix='.old-', dir=os.path.dirname(directory) or '.')
    os.replace(directory, os.path.join(old, 'x'))  # local: not a URL (above)
    os.replace(tmp, directory)  # local: not a URL (above)
    shutil.rmtree(old)  # local: not a URL (above)
  else:
    os.replace(tmp, directory)  # local: not a URL (above)


def remove_staging(tmp: str) -> None:
  """Removes a staging directory after a failed write (the destination is left untouched)."""
  shutil.rmtree(tmp, ignore_errors=True)  # local: staging dir
