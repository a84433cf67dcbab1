"""The one path layer: every path a user gives (MODEL_DIR and all under it, teacher and aligned files,
checkpoints, eval outputs, reports, plots, `convert` outputs) is read and written through here or
through `etils.epath` (what orbax itself uses), so local paths and storage URLs (`gs://...`) behave
alike. No module calls `os.` file functions or `open()` on a user path (tests/test_storage.py greps).

On TPU VMs `gs://` goes through TensorFlow's GCS client (epath's default backend when TensorFlow is
installed); with `EPATH_USE_TF=false` it goes through fsspec's `gcsfs`, which honours
`STORAGE_EMULATOR_HOST` (the tests' local emulator). Orbax's array data goes through tensorstore
(`TENSORSTORE_GCS_HTTP_URL`).

Atomic writes: `atomic_write(path)` yields a file object; a reader sees the old content or the new,
never half of it. Locally: a temp file beside `path`, flushed, fsync'ed and `os.replace`d onto it.
On an object store: a local temp file uploaded as one object at the end (an object becomes visible
only when its upload completes). On any exception `path` is untouched (absent stays absent).

Append-only logs (`AppendLog`, read by `read_log`): a file appended in place locally; on an object
store, which cannot append, a folder of part objects, one per flush, so a log costs bytes linear in
its length.
"""
import concurrent.futures
import contextlib
import datetime
import os
import shutil
import tempfile
from typing import IO, Iterator, List, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_url(path: PathLike) -> bool:
  return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
  """A local path made absolute; a URL as it is."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def as_path(path: PathLike) -> epath.Path:
  return epath.Path(os.fspath(path))


def join(base: PathLike, *parts: str) -> str:
  return os.fspath(as_path(base).joinpath(*parts))


def basename(path: PathLike) -> str:
  return as_path(path).name


def dirname(path: PathLike) -> str:
  return os.fspath(as_path(absolute(path)).parent)


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
  path = as_path(path)
  return path.exists() and not path.is_dir()


def makedirs(path: PathLike) -> None:
  as_path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: PathLike) -> List[str]:
  """The names in directory `path`, sorted."""
  return sorted(child.name for child in as_path(path).iterdir())


def remove(path: PathLike) -> None:
  as_path(path).unlink()


def rmtree(path: PathLike) -> None:
  as_path(path).rmtree()


def read_text(path: PathLike) -> str:
  return as_path(path).read_text(encoding="utf-8")


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def open_file(path: PathLike, mode: str = "r") -> IO:
  """A file object for reading (`r`/`rb`) or a streamed write; use `atomic_write` for outputs a
  user keeps."""
  return as_path(path).open(mode)


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Streams file `src` to `dst` (either local or a URL; one object on a store), creating
  `dst`'s directory."""
  dst = as_path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  with as_path(src).open("rb") as fin, dst.open("wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 22)


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies the files under directory `src` into `dst` (created), local or remote alike.
  Subdirectories go first, then the files, largest first: the small index files a reader opens
  first (config.json, T5X's `checkpoint`) arrive last."""
  src, dst = as_path(src), as_path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  children = list(src.iterdir())
  for child in sorted(c for c in children if c.is_dir()):
    copy_tree(child, dst / child.name)
  for child in sorted((c for c in children if not c.is_dir()), key=lambda c: -c.stat().length):
    copy_file(child, dst / child.name)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", durable: bool = True) -> Iterator[IO]:
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}.")
  path = os.fspath(path)
  remote = is_url(path)
  if remote:  # Staged on local disk, then uploaded as one object.
    directory = tempfile.mkdtemp(prefix="specialize-upload-")
  else:  # Beside the target: same filesystem, so the rename is atomic.
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{basename(path)}.", suffix=".tmp")
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions.
    kwargs = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      if durable and not remote:
        os.fsync(f.fileno())
    if remote:
      copy_file(tmp, path)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
    if remote:
      shutil.rmtree(directory, ignore_errors=True)


def write_text(path: PathLike, text: str) -> None:
  with atomic_write(path) as f:
    f.write(text)


class AppendLog:
  """An append-only text log at `path` (such as MODEL_DIR/metrics.jsonl), written by one process
  at a time.

  Locally `path` is one file, appended to and flushed to the OS at every `append`. Object stores
  cannot append, and rewriting the whole object at every write moves bytes quadratic in the log's
  length and stalls the writer more the longer a run goes. So on a store `path` is a folder of part
  objects: `append` keeps the lines in memory and `flush` uploads the lines since the last flush as
  the next part. Every byte is uploaded once; a part is a new object that becomes visible only once
  whole, so nothing readable is ever replaced, and a crash (SIGKILL, a preempted VM) loses only the
  lines not yet flushed; the caller decides how often that is (the metric writer: at checkpoints,
  at exit and at most a minute apart).

  Parts are named `part-<writer start, UTC, to the microsecond>-<flush number><suffix>`, so names
  sort in the order written, across resumed runs too, and a writer never lists the folder (a
  listing may be stale: gcsfs caches them). `read_log` gives the text either way (on a store as
  `gsutil cat 'PATH/*'` does).
  """

  def __init__(self, path: PathLike):
    self._path = os.fspath(path)
    self._remote = is_url(self._path)
    self._pending: List[str] = []
    self._start = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    self._num_parts = 0

  def append(self, lines: List[str]) -> None:
    if self._remote:
      self._pending.extend(lines)
      return
    os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
    with open(self._path, "a", encoding="utf-8") as f:
      f.write("".join(lines))
      f.flush()

  def flush(self) -> None:
    """Uploads the lines appended since the last flush as one new part (nothing locally, where
    `append` has written them already). On an upload error the lines stay pending."""
    if not self._pending:
      return
    name = f"{_PART_PREFIX}{self._start}-{self._num_parts:06d}{os.path.splitext(self._path)[1]}"
    # One write call, then close: the object is created whole at close, or not at all.
    with open_file(join(self._path, name), "w") as f:
      f.write("".join(self._pending))
    self._pending = []
    self._num_parts += 1

  def close(self) -> None:
    self.flush()


_PART_PREFIX = "part-"


def read_log(path: PathLike) -> str:
  """The text of the `AppendLog` at `path`: the file, or its parts concatenated in order."""
  path = os.fspath(path)
  if isfile(path):
    return read_text(path)
  if not exists(path):
    raise FileNotFoundError(f"No log at {path}.")
  parts = [join(path, name) for name in listdir(path) if name.startswith(_PART_PREFIX)]
  with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(parts)))) as pool:
    return "".join(pool.map(read_text, parts))
