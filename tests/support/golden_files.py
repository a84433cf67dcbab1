"""Golden-file comparison: plain text under tests/golden/, rewritten only with UPDATE_GOLDEN=1."""
import os
import pathlib

GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[1] / "golden"


def check_golden(name: str, actual: str) -> None:
  path = GOLDEN_DIR / name
  if os.environ.get("UPDATE_GOLDEN") == "1":
    path.write_text(actual, encoding="utf-8")
    return
  if not path.exists():
    raise AssertionError(f"Golden file {path} is missing; create it with UPDATE_GOLDEN=1 and "
                         "review it.")
  expected = path.read_text(encoding="utf-8")
  assert actual == expected, (f"Output differs from {path}; if the change is intended, rerun with "
                              "UPDATE_GOLDEN=1 and review the diff.")
