"""Test-wide setup: 8 fake CPU devices (set before jax is imported) and the shared data directory."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
from specialize_jax import xla_cpu_flags  # noqa: E402  (the CPU settings `specialize` runs with)
xla_cpu_flags.apply()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

import shared_data  # noqa: E402

# Task registration reads the vocabulary path at `import tasks`, whichever test imports it first:
# fix it for the whole session to the shared T5 vocabulary (when the shared data is there).
_SHARED_VOCAB = os.path.join(os.environ.get(shared_data.SHARED_DATA_ENV, str(
    shared_data.REPO_ROOT.parent / "shared" / "data")), "tokenizer", "t5_spiece.model")
if os.path.exists(_SHARED_VOCAB):
  os.environ.setdefault("SPECIALIZE_VOCAB_PATH", _SHARED_VOCAB)


@pytest.fixture
def data_dir(monkeypatch):
  """Points SPECIALIZE_DATA_DIR at the shared data folder (skips loudly when it is absent)."""
  path = shared_data.shared_data_dir()
  monkeypatch.setenv("SPECIALIZE_DATA_DIR", str(path))
  return path


@pytest.fixture
def vocab_path():
  return shared_data.shared_file("tokenizer/t5_spiece.model")
