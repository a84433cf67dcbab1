"""XLA CPU settings that entry points apply before JAX starts (`specialize`, the benchmarks, tests).

With jaxlib 0.10.2, XLA's CPU backend hands dots *and* elementwise ops to YNNPACK fusions by
default, and the elementwise ones cost more than they save in training (the gated-GELU backward and
its layout copies). Keeping YNNPACK for dots only makes training steps faster (docs/benchmarks.md).

The flag names exist in the pinned jaxlib (an unknown XLA flag aborts the process, so a jaxlib
upgrade must re-check them). A flag the user already set in `XLA_FLAGS` is left as the user set it.
`XLA_FLAGS` is read by every XLA backend a process starts, and a TPU or GPU plugin ships its own XLA
that may not know a CPU flag, so `apply` sets them only when the CPU is the only backend JAX will
start (`platforms.cpu_only`); TPU and GPU processes keep their environment untouched.

Decoding is the exception to "YNNPACK for dots": a decode step multiplies a few rows (`[32, 512]`)
by weights that no longer sit in the cache, and there XLA's own (Eigen) dots are faster
(`tools/bench_decode.py`, docs/benchmarks.md). `decode_compiler_options` gives the decoder's `jax.jit` that setting, so training
keeps YNNPACK and decoding does not.
"""
import os

from specialize_jax.runtime import platforms

_YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = {_YNN_FUSION_FLAG: "dot"}
# Per-compilation options of the decoder (`jax.jit(..., compiler_options=...)`): no YNNPACK.
DECODE_CPU_OPTIONS = {_YNN_FUSION_FLAG.lstrip("-"): ""}


def _flag_values() -> dict:
  """`{flag: value}` of `$XLA_FLAGS` (value "" for a bare flag)."""
  pairs = (item.split("=", 1) for item in os.environ.get("XLA_FLAGS", "").split())
  return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}


def apply() -> str:
  """Adds `CPU_FLAGS` to `$XLA_FLAGS` when JAX will run on the CPU only (call before JAX
  initializes a backend); returns the value ("" when unset)."""
  current = os.environ.get("XLA_FLAGS", "")
  if not platforms.cpu_only(os.environ, platforms.accelerator_installed()):
    return current
  present = _flag_values()
  extra = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in present]
  os.environ["XLA_FLAGS"] = " ".join([current] + extra).strip()
  return os.environ["XLA_FLAGS"]


def decode_compiler_options(backend: str) -> dict:
  """The decoder's compiler options on `backend`: `DECODE_CPU_OPTIONS` on CPU, else none.

  A YNNPACK setting in `XLA_FLAGS` other than `CPU_FLAGS`' own is the user's choice and stays in
  force for decoding too (no options).
  """
  if backend != "cpu" or _flag_values().get(_YNN_FUSION_FLAG, CPU_FLAGS[_YNN_FUSION_FLAG]) != (
      CPU_FLAGS[_YNN_FUSION_FLAG]):
    return {}
  return dict(DECODE_CPU_OPTIONS)
