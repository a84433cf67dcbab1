"""The training loop end to end on the generated demo data (`specialize_jax.training.trainer`).

Every run trains a tiny T5 (1+1 layers, width 32, the demo's 384-piece vocabulary) at batch 8 on
`demo_train_cot`, so a run is seconds, most of it compilation. Runs with the same model, optimizer
and mesh compile the same programs: a persistent compilation cache, scoped to this module, lets the
restarts load them instead of compiling again (a restart on a new machine would compile; what the
tests check does not depend on it).

Terms:
  run A: the reference run, 20 uninterrupted steps on the default 8-device data-parallel mesh,
    checkpoints every 10 steps (module fixture `run_a`).
"""
import base64
import dataclasses
import glob
import json
import logging
import os
import signal

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest
import seqio
import tensorflow as tf

from specialize_jax import cli
from specialize_jax.evaluation import evaluator as evaluator_lib
from specialize_jax.evaluation import scoring
from specialize_jax.checkpoints import loading
from specialize_jax.checkpoints import orbax_pytree
from specialize_jax.checkpoints import param_tree
from specialize_jax.model import models
from specialize_jax.model import network
from specialize_jax.training import checkpoint_manager
from specialize_jax.training import input_pipeline
from specialize_jax.training import metric_writers
from specialize_jax.training import optimizers
from specialize_jax.training import partitioning
from specialize_jax.training import preemption
from specialize_jax.training import trainer
from tests.support import demo_data
from tests.support import tiny_model

NUM_TRAIN, NUM_EVAL = 2000, 32
TINY = tiny_model.config()
LENGTHS = {'inputs': 128, 'targets': 64}
BATCH_SIZE = 8
# Constant 3e-3 after 5 warm-up steps; the first update's rate is 0 (optimizers' docstring).
OPTIMIZER = optimizers.OptimizerConfig(learning_rate=3e-3, warmup_steps=5)
RUN_A_STEPS = 20
CHECKPOINTS = checkpoint_manager.CheckpointConfig(period=10, keep_last=3)


