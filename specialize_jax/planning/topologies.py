"""Named TPU slices and GPU boxes, and stand-in devices laid out as the real ones are.

CPU fake devices come in process order with every device addressable; a TPU slice orders its
devices by torus position, so one host's chips sit at interleaved mesh coordinates. Stand-in
devices carry what `jax.make_mesh` reads of a real device (`platform`, `device_kind`, `coords`,
`core_on_chip`, `process_index`, `id`, `slice_index`), so `partitioning.make_mesh` over them builds
the mesh a real slice gets, with the same code as `specialize train`, and `partitioning.data_layout`
gives each host's rows of it (`specialize plan` prints them; the tests check every layout).

Terms:
  topology: a named slice or GPU box (`v4-32`, `v5e-64`, `v5p-128`, `8xH100`): chips (JAX
    devices), memory per chip, and how chips sit on hosts. TPU v4 and v5p names count TensorCores
    (two per chip, one JAX device per chip: megacore); v5e and v6e names count chips.
  chip grid: the slice's chips as a 3-D torus `(x, y, z)`; a host owns a block of it (2x2x1 on
    v4, v5p and on v5e/v6e slices of more than 8 chips; the whole 2x4 grid of an 8-chip v5e/v6e).
    Hosts are numbered x block fastest, then y, then z (TPU worker ids follow the torus).
  ring hops: the interconnect hops around the mesh's `data` axis (each neighbour pair plus the
    way back), the path of the gradient reduction; `ring_hops` compares orders. Distances are
    taken without wrap-around links (slices smaller than a full cube have none): an upper bound.
"""
import dataclasses
import itertools
import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from specialize_jax.errors import ConfigError

GIB = 2**30
GB = 10**9

# Public figures. TPUs: cloud.google.com/tpu/docs/system-architecture-tpu-vm and the per-version
# pages (tpu/docs/v4, v5e, v5p, v6e): v4 32 GiB HBM2 per chip, 4 chips per host, v4-N has N/2 chips
# (N TensorCores); v5e 16 GiB HBM2 per chip, v5litepod-N has N chips, 8 on the single host of
# v5litepod-8 and 4 per host on larger slices; v5p "95GB" HBM2e per chip, 4 chips per host,
# v5p-N has N/2 chips; v6e (Trillium) 32 GB per chip, v6e-N has N chips, 4 per host (8 on v6e-8).
# GPUs (nvidia.com data sheets): A100 40/80 GB, H100 SXM 80 GB, H200 141 GB; 8 per host. Decimal
# units are taken as written (GB = 10^9 bytes): the conservative reading.
_TPU_FAMILIES = {
    # name prefix: (chip, bytes per chip, accelerator-type units per chip, chips per host,
    #               device_kind as JAX reports it)
    'v4': ('TPU v4', 32 * GIB, 2, 4, 'TPU v4'),
    'v5e': ('TPU v5e', 16 * GIB, 1, 4, 'TPU v5 lite'),
    'v5litepod': ('TPU v5e', 16 * GIB, 1, 4, 'TPU v5 lite'),
    'v5p': ('TPU v5p', 95 * GB, 2, 4, 'TPU v5p'),
    'v6e': ('TPU v6e', 32 * GB, 1, 4, 'TPU v6 lite'),
}
_GPUS = {
    'A100-40': ('NVIDIA A100 40GB', 40 * GB),
    'A100-80': ('NVIDIA A100 80GB', 80 * GB),
    'A100': ('NVIDIA A100 80GB', 80 * GB),
    'H100': ('NVIDIA H100 80GB', 80 * GB),
    'H200': ('NVIDIA H200 141GB', 141 * GB),
}
GPUS_PER_HOST = 8
KNOWN_TOPOLOGIES = ('v4-8', 'v4-16', 'v4-32', 'v4-64', 'v4-128', 'v5e-8', 'v5e-16', 'v5e-64',
                    'v5e-256', 'v5p-8', 'v5p-32', 'v5p-64', 'v5p-128', 'v6e-8', 'v6e-16', 'v6e-64',
                    '1xH100', '8xH100', '16xH100', '8xA100-40', '8xA100-80', '8xH200')
# What JAX preallocates of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
GPU_DEFAULT_MEM_FRACTION = 0.75
GPU_MEM_FRACTION_ENV = 'XLA_PYTHON_CLIENT_MEM_FRACTION'

