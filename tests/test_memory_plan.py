"""`specialize plan`: topologies, exact per-device state bytes (against the state the trainer
builds), batch shapes (against the input pipeline), the verdict and its fix, and every shipped
FlanT5 experiment gin fitting the topology its header names.

Compiling a FlanT5 step for a pod takes minutes, so the shipped gins are planned here without
compiling (state, optimizer and gradients: what overflows first); one CLI run compiles a FlanT5
step end to end and `tools/plan_experiments.py` compiles them all for the README's table.
"""
import glob
import os
import re

import jax
import pytest

from specialize_jax.errors import ConfigError
from specialize_jax.jobs import plan_config
from specialize_jax.training import input_pipeline
from specialize_jax.planning import memory_plan
from specialize_jax.planning import topologies
from specialize_jax.training import optimizers
from specialize_jax.training import partitioning
from specialize_jax.training import train_state
from tests.support import demo_data
from tests.support import processes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(os.path.relpath(p, os.path.join(REPO_ROOT, 'gin'))
                     for p in glob.glob(os.path.join(REPO_ROOT, 'gin/experiments/flan_t5_*.gin')))
GIB = 2**30


def test_topology_names_give_chips_memory_and_hosts():
  v4 = topologies.topology('v4-32')  # 32 TensorCores = 16 chips, 4 per host.
  assert (v4.num_devices, v4.memory_bytes, v4.devices_per_host, v4.num_hosts) == (16, 32 * GIB, 4, 4)
  v5e = topologies.topology('v5e-64')  # v5e counts chips.
  assert (v5e.num_devices, v5e.memory_bytes, v5e.num_hosts) == (64, 16 * GIB, 16)
  assert topologies.topology('v5litepod-8').num_hosts == 1
  v5p = topologies.topology('v5p-128')
  assert (v5p.num_devices, v5p.memory_bytes, v5p.num_hosts) == (64, 95 * 10**9, 16)
  h100 = topologies.topology('16xH100')
  assert (h100.num_devices, h100.memory_bytes, h100.num_hosts) == (16, 80 * 10**9, 2)
  with pytest.raises(ConfigError, match='two per chip'):
    topologies.topology('v4-7')
  with pytest.raises(ConfigError, match=r"unknown --topology 'tpu9'.*v5p-128"):
    topologies.topology('tpu9')


def test_every_flan_t5_experiment_names_a_known_topology_in_its_header():
  assert len(EXPERIMENTS) == 10
  for name in EXPERIMENTS:
    with open(os.path.join(REPO_ROOT, 'gin', name), encoding='utf-8') as f:
      text = f.read()
    header = text[:text.index('\ninclude')]
    named = topologies.named_topology([header])
    assert named is not None, f'{name} has no "# Topology:" header line'
    topologies.topology(named)


def _request(gin_files, overrides, topology='8xH100'):
  return plan_config.plan_request(gin_files, overrides, [], topologies.topology(topology))


@pytest.mark.slow
@pytest.mark.parametrize('experiment', EXPERIMENTS)
def test_every_flan_t5_experiment_fits_the_topology_its_header_names(experiment):
  with open(os.path.join(REPO_ROOT, 'gin', experiment), encoding='utf-8') as f:
    named = topologies.named_topology([f.read()])
  result = memory_plan.plan(_request([experiment], [], named), compile_step=False)
  assert result.problem is None
  assert result.fits, memory_plan.format_plan(result)
  # The layout the run gets on that slice (make_mesh over stand-ins): every host's rows printed.
  layouts = memory_plan.host_layouts(result)
  assert sorted(layouts) == list(range(topologies.topology(named).num_hosts))
  text = memory_plan.format_plan(result)
  for host, layout in layouts.items():
    assert f'  host {host}: {layout.describe()}' in text
  assert "The original's batching: each step is padded to" in text
  if re.search(r'_(large|xl|xxl)_', experiment):  # FSDP: data parallel Large does not fit v4-8.
    assert ('embed', 'data') in result.request.partitioner.logical_axis_rules


# The CPU demo's config at test sizes: packed batches of 16 rows in 2 micro-batches.
DEMO = ['experiments/demo_cpu.gin']
DEMO_OVERRIDES = ['--gin.BATCH_SIZE=16', '--gin.NUM_MICROBATCHES=2',
                  "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}"]


def _bytes_on(device, tree):
  return sum(shard.data.nbytes for leaf in jax.tree_util.tree_leaves(tree)
             for shard in leaf.addressable_shards if shard.device == device)


@pytest.mark.slow
@pytest.mark.parametrize('partitioning_gin', ['partitioning/data_model.gin',
                                              'partitioning/fsdp.gin'])
