"""A memory plan: the per-device bytes of one training step on a target topology, before the queue.

The plan builds the run's mesh over fake CPU devices (as many as the topology has chips), the
abstract train state and batch with their shardings (nothing allocated, no data read), compiles the
trainer's own jitted step (`train_step.make_train_step`) and reads XLA's memory analysis of the
SPMD-partitioned program, which is the program of one device.

Terms:
  topology: a named slice or GPU box (`topologies`); its hosts' data rows come from
    `partitioning.make_mesh` over stand-in devices laid out as the real slice (`host_layouts`).
  state: parameters, optimizer state and step, donated to the step and aliased by its outputs, so
    counted once. Their per-device bytes are exact: each leaf's shard shape under its sharding times
    its item size.
  gradients: the float32 gradient of one micro-batch, sharded like the parameters; with
    `num_microbatches > 1` the step also carries a float32 accumulator of the same size
    (`train_step._accumulate_gradients`). With `gradient_reduction='once'` (GRADIENT_REDUCTION)
    both are per data shard and not reduced over `data` until the step's end: each is the size of
    the parameters sharded without `data` (under FSDP up to data-axis times the parameters'
    bytes: only parameters with an `embed` dimension shard on `data`).
    Both live inside XLA's temporaries; the table shows this analytic part and the rest of the
    temporaries (activations, collectives' buffers) separately.
  XLA temporaries: `memory_analysis().temp_size_in_bytes` of the CPU compilation. The CPU compiler
    fuses, schedules and rematerializes differently from the TPU and GPU compilers, so this row is an
    estimate of theirs; `USABLE_FRACTION` leaves headroom for that and for the runtime's reservations.
  verdict: fits when the total is at most `USABLE_FRACTION` of the chip's memory (on GPUs no more
    than JAX preallocates: `XLA_PYTHON_CLIENT_MEM_FRACTION`, 0.75 unless set); DOES NOT FIT
    when it is more; CANNOT RUN when the batch does not split over the data axis (that plan is not
    compiled). Otherwise the plan names a fix (FSDP, a larger model axis, another micro-batch count)
    whose analytic estimate fits, and compiles it to check (`plan(check_fix=True)`).
"""
import dataclasses
import itertools
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
from jax.sharding import AbstractMesh
import numpy as np

from specialize_jax.errors import ConfigError
from specialize_jax.model import models
from specialize_jax.prepared import prepared_data
from specialize_jax.training import input_pipeline
from specialize_jax.training import optimizers
from specialize_jax.training import partitioning
from specialize_jax.planning import topologies
from specialize_jax.training import train_state
from specialize_jax.training import train_step
from specialize_jax.training import trainer

GIB = topologies.GIB
# The total must stay under this fraction of the chip's memory: the TPU/GPU runtime reserves some
# (program, collectives, fragmentation), and the CPU compiler's temporaries only estimate theirs.
USABLE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class PlanRequest:
  """What `specialize train` would run (the `runs.train` bindings) and where."""
  model: models.EncoderDecoderModel
  dataset: input_pipeline.DatasetConfig
  num_train_steps: int
  optimizer: optimizers.OptimizerConfig
  partitioner: partitioning.PartitioningConfig
  num_microbatches: int
  topology: topologies.Topology
  gradient_reduction: str = 'per_microbatch'  # GRADIENT_REDUCTION: 'per_microbatch' or 'once'.

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
  problem: Optional[str] = None         # Why the step cannot run as configured (batch split).
  fix: Optional[str] = None
  fix_plan: Optional['Plan'] = None

  @property
  def usable_fraction(self) -> float:
    return topologies.usable_fraction(self.request.topology, USABLE_FRACTION)

  @property
  def usable_bytes(self) -> int:
    return int(self.usable_fraction * self.request.topology.memory_bytes)

  @property
  def fits(self) -> bool:
    return self.problem is None and self.total_bytes <= self.usable_bytes

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
  """The trainer's own argument checks and the model axis against the topology's devices (a
  batch that does not split is not an error here: the plan reports it, `_batch_problem`)."""
  trainer.check_train_arguments(request.dataset, request.num_train_steps, request.num_microbatches,
                                request.gradient_reduction)
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