# The header line naming the topology a shipped experiment gin is meant for (`# Topology: v4-32`).
TOPOLOGY_LINE = re.compile(r'^#\s*Topology:\s*(\S+)', re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice or GPU box: `num_devices` JAX devices of `memory_bytes` each, `devices_per_host` per
  process; TPUs also their chip grid and host block (see the module docstring)."""
  name: str
  chip: str
  num_devices: int
  memory_bytes: int
  devices_per_host: int
  device_kind: str = ''
  chip_grid: Optional[Tuple[int, int, int]] = None
  host_block: Optional[Tuple[int, int, int]] = None

  @property
  def num_hosts(self) -> int:
    return max(1, self.num_devices // self.devices_per_host)

  @property
  def is_gpu(self) -> bool:
    return self.chip_grid is None


def named_topology(gin_texts: Sequence[str]) -> Optional[str]:
  """The topology the first of `gin_texts` that has a `# Topology:` line names (None: none)."""
  for text in gin_texts:
    match = TOPOLOGY_LINE.search(text)
    if match:
      return match.group(1)
  return None


def _chip_grid(chips: int, two_d: bool) -> Tuple[int, int, int]:
  """The torus of a slice of `chips` chips: v5e/v6e are 2-D (2x2, 2x4, 4x4, 4x8, 8x8, ...), v4/v5p
  3-D (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...): the smallest dimension doubles first."""
  dims = [2, 2, 1] if chips >= 4 else [chips, 1, 1]
  while int(np.prod(dims)) < chips:
    axes = (1, 0) if two_d else (2, 1, 0)
    smallest = min(axes, key=lambda a: (dims[a], axes.index(a)))
    dims[smallest] *= 2
  if int(np.prod(dims)) != chips:
    raise ConfigError(f'{chips} chips do not form a TPU slice (a power of two is expected).')
  return tuple(dims)


def topology(name: str) -> Topology:
  """The `Topology` of a name such as `v4-32`, `v5litepod-16`, `v5p-128`, `8xH100`."""
  tpu = re.fullmatch(r'(v4|v5e|v5litepod|v5p|v6e)-(\d+)', name.strip())
  gpu = re.fullmatch(r'(\d+)x(A100-40|A100-80|A100|H100|H200)', name.strip(), flags=re.I)
  if tpu:
    chip, memory, units_per_chip, per_host, kind = _TPU_FAMILIES[tpu.group(1)]
    units = int(tpu.group(2))
    if units < units_per_chip or units % units_per_chip:
      raise ConfigError(f'--topology {name}: {tpu.group(1)}-N counts TensorCores, two per chip; '
                        f'N must be a multiple of {units_per_chip} (e.g. {tpu.group(1)}-32).')
    chips = units // units_per_chip
    two_d = units_per_chip == 1
    grid = _chip_grid(chips, two_d)
    block = (min(2, grid[0]), min(2, grid[1]), 1)
    if two_d and chips <= 8:
      per_host, block = chips, grid  # v5e / v6e slices of up to 8 chips are one host.
    return Topology(name, chip, chips, memory, min(per_host, chips), kind, grid, block)
  if gpu:
    count = int(gpu.group(1))
    key = next(k for k in _GPUS if k.lower() == gpu.group(2).lower())
    chip, memory = _GPUS[key]
    if count < 1:
      raise ConfigError(f'--topology {name}: the GPU count must be >= 1 (e.g. 8xH100).')
    return Topology(name, chip, count, memory, min(GPUS_PER_HOST, count), chip)
  raise ConfigError(f'unknown --topology {name!r}; known: {", ".join(KNOWN_TOPOLOGIES)} (TPU '
                    'v4/v5p-N: N TensorCores, 2 per chip; v5e/v6e-N: N chips; GPUs: COUNTxH100, '
                    'A100-40, A100-80, H200).')


def usable_fraction(topo: Topology, headroom_fraction: float) -> float:
  """The fraction of a chip's memory a run may plan for: `headroom_fraction` (the plan's margin)
  on TPUs; on GPUs no more than JAX preallocates (`XLA_PYTHON_CLIENT_MEM_FRACTION`, default 0.75),
  read from this environment as the run's would be."""
  if not topo.is_gpu:
    return headroom_fraction
  text = os.environ.get(GPU_MEM_FRACTION_ENV)
  try:
    fraction = GPU_DEFAULT_MEM_FRACTION if text is None else float(text)
  except ValueError:
    raise ConfigError(f'{GPU_MEM_FRACTION_ENV}={text!r} is not a number; set it to a fraction such '
                      'as 0.9 or unset it (JAX then preallocates 0.75).') from None
  if not 0 < fraction <= 1:
    raise ConfigError(f'{GPU_MEM_FRACTION_ENV}={text} must be in (0, 1].')
  return min(headroom_fraction, fraction)


@dataclasses.dataclass(frozen=True, eq=False)
class StandInDevice:
  """What `jax.make_mesh` and the data layout read of a device, for a slice this process is not
  on (identity-hashed, as devices are)."""
  id: int
  process_index: int
  platform: str
  device_kind: str
  coords: Tuple[int, int, int] = (0, 0, 0)
  core_on_chip: int = 0
  slice_index: int = 0

  def __repr__(self) -> str:
    return f'StandInDevice(id={self.id}, process={self.process_index}, coords={self.coords})'


def stand_in_devices(topo: Topology) -> List[StandInDevice]:
  """The topology's devices in `jax.devices()` order (by id: host by host, then by torus
  position z, y, x within the host), with real-slice coordinates and hosts."""
  if topo.is_gpu:
    return [StandInDevice(i, i // topo.devices_per_host, 'gpu', topo.device_kind)
            for i in range(topo.num_devices)]
  grid, block = topo.chip_grid, topo.host_block
  blocks = [g // b for g, b in zip(grid, block)]
  chips = []
  for z, y, x in itertools.product(range(grid[2]), range(grid[1]), range(grid[0])):
    bx, by, bz = x // block[0], y // block[1], z // block[2]
    host = bx + blocks[0] * (by + blocks[1] * bz)
    chips.append((host, z, y, x))
  chips.sort()
  return [StandInDevice(i, host, 'tpu', topo.device_kind, (x, y, z))
          for i, (host, z, y, x) in enumerate(chips)]


def ring_hops(device_grid: np.ndarray, topo: Topology) -> int:
  """Interconnect hops around the `data` axis of a `[data, model]` grid (model column 0): the
  chip-grid distance between each pair of neighbours and back to the start (0 for GPUs)."""
  if topo.is_gpu or device_grid.shape[0] < 2:
    return 0
  ring = list(device_grid[:, 0]) + [device_grid[0, 0]]
  return int(sum(np.abs(np.subtract(a.coords, b.coords)).sum() for a, b in zip(ring, ring[1:])))


def host_contiguous(devices: Sequence[StandInDevice]) -> List[StandInDevice]:
  """The devices host by host (the order a host-local mesh would use), for comparison."""
  return sorted(devices, key=lambda d: (d.process_index, d.id))
