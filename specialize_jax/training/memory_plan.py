"""A memory plan: the per-device bytes of one training step on a target topology, before the queue.

The plan builds the run's mesh over fake CPU devices (as many as the topology has chips), the
abstract train state and batch with their shardings (nothing allocated, no data read), compiles the
trainer's own jitted step (`train_step.make_train_step`) and reads XLA's memory analysis of the
SPMD-partitioned program, which is the program of one device.

Terms:
  topology: a named slice or GPU box (`v4-32`, `v5e-64`, `v5p-128`, `8xH100`): chips (JAX devices),
    memory per chip and chips per host. TPU v4 and v5p names count TensorCores (two per chip, one
    JAX device per chip: megacore); v5e and v6e names count chips.
  state: parameters, optimizer state and step, donated to the step and aliased by its outputs, so
    counted once. Their per-device bytes are exact: each leaf's shard shape under its sharding times
    its item size.
  gradients: the float32 gradient of one micro-batch, sharded like the parameters; with
    `num_microbatches > 1` the step also carries a float32 accumulator of the same size
    (`train_step._accumulate_gradients`). Both live inside XLA's temporaries; the table shows this
    analytic part and the rest of the temporaries (activations, collectives' buffers) separately.
  XLA temporaries: `memory_analysis().temp_size_in_bytes` of the CPU compilation. The CPU compiler
    fuses, schedules and rematerializes differently from the TPU and GPU compilers, so this row is an
    estimate of theirs; `USABLE_FRACTION` leaves headroom for that and for the runtime's reservations.
  verdict: fits when the total is at most `USABLE_FRACTION` of the chip's memory; otherwise the plan
    names a fix (FSDP, more partitions, more micro-batches) whose analytic estimate fits, and can
    compile it to check (`PlanRequest.check_fix`).
"""
import dataclasses
import re
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
from jax.sharding import AbstractMesh, NamedSharding
import numpy as np

from specialize_jax.config_errors import ConfigError
from specialize_jax.model import models
from specialize_jax.training import input_pipeline
from specialize_jax.training import optimizers
from specialize_jax.training import partitioning
from specialize_jax.training import train_state
from specialize_jax.training import train_step

