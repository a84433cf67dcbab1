"""`specialize` commands as forked processes of a server that has already imported the libraries.

Every `specialize` process spends about 7 of its first seconds importing TensorFlow (through
SeqIO), JAX, Flax and orbax: most of what a failing command or a tiny multi-process training run
costs, and a large share of the suite's. The server (`python -m tests.support.forked_commands`) imports
them once, before JAX has a backend or any thread has started; each command is then a child forked
from it that takes its own environment, working directory and log file and runs
`specialize_jax.cli.main(argv)` to its exit code, with its exit handlers, as the command's process
would. It is a separate process (its own pid, signals, devices and `jax.distributed` client);
what it skips is the interpreter start and those imports. The server freezes its objects
(`gc.freeze`): a child's garbage collections would otherwise touch, and so copy, all of them (a
forked tiny training run then took about as long as a new interpreter).

What a child cannot change, because the server read it at import: the `JAX_*` variables and
`TF_CPP_MIN_LOG_LEVEL` (JAX reads its configuration when imported) and `GLIBC_TUNABLES` (glibc reads
it when a process starts). `Server.start` refuses a command whose environment differs there; the
server runs with `allocator.TUNABLES` unless the environment sets them, as `specialize train`
would after its re-exec.

Protocol, one JSON object per line: requests `{"argv", "env", "cwd", "stdout", "stderr"}` (file
paths) on the server's stdin;
replies `{"pid": PID}` per request and `{"exited": PID, "code": CODE}` when a child ends (CODE as
`subprocess`'s `returncode`: negative for a signal).
"""
import atexit
import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from tests.support import REPO_ROOT

# Read when a library is imported or a process starts: a child must share the server's.
_FIXED_AT_START = ('TF_CPP_MIN_LOG_LEVEL', 'GLIBC_TUNABLES')


def _fixed(env: Dict[str, str]) -> Dict[str, Optional[str]]:
  names = {n for n in env if n.startswith('JAX_')} | set(_FIXED_AT_START)
  return {n: env.get(n) for n in sorted(names)}


def _with_start_defaults(env: Dict[str, str]) -> Dict[str, str]:
  """`env` with what a `specialize train` process runs with where it sets nothing: glibc's
  `allocator.TUNABLES` (its re-exec) and `TF_CPP_MIN_LOG_LEVEL=3` (`cli.main`, before TensorFlow
  is imported)."""
  from specialize_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  return {'GLIBC_TUNABLES': allocator.TUNABLES, 'TF_CPP_MIN_LOG_LEVEL': '3', **env}


def check_same_start(server_env: Dict[str, str], env: Dict[str, str]) -> None:
  """Raises unless a command's `env` agrees with its server's on what was read at start."""
  if _fixed(env) != _fixed(server_env):
    raise ValueError(f'A forked command cannot change {_fixed(server_env)} to {_fixed(env)}: '
                     'start a server with that environment.')


class ForkedProcess:
  """A forked command, with the part of `subprocess.Popen`'s interface the tests use."""

  def __init__(self, server: 'Server', pid: int):
    self._server, self.pid = server, pid
    self.returncode: Optional[int] = None

  def poll(self) -> Optional[int]:
    if self.returncode is None:
      self.returncode = self._server.exit_code(self.pid)
    return self.returncode

  def wait(self, timeout: Optional[float] = None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    while self.poll() is None:
      if deadline is not None and time.monotonic() > deadline:
        raise subprocess.TimeoutExpired(f'forked command {self.pid}', timeout)
      time.sleep(0.01)
    return self.returncode

  def send_signal(self, signum: int) -> None:
    if self.poll() is None:
      os.kill(self.pid, signum)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)


