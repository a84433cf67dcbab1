"""The allocator: when the CPU malloc settings apply, and that a re-executed process reuses memory."""
import ast
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from specialize_jax.runtime import allocator


@pytest.mark.parametrize('environ, system, libc, accelerator, wanted', [
    ({}, 'Linux', 'glibc', False, True),
    ({'JAX_PLATFORMS': 'cpu'}, 'Linux', 'glibc', True, True),
    ({'JAX_PLATFORMS': 'cpu,tpu'}, 'Linux', 'glibc', True, True),
    ({}, 'Linux', 'glibc', True, False),  # a TPU/GPU plugin is installed
    ({'JAX_PLATFORMS': 'cuda,cpu'}, 'Linux', 'glibc', False, False),
    ({'GLIBC_TUNABLES': ''}, 'Linux', 'glibc', False, False),  # the user's own (opt-out)
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}, 'Linux', 'glibc', False, False),
    ({}, 'Darwin', '', False, False),
    ({}, 'Linux', '', False, False),  # musl
])
def test_tunables_wanted(environ, system, libc, accelerator, wanted):
  assert allocator.tunables_wanted(environ, system, libc, accelerator) is wanted


# A thread (as XLA's workers) allocates, touches and frees 128 MiB twice; the second round's page
# faults show whether the freed block was kept for reuse.
_CHILD = textwrap.dedent('''
    import ctypes, os, resource, sys, threading
    from specialize_jax.runtime import allocator
    allocator.reexec_with_tunables()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 128 << 20
    faults = []
    def rounds():
      for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=rounds)
    thread.start()
    thread.join()
    print(repr(os.environ.get("GLIBC_TUNABLES")), faults[1])
''')


def _second_round_faults(environ):
  done = subprocess.run([sys.executable, '-c', _CHILD], env=environ, capture_output=True,
                        text=True, check=True, timeout=120)
  tunables, faults = done.stdout.split()
  return ast.literal_eval(tunables), int(faults)


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                    reason='glibc malloc settings apply on Linux with glibc only')
def test_reexecuted_process_reuses_freed_memory():
  environ = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  environ['JAX_PLATFORMS'] = 'cpu'
  tunables, faults = _second_round_faults(environ)
  assert tunables == allocator.TUNABLES
  assert faults < 1000, faults  # 32,768 pages would fault in again without the settings
  # The opt-out: an empty GLIBC_TUNABLES is left alone, and glibc unmaps and re-faults the block.
  tunables, faults = _second_round_faults({**environ, 'GLIBC_TUNABLES': ''})
  assert tunables == ''
  assert faults > 30000, faults


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                    reason='glibc malloc settings apply on Linux with glibc only')
@pytest.mark.parametrize('command, restarted', [('train', True), ('demo', True), ('score', False)])
def test_training_commands_restart_with_the_settings(command, restarted):
  # Prints the environment's setting, then runs the command line `specialize COMMAND --help`; a
  # restarted process prints a second line.
  code = (f'import os, sys; sys.argv = ["specialize", "{command}", "--help"]; '
          'print(repr(os.environ.get("GLIBC_TUNABLES")), flush=True); '
          'from specialize_jax import cli; cli.main()')
  environ = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  environ['JAX_PLATFORMS'] = 'cpu'
  done = subprocess.run([sys.executable, '-c', code], env=environ, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  printed = [ast.literal_eval(line) for line in done.stdout.splitlines()
             if line == 'None' or line.startswith("'glibc")]
  assert printed == ([None, allocator.TUNABLES] if restarted else [None])
