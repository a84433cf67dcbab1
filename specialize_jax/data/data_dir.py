"""Where datasets, prompts and the vocabulary live on disk.

The data directory has the layout of the project's shared data folder (``gsm8k/train.jsonl``,
``multiarith/MultiArith.json``, ``bbh/bbh/<task>.json``, ``prompts/fu2023_lib_prompt/...``,
``tokenizer/t5_spiece.model``, ...). ``specialize download`` fills it from public URLs.

Resolution order: the ``SPECIALIZE_DATA_DIR`` environment variable, else ``DEFAULT_DATA_DIR``.
"""
import os
import pathlib

DATA_DIR_ENV = "SPECIALIZE_DATA_DIR"
DEFAULT_DATA_DIR = pathlib.Path("~/.cache/specialize_jax/data").expanduser()


def data_dir() -> pathlib.Path:
  """The data directory currently in force (not required to exist)."""
  value = os.environ.get(DATA_DIR_ENV)
  return pathlib.Path(value).expanduser() if value else DEFAULT_DATA_DIR


def data_path(relative_path: str) -> pathlib.Path:
  """Absolute path of ``relative_path`` inside the data directory; raises if it is missing."""
  path = data_dir() / relative_path
  if not path.exists():
    raise FileNotFoundError(
        f"Missing data file {path}. Fetch it with `specialize download` "
        f"(or point {DATA_DIR_ENV} at a directory that holds {relative_path}).")
  return path
