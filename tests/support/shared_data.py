"""The one place tests locate the project's shared data folder."""
import os
import pathlib

import pytest

from tests.support import REPO_ROOT

SHARED_DATA_ENV = "SPECIALIZE_SHARED_DATA"


def location() -> pathlib.Path:
  """``$SPECIALIZE_SHARED_DATA``, default ``../shared/data`` beside the repo (maybe absent)."""
  return pathlib.Path(os.environ.get(SHARED_DATA_ENV,
                                     REPO_ROOT.parent / "shared" / "data")).resolve()


def shared_data_dir() -> pathlib.Path:
  """The shared data folder (`location()`); skips the test loudly if it is absent."""
  path = location()
  if not path.is_dir():
    pytest.skip(f"SHARED DATA NOT FOUND at {path}: set {SHARED_DATA_ENV} to the shared data folder "
                "(CI always has it; this test did NOT run).")
  return path


def shared_file(relative_path: str) -> pathlib.Path:
  path = shared_data_dir() / relative_path
  if not path.exists():
    pytest.skip(f"SHARED DATA FILE NOT FOUND: {path} (this test did NOT run).")
  return path