def _batch_problem(request: PlanRequest) -> Optional[str]:
  """Why the batch cannot be split as configured over the topology's data axis (None: it can)."""
  data = request.topology.num_devices // request.partitioner.num_partitions
  batch, k = request.dataset.batch_size, request.num_microbatches
  if batch % (k * data):
    return (f'BATCH_SIZE={batch} in {k} micro-batches of {batch / k:g} rows does not split over '
            f'the {data} data shards (NUM_PARTITIONS={request.partitioner.num_partitions} of '
            f'{request.topology.num_devices} devices)')
  return None


def _defers_reduction(request: PlanRequest) -> bool:
  """Whether the step accumulates unreduced per-data-shard gradients (`gradient_reduction='once'`
  with several micro-batches; with one there is no accumulator and the two are the same)."""
  return request.gradient_reduction == 'once' and request.num_microbatches > 1


def _gradient_bytes(request: PlanRequest, params: Any, param_shardings: Any) -> int:
  """One micro-batch's f32 gradient plus the accumulator (see the module docstring)."""
  if not _defers_reduction(request):
    return _shard_bytes(params, param_shardings) * (2 if request.num_microbatches > 1 else 1)
  data = request.topology.num_devices // request.partitioner.num_partitions
  partial = jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct((data,) + tuple(leaf.shape), np.float32), params)
  return 2 * _shard_bytes(partial, train_step.partial_gradient_shardings(param_shardings))


def _analytic(request: PlanRequest, mesh) -> Tuple[Any, Any, Any, Optional[Dict[str, Any]],
                                                   Dict[str, int]]:
  """`(optimizer, abstract state, its shardings, abstract batch, per-device bytes)` on `mesh`
  (abstract or concrete); allocates nothing. The batch is None (and counts 0 bytes) when it does
  not split over the data axis (`_batch_problem`)."""
  rules = request.partitioner.logical_axis_rules
  tx = optimizers.make_optimizer(request.optimizer, request.num_train_steps)
  try:
    state, shardings = train_state.abstract_train_state(request.model, tx, mesh, rules)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  batch = None if _batch_problem(request) else _abstract_batch(request.dataset, mesh)
  params = _shard_bytes(state.params, shardings.params)
  gradients = _gradient_bytes(request, state.params, shardings.params)
  sizes = {
      'params': params,
      'optimizer': _shard_bytes(state.opt_state, shardings.opt_state) + 4,  # + the int32 step.
      'batch': 0 if batch is None else  # + the uint32[2] key:
               _shard_bytes(batch, [v.sharding for v in batch.values()]) + 8,
      'gradients': gradients,
  }
  return tx, state, shardings, batch, sizes


def _rows_per_device(request: PlanRequest) -> float:
  """Micro-batch rows per device, counting a model-axis group as one device's worth."""
  data = request.topology.num_devices // request.partitioner.num_partitions
  return request.dataset.batch_size / request.num_microbatches / data / (
      request.partitioner.num_partitions)


def _estimate(request: PlanRequest, reference: Plan) -> int:
  """Analytic total of `request`: exact state, batch and gradients, plus `reference`'s other XLA
  temporaries scaled by the micro-batch rows per device (activations grow with them). Raises
  `ValueError` when `request` cannot run (its batch does not split, a dimension does not shard)."""
  problem = _batch_problem(request)
  if problem:
    raise ValueError(problem)
  total = sum(_analytic(request, _abstract_mesh(request))[-1].values())
  if reference.other_temp_bytes is not None and reference.problem is None:
    total += int(reference.other_temp_bytes * _rows_per_device(request) /
                 _rows_per_device(reference.request))
  return total