GIB = 2**30
GB = 10**9
# The total must stay under this fraction of the chip's memory: the TPU/GPU runtime reserves some
# (program, collectives, fragmentation), and the CPU compiler's temporaries only estimate theirs.
USABLE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice or GPU box: `num_devices` JAX devices of `memory_bytes` each, `devices_per_host` per
  process."""
  name: str
  chip: str
  num_devices: int
  memory_bytes: int
  devices_per_host: int

  @property
  def num_hosts(self) -> int:
    return max(1, self.num_devices // self.devices_per_host)


# Public figures. TPUs: cloud.google.com/tpu/docs/system-architecture-tpu-vm and the per-version
# pages (tpu/docs/v4, v5e, v5p, v6e): v4 32 GiB HBM2 per chip, 4 chips per host, v4-N has N/2 chips
# (N TensorCores); v5e 16 GiB HBM2 per chip, v5litepod-N has N chips, 8 on the single host of
# v5litepod-8 and 4 per host on larger slices; v5p "95GB" HBM2e per chip, 4 chips per host,
# v5p-N has N/2 chips; v6e (Trillium) 32 GB per chip, v6e-N has N chips, 4 per host (8 on v6e-8).
# GPUs (nvidia.com data sheets): A100 40/80 GB, H100 SXM 80 GB, H200 141 GB; 8 per host. Decimal
# units are taken as written (GB = 10^9 bytes): the conservative reading.
_TPU_FAMILIES = {
    # name prefix: (chip, bytes per chip, accelerator-type units per chip, chips per host)
    'v4': ('TPU v4', 32 * GIB, 2, 4),
    'v5e': ('TPU v5e', 16 * GIB, 1, 4),
    'v5litepod': ('TPU v5e', 16 * GIB, 1, 4),
    'v5p': ('TPU v5p', 95 * GB, 2, 4),
    'v6e': ('TPU v6e', 32 * GB, 1, 4),
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
                    'v5e-256', 'v5p-8', 'v5p-32', 'v5p-128', 'v6e-8', 'v6e-64', '1xH100', '8xH100',
                    '16xH100', '8xA100-40', '8xA100-80', '8xH200')


def topology(name: str) -> Topology:
  """The `Topology` of a name such as `v4-32`, `v5litepod-16`, `v5p-128`, `8xH100`."""
  tpu = re.fullmatch(r'(v4|v5e|v5litepod|v5p|v6e)-(\d+)', name.strip())
  gpu = re.fullmatch(r'(\d+)x(A100-40|A100-80|A100|H100|H200)', name.strip(), flags=re.I)
  if tpu:
    chip, memory, units_per_chip, per_host = _TPU_FAMILIES[tpu.group(1)]
    units = int(tpu.group(2))
    if units < units_per_chip or units % units_per_chip:
      raise ConfigError(f'--topology {name}: {tpu.group(1)}-N counts TensorCores, two per chip; '
                        f'N must be a multiple of {units_per_chip} (e.g. {tpu.group(1)}-32).')
    chips = units // units_per_chip
    if units_per_chip == 1 and chips <= 8:
      per_host = chips  # v5e / v6e slices of up to 8 chips are one host.
    return Topology(name, chip, chips, memory, min(per_host, chips))
  if gpu:
    count = int(gpu.group(1))
    key = next(k for k in _GPUS if k.lower() == gpu.group(2).lower())
    chip, memory = _GPUS[key]
    if count < 1:
      raise ConfigError(f'--topology {name}: the GPU count must be >= 1 (e.g. 8xH100).')
    return Topology(name, chip, count, memory, min(GPUS_PER_HOST, count))
  raise ConfigError(f'unknown --topology {name!r}; known: {", ".join(KNOWN_TOPOLOGIES)} (TPU '
                    'v4/v5p-N: N TensorCores, 2 per chip; v5e/v6e-N: N chips; GPUs: COUNTxH100, '
                    'A100-40, A100-80, H200).')


@dataclasses.dataclass(frozen=True)
class PlanRequest:
  """What `specialize train` would run (the `runs.train` bindings) and where."""
  model: models.EncoderDecoderModel
  dataset: input_pipeline.DatasetConfig
  num_train_steps: int
  optimizer: optimizers.OptimizerConfig
  partitioner: partitioning.PartitioningConfig
  num_microbatches: int
  topology: Topology

  def replace(self, **changes) -> 'PlanRequest':
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device bytes of one training step (see the module docstring)."""
  request: PlanRequest
  mesh_shape: Dict[str, int]
  params_bytes: int
  optimizer_bytes: int
  batch_bytes: int            # This device's rows of the batch (plus the replicated key).
  gradient_bytes: int         # Analytic: one micro-batch's gradients (+ the accumulator), f32.
  temp_bytes: Optional[int]   # XLA's temporaries (None: not compiled).
  total_bytes: int            # Compiled: XLA's arguments + unaliased outputs + temporaries.
  compiled: bool
  compile_seconds: float = 0.0
  argument_bytes: Optional[int] = None  # XLA's own count of the arguments (a check on ours).
  fix: Optional[str] = None
  fix_plan: Optional['Plan'] = None

  @property
  def usable_bytes(self) -> int:
    return int(USABLE_FRACTION * self.request.topology.memory_bytes)

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.usable_bytes

  @property
  def other_temp_bytes(self) -> Optional[int]:
    """XLA temporaries beyond the analytic gradients: activations, collectives, scratch."""
    return None if self.temp_bytes is None else max(0, self.temp_bytes - self.gradient_bytes)


def _is_fsdp(rules: partitioning.LogicalAxisRules) -> bool:
  return ('embed', 'data') in rules


