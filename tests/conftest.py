"""Test-wide setup: 8 fake CPU devices (set before jax is imported), the shared data directory,
and the order files are handed to the workers in (longest first)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CPU settings `specialize` runs with.
from specialize_jax.runtime import xla_flags  # noqa: E402
xla_flags.apply()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from tests.support import prepared_sets  # noqa: E402
from tests.support import shared_data  # noqa: E402

# Task registration reads the vocabulary path at `import tasks`, whichever test imports it first:
# fix it for the whole session to the shared T5 vocabulary (when the shared data is there).
_SHARED_VOCAB = shared_data.location() / "tokenizer" / "t5_spiece.model"
if os.path.exists(_SHARED_VOCAB):
  os.environ.setdefault("SPECIALIZE_VOCAB_PATH", str(_SHARED_VOCAB))


# The longest files, as the README's two-worker run measures them (docs/testing.md), go to the
# workers first, so that no long file starts last while the other worker idles; the rest follow
# in collection order. (pytest-xdist would otherwise order files by their number of tests.)
LONGEST_FILES_FIRST = ("test_multihost_cli.py", "test_demo.py", "test_train_step.py",
                       "test_trainer.py", "test_memory_plan.py", "test_original_batching.py",
                       "test_attention_kernels.py", "test_network.py", "test_wheel.py",
                       "test_multiprocess.py", "test_tasks.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest in order


@pytest.fixture
def data_dir(monkeypatch):
  """Points SPECIALIZE_DATA_DIR at the shared data folder (skips loudly when it is absent)."""
  path = shared_data.shared_data_dir()
  monkeypatch.setenv("SPECIALIZE_DATA_DIR", str(path))
  return path


@pytest.fixture
def vocab_path():
  return shared_data.shared_file("tokenizer/t5_spiece.model")


@pytest.fixture(scope="session")
def codex_aligned_files(tmp_path_factory):
  """The paper's code-davinci-002 samples of GSM8K train[0] (top-5 logprobs) as a teacher file, and
  its aligned file: `(teacher_path, aligned_path, records)`."""
  from specialize_jax.align import alignment  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_data  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_sources  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("codex_teacher")
  records = teacher_sources.records_from_fu2023_codex(shared_data.shared_file(
      "teacher_outputs/fu2023_codex_notebook/codex_gsm8k_train0_50samples_top5.json"))[:1]
  teacher_path = root / "teacher.jsonl"
  teacher_data.write_records(teacher_path, records)
  lines, _ = alignment.align_records(records, shared_data.shared_file("tokenizer/t5_spiece.model"))
  aligned_path = root / "aligned.jsonl"
  aligned_path.write_text("".join(lines), encoding="utf-8")
  return teacher_path, aligned_path, records


@pytest.fixture(scope="session")
def gsm8k_gold_set(tmp_path_factory):
  """The GSM8K gold rationales prepared once (all four formats), with SPECIALIZE_PREPARED_DATA
  pointing at it for the whole session (the default distillation tasks read it)."""
  old = os.environ.get("SPECIALIZE_DATA_DIR")
  os.environ["SPECIALIZE_DATA_DIR"] = str(shared_data.shared_data_dir())
  try:
    path = prepared_sets.prepare_gsm8k_set(tmp_path_factory.mktemp("prepared") / "gsm8k_gold",
                                           workers=2, num_chunks=4)
  finally:
    if old is None:
      os.environ.pop("SPECIALIZE_DATA_DIR")
    else:
      os.environ["SPECIALIZE_DATA_DIR"] = old
  os.environ["SPECIALIZE_PREPARED_DATA"] = path
  return path