class Server:
  """The server process and the exits it reports (read on a thread of this process)."""

  def __init__(self, env: Dict[str, str]):
    self.env = _with_start_defaults(env)
    self._log = tempfile.TemporaryFile()  # the server's own stderr: its failures
    self._process = subprocess.Popen(
        [sys.executable, '-m', 'tests.support.forked_commands'], cwd=REPO_ROOT, env=self.env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
    self._exits: Dict[int, int] = {}
    self._pids: List[int] = []
    self._changed = threading.Condition()
    threading.Thread(target=self._read, daemon=True).start()
    atexit.register(self.close)

  def _read(self) -> None:
    for line in self._process.stdout:
      message = json.loads(line)
      with self._changed:
        if 'pid' in message:
          self._pids.append(message['pid'])
        else:
          self._exits[message['exited']] = message['code']
        self._changed.notify_all()

  def start(self, argv: List[str], env: Dict[str, str], cwd, stdout,
            stderr=None) -> ForkedProcess:
    """Forks `specialize ARGV` with `env` in `cwd`, its output appended to the file `stdout` and
    its errors to `stderr` (default: the same file)."""
    env = _with_start_defaults(env)
    check_same_start(self.env, env)
    with self._changed:
      asked = len(self._pids)
      self._process.stdin.write(json.dumps(
          {'argv': list(argv), 'env': env, 'cwd': str(cwd), 'stdout': str(stdout),
           'stderr': str(stderr or stdout)}) + '\n')
      self._process.stdin.flush()
      if not self._changed.wait_for(lambda: len(self._pids) > asked, timeout=60):
        self._log.seek(0)
        raise RuntimeError('The command server did not fork; its output ends:\n' +
                           self._log.read()[-3000:].decode(errors='replace'))
      return ForkedProcess(self, self._pids[asked])

  def run(self, argv: List[str], env: Dict[str, str], cwd,
          timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """`specialize ARGV` to its end, as `subprocess.run(..., capture_output=True, text=True)`."""
    with tempfile.TemporaryDirectory() as logs:
      out, err = os.path.join(logs, 'stdout'), os.path.join(logs, 'stderr')
      for path in (out, err):
        open(path, 'w', encoding='utf-8').close()
      process = self.start(argv, env, cwd, out, err)
      try:
        code = process.wait(timeout)
      finally:
        process.kill()
      texts = []
      for path in (out, err):
        with open(path, encoding='utf-8', errors='replace') as f:
          texts.append(f.read())
    return subprocess.CompletedProcess(['specialize', *argv], code, *texts)

  @property
  def closed(self) -> bool:
    return self._process.poll() is not None

  def exit_code(self, pid: int) -> Optional[int]:
    with self._changed:
      return self._exits.get(pid)

  def close(self) -> None:
    """Kills the commands still running, then ends the server."""
    if self._process.poll() is not None:
      return
    with self._changed:
      running = [pid for pid in self._pids if pid not in self._exits]
    for pid in running:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    self._process.stdin.close()
    self._process.wait(timeout=60)


_SERVERS: Dict[tuple, Server] = {}


def shared_server(env: Dict[str, str]) -> Server:
  """This test process's server for commands with `env`'s import-time variables (one per set)."""
  key = tuple(_fixed(_with_start_defaults(env)).items())
  if key not in _SERVERS or _SERVERS[key].closed:
    _SERVERS[key] = Server(env)
  return _SERVERS[key]


# ---------------------------------------------------------------------------------- the server


def _run_child(request: dict) -> None:
  """In the forked child: becomes the command's process and never returns."""
  code = 1
  try:
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, name in ((1, 'stdout'), (2, 'stderr')):
      os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    sys.argv = ['specialize', *request['argv']]
    from specialize_jax import cli  # pylint: disable=g-import-not-at-top
    try:
      code = cli.main(request['argv'])
    except SystemExit as e:  # argparse's usage errors and `--help`
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
  finally:
    try:
      atexit._run_exitfuncs()  # pylint: disable=protected-access
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code or 0)


def serve() -> None:
  """Imports the libraries, then forks a child per request until stdin closes and every child
  has ended."""
  # pylint: disable=g-import-not-at-top,unused-import
  import flax.linen
  import gin
  import jax
  import optax
  import orbax.checkpoint
  import seqio
  import tensorflow
  from specialize_jax import cli
  # pylint: enable=g-import-not-at-top,unused-import
  # The imported objects are shared with every child until written: kept out of the children's
  # garbage collections, which would touch (and so copy) every page of them.
  gc.freeze()
  reply = lambda message: print(json.dumps(message), flush=True)
  children, pending, stdin_open = set(), b'', True
  while stdin_open or children:
    if stdin_open and select.select([0], [], [], 0.02)[0]:
      data = os.read(0, 1 << 16)
      stdin_open = bool(data)
      pending += data
      while b'\n' in pending:
        line, pending = pending.split(b'\n', 1)
        pid = os.fork()
        if pid == 0:
          _run_child(json.loads(line))
        children.add(pid)
        reply({'pid': pid})
    elif not stdin_open:
      time.sleep(0.02)
    while children:
      pid, status = os.waitpid(-1, os.WNOHANG)
      if pid == 0:
        break
      children.discard(pid)
      reply({'exited': pid, 'code': os.waitstatus_to_exitcode(status)})


if __name__ == '__main__':
  serve()