@pytest.fixture(scope='module', autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """A persistent compilation cache for this module only (restored afterwards)."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {name: getattr(jax.config, name) for name in names}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  compilation_cache.reset_cache()
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  """The demo data at tiny sizes, with the demo tasks registered over it."""
  with demo_data.tiny_demo_data(tmp_path_factory, NUM_TRAIN, NUM_EVAL) as directory:
    yield directory


@pytest.fixture(scope='module')
def model():
  return models.EncoderDecoderModel(TINY, z_loss=1e-4)


def _dataset():
  return input_pipeline.DatasetConfig('demo_train_cot', LENGTHS, batch_size=BATCH_SIZE)


def _train(model_dir, model, num_train_steps, **kwargs):
  kwargs = {'optimizer': OPTIMIZER, 'checkpoint': CHECKPOINTS, 'log_period': 5, **kwargs}
  return trainer.train(str(model_dir), model, _dataset(), num_train_steps, **kwargs)


def _params(step_dir):
  """{'encoder/layers_0/...': float32 array} of a checkpoint step directory."""
  _, params = loading.load_checkpoint(str(step_dir), config=TINY)
  return param_tree.flatten_params(params)


def _records(model_dir, split):
  return [r for r in metric_writers.read_metrics(str(model_dir)) if r['split'] == split]


def _step_dirs(model_dir):
  return sorted((p for p in os.listdir(model_dir) if p.startswith('checkpoint_')),
                key=lambda p: int(p.split('_')[1]))


def _assert_params_equal(actual, expected, atol=0.0):
  assert actual.keys() == expected.keys()
  worst = max((float(np.max(np.abs(actual[k] - expected[k]))), k) for k in expected)
  assert worst[0] <= atol, f'largest difference {worst[0]} in {worst[1]} (allowed {atol})'


@pytest.fixture(scope='module')
def run_a(demo_dir, model, tmp_path_factory):
  """Run A: 20 uninterrupted steps; returns its MODEL_DIR."""
  model_dir = tmp_path_factory.mktemp('run_a')
  _train(model_dir, model, RUN_A_STEPS)
  assert _step_dirs(model_dir) == ['checkpoint_10', 'checkpoint_20']
  return model_dir


# ------------------------------------------------------------------------------------------------
# Resume.


def _corrupt_arrays(step_dir):
  """Deletes the array data files (OCDBT `d/` files) of the step's train state."""
  removed = 0
  for root, _, files in os.walk(os.path.join(step_dir, checkpoint_manager.STATE_ITEM)):
    if os.path.basename(root) == 'd':
      for name in files:
        os.remove(os.path.join(root, name))
        removed += 1
  assert removed


@pytest.mark.slow
def test_resumed_run_ends_identical_to_uninterrupted_run(run_a, model, tmp_path, caplog):
  """Run B stops at step 10, a new `train` call continues it to 20: it must match run A bit for
  bit, which needs the saved data position as well as the state."""
  model_dir = tmp_path / 'run_b'
  _train(model_dir, model, 10)
  assert _step_dirs(model_dir) == ['checkpoint_10']

  lines = []
  _train(model_dir, model, RUN_A_STEPS, log=lines.append)
  assert any('Resuming from step 10' in line for line in lines), lines
  assert any(line.startswith('Starting at step 10 from resume') for line in lines), lines
  expected = _params(run_a / 'checkpoint_20')
  # Bitwise: the same batches in the same order (the saved data position) and the same updates.
  _assert_params_equal(_params(model_dir / 'checkpoint_20'), expected)
  losses_a = {r['step']: r['loss'] for r in _records(run_a, 'train')}
  losses_b = {r['step']: r['loss'] for r in _records(model_dir, 'train')}
  assert losses_b == losses_a

  # A corrupted latest checkpoint: the next run falls back to step 10, warns, and redoes 11-20.
  _corrupt_arrays(model_dir / 'checkpoint_20')
  lines = []
  with caplog.at_level(logging.WARNING):
    _train(model_dir, model, RUN_A_STEPS, log=lines.append)
  warnings = '\n'.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert 'Checkpoint step 20' in warnings and 'is bad' in warnings, warnings
  assert 'Restored step 10' in warnings, warnings
  assert any(line.startswith('Starting at step 10 from resume') for line in lines), lines
  assert _step_dirs(model_dir) == ['checkpoint_10', 'checkpoint_20']
  # The damaged step was moved aside, not deleted.
  moved = os.listdir(model_dir / checkpoint_manager.BAD_SUBDIR)
  assert len(moved) == 1 and moved[0].startswith('checkpoint_20.unreadable-'), moved
  _assert_params_equal(_params(model_dir / 'checkpoint_20'), expected)


@pytest.mark.slow
def test_sigterm_saves_a_step_and_the_rerun_ends_identical(run_a, model, tmp_path):
  """One process: SIGTERM during step 3 saves step 4 (not a checkpoint period), raises
  `Preempted`, and restores the previous SIGTERM handler; the same call again continues to run
  A's params bit for bit."""
  model_dir = tmp_path / 'run'
  unhandled = []
  # Should the trainer not catch SIGTERM, this handler notes it instead of pytest being killed.
  previous = signal.signal(signal.SIGTERM, lambda *_: unhandled.append(True))

  def log(line):
    if line.startswith('step 3/'):
      os.kill(os.getpid(), signal.SIGTERM)

  try:
    with pytest.raises(preemption.Preempted,
                       match=r'^preempted at step 4; rerun the same command'):
      _train(model_dir, model, RUN_A_STEPS, log_period=1, log=log)
    assert not unhandled
  finally:
    handler = signal.signal(signal.SIGTERM, previous)
  assert handler is not previous and handler.__name__ == '<lambda>'  # the trainer put it back
  assert _step_dirs(model_dir) == ['checkpoint_4']
  assert [r['step'] for r in _records(model_dir, 'train')] == [1, 2, 3, 4]
  lines = []
  _train(model_dir, model, RUN_A_STEPS, log=lines.append)
  assert any(line.startswith('Starting at step 4 from resume') for line in lines), lines
  _assert_params_equal(_params(model_dir / 'checkpoint_20'), _params(run_a / 'checkpoint_20'))


# ------------------------------------------------------------------------------------------------
# INITIAL_CHECKPOINT_PATH.


@pytest.mark.slow
def test_initial_checkpoint_params_start_the_run(demo_dir, model, tmp_path):
  """A run with INITIAL_CHECKPOINT_PATH (an orbax export) starts from exactly those params."""
  params = jax.device_get(network.init_params(TINY, jax.random.PRNGKey(42)))
  initial = orbax_pytree.save_orbax(params, TINY, tmp_path / 'initial')
  lines = []
  # One update, at the warm-up's rate 0: the final params are the starting params, unchanged
  # (a run that ignored them would end with its own random init).
  _train(tmp_path / 'run', model, 1, initial_checkpoint_path=initial, log_period=1,
         log=lines.append)
  assert any(line.startswith('Starting at step 0 from initial_checkpoint') for line in lines)
  assert _records(tmp_path / 'run', 'train')[0]['learning_rate'] == 0.0
  _assert_params_equal(_params(tmp_path / 'run' / 'checkpoint_1'),
                       param_tree.flatten_params(params))


# ------------------------------------------------------------------------------------------------
# Non-finite loss.


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_naming_the_steps(demo_dir, model, tmp_path):
  """A diverging run stops at the first log period whose loss is not finite, naming its steps."""
  # Rates 0, 5e29, then 1e30: steps 1-2 see the initial params, the update of step 2 blows them up.
  optimizer = optimizers.OptimizerConfig(learning_rate=1e30, warmup_steps=2)
  with pytest.raises(FloatingPointError, match=r'between steps 3 and 4'):
    _train(tmp_path, model, 10, optimizer=optimizer, log_period=2)
  train = _records(tmp_path, 'train')
  assert [r['step'] for r in train] == [2] and np.isfinite(train[0]['loss'])


@pytest.mark.slow
def test_a_non_finite_state_is_never_checkpointed(demo_dir, model, tmp_path):
  """Log and checkpoint periods differ: the blow-up at step 3 is not a logged step, yet the save
  at step 4 checks the losses first and stops the run instead of saving the NaN state."""
  optimizer = optimizers.OptimizerConfig(learning_rate=1e30, warmup_steps=2)
  with pytest.raises(FloatingPointError, match=r'between steps 3 and 4; nothing was saved'):
    _train(tmp_path, model, 10, optimizer=optimizer, log_period=10,
           checkpoint=checkpoint_manager.CheckpointConfig(period=2, async_save=False))
  assert _step_dirs(tmp_path) == ['checkpoint_2']
  assert not os.path.exists(tmp_path / 'metrics.jsonl')  # no logged step was reached


def test_a_vocabulary_larger_than_the_model_fails_before_anything_is_written(demo_dir, tmp_path):
  """Ids past the embedding table would read NaN rows (`jnp.take`): the run refuses to start."""
  small = models.EncoderDecoderModel(dataclasses.replace(TINY, vocab_size=256))
  with pytest.raises(ValueError, match=r"Task 'demo_train_cot': its 'inputs' vocabulary has 384 "
                                       r"ids but the model's vocab_size is 256.*at least 384"):
    _train(tmp_path / 'run', small, 2)
  assert not (tmp_path / 'run').exists()


def test_an_unknown_task_name_fails_before_anything_is_written_with_suggestions(demo_dir, model,
                                                                              tmp_path):
  del demo_dir  # Registers the demo tasks the error suggests.
  dataset = input_pipeline.DatasetConfig('demo_train_cott', LENGTHS, batch_size=BATCH_SIZE)
  with pytest.raises(ValueError, match=r"MIXTURE_OR_TASK_NAME='demo_train_cott' is not registered; "
                                       r"did you mean demo_train_cot"):
    trainer.train(str(tmp_path / 'run'), model, dataset, 2)
  assert not (tmp_path / 'run').exists()


# ------------------------------------------------------------------------------------------------
# Sharding.


def _saved_partition_specs(step_dir):
  """{'params/encoder/...': (mesh shape, partition spec)} from orbax's `_sharding` file."""
  path = os.path.join(step_dir, checkpoint_manager.STATE_ITEM, '_sharding')
  with open(path, encoding='utf-8') as f:
    raw = json.load(f)
  specs = {}
  for key, value in raw.items():
    name = base64.urlsafe_b64decode(key + '=' * (-len(key) % 4)).decode().replace('.', '/')
    value = json.loads(value) if isinstance(value, str) else value
    specs[name] = (tuple(value['shape']), tuple(value['partition_spec']))
  return specs


@pytest.mark.slow
def test_model_parallel_loop_matches_data_parallel(run_a, model, tmp_path):
  """The loop on a 4x2 (data x model) mesh gives run A's losses and params (8x1) within 1e-5."""
  partitioner = partitioning.PartitioningConfig(num_partitions=2)
  _train(tmp_path, model, RUN_A_STEPS, partitioner=partitioner)
  specs = _saved_partition_specs(tmp_path / 'checkpoint_20')
  # The run really was 4x2 with tensor-parallel parameters.
  assert specs['params/encoder/layers_0/mlp/wi_0/kernel'] == ((4, 2), (None, 'model'))
  assert specs['params/encoder/layers_0/attention/out/kernel'] == ((4, 2), ('model', None))
  assert _saved_partition_specs(run_a / 'checkpoint_20')[
      'params/encoder/layers_0/mlp/wi_0/kernel'][0] == (8, 1)

  _assert_params_equal(_params(tmp_path / 'checkpoint_20'), _params(run_a / 'checkpoint_20'),
                       atol=1e-5)
  losses_a = [r['loss'] for r in _records(run_a, 'train')]
  losses = [r['loss'] for r in _records(tmp_path, 'train')]
  np.testing.assert_allclose(losses, losses_a, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# End to end through the CLI and gin.


def _tensorboard_scalars(directory):
  """{(tag, step): value} of the event files in `directory`."""
  values = {}
  for path in glob.glob(os.path.join(directory, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        values[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
  return values


@pytest.mark.slow
def test_cli_run_trains_saves_evaluates_and_writes_metrics(demo_dir, tmp_path, capsys):
  """`specialize train` with the demo experiment's gin file, shrunk by `--gin.` overrides: every
  output a user reads is present and consistent with the others."""
  model_dir = tmp_path / 'run'
  overrides = {
      'MODEL_DIR': f"'{model_dir}'", 'TRAIN_STEPS': 30, 'BATCH_SIZE': BATCH_SIZE,
      'LEARNING_RATE': 3e-3, 'LR_SCHEDULE': "'constant'", 'WARMUP_STEPS': 5, 'LOG_PERIOD': 5,
      'CHECKPOINT_PERIOD': 10, 'KEEP_LAST_CHECKPOINTS': 2, 'EVAL_PERIOD': 15,
      'EVAL_TASKS': "('demo_id_cot',)", 'EVAL_MAX_EXAMPLES': 16, 'EVAL_BATCH_SIZE': 16,
      'EVAL_MAX_DECODE_LENGTH': 48,
      **tiny_model.gin_bindings()}
  argv = ['train', '--gin_file=experiments/demo_cpu.gin'] + [
      f'--gin.{name}={value}' for name, value in overrides.items()]
  assert cli.main(argv) == 0
  returned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

  # The configuration as run, with the overrides applied.
  config_text = (model_dir / 'config.gin').read_text()
  assert 'TRAIN_STEPS = 30' in config_text and 'emb_dim = 32' in config_text

  # Train records every LOG_PERIOD steps, with the documented keys and values.
  train = _records(model_dir, 'train')
  assert [r['step'] for r in train] == [5, 10, 15, 20, 25, 30]
  for record in train:
    assert {'loss', 'cross_ent_loss', 'z_loss', 'accuracy', 'learning_rate', 'grad_norm',
            'num_target_tokens', 'num_examples', 'steps_per_s', 'target_tokens_per_s',
            'time'} <= record.keys()
    # Packed rows (demo_cpu.gin packs): examples (a mean over the logged steps), not rows.
    assert record['num_examples'] > 1.5 * BATCH_SIZE
  # Updates 0-4 warm up at 0, 0.6, ..., 2.4e-3 (mean 1.2e-3); then 3e-3.
  assert train[0]['learning_rate'] == pytest.approx(1.2e-3, rel=1e-5)
  assert all(r['learning_rate'] == pytest.approx(3e-3, rel=1e-5) for r in train[1:])
  assert train[-1]['loss'] < 0.8 * train[0]['loss'], [r['loss'] for r in train]
  assert returned['loss'] == train[-1]['loss']

  # Checkpoints every 10 steps, the last 2 kept; the data position saved with each.
  assert _step_dirs(model_dir) == ['checkpoint_20', 'checkpoint_30']
  meta = json.loads((model_dir / 'checkpoint_30' / 'meta' / 'metadata').read_text())
  assert meta['step'] == 30 and meta['data_position']['batches_consumed'] == 30

  # Eval records at EVAL_PERIOD and at the end, mirrored by the per-task files.
  evals = _records(model_dir, 'eval')
  assert [r['step'] for r in evals] == [15, 30]
  task = 'demo_id_cot'
  gold = [json.loads(line)['gold_answer']
          for line in (demo_dir / 'test_id.jsonl').read_text().splitlines()]
  for record in evals:
    step = record['step']
    summary_file = evaluator_lib.metrics_path(str(model_dir / 'eval'), task, step)
    with open(summary_file, encoding='utf-8') as f:
      summary = json.load(f)
    assert summary['step'] == step and summary['num_examples'] == 16
    accuracy = summary['metrics']['accuracy']
    assert record[f'{task}/accuracy'] == accuracy
    predictions_file = evaluator_lib.predictions_path(str(model_dir / 'eval'), task, step)
    with open(predictions_file, encoding='utf-8') as f:
      rows = [json.loads(line) for line in f]
    assert [r['index'] for r in rows] == list(range(16))
    assert [r['target'] for r in rows] == gold[:16]  # Aligned with the eval data.
    # Decoded text for every row (a 30-step model may end some rows at once: empty is allowed).
    assert all(isinstance(r['prediction'], str) for r in rows) and any(r['prediction'] for r in rows)
    rescored = scoring.score(seqio.get_mixture_or_task(task), predictions_file)
    assert rescored.n == 16 and rescored.accuracy == accuracy
    assert sum(r['correct'] for r in rows) == round(accuracy * 16 / 100)

  # TensorBoard holds the same numbers as metrics.jsonl.
  scalars = _tensorboard_scalars(model_dir / 'tensorboard' / 'train')
  assert scalars[('loss', 30)] == pytest.approx(train[-1]['loss'], rel=1e-6)
  eval_scalars = _tensorboard_scalars(model_dir / 'tensorboard' / 'eval')
  assert eval_scalars[(f'{task}/accuracy', 15)] == pytest.approx(evals[0][f'{task}/accuracy'])


def _eval_output(eval_dir, task, step):
  """(metrics file text, its record, prediction rows) of one eval output."""
  with open(evaluator_lib.metrics_path(str(eval_dir), task, step), encoding='utf-8') as f:
    text = f.read()
  with open(evaluator_lib.predictions_path(str(eval_dir), task, step), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return text, json.loads(text), rows


@pytest.mark.slow
def test_cli_eval_scores_a_checkpoint_as_the_training_loop_did(demo_dir, tmp_path):
  """A bfloat16 model (bound with --gin.): `specialize eval` of the run's checkpoint, given no
  MODEL, decodes in the dtype the run trained in (its config.gin) and writes the in-loop
  evaluation's metrics and predictions exactly; DECODE_DTYPE overrides, and a result in another
  dtype is decoded again."""
  model_dir, task, step = tmp_path / 'run', 'demo_id_cot', 4
  # The shapes of the test above: its float32 decoding program is in the compilation cache.
  eval_flags = {'EVAL_TASKS': "('demo_id_cot',)", 'EVAL_MAX_EXAMPLES': 16, 'EVAL_BATCH_SIZE': 16,
                'EVAL_MAX_DECODE_LENGTH': 48,
                'EVAL_FEATURE_LENGTHS': "{'inputs': 256, 'targets': 80}"}  # demo_cpu.gin's
  overrides = {
      'MODEL_DIR': f"'{model_dir}'", 'TRAIN_STEPS': step, 'BATCH_SIZE': BATCH_SIZE,
      'LEARNING_RATE': 3e-3, 'WARMUP_STEPS': 1, 'LOG_PERIOD': 2, 'CHECKPOINT_PERIOD': step,
      'EVAL_PERIOD': step, 'TENSORBOARD': False, 'model_config.T5Config.dtype': "'bfloat16'",
      **eval_flags,
      **tiny_model.gin_bindings()}
  assert cli.main(['train', '--gin_file=experiments/demo_cpu.gin'] + [
      f'--gin.{name}={value}' for name, value in overrides.items()]) == 0
  in_loop_text, in_loop, in_loop_rows = _eval_output(model_dir / 'eval', task, step)
  assert in_loop[evaluator_lib.SETTINGS_KEY]['dtype'] == 'bfloat16'
  assert any(r['prediction'] for r in in_loop_rows)

  eval_argv = ['eval', '--gin_file=runs/eval.gin', f"--gin.CHECKPOINT_PATH='{model_dir}'"] + [
      f'--gin.{name}={value}' for name, value in eval_flags.items()]
  # The in-loop result has the settings and dtype `specialize eval` decodes in: reused as is.
  assert cli.main(eval_argv) == 0
  assert _eval_output(model_dir / 'eval', task, step)[0] == in_loop_text
  # Decoded again (the in-loop output moved away): the same metrics and predictions.
  os.rename(model_dir / 'eval', tmp_path / 'in_loop_eval')
  assert cli.main(eval_argv) == 0
  _, record, rows = _eval_output(model_dir / 'eval', task, step)
  assert record['metrics'] == in_loop['metrics']
  assert record[evaluator_lib.SETTINGS_KEY] == in_loop[evaluator_lib.SETTINGS_KEY]
  assert rows == in_loop_rows
  # An explicit dtype wins; the bfloat16 result does not count for it.
  assert cli.main(eval_argv + ['--gin.DECODE_DTYPE="float32"']) == 0
  _, record, _ = _eval_output(model_dir / 'eval', task, step)
  assert record[evaluator_lib.SETTINGS_KEY] == {**in_loop[evaluator_lib.SETTINGS_KEY],
                                                'dtype': 'float32'}
