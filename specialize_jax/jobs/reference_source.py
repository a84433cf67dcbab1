"""Where `--reference` numbers come from: a .json or .csv file, another run directory (its selected
checkpoint), or a reference shipped with the configs (`gin/reference/NAME.json`)."""
import os
from typing import List

from specialize_jax.data import storage
from specialize_jax.errors import ConfigError
from specialize_jax.jobs import gin_config

REFERENCE_SUBDIR = "reference"  # under the shipped gin/ folder


def shipped_references() -> List[str]:
  """The names of the shipped reference tables."""
  folder = os.path.join(gin_config.SHIPPED_GIN_DIR, REFERENCE_SUBDIR)
  names = os.listdir(folder) if os.path.isdir(folder) else ()  # local: the package's own files
  return sorted(n[:-len(".json")] for n in names if n.endswith(".json"))


def load_reference(value: str, rule, dtype, start_step):
  """The reference `value` names: a run directory, a file, or a shipped name."""
  # Imported here: `shipped_references` serves `specialize --help`, which must not start JAX.
  from specialize_jax.evaluation import reference  # pylint: disable=g-import-not-at-top
  from specialize_jax.evaluation import sweep  # pylint: disable=g-import-not-at-top
  if storage.isdir(value):
    table = sweep.read_accuracy_table(value, dtype or gin_config.recorded_model_dtype(value))
    return reference.from_run(storage.absolute(value), table, rule, start_step)
  shipped = os.path.join(gin_config.SHIPPED_GIN_DIR, REFERENCE_SUBDIR, f"{value}.json")
  is_shipped = os.path.isfile(shipped)  # local: the package's own files
  if not storage.exists(value) and os.sep not in value and is_shipped:
    return reference.load_file(shipped)
  if not storage.exists(value):
    raise ConfigError(f"--reference {value}: no such file or run directory, nor a shipped "
                      f"reference ({', '.join(shipped_references())}); give a .json or .csv "
                      "file, a run directory or one of those names.")
  return reference.load_file(value)
