"""The one place tests locate the project's shared data folder."""
import json
import os
import pathlib

import pytest

from tests.support import REPO_ROOT

SHARED_DATA_ENV = "SPECIALIZE_SHARED_DATA"
# The is_correct rates (%) of the four GPT-3 models in gsm8k/example_model_solutions.jsonl, as the
# shared data's SOURCES.md §1 records them.
GSM8K_SOLUTION_IS_CORRECT_PERCENT = {"6b_finetuning": 21.68, "6b_verification": 39.04,
                                     "175b_finetuning": 34.72, "175b_verification": 56.25}


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


def read_jsonl(relative_path: str) -> list:
  """The rows of a JSON-lines file of the shared data."""
  with open(shared_file(relative_path), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def point_tasks_here() -> pathlib.Path:
  """Points SPECIALIZE_DATA_DIR and SPECIALIZE_VOCAB_PATH (the shared T5 vocabulary) at the shared
  data for the rest of the session, as the registered tasks read them; returns the data folder."""
  data = shared_data_dir()
  os.environ["SPECIALIZE_DATA_DIR"] = str(data)
  os.environ["SPECIALIZE_VOCAB_PATH"] = str(data / "tokenizer" / "t5_spiece.model")
  return data