def test_state_bytes_per_device_are_what_the_trainer_holds(partitioning_gin):
  request = _request(DEMO + [partitioning_gin], DEMO_OVERRIDES + ['--gin.NUM_PARTITIONS=2'])
  devices = jax.devices()[:8]
  compiled = 'data_model' in partitioning_gin  # The state rows need no compile (one is enough).
  result = memory_plan.plan(request, compile_step=compiled, devices=devices)
  assert result.compiled == compiled and result.mesh_shape == {'data': 4, 'model': 2}

  mesh = partitioning.make_mesh(request.partitioner, devices)
  tx = optimizers.make_optimizer(request.optimizer, request.num_train_steps)
  state, _ = train_state.create_train_state(request.model, tx, mesh,
                                            request.partitioner.logical_axis_rules,
                                            jax.random.key(0))
  for device in devices:  # Even shardings: every device holds the same bytes.
    assert result.params_bytes == _bytes_on(device, state.params)
    assert result.optimizer_bytes == _bytes_on(device, (state.opt_state, state.step))
  full_params = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state.params))
  sharded = 'fsdp' in partitioning_gin
  assert (result.params_bytes < full_params / 2) == sharded  # FSDP: embed also shards on data.
  assert result.gradient_bytes == 2 * result.params_bytes  # f32 gradients and their accumulator.
  assert result.fits
  if not compiled:
    return
  # XLA's own count of the step's arguments: our state and batch, less what jit prunes as unused
  # (the step counter, the dropout key at rate 0, token positions under relative attention).
  state_bytes = result.params_bytes + result.optimizer_bytes
  assert state_bytes - 4 <= result.argument_bytes <= state_bytes + result.batch_bytes
  assert result.temp_bytes > 0
  # The state's outputs alias its arguments: only the metrics are new outputs.
  assert 0 <= result.total_bytes - result.argument_bytes - result.temp_bytes < 4096
  assert 'verdict: fits:' in memory_plan.format_plan(result)


ONCE = ["--gin.GRADIENT_REDUCTION='once'"]


def test_gradient_reduction_once_reaches_the_plan_from_gin_with_its_memory():
  """GRADIENT_REDUCTION='once' under FSDP: the gradient and accumulator rows become the unreduced
  partial gradients, sharded on the model axis only (as the standard rules shard the params); the
  first fix of a 'once' plan is reducing per micro-batch; a bad value names the choices."""
  overrides = DEMO_OVERRIDES + ['--gin.NUM_PARTITIONS=2']
  fsdp = _request(DEMO + ['partitioning/fsdp.gin'], overrides)
  once = _request(DEMO + ['partitioning/fsdp.gin'], overrides + ONCE)
  assert (fsdp.gradient_reduction, once.gradient_reduction) == ('per_microbatch', 'once')
  per_plan, once_plan, standard_plan = (
      memory_plan.plan(request, compile_step=False)
      for request in (fsdp, once, _request(DEMO + ['partitioning/data_model.gin'], overrides)))
  assert per_plan.gradient_bytes == 2 * per_plan.params_bytes
  assert once_plan.gradient_bytes == 2 * standard_plan.params_bytes > 2 * per_plan.gradient_bytes
  assert once_plan.total_bytes - per_plan.total_bytes == (once_plan.gradient_bytes -
                                                          per_plan.gradient_bytes)
  text = memory_plan.format_plan(once_plan)
  assert "Gradients reduced over data once per step (GRADIENT_REDUCTION='once')" in text
  assert re.search(r'^unreduced gradients \+ accumulator \(f32, temps\)\s+[\d.]+ GiB$', text,
                   re.MULTILINE), text
  fix, fixed = next(memory_plan.suggest_fixes(once_plan))
  assert fix.startswith('--gin.GRADIENT_REDUCTION="\'per_microbatch\'"')
  assert fixed == once.replace(gradient_reduction='per_microbatch')
  # One micro-batch: no accumulator, nothing to defer.
  single = memory_plan.plan(once.replace(num_microbatches=1), compile_step=False)
  assert single.gradient_bytes == single.params_bytes
  with pytest.raises(ConfigError,
                     match="gradient_reduction='twice' is not one of 'per_microbatch', 'once'"):
    memory_plan.plan(once.replace(gradient_reduction='twice'), compile_step=False)


@pytest.mark.slow
def test_the_plan_compiles_the_once_step():
  """The compiled plans of both reductions (FSDP, 8 data shards): the same arguments (the state),
  and XLA's temporaries of 'once' hold its unreduced gradient and accumulator. On the CPU compiler
  the 'per_microbatch' temporaries hold full-size gradients too (its reduce-scatter is an
  all-reduce then a slice), so its total is not smaller for this small model (docs/memory_plan.md
  gives FlanT5-XL's numbers)."""
  plans = {}
  for overrides in ([], ONCE):
    request = _request(DEMO + ['partitioning/fsdp.gin'], DEMO_OVERRIDES + overrides)
    plans[request.gradient_reduction] = memory_plan.plan(request, devices=jax.devices()[:8])
  per_plan, once_plan = plans['per_microbatch'], plans['once']
  assert per_plan.compiled and once_plan.compiled and per_plan.mesh_shape == {'data': 8, 'model': 1}
  assert once_plan.argument_bytes == per_plan.argument_bytes
  assert once_plan.gradient_bytes > 7 * per_plan.gradient_bytes  # not data-sharded: 8 shards
  assert once_plan.temp_bytes >= once_plan.gradient_bytes
  assert once_plan.temp_bytes != per_plan.temp_bytes


