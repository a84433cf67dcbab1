"""Test-wide setup: 8 fake CPU devices (set before jax is imported) and the shared data directory."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

import shared_data  # noqa: E402


@pytest.fixture
def data_dir(monkeypatch):
  """Points SPECIALIZE_DATA_DIR at the shared data folder (skips loudly when it is absent)."""
  path = shared_data.shared_data_dir()
  monkeypatch.setenv("SPECIALIZE_DATA_DIR", str(path))
  return path


@pytest.fixture
def vocab_path():
  return shared_data.shared_file("tokenizer/t5_spiece.model")
