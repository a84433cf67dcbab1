"""The README's memory-plan table: `specialize plan` for every shipped FlanT5 experiment gin on the
topology its header names, plus the XXL experiment on the partitioning it used to ship with
(`data_model.gin`, 2 partitions), compiled.

  python tools/plan_experiments.py [--no_compile] [--only xl,xxl]

One process with as many fake CPU devices as the largest topology; each plan compiles on the first
`num_devices` of them (`memory_plan.plan(devices=...)`), as `specialize plan` does on its own.
Prints a Markdown table, one row per plan (a fix that the plan compiled gets a row of its own).
Compiling every step takes about 20 minutes on 2 cores.
"""
import argparse
import glob
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The partitioning XXL shipped with before FSDP: the overflow the plan must report.
OLD_XXL = ('experiments/flan_t5_xxl_gsm8k.gin', ['partitioning/data_model.gin'],
           ['--gin.NUM_PARTITIONS=2'])


def _plans():
  """`(label, gin files, overrides)` of the table's plans."""
  paths = sorted(glob.glob(os.path.join(REPO_ROOT, 'gin/experiments/flan_t5_*.gin')))
  shipped = [(os.path.relpath(p, os.path.join(REPO_ROOT, 'gin')), [], []) for p in paths]
  return shipped + [OLD_XXL]


def _gib(num_bytes):
  return '–' if num_bytes is None else f'{num_bytes / 2**30:.2f}'


def _row(label, result, memory_plan):
  request = result.request
  rules = 'FSDP' if ('embed', 'data') in request.partitioner.logical_axis_rules else 'standard'
  mesh = f'{result.mesh_shape["data"]}×{result.mesh_shape["model"]} {rules}'
  micro = request.dataset.batch_size // request.num_microbatches
  verdict = memory_plan.verdict(result).split(':')[0]
  if result.compiled:
    verdict += f' ({result.compile_seconds:.0f} s compile)'
  else:
    verdict += ' (not compiled' + ('; the micro-batch does not split over the '
                                   f'{result.mesh_shape["data"]} data shards' if result.problem
                                   else '') + ')'
  cells = [label, request.topology.name, mesh, f'{request.dataset.batch_size}/{micro}',
           _gib(result.params_bytes), _gib(result.optimizer_bytes), _gib(result.gradient_bytes),
           _gib(result.other_temp_bytes), _gib(result.total_bytes),
           _gib(request.topology.memory_bytes), verdict]
  return '| ' + ' | '.join(cells) + ' |'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--no_compile', action='store_true', help='analytic rows only (seconds)')
  parser.add_argument('--only', default='', help='comma-separated sizes, e.g. xl,xxl')
  args = parser.parse_args(argv)
  sys.path.insert(0, REPO_ROOT)
  from specialize_jax.planning import memory_plan  # pylint: disable=g-import-not-at-top
  from specialize_jax.planning import topologies  # pylint: disable=g-import-not-at-top
  plans = [p for p in _plans() if not args.only or any(
      f'flan_t5_{size}_' in p[0] for size in args.only.split(','))]
  named = {}
  for gin_file, _, _ in plans:
    with open(os.path.join(REPO_ROOT, 'gin', gin_file), encoding='utf-8') as f:
      named[gin_file] = topologies.topology(topologies.named_topology([f.read()]))

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', max(t.num_devices for t in named.values()))
  from specialize_jax.jobs import plan_config  # pylint: disable=g-import-not-at-top

  print('| experiment | topology | mesh data×model | batch/micro | params | optimizer | gradients '
        '(+acc) | other XLA temps | total | chip | verdict |')
  print('|' + '---|' * 11)
  for gin_file, extra_files, overrides in plans:
    label = os.path.basename(gin_file)[:-len('.gin')] + ''.join(
        f' + {os.path.basename(f)}' for f in extra_files) + ''.join(f' {o}' for o in overrides)
    request = plan_config.plan_request([gin_file] + extra_files, overrides, [], named[gin_file])
    start = time.perf_counter()
    result = memory_plan.plan(request, compile_step=not args.no_compile,
                              log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f'{label}: {time.perf_counter() - start:.0f} s', file=sys.stderr, flush=True)
    print(_row(label, result, memory_plan), flush=True)
    if result.fix_plan is not None:
      print(_row(f'↳ fix: {result.fix}', result.fix_plan, memory_plan), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
