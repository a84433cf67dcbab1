"""Gin for the `specialize` jobs, with T5X's flag semantics.

`--gin_file` files parse in order (later override earlier), then `--gin.X=Y` bindings. A relative
gin file or include is looked up as a file relative to the working directory, then to each
`--gin_search_paths` entry, then to this repository's `gin/` folder. The configuration of a run is
logged and written to `MODEL_DIR/config.gin`.
"""
import contextlib
import logging
import os
from typing import Any, Iterator, List, Optional, Sequence

from specialize_jax.config_errors import ConfigError

# The shipped configs (found this way in a source checkout / editable install).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))  # local: this package
REPO_GIN_DIR = os.path.join(os.path.dirname(_PACKAGE_DIR), "gin")


def gin_bindings(extra_args: List[str]) -> List[str]:
  """`--gin.X=Y` flags (T5X's syntax) as gin bindings `X = Y`; anything else is an error."""
  bindings = []
  for arg in extra_args:
    if not arg.startswith("--gin.") or "=" not in arg:
      raise ConfigError(f"unrecognized argument {arg!r}; gin overrides look like "
                        "--gin.TRAIN_STEPS=2000 or --gin.MODEL_DIR=\\\"runs/x\\\".")
    name, value = arg[len("--gin."):].split("=", 1)
    bindings.append(f"{name} = {value}")
  return bindings


@contextlib.contextmanager
def file_resolution(search_paths: Sequence[str] = ()) -> Iterator[None]:
  """Within the block, gin finds relative files only as plain files under `search_paths`, then
  `REPO_GIN_DIR` (the working directory first, as gin always does).

  gin also registers a reader that treats `runs/specialize.gin` as the resource `specialize.gin` of
  a Python package `runs`: it logs "ERROR Path not found" for each location it probes in a run that
  works, and crashes on a namespace package such as a `runs/` directory in the working directory
  (`specialize demo` writes one). gin has no public way to drop a reader or search path, so this
  swaps its two lists for the block and restores them after.
  """
  from gin import config as gin_lib  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  file_readers, location_prefixes = gin_lib._FILE_READERS, gin_lib._LOCATION_PREFIXES
  # pylint: enable=protected-access
  from specialize_jax.data import storage  # pylint: disable=g-import-not-at-top
  saved = list(file_readers), list(location_prefixes)
  file_readers[:] = [(storage.open_file, storage.isfile)]  # local files and gs:// alike
  location_prefixes[:] = ["", *search_paths, REPO_GIN_DIR]
  try:
    yield
  finally:
    file_readers[:], location_prefixes[:] = saved


def find_file(name: str, search_paths: Sequence[str] = ()) -> str:
  """Where `parse_gin` finds the gin file `name` (the order of `file_resolution`)."""
  from specialize_jax.data import storage  # pylint: disable=g-import-not-at-top
  for prefix in ["", *search_paths, REPO_GIN_DIR]:
    path = storage.join(prefix, name) if prefix else name
    if storage.isfile(path):
      return path
  raise ConfigError(f"gin file {name!r} not found in the working directory, --gin_search_paths "
                    f"{list(search_paths)} or {REPO_GIN_DIR}.")


def parse_gin(gin_files: List[str], bindings: List[str], search_paths: List[str]) -> None:
  """T5X's flag semantics: files in order (later override earlier), then bindings. Unknown
  parameters and `%gin.REQUIRED` macros left unset fail here, before any compilation, as a
  `ConfigError` naming the binding."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    with file_resolution(search_paths):
      gin.parse_config_files_and_bindings(gin_files, bindings)
  except ConfigError:
    raise
  except (ValueError, IOError) as e:
    raise ConfigError(f"gin configuration error: {e}") from e


def write_config(model_dir: Optional[str]) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  text = gin.config_str()
  logging.info("Gin config:\n%s", text)
  if model_dir and jax.process_index() == 0:
    from specialize_jax.data import storage  # pylint: disable=g-import-not-at-top
    storage.write_text(storage.join(model_dir, "config.gin"), text)


def macro(name: str):
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return gin.query_parameter(f"%{name}")
  except ValueError:
    return None


def bound_value(selector: str) -> Any:
  """The value bound to `selector` (e.g. "runs.train.eval_period"), macros resolved; None when
  unbound."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    value = gin.query_parameter(selector)
  except ValueError:
    return None
  while isinstance(value, gin.config.ConfigurableReference) and (
      value.scoped_selector.endswith("/gin.macro")):
    value = macro(value.scoped_selector[:-len("/gin.macro")])
  return value