@pytest.mark.slow
def test_batch_spec_is_what_the_input_pipeline_yields(tmp_path_factory):
  request = _request(DEMO, DEMO_OVERRIDES)
  with demo_data.tiny_demo_data(tmp_path_factory, num_train=64, num_eval=8):
    batch = next(iter(input_pipeline.TrainIterator(request.dataset)))
  spec = input_pipeline.batch_spec(request.dataset)
  assert spec == {name: (value.shape, value.dtype) for name, value in batch.items()}


@pytest.mark.slow
def test_an_indivisible_batch_cannot_run_and_the_fix_splits_it():
  # 16 rows in 8 micro-batches of 2 rows over 4 data shards.
  request = _request(DEMO + ['partitioning/data_model.gin'],
                     DEMO_OVERRIDES[:1] + ['--gin.NUM_MICROBATCHES=8', '--gin.NUM_PARTITIONS=2',
                                           DEMO_OVERRIDES[2]])
  result = memory_plan.plan(request, devices=jax.devices()[:8])
  assert not result.compiled and not result.fits
  assert result.problem == ('BATCH_SIZE=16 in 8 micro-batches of 2 rows does not split over the 4 '
                            'data shards (NUM_PARTITIONS=2 of 8 devices)')
  # FSDP at the same model axis keeps the 4 data shards; a model axis of 4 leaves 2 of them.
  assert result.fix == 'include gin/partitioning/fsdp.gin with --gin.NUM_PARTITIONS=4'
  assert result.fix_plan.compiled and result.fix_plan.fits
  assert result.fix_plan.mesh_shape == {'data': 2, 'model': 4}
  assert memory_plan.verdict(result).startswith('CANNOT RUN: BATCH_SIZE=16 in 8 micro-batches')


def _plan_cli(args, timeout=600):
  # Without XLA_FLAGS: the command sets its own device count.
  return processes.run_specialize(['plan', *args], processes.environment(JAX_PLATFORMS='cpu'),
                                  timeout=timeout)


def _row(output, name):
  match = re.search(rf'^{re.escape(name)}\s+([\d.]+) GiB$', output, flags=re.MULTILINE)
  assert match, f'no {name!r} row in:\n{output}'
  return float(match.group(1))


@pytest.mark.slow
def test_xxl_on_two_model_partitions_overflows_and_the_plan_names_the_fix():
  """The shipped XXL experiment as it was (data_model.gin, 2 partitions) on its topology."""
  result = _plan_cli(['--gin_file', 'gin/experiments/flan_t5_xxl_gsm8k.gin',
                      '--gin_file', 'gin/partitioning/data_model.gin', '--gin.NUM_PARTITIONS=2',
                      '--no_compile'])
  assert result.returncode == 1, result.stderr[-3000:]
  out = result.stdout
  assert out.startswith('Topology v5p-64: 32 x TPU v5p (88.48 GiB each), 8 host(s) of 4.')
  # 11.3e9 float32 parameters over a model axis of 2; AdamW's two moments; f32 gradients + sum.
  assert _row(out, 'params') == pytest.approx(20.74, abs=0.01)
  assert _row(out, 'optimizer state (+ step)') == pytest.approx(2 * 20.74, abs=0.02)
  assert re.search(r'^verdict: DOES NOT FIT: 103\.\d\d GiB of 88\.48 GiB \(11\d%\), without '
                   r'activations.*does not split over the 16 data shards.*; fix: include '
                   r'gin/partitioning/fsdp\.gin with --gin\.NUM_PARTITIONS=4$', out, re.MULTILINE)


@pytest.mark.slow
def test_plan_compiles_a_flan_t5_step_on_the_topology_the_header_names():
  """FlanT5-small as shipped: no --topology (the header's), compiled on 4 fake devices."""
  result = _plan_cli(['--gin_file', 'gin/experiments/flan_t5_small_gsm8k.gin'])
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert out.startswith('Topology v4-8: 4 x TPU v4 (32.00 GiB each), 1 host(s) of 4.')
  assert 'Mesh data=4 x model=1 (standard rules)' in out
  assert re.search(r'^  host 0: rows 0-\d+ of \d+ \(data coordinates \[0, 1, 2, 3\] of 4\)$', out,
                   re.MULTILINE), out
  # FlanT5-small: 76.96M float32 parameters, whole on every device; AdamW: two moments.
  params = _row(out, 'params')
  assert params == pytest.approx(76_961_152 * 4 / GIB, abs=0.005)
  assert _row(out, 'optimizer state (+ step)') == pytest.approx(2 * 76_961_152 * 4 / GIB, abs=0.005)
  total = _row(out, 'total')
  assert total > 5 * params  # State, gradients and accumulator (5x) plus activations.
  assert re.search(rf'^verdict: fits: {total:.2f} GiB of 32\.00 GiB', out, re.MULTILINE)
  assert 'XLA CPU compile of the SPMD step' in out