def _shard_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (the largest shard: even shardings make them all equal)."""
  total = 0
  for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    total += int(np.prod(sharding.shard_shape(tuple(leaf.shape)), dtype=np.int64)) * np.dtype(
        leaf.dtype).itemsize
  return total


def _check_request(request: PlanRequest) -> None:
  """The trainer's own checks (`trainer.check_train_arguments`, mesh and batch division), with
  fixes phrased for the topology."""
  from specialize_jax.training import trainer  # pylint: disable=g-import-not-at-top
  trainer.check_train_arguments(request.dataset, request.num_train_steps, request.num_microbatches)
  num_devices, parts = request.topology.num_devices, request.partitioner.num_partitions
  if num_devices % parts:
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    raise ConfigError(f'NUM_PARTITIONS={parts} does not divide the {num_devices} devices of '
                      f'{request.topology.name}; set --gin.NUM_PARTITIONS to one of {divisors}.')


def _abstract_mesh(request: PlanRequest) -> AbstractMesh:
  parts = request.partitioner.num_partitions
  return AbstractMesh((request.topology.num_devices // parts, parts), partitioning.MESH_AXES,
                      axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _abstract_batch(dataset: input_pipeline.DatasetConfig, mesh) -> Dict[str, jax.ShapeDtypeStruct]:
  sharding = partitioning.batch_sharding(mesh)
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for name, (shape, dtype) in input_pipeline.batch_spec(dataset).items()}


def _analytic(request: PlanRequest, mesh) -> Tuple[Any, Any, Any, Dict[str, Any], Dict[str, int]]:
  """`(optimizer, abstract state, its shardings, abstract batch, per-device bytes)` on `mesh`
  (abstract or concrete); allocates nothing."""
  rules = request.partitioner.logical_axis_rules
  tx = optimizers.make_optimizer(request.optimizer, request.num_train_steps)
  partitioning.check_batch_divisible(request.dataset.batch_size, mesh, request.num_microbatches)
  try:
    state, shardings = train_state.abstract_train_state(request.model, tx, mesh, rules)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  batch = _abstract_batch(request.dataset, mesh)
  params = _shard_bytes(state.params, shardings.params)
  gradients = params * (2 if request.num_microbatches > 1 else 1)  # f32, like the params.
  sizes = {
      'params': params,
      'optimizer': _shard_bytes(state.opt_state, shardings.opt_state) + 4,  # + the int32 step.
      'batch': _shard_bytes(batch, [v.sharding for v in batch.values()]) + 8,  # + the uint32[2] key.
      'gradients': gradients,
  }
  return tx, state, shardings, batch, sizes


def _estimate(request: PlanRequest, reference: Optional[Plan] = None) -> int:
  """Analytic total of `request`: exact state, batch and gradients, plus `reference`'s other XLA
  temporaries scaled by the micro-batch rows per device (activations grow with them)."""
  sizes = _analytic(request, _abstract_mesh(request))[-1]
  total = sum(sizes.values())
  if reference is not None and reference.other_temp_bytes is not None:
    rows = lambda r: r.dataset.batch_size / r.num_microbatches / (
        r.topology.num_devices // r.partitioner.num_partitions) / r.partitioner.num_partitions
    total += int(reference.other_temp_bytes * rows(request) / rows(reference.request))
  return total


def plan(request: PlanRequest, compile_step: bool = True,
         devices: Optional[Sequence[jax.Device]] = None, check_fix: bool = True,
         log: Callable[[str], None] = lambda _: None) -> Plan:
  """The memory plan of `request` (see the module docstring).

  Args:
    request: the run and the topology.
    compile_step: compile the step on `topology.num_devices` CPU devices (else: the analytic rows
      only, on an abstract mesh, and no temporaries).
    devices: the devices to compile for (default: the first `num_devices` CPU devices).
    check_fix: when it does not fit, compile the suggested fix too (`Plan.fix_plan`).
  """
  _check_request(request)
  if not compile_step:
    mesh = _abstract_mesh(request)
    sizes = _analytic(request, mesh)[-1]
    result = Plan(request, dict(mesh.shape), sizes['params'], sizes['optimizer'], sizes['batch'],
                  sizes['gradients'], None, sum(sizes.values()), compiled=False)
  else:
    result = _compiled_plan(request, devices, log)
  if result.fits:
    return result
  fix, fixed = suggest_fix(result)
  fix_plan = None
  if fixed is not None and check_fix and compile_step:
    log(f'Checking the fix ({fix}) ...')
    fix_plan = plan(fixed, compile_step=True, devices=devices, check_fix=False, log=log)
  return dataclasses.replace(result, fix=fix, fix_plan=fix_plan)


def _compiled_plan(request: PlanRequest, devices: Optional[Sequence[jax.Device]],
                   log: Callable[[str], None]) -> Plan:
  num_devices = request.topology.num_devices
  devices = list(jax.devices('cpu') if devices is None else devices)
  if len(devices) < num_devices:
    raise ConfigError(f'{request.topology.name} needs {num_devices} devices and this process has '
                      f'{len(devices)}; run `specialize plan` as its own command (it starts JAX '
                      'with that many CPU devices).')
  mesh = partitioning.make_mesh(request.partitioner, devices[:num_devices])
  tx, state, shardings, batch, sizes = _analytic(request, mesh)
  rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=partitioning.replicated(mesh))
  step_fn = train_step.make_train_step(request.model, tx, shardings, mesh,
                                       request.num_microbatches,
                                       rules=request.partitioner.logical_axis_rules)
  log(f'Compiling the train step for {num_devices} devices (mesh {dict(mesh.shape)}) ...')
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes +
           stats.temp_size_in_bytes)
  return Plan(request, dict(mesh.shape), sizes['params'], sizes['optimizer'], sizes['batch'],
              sizes['gradients'], int(stats.temp_size_in_bytes), int(total), compiled=True,
              compile_seconds=seconds, argument_bytes=int(stats.argument_size_in_bytes))


def _candidates(request: PlanRequest) -> List[Tuple[str, PlanRequest]]:
  """Fixes in the order we suggest them: shard the state over every device (FSDP), then more
  micro-batches (smaller activations), then more model partitions."""
  out = []
  num_devices = request.topology.num_devices
  parts = request.partitioner.num_partitions
  rules = request.partitioner.logical_axis_rules
  if not _is_fsdp(rules):
    fsdp = dataclasses.replace(request.partitioner,
                               logical_axis_rules=partitioning.fsdp_logical_axis_rules())
    out.append((f'include gin/partitioning/fsdp.gin (--gin.NUM_PARTITIONS={parts}): parameters '
                'and optimizer state shard over all devices', request.replace(partitioner=fsdp)))
  for partitioner, where in ((request.partitioner, ''),) + (
      ((fsdp, ' with gin/partitioning/fsdp.gin'),) if not _is_fsdp(rules) else ()):
    batch, k = request.dataset.batch_size, request.num_microbatches
    data = num_devices // parts
    for more in range(k + 1, batch // data + 1):
      if batch % (more * data) == 0:
        micro = batch // more
        out.append((f'--gin.NUM_MICROBATCHES={more}{where} (micro-batch {micro} rows, '
                    f'{micro // data} per device; BATCH_SIZE={batch} unchanged)',
                    request.replace(num_microbatches=more, partitioner=partitioner)))
  for partitioner, where in ((request.partitioner, ''),) + (
      ((fsdp, ' with gin/partitioning/fsdp.gin'),) if not _is_fsdp(rules) else ()):
    for more in range(parts + 1, num_devices + 1):
      if num_devices % more == 0:
        out.append((f'--gin.NUM_PARTITIONS={more}{where}',
                    request.replace(partitioner=dataclasses.replace(partitioner,
                                                                    num_partitions=more))))
  return out


def suggest_fix(result: Plan) -> Tuple[str, Optional[PlanRequest]]:
  """The first candidate fix whose analytic estimate fits with the headroom, as
  `(text, request)`; `(advice, None)` when none does."""
  for text, candidate in _candidates(result.request):
    try:
      estimate = _estimate(candidate, result)
    except ValueError:
      continue  # Not shardable or not divisible: not a fix.
    if estimate <= result.usable_bytes:
      return text, candidate
  return ('no change of partitioning or micro-batches fits this topology; use a larger slice '
          '(more chips) or chips with more memory'), None


def host_layout(result: Plan) -> partitioning.DataLayout:
  """The data layout of process 0 on the real topology (devices numbered host by host)."""
  request = result.request
  grid = np.array([SimpleNamespace(process_index=i // request.topology.devices_per_host)
                   for i in range(request.topology.num_devices)], dtype=object)
  grid = grid.reshape(result.mesh_shape['data'], result.mesh_shape['model'])
  return partitioning.layout_of_grid(grid, request.dataset.batch_size, 0)


def _gib(num_bytes: Optional[int]) -> str:
  return '-' if num_bytes is None else f'{num_bytes / GIB:.2f} GiB'


def verdict(result: Plan) -> str:
  share = result.total_bytes / result.request.topology.memory_bytes
  if result.fits:
    return (f'fits: {_gib(result.total_bytes)} of {_gib(result.request.topology.memory_bytes)} '
            f'({share:.0%}; headroom {1 - USABLE_FRACTION:.0%} kept)')
  return (f'DOES NOT FIT: {_gib(result.total_bytes)} of '
          f'{_gib(result.request.topology.memory_bytes)} ({share:.0%}); fix: {result.fix}')


def format_plan(result: Plan) -> str:
  """The table `specialize plan` prints."""
  request = result.request
  topo = request.topology
  rules = request.partitioner.logical_axis_rules
  data, parts = result.mesh_shape['data'], result.mesh_shape['model']
  micro_rows = request.dataset.batch_size // request.num_microbatches
  layout = host_layout(result)
  config = request.model.config
  lines = [
      f'Topology {topo.name}: {topo.num_devices} x {topo.chip} '
      f'({_gib(topo.memory_bytes)} each), {topo.num_hosts} host(s) of {topo.devices_per_host}.',
      f'Mesh data={data} x model={parts} ({"FSDP" if _is_fsdp(rules) else "standard"} rules); '
      f'params float32, activations {config.dtype}; optimizer '
      f'{request.optimizer.name}.',
      f'Batch {request.dataset.batch_size} = {request.num_microbatches} micro-batches of '
      f'{micro_rows} rows ({micro_rows // data} per data shard); each host feeds '
      f'{layout.local_batch_size} rows per step (data shard {layout.shard_index} of '
      f'{layout.num_shards} on host 0).',
      '',
      f'{"per device":<46}{"bytes":>12}',
  ]
  rows = [
      ('params', result.params_bytes),
      ('optimizer state (+ step)', result.optimizer_bytes),
      (f'gradients{" + accumulator" if request.num_microbatches > 1 else ""} (f32, in XLA temps)',
       result.gradient_bytes),
      ('other XLA temporaries (activations, ...)', result.other_temp_bytes),
      ('batch (+ key)', result.batch_bytes),
      ('total' + ('' if result.compiled else ' (not compiled: no activations)'), result.total_bytes),
      (f'chip memory (usable {USABLE_FRACTION:.0%})', topo.memory_bytes),
  ]
  lines += [f'{name:<46}{_gib(value):>12}' for name, value in rows]
  lines.append(f'verdict: {verdict(result)}')
  if result.compiled:
    lines.append(f'(XLA CPU compile of the SPMD step: {result.compile_seconds:.1f} s; temporaries '
                 'are the CPU compiler\'s, an estimate of the TPU/GPU ones.)')
  if result.fix_plan is not None:
    lines.append(f'fix checked (compiled): total {_gib(result.fix_plan.total_bytes)}, '
                 f'{verdict(result.fix_plan).split(":")[0]}.')
  return '\n'.join(lines)