def _analytic_plan(request: PlanRequest) -> Plan:
  mesh = _abstract_mesh(request)
  sizes = _analytic(request, mesh)[-1]
  return Plan(request, dict(mesh.shape), sizes['params'], sizes['optimizer'], sizes['batch'],
              sizes['gradients'], None, sum(sizes.values()), compiled=False,
              problem=_batch_problem(request))


# At most this many suggested fixes are compiled, in order, before the plan names the first whose
# analytic estimate fits without the compiled check.
MAX_FIXES_COMPILED = 2


def plan(request: PlanRequest, compile_step: bool = True,
         devices: Optional[Sequence[jax.Device]] = None, check_fix: bool = True,
         log: Callable[[str], None] = lambda _: None) -> Plan:
  """The memory plan of `request` (see the module docstring).

  Args:
    request: the run and the topology.
    compile_step: compile the step on `topology.num_devices` CPU devices (else: the analytic rows
      only, on an abstract mesh, and no temporaries). A batch that does not split over the data axis
      is never compiled: the plan reports it as its `problem`.
    devices: the devices to compile for (default: the first `num_devices` CPU devices).
    check_fix: when it does not fit, compile the suggested fixes (up to `MAX_FIXES_COMPILED`, in
      order) and keep the first that fits as `Plan.fix_plan`.
  """
  _check_request(request)
  if compile_step and _batch_problem(request) is None:
    result = _compiled_plan(request, devices, log)
  else:
    result = _analytic_plan(request)
  if result.fits:
    return result
  wanted = MAX_FIXES_COMPILED if compile_step and check_fix else 1
  fixes = list(itertools.islice(suggest_fixes(result), wanted))
  if not fixes:
    return dataclasses.replace(result, fix=(
        'no change of partitioning or micro-batches fits this topology; use a larger slice (more '
        'chips) or chips with more memory'))
  if compile_step and check_fix:
    for text, fixed in fixes[:MAX_FIXES_COMPILED]:
      log(f'Checking the fix ({text}) ...')
      fix_plan = plan(fixed, compile_step=True, devices=devices, check_fix=False, log=log)
      if fix_plan.fits:
        return dataclasses.replace(result, fix=text, fix_plan=fix_plan)
  return dataclasses.replace(result, fix=fixes[0][0])


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
  step_fn = train_step.make_train_step(
      request.model, tx, shardings, mesh, request.num_microbatches,
      rules=request.partitioner.logical_axis_rules,
      skip_empty_microbatches=request.dataset.micro_batches is not None,
      gradient_reduction=request.gradient_reduction)
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


def _candidates(request: PlanRequest) -> Iterator[Tuple[str, PlanRequest]]:
  """Changes in the order we suggest them: with unreduced gradients ('once'), reducing them in
  every micro-batch; shard the state over every device (FSDP), also with a larger model axis; then
  other micro-batch counts (more first: smaller activations; fewer only help a batch that does not
  split); then a larger model axis under the same rules."""
  num_devices = request.topology.num_devices
  parts = request.partitioner.num_partitions
  batch, k = request.dataset.batch_size, request.num_microbatches
  current = request.partitioner
  more_parts = [p for p in range(parts + 1, num_devices + 1) if num_devices % p == 0]
  micro_counts = sorted((m for m in range(1, batch + 1) if batch % m == 0 and m != k),
                        key=lambda m: (m < k, abs(m - k)))
  with_parts = lambda partitioner, p: dataclasses.replace(partitioner, num_partitions=p)
  if _defers_reduction(request):
    yield ('--gin.GRADIENT_REDUCTION="\'per_microbatch\'": gradients reduced in every '
           'micro-batch, accumulated sharded like the parameters',
           request.replace(gradient_reduction='per_microbatch'))
  partitioners = [(current, '')]
  if not _is_fsdp(current.logical_axis_rules):
    fsdp = dataclasses.replace(current, logical_axis_rules=partitioning.fsdp_logical_axis_rules())
    partitioners.append((fsdp, ' with gin/partitioning/fsdp.gin'))
    yield (f'include gin/partitioning/fsdp.gin (--gin.NUM_PARTITIONS={parts}): parameters and '
           'optimizer state shard over all devices', request.replace(partitioner=fsdp))
    for p in more_parts:
      yield (f'include gin/partitioning/fsdp.gin with --gin.NUM_PARTITIONS={p}',
             request.replace(partitioner=with_parts(fsdp, p)))
  for partitioner, where in partitioners:
    data = num_devices // partitioner.num_partitions
    for m in micro_counts:
      if batch % (m * data) == 0:
        yield (f'--gin.NUM_MICROBATCHES={m}{where} (micro-batches of {batch // m} rows, '
               f'{batch // m // data} per data shard; BATCH_SIZE={batch} unchanged)',
               request.replace(num_microbatches=m, partitioner=partitioner))
  for p in more_parts:
    yield f'--gin.NUM_PARTITIONS={p}', request.replace(partitioner=with_parts(current, p))


