"""GSM8K as the TensorFlow Datasets builder `gsm8k:1.0.0`, which T5X users read through
`seqio.TfdsDataSource` and `--tfds_data_dir`.

TFDS's own builder downloads from GitHub `master`. `prepare_gsm8k_tfds` builds the same dataset
(splits `train` 7,473 / `test` 1,319; features `question`, `answer`, `annotation`, `short_answer`)
from the local JSONL files instead, so it also works offline: it points the builder's download URLs at
`file://` copies for the duration of the call. (The builder also lists `*_socratic` splits, which the
project does not use and the data directory does not hold; they are not built.)
"""
import contextlib
import pathlib
from typing import Iterator, Optional

from specialize_jax.data import data_dir
from specialize_jax.data import readers

GSM8K_TFDS_NAME = "gsm8k:1.0.0"


@contextlib.contextmanager
def _local_urls(source_dir: pathlib.Path) -> Iterator[None]:
  from tensorflow_datasets.text.gsm8k import gsm8k  # pylint: disable=g-import-not-at-top
  saved = dict(gsm8k._URLS)  # pylint: disable=protected-access
  gsm8k._URLS.clear()  # pylint: disable=protected-access
  gsm8k._URLS.update({split: (source_dir / pathlib.Path(path).name).resolve().as_uri()  # pylint: disable=protected-access
                      for split, path in readers.GSM8K_FILES.items()})
  try:
    yield
  finally:
    gsm8k._URLS.clear()  # pylint: disable=protected-access
    gsm8k._URLS.update(saved)  # pylint: disable=protected-access


def prepare_gsm8k_tfds(tfds_data_dir: str, source_dir: Optional[str] = None) -> str:
  """Builds `gsm8k:1.0.0` under `tfds_data_dir` from local JSONL files; returns the dataset dir.

  `source_dir` holds `train.jsonl` and `test.jsonl` (default: the data directory's `gsm8k/`).
  Already-prepared data is left as it is.
  """
  import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import  (TFDS needs it, undeclared)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if source_dir is None:
    source = data_dir.data_path(readers.GSM8K_FILES["train"]).parent
  else:
    source = pathlib.Path(source_dir)
  for split, relative_path in readers.GSM8K_FILES.items():
    if not (source / pathlib.Path(relative_path).name).exists():
      raise FileNotFoundError(f"GSM8K {split} file {source / pathlib.Path(relative_path).name} is "
                              "missing; run `specialize download --only gsm8k` first.")
  builder = tfds.builder(GSM8K_TFDS_NAME, data_dir=tfds_data_dir)
  with _local_urls(source):
    builder.download_and_prepare(download_dir=str(pathlib.Path(tfds_data_dir) / "downloads"))
  return str(builder.data_dir)
