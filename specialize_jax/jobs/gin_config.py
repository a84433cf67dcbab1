"""Gin for the `specialize` jobs, with T5X's flag semantics.

`--gin_file` files parse in order (later override earlier), then `--gin.X=Y` bindings. A relative
gin file or include is looked up as a file relative to the working directory, then to each
`--gin_search_paths` entry, then to the shipped configs (the checkout's `gin/`, or the package's
copy in a wheel). The configuration of a run is logged and written to `MODEL_DIR/config.gin`, where
later jobs read the model's compute dtype (`recorded_model_dtype`).
"""
import contextlib
import logging
import os
import pathlib
from typing import Any, Iterator, List, Optional, Sequence

from specialize_jax.errors import ConfigError



def _shipped_gin_dir() -> str:
  """The shipped configs: inside the package when installed from a wheel, else the checkout's gin/."""
  package_dir = pathlib.Path(__file__).resolve().parent.parent  # local: this package's files
  installed = package_dir / "gin"
  return str(installed if installed.is_dir() else package_dir.parent / "gin")


SHIPPED_GIN_DIR = _shipped_gin_dir()
RUN_CONFIG_FILE = "config.gin"


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
  `SHIPPED_GIN_DIR` (the working directory first, as gin always does).

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
  location_prefixes[:] = ["", *search_paths, SHIPPED_GIN_DIR]
  try:
    yield
  finally:
    file_readers[:], location_prefixes[:] = saved


def find_file(name: str, search_paths: Sequence[str] = ()) -> str:
  """Where `parse_gin` finds the gin file `name` (the order of `file_resolution`)."""
  from specialize_jax.data import storage  # pylint: disable=g-import-not-at-top
  for prefix in ["", *search_paths, SHIPPED_GIN_DIR]:
    path = storage.join(prefix, name) if prefix else name
    if storage.isfile(path):
      return path
  raise ConfigError(f"gin file {name!r} not found in the working directory, --gin_search_paths "
                    f"{list(search_paths)} or {SHIPPED_GIN_DIR}.")


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
    storage.write_text(storage.join(model_dir, RUN_CONFIG_FILE), text)


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


def recorded_model_dtype(path: str) -> Optional[str]:
  """The compute dtype of the model a run trained: the unscoped `T5Config.dtype` binding (macros
  resolved; T5Config's default when unbound) in the `config.gin` of `path`, a run directory, or of
  its parent (`path` a step directory). None when neither holds one that configures a T5Config,
  or it does not parse (a warning).

  Read with gin's parser alone: nothing is bound, so a job's own configuration stays as it is.
  """
  from gin import config_parser  # pylint: disable=g-import-not-at-top
  from specialize_jax.data import storage  # pylint: disable=g-import-not-at-top
  from specialize_jax.model.config import T5Config  # pylint: disable=g-import-not-at-top
  path = str(path).rstrip("/")
  candidates = [storage.join(path, RUN_CONFIG_FILE),
                storage.join(storage.dirname(path), RUN_CONFIG_FILE)]
  config_file = next((c for c in candidates if storage.isfile(c)), None)
  if config_file is None:
    return None

  class Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_name, evaluate):
      return ("@", scoped_name, evaluate)

    def macro(self, name):
      return ("%", name)

  macros, dtype, configured = {}, T5Config.dtype, False
  try:
    for statement in config_parser.ConfigParser(storage.read_text(config_file), Delegate()):
      if not isinstance(statement, config_parser.BindingStatement) or statement.scope:
        continue
      if not statement.arg_name:
        macros[statement.selector] = statement.value
      elif statement.selector.rsplit(".", 1)[-1] == "T5Config":
        configured = True
        if statement.arg_name == "dtype":
          dtype = statement.value
  except (SyntaxError, ValueError) as e:
    logging.warning("%s does not parse (%s); its model dtype is not used.", config_file, e)
    return None
  for _ in range(len(macros) + 1):  # A chain of macros ends within as many steps as there are.
    if isinstance(dtype, tuple) and dtype[0] == "%":
      dtype = macros.get(dtype[1])
  if not configured or not isinstance(dtype, str):
    return None
  logging.info("%s: the run's model computes in %s.", config_file, dtype)
  return dtype
