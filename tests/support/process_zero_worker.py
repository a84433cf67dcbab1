"""One process of `tests/test_process_zero.py`: decisions from listings that differ per process.

Run as `python -m tests.support.process_zero_worker` from the repository root, once per process,
joined on loopback (CPU collectives over gloo, one fake device each). `--run_dir` is this
process's own run directory, so each process would list other steps; every case goes through
`process_zero.decided_by_process_zero`, and the results (or the error each case raised) go to
`--output` as JSON.
"""
import argparse
import json
import os
import re


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--run_dir', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--coordinator_address', required=True)
  args = parser.parse_args()
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  from specialize_jax.evaluation import process_zero  # pylint: disable=g-import-not-at-top
  from specialize_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

  def listing():
    return sorted((int(m.group(1)), os.path.join(args.run_dir, m.group(0)))
                  for m in map(re.compile(r'checkpoint_(\d+)').fullmatch,
                               os.listdir(args.run_dir)) if m)

  def fails():
    raise ValueError(f'no committed checkpoint in {args.run_dir}')

  # Non-ASCII and over 64 KiB: the bytes, not the characters, are counted and sent.
  large = {'text': 'é' * 40000, 'steps': list(range(1000))}
  result = {'process_index': jax.process_index()}
  for name, decide in (('listing', listing), ('error', fails), ('large', lambda: large)):
    try:
      result[name] = process_zero.decided_by_process_zero(decide, name)
    except ValueError as e:
      result[name] = {'raised': type(e).__name__, 'message': str(e)}
  result['large'] = result['large'] == large
  with open(args.output, 'w', encoding='utf-8') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main()
