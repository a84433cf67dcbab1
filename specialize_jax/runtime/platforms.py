"""Which platforms JAX will start in this process, decided before JAX is imported.

JAX starts the platforms `JAX_PLATFORMS` names (comma-separated; the first is the default). Unset,
it starts the CPU and every accelerator whose plugin is installed, and an accelerator becomes the
default. Settings made for the CPU backend (`xla_flags`, `allocator`) ask here first.
"""
import importlib.util
from typing import List, Mapping

# Top-level modules whose presence means JAX will pick an accelerator when JAX_PLATFORMS is unset.
ACCELERATOR_MODULES = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                       'jax_rocm7_plugin')


def accelerator_installed() -> bool:
  return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_MODULES)


def requested(environ: Mapping[str, str]) -> List[str]:
  """The platforms `JAX_PLATFORMS` names, lower-cased, in order; [] when it is unset or empty."""
  return [p.strip().lower() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]


def cpu_is_default(environ: Mapping[str, str], accelerator: bool) -> bool:
  """Whether JAX's default backend will be the CPU (`accelerator`: a plugin is installed)."""
  platforms = requested(environ)
  return platforms[0] == 'cpu' if platforms else not accelerator


def cpu_only(environ: Mapping[str, str], accelerator: bool) -> bool:
  """Whether the CPU is the only backend JAX will start (`accelerator`: a plugin is installed)."""
  platforms = requested(environ)
  return all(p == 'cpu' for p in platforms) if platforms else not accelerator
