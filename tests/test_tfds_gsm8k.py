"""GSM8K through TFDS (`gsm8k:1.0.0`), prepared offline from the local JSONL, read by SeqIO."""
import pytest
import seqio

from specialize_jax.data import readers
from specialize_jax.data import tfds_gsm8k
from tests.support import shared_data


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  shared_data.point_tasks_here()
  directory = str(tmp_path_factory.mktemp("tfds"))
  tfds_gsm8k.prepare_gsm8k_tfds(directory)
  return directory


def test_prepared_splits_match_the_jsonl(tfds_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(tfds_gsm8k.GSM8K_TFDS_NAME, data_dir=tfds_dir)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 7473, "test": 1319}
  questions = {e["question"].decode() for e in tfds.as_numpy(builder.as_dataset(split="test"))}
  assert questions == {e.question for e in readers.read_gsm8k("test")}


def test_tfds_task_matches_jsonl_task(tfds_dir):
  import specialize_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import
  seqio.set_tfds_data_dir_override(tfds_dir)
  try:
    def examples(name):
      task = seqio.get_mixture_or_task(name)
      data = task.get_dataset({"inputs": 1024, "targets": 16}, split="test", shuffle=False)
      return {e["inputs_pretokenized"]: e["targets_pretokenized"] for e in data.as_numpy_iterator()}
    assert examples("gsm8k_tfds_test_icl_cot") == examples("gsm8k_test_icl_cot")
  finally:
    seqio.set_tfds_data_dir_override(None)


def test_missing_source_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="specialize download --only gsm8k"):
    tfds_gsm8k.prepare_gsm8k_tfds(str(tmp_path / "tfds"), source_dir=str(tmp_path))
