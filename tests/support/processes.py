"""Subprocesses of the tests: the `specialize` command, worker scripts, loopback ports.

A child's variables are `environment()`: this process's, with this checkout first on PYTHONPATH
(so a child imports the library under test, not another installed copy), by default without
XLA_FLAGS (a child chooses its own device count), and with a persistent compilation cache shared
by the children of this test process (`JAX_COMPILATION_CACHE_DIR`, unless a test names its own):
a command run again (a resume, a rerun) loads its programs instead of compiling them.
`run_specialize` forks the command from a server that has imported the libraries
(`forked_commands`); `specialize_argv` is for a test that needs a new interpreter.
"""
import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Iterable, List, Optional

from tests.support import REPO_ROOT
from tests.support import forked_commands

TIMEOUT_S = 600  # A hang's limit; on a loaded 2-core machine a run can take minutes.


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@functools.lru_cache(maxsize=None)
def _children_compilation_cache() -> str:
  directory = tempfile.mkdtemp(prefix='specialize-test-xla-cache-')
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  return directory


def environment(drop: Iterable[str] = ('XLA_FLAGS',), **values) -> dict:
  """`os.environ` without the variables `drop`, updated with `values`, this checkout first on
  PYTHONPATH, the children's compilation cache unless `values` names one."""
  drop = set(drop)
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.setdefault('JAX_COMPILATION_CACHE_DIR', _children_compilation_cache())
  env.update(values)
  env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT)] + [
      p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])
  return env


def specialize_argv(*args: str) -> List[str]:
  """The command line of `specialize ARGS` in this Python."""
  return [sys.executable, '-m', 'specialize_jax.cli', *args]


def module_argv(module: str, *args: str) -> List[str]:
  """The command line of `python -m MODULE ARGS` (e.g. `tests.support.multiprocess_worker`): run
  it with cwd REPO_ROOT or with `environment()`, either of which makes `tests` importable."""
  return [sys.executable, '-m', module, *args]


def run_specialize(args, env: Optional[dict] = None, cwd=REPO_ROOT,
                   timeout: Optional[float] = TIMEOUT_S,
                   check: bool = False) -> subprocess.CompletedProcess:
  """Runs `specialize ARGS` to its end (text output captured; env default `environment()`), in a
  process forked from a server that has imported the libraries (`forked_commands`).

  With `check`, fails the test with the end of stderr unless it exits 0.
  """
  env = environment() if env is None else env
  result = forked_commands.shared_server(env).run(list(args), env, cwd, timeout)
  if check:
    assert result.returncode == 0, f'specialize {args[0]} failed:\n{result.stderr[-4000:]}'
  return result
