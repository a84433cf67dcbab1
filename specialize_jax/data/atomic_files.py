"""Writing a file so that a reader sees the old content or the new, never half of it.

`atomic_write(path)` yields a file object on a temp file beside `path` (same filesystem); on a clean
exit the data is flushed, fsync'ed and `os.replace`d onto `path`; on any exception the temp file is
removed and `path` is untouched (absent stays absent). Used for every output a user keeps: teacher
data, predictions, metrics, the demo's data.
"""
import contextlib
import os
import tempfile
from typing import IO, Iterator


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", durable: bool = True) -> Iterator[IO]:
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}.")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions.
    kwargs = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      if durable:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
