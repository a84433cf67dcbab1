"""One process of `tests/test_multiprocess.py`: a few steps of tiny training on the demo data.

Run as `python -m tests.support.multiprocess_worker` from the repository root, once per process.
With `--num_processes 2` it joins a JAX cluster on loopback (CPU collectives over gloo, as
`specialize --multihost` runs on CPU); each process owns `--num_devices` fake CPU devices.
It writes `--output` (JSON: process index and count, device counts, the returned train metrics);
process 0 also writes MODEL_DIR's metrics.jsonl, and every process its shards of the checkpoint.
"""
import argparse
import json
import os
import time

from tests.support import tiny_model

START = time.monotonic()

TRAIN_STEPS = 4
BATCH_SIZE = 8  # Global: 4 rows per process with 2 processes.


def train(model_dir: str, log=print) -> dict:
  """The run every process makes (and the in-process reference of the test): its train metrics.

  Unshuffled, to save each process filling the demo task's 10,000-example shuffle buffer; that
  processes see the same shuffled global stream is checked in-process by the test.
  """
  # pylint: disable=g-import-not-at-top
  from specialize_jax.model import models
  from specialize_jax.training import checkpoint_manager
  from specialize_jax.training import input_pipeline
  from specialize_jax.training import optimizers
  from specialize_jax.training import trainer
  # pylint: enable=g-import-not-at-top
  config = tiny_model.config()
  dataset = input_pipeline.DatasetConfig('demo_train_cot', {'inputs': 128, 'targets': 64},
                                         batch_size=BATCH_SIZE, shuffle=False,
                                         shard_by_process=False)
  return trainer.train(
      model_dir, models.EncoderDecoderModel(config), dataset, TRAIN_STEPS,
      optimizer=optimizers.OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
      checkpoint=checkpoint_manager.CheckpointConfig(period=1000), log_period=1, log=log)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--demo_dir', required=True)
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--num_devices', type=int, required=True)
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--coordinator_address', default=None)
  args = parser.parse_args()

  # Before jax is imported: the fake devices of this process.
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.num_devices}'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import jax  # pylint: disable=g-import-not-at-top
  from specialize_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

  from specialize_jax.tasks import demo  # pylint: disable=g-import-not-at-top
  demo.register_demo_tasks(args.demo_dir)
  log = lambda message: print(f'[{time.monotonic() - START:5.1f} s] {message}', flush=True)
  log('imported and connected')
  metrics = train(args.model_dir, log=log)
  result = {'process_index': jax.process_index(), 'process_count': jax.process_count(),
            'num_devices': jax.device_count(), 'num_local_devices': jax.local_device_count(),
            'metrics': metrics}
  with open(args.output, 'w', encoding='utf-8') as f:
    json.dump(result, f)
  log('done')


if __name__ == '__main__':
  main()