def suggest_fixes(result: Plan) -> Iterator[Tuple[str, PlanRequest]]:
  """`(text, request)` of every candidate change whose analytic estimate fits with the headroom,
  in the order of `_candidates`."""
  for text, candidate in _candidates(result.request):
    try:
      estimate = _estimate(candidate, result)
    except ValueError:
      continue  # Cannot run: not a fix.
    if estimate <= result.usable_bytes:
      yield text, candidate


def host_grid(result: Plan) -> np.ndarray:
  """The `[data, model]` device grid of the real topology: `partitioning.make_mesh`, the code
  `specialize train` runs, over stand-ins with the slice's coordinates and hosts."""
  request = result.request
  devices = topologies.stand_in_devices(request.topology)
  return np.asarray(partitioning.make_mesh(request.partitioner, devices).devices)


def host_layouts(result: Plan) -> Dict[int, partitioning.DataLayout]:
  """`{host: its data layout}` on the real topology (see `host_grid`)."""
  grid = host_grid(result)
  hosts = partitioning.data_rows_by_process(grid)
  return {h: partitioning.layout_of_grid(grid, result.request.dataset.batch_size, h)
          for h in hosts}


def format_layout(result: Plan) -> List[str]:
  """Lines: the rows of every global batch each host feeds, and the data axis's ring length."""
  grid, topo = host_grid(result), result.request.topology
  lines = [f'  host {h}: {layout.describe()}' for h, layout in host_layouts(result).items()]
  if not topo.is_gpu and grid.shape[0] > 1:
    by_host = np.asarray(topologies.host_contiguous(list(grid.flat)), dtype=object)
    lines.append(f'  data-axis ring: {topologies.ring_hops(grid, topo)} chip hops in this order '
                 f'({topologies.ring_hops(by_host.reshape(grid.shape), topo)} host by host).')
  return lines


def _gib(num_bytes: Optional[int]) -> str:
  return '-' if num_bytes is None else f'{num_bytes / GIB:.2f} GiB'


def verdict(result: Plan) -> str:
  """One line: fits, DOES NOT FIT or CANNOT RUN, the total against the chip, and the fix."""
  memory = result.request.topology.memory_bytes
  amount = f'{_gib(result.total_bytes)} of {_gib(memory)} ({result.total_bytes / memory:.0%})'
  scope = '' if result.compiled else ', without activations (not compiled)'
  if result.fits:
    return f'fits: {amount}{scope}; headroom {1 - result.usable_fraction:.0%} kept'
  if result.total_bytes > result.usable_bytes:
    head = f'DOES NOT FIT: {amount}{scope}'
    if result.problem:
      head += f'; and {result.problem}'
  else:
    head = f'CANNOT RUN: {result.problem}'
  return f'{head}; fix: {result.fix}'


