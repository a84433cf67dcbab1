"""glibc malloc settings for the CPU backend: freed step buffers stay in the process for reuse.

XLA's CPU runtime allocates a step's temporary buffers when the step starts and frees them when it
ends (one 535 MB block for a demo-sized training step, several GB for t5-small). glibc serves
blocks that large with `mmap` and unmaps them on free, so every step page-faults the whole block
in again and the kernel zeroes it, which costs a large share of a CPU step's time
(docs/benchmarks.md). Three glibc settings keep that memory in the heap instead:

  arena_max=1        one arena: XLA's worker threads allocate from the main heap, the only one that
                     grows without `mmap` (a thread arena falls back to `mmap` for large blocks);
  mmap_max=0         no `mmap` for large blocks;
  trim_threshold=2^46  the heap's free top is never handed back, so the next step reuses it.

With them a demo step took 0.63 s instead of 0.95 s and a t5-small step 11.0 s instead of 12.5 s.
The price: the process keeps its peak memory until it exits (a training run reaches it every step
anyway), and each compilation takes about 1.5 s longer (demo first step 6.9-8.0 s vs 5.4-6.2 s), so
only the training commands (`specialize train`, `specialize demo`, `tools/bench_train.py`) use them.
glibc reads these settings (`GLIBC_TUNABLES`) only when a process starts, and `mallopt` cannot set a
trim threshold above 2 GiB, so `reexec_with_tunables` restarts the command once, before it imports
anything heavy, with them set. It does nothing when:
  * the C library is not glibc (macOS, musl), or the process is not on Linux;
  * `GLIBC_TUNABLES` is already set (the user's own choice; set it, even empty, to opt out);
  * JAX will not run on the CPU: `JAX_PLATFORMS` names another platform first, or it is unset and a
    TPU or GPU plugin is installed. There step buffers live on the device, and one arena could
    slow a many-core host's input pipeline.
"""
import os
import platform
import sys
from typing import Mapping, Optional, Sequence

from specialize_jax.runtime import platforms

TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
            f'glibc.malloc.trim_threshold={2**46}')


def tunables_wanted(environ: Mapping[str, str], system: str, libc: str,
                    accelerator_installed: bool) -> bool:
  """Whether a process with this environment and platform should run with `TUNABLES`."""
  if system != 'Linux' or libc != 'glibc' or 'GLIBC_TUNABLES' in environ:
    return False
  return platforms.cpu_is_default(environ, accelerator_installed)


def reexec_with_tunables(argv: Optional[Sequence[str]] = None) -> None:
  """Restarts this process with `GLIBC_TUNABLES=TUNABLES` when `tunables_wanted`; else returns.

  `argv` defaults to the command line exactly as started (`sys.orig_argv`: interpreter, `-m`
  module or script, arguments). Call it first thing in a command's `main`, never from a library
  function or a test (it replaces the running program).
  """
  if not sys.executable or not tunables_wanted(os.environ, platform.system(),
                                               platform.libc_ver()[0],
                                               platforms.accelerator_installed()):
    return  # (an embedded interpreter has no executable to restart)
  argv = list(sys.orig_argv if argv is None else argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, {**os.environ, 'GLIBC_TUNABLES': TUNABLES})
