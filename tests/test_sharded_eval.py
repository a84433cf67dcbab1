"""Sharded decoding as a user runs it: `specialize infer` with the model axis over 4 of 8 fake CPU
devices gives the predictions of a one-device run, and the restored parameters are sharded (each
device holds 1/4 of every model-sharded parameter); decoding under the FSDP rules keeps its weight
gathers out of the token loop."""
import json
import os

import jax
import numpy as np
import pytest

from specialize_jax.evaluation import inference
from specialize_jax.training import partitioning
from tests.support import demo_data
from tests.support import processes
from tests.support import tiny_model

pytestmark = pytest.mark.slow

# The tiny demo model with 4 heads of 8, which a model axis of 4 divides.
TINY = {
    'TRAIN_STEPS': 2, 'BATCH_SIZE': 8, 'LOG_PERIOD': 1, 'CHECKPOINT_PERIOD': 2, 'EVAL_PERIOD': 0,
    'WARMUP_STEPS': 1, 'LR_SCHEDULE': "'constant'", 'USE_PACKING': False, 'TENSORBOARD': False,
    **tiny_model.gin_bindings(num_heads=4, head_dim=8),
}


def _env(devices: int, data_dir) -> dict:
  return processes.environment(SPECIALIZE_DATA_DIR=str(data_dir), JAX_PLATFORMS='cpu',
                               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _specialize(args, env):
  return processes.run_specialize(args, env, check=True).stdout


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  with demo_data.tiny_demo_data(tmp_path_factory, num_train=200, num_eval=16) as data:
    model_dir = tmp_path_factory.mktemp('run')
    _specialize(['train', '--gin_file=experiments/demo_cpu.gin', f"--gin.MODEL_DIR='{model_dir}'"]
                + [f'--gin.{k}={v}' for k, v in TINY.items()], _env(1, data.parent))
    yield model_dir, data.parent


def _infer(checkpoint, output, env, partitioning_flags):
  _specialize(['infer', '--gin_file=runs/infer.gin', *partitioning_flags,
               f"--gin.CHECKPOINT_PATH='{checkpoint}'", "--gin.INFER_INPUTS='demo_id_cot'",
               f"--gin.INFER_OUTPUT='{output}'", '--gin.INFER_BATCH_SIZE=8',
               '--gin.MAX_DECODE_LENGTH=12'], env)
  with open(output, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_model_parallel_infer_predicts_what_one_device_does(run, tmp_path):
  model_dir, data_dir = run
  checkpoint = os.path.join(model_dir, 'checkpoint_2')
  one = _infer(checkpoint, tmp_path / 'one.jsonl', _env(1, data_dir), [])
  sharded = _infer(checkpoint, tmp_path / 'sharded.jsonl', _env(8, data_dir),
                   ['--gin_file=partitioning/data_model.gin', '--gin.NUM_PARTITIONS=4'])
  assert len(one) == 16
  assert [r['prediction'] for r in sharded] == [r['prediction'] for r in one]


def test_restored_params_hold_a_quarter_of_each_sharded_parameter_per_device(run):
  model_dir, _ = run
  assert jax.device_count() == 8
  mesh = partitioning.make_mesh(partitioning.PartitioningConfig(num_partitions=4))
  _, params = inference.restore_params(os.path.join(model_dir, 'checkpoint_2'), mesh)
  sharded = replicated = 0
  for leaf in jax.tree.leaves(params):
    shard = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    assert len(leaf.addressable_shards) == 8
    if 'model' in jax.tree.leaves(tuple(leaf.sharding.spec)):
      assert shard * 4 == leaf.nbytes, (leaf.shape, leaf.sharding.spec)
      sharded += leaf.nbytes
    else:
      assert shard == leaf.nbytes
      replicated += leaf.nbytes
  assert sharded > 10 * replicated  # the embeddings, attention and MLP kernels are all split


def test_decoding_under_fsdp_rules_gathers_weights_before_the_loop_and_decodes_the_same():
  """Decoding traced under the trainer's FSDP rules (what eval, sweep, infer and the in-loop eval
  pass) decodes the same tokens as without them, with the weight gathers hoisted out of the token
  loop and (almost) no all-reduce left: without the rules XLA reduces activations across the data
  axis at every generated token."""
  from specialize_jax.model import models  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import optimizers  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import train_state  # pylint: disable=g-import-not-at-top
  from tests.support import hlo  # pylint: disable=g-import-not-at-top
  config = tiny_model.config(vocab_size=128, num_encoder_layers=2, num_decoder_layers=2)
  model = models.EncoderDecoderModel(config)
  mesh = partitioning.make_mesh(partitioning.PartitioningConfig(num_partitions=1),
                                jax.devices()[:4])
  rules = partitioning.fsdp_logical_axis_rules()
  state, _ = train_state.create_train_state(
      model, optimizers.make_optimizer(optimizers.OptimizerConfig(), 10), mesh, rules,
      jax.random.key(0), init_params_fn=lambda: tiny_model.random_params(config, as_numpy=True))
  inputs = np.random.default_rng(0).integers(2, 128, (8, 12)).astype(np.int32)
  results = {}
  for with_rules in (False, True):
    decoder = inference.Decoder(model, mesh, 10, logical_axis_rules=rules if with_rules else None)
    tokens = decoder(state.params, {'encoder_input_tokens': inputs}, batch_size=8)
    step = decoder._step(state.params, mesh)  # pylint: disable=protected-access
    batch = partitioning.global_batch({'encoder_input_tokens': inputs}, mesh)
    key = jax.make_array_from_callback((2,), partitioning.replicated(mesh),
                                       lambda index: np.zeros(2, np.uint32)[index])
    text = step.lower(state.params, batch, key).compile().as_text()
    results[with_rules] = (np.stack(tokens), hlo.collectives_outside_and_inside_loops(text),
                           sum(hlo.collectives_outside_and_inside_loops(text, 'all-reduce')))
  np.testing.assert_array_equal(results[True][0], results[False][0])
  (outside, inside), reduces = results[True][1:]
  assert outside > inside
  assert reduces < results[False][2] / 4