def _batching_lines(request: PlanRequest) -> List[str]:
  """With the original's batching: how full the steps of this run are (read from the prepared set's
  sizes when it can be opened here)."""
  if request.dataset.micro_batches is None:
    return []
  head = (f'The original\'s batching: each step is padded to {request.dataset.batch_size} rows; '
          'all-padding micro-batches are skipped.')
  try:
    rows = input_pipeline.micro_batch_rows(request.dataset, request.num_train_steps,
                                           request.num_microbatches)
  except prepared_data.PreparedDataError as e:
    return [head, f'  (steps not counted: {e})']
  except ConfigError as e:
    return [head, f'  DOES NOT FIT: {e}']
  per_device = request.dataset.batch_size // request.num_microbatches
  return [head, f'  Over {request.num_train_steps} steps: {rows.mean():.1f} rows on average, '
                f'{int(rows.max())} at most; {np.mean(-(-rows // per_device)):.1f} of '
                f'{request.num_microbatches} micro-batches computed per step on average.']


def format_plan(result: Plan) -> str:
  """The table `specialize plan` prints."""
  request = result.request
  topo = request.topology
  rules = request.partitioner.logical_axis_rules
  data, parts = result.mesh_shape['data'], result.mesh_shape['model']
  micro_rows = request.dataset.batch_size / request.num_microbatches
  config = request.model.config
  if result.problem:
    feed, layout_lines = f'{result.problem}.', []
  else:
    layouts = host_layouts(result)
    feed = (f'{micro_rows // data:g} of them per data coordinate; each host feeds '
            f'{layouts[0].local_batch_size} rows per step, the rows its chips hold:')
    layout_lines = format_layout(result)
  lines = [
      f'Topology {topo.name}: {topo.num_devices} x {topo.chip} '
      f'({_gib(topo.memory_bytes)} each), {topo.num_hosts} host(s) of {topo.devices_per_host}.',
      f'Mesh data={data} x model={parts} ({"FSDP" if _is_fsdp(rules) else "standard"} rules); '
      f'params float32, activations {config.dtype}; optimizer '
      f'{request.optimizer.name}.',
      f'Batch {request.dataset.batch_size} = {request.num_microbatches} micro-batches of '
      f'{micro_rows:g} rows: {feed}',
      *layout_lines,
      *_batching_lines(request),
      *(['Gradients reduced over data once per step (GRADIENT_REDUCTION=\'once\'): each device '
         'accumulates a full-size partial gradient of its rows.'] if _defers_reduction(request)
        else []),
      '',
      f'{"per device":<46}{"bytes":>12}',
  ]
  rows = [
      ('params', result.params_bytes),
      ('optimizer state (+ step)', result.optimizer_bytes),
      (('unreduced gradients + accumulator (f32, temps)' if _defers_reduction(request) else
        f'gradients{" + accumulator" if request.num_microbatches > 1 else ""} (f32, in XLA temps)'),
       result.gradient_bytes),
      ('other XLA temporaries (activations, ...)', result.other_temp_bytes),
      ('batch (+ key)', result.batch_bytes),
      ('total' + ('' if result.compiled else ' (not compiled: no activations)'), result.total_bytes),
      (f'chip memory (usable {result.usable_fraction:.0%}'
       f'{", JAX preallocation" if topo.is_gpu else ""})', topo.memory_bytes),
  ]
  lines += [f'{name:<46}{_gib(value):>12}' for name, value in rows]
  lines.append(f'verdict: {verdict(result)}')
  if result.compiled:
    lines.append(f'(XLA CPU compile of the SPMD step: {result.compile_seconds:.1f} s; temporaries '
                 'are the CPU compiler\'s, an estimate of the TPU/GPU ones.)')
  if result.fix_plan is not None:
    lines.append(f'fix checked (compiled, mesh data={result.fix_plan.mesh_shape["data"]} x '
                 f'model={result.fix_plan.mesh_shape["model"]}): {verdict(result.fix_plan)}.')
  return '\n'.join(lines)
