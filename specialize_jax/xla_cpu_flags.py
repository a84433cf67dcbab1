"""XLA CPU settings that entry points apply before JAX starts (`specialize`, the benchmarks, tests).

Measured on the 2-core development CPU (README "Measured"): with jaxlib 0.10.2, XLA's CPU backend
hands dots *and* elementwise ops to YNNPACK fusions by default, and the elementwise ones cost more
than they save in training (the gated-GELU backward and its layout copies). Keeping YNNPACK for dots
only makes a demo-sized training step about 20 % faster and a t5-small step about 13 % faster.

The flag names exist in the pinned jaxlib (an unknown XLA flag aborts the process, so a jaxlib
upgrade must re-check them). A flag the user already set in `XLA_FLAGS` is left as the user set it.
Flags only affect the CPU backend; TPU and GPU runs are unchanged.
"""
import os

CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "dot"}


def apply() -> str:
  """Adds `CPU_FLAGS` to `$XLA_FLAGS` (call before JAX initializes a backend); returns the value."""
  current = os.environ.get("XLA_FLAGS", "")
  present = {item.split("=", 1)[0] for item in current.split()}
  extra = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in present]
  os.environ["XLA_FLAGS"] = " ".join([current] + extra).strip()
  return os.environ["XLA_FLAGS"]
