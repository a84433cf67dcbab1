"""The evaluator and `infer` on a real registered eval task with a tiny random T5 (real vocabulary).

What must hold: the metrics file equals a re-scoring of the predictions file; decoding compiles
once and is reused by later evaluations; the padded last batch adds no predictions; forced-correct
predictions score 100 %; a checkpoint sweep evaluates every step and a rerun skips them; `infer`
writes one line per input, identical to the evaluator's decodes of the same inputs.
"""
import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from specialize_jax.evaluation import evaluator as evaluator_lib
from specialize_jax.evaluation import inference
from specialize_jax.evaluation import scoring
from specialize_jax.checkpoints import loading
from specialize_jax.checkpoints import orbax_pytree
from specialize_jax.model import config as config_lib
from specialize_jax.model import models
from specialize_jax.model import network
from tests.support import shared_data

TASK = 'multiarith_dev_zs_ao'  # numeric golds; inputs of the first 10 examples are <= 57 tokens
NUM_EXAMPLES = 10
CONFIG = evaluator_lib.EvalConfig(
    task_names=(TASK,), feature_lengths={'inputs': 64, 'targets': 8}, batch_size=4,
    max_examples=NUM_EXAMPLES, max_decode_length=8)
WRONG_ANSWER = 'The answer is -7777'


@pytest.fixture(scope='module')
def registry():
  shared_data.point_tasks_here()
  import specialize_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import
  return seqio.TaskRegistry


class CountingModel(models.EncoderDecoderModel):
  """Counts traces of the jitted decoder: a trace means a compilation."""

  def __init__(self, *args, **kwargs):
    self.traces = 0
    super().__init__(*args, **kwargs)

  def _decode_impl(self, *args, **kwargs):
    self.traces += 1
    return super()._decode_impl(*args, **kwargs)


T5_CONFIG = config_lib.get_config('tiny')  # vocab 32,128: the real T5 vocabulary


@pytest.fixture(scope='module')
def model():
  return CountingModel(T5_CONFIG)


def _random_params(seed):
  """Host-side random params of the network's shapes (jitting `init_params` at vocab 32,128
  takes ~13 s on a loaded CPU; this takes milliseconds): norm scales 1, embedding std 1, the rest
  std 0.25, about what `init_params` gives."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = jax.tree_util.keystr(path)
    std = 1.0 if 'embedding' in name else 0.25
    if 'scale' in name:
      return np.ones(shape.shape, np.float32)
    return rng.normal(0.0, std, shape.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, network.param_shapes(T5_CONFIG))


@pytest.fixture(scope='module')
def params_pair():
  return _random_params(1), _random_params(2)


@pytest.fixture(scope='module')
def evaluator(registry, model):
  return evaluator_lib.Evaluator(model, CONFIG)


def _read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _read_json(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _task_inputs(n):
  task = seqio.get_mixture_or_task(TASK)
  return [e['inputs_pretokenized'].decode() for e in
          task.get_dataset(None, split='test', shuffle=False).take(n).as_numpy_iterator()]


def test_metrics_file_is_rescoring_of_predictions_and_decode_compiles_once(
    evaluator, model, params_pair, tmp_path):
  out = str(tmp_path / 'eval')
  first = evaluator.evaluate(params_pair[0], 1, output_dir=out)
  second = evaluator.evaluate(params_pair[1], 2, output_dir=out)
  # One trace for all 6 batches (the last one padded) of both calls; every use of this model in
  # this file has the same shapes, so the count holds whatever ran before.
  assert model.traces == 1

  rows = _read_jsonl(evaluator_lib.predictions_path(out, TASK, 2))
  # 3 batches of 4; the 2 padded rows of the last one are dropped.
  assert [r['index'] for r in rows] == list(range(NUM_EXAMPLES))
  assert [r['input'] for r in rows] == _task_inputs(NUM_EXAMPLES)
  assert all(r['target'] for r in rows) and all(isinstance(r['correct'], bool) for r in rows)
  record = _read_json(evaluator_lib.metrics_path(out, TASK, 2))
  assert record['step'] == 2 and record['num_examples'] == NUM_EXAMPLES
  rescored = scoring.score(seqio.get_mixture_or_task(TASK),
                           evaluator_lib.predictions_path(out, TASK, 2))
  assert rescored.n == NUM_EXAMPLES
  assert record['metrics'] == pytest.approx(rescored.metrics)
  assert {k: v for k, v in second[TASK].items() if not k.startswith('timing/')} == (
      pytest.approx(record['metrics']))
  assert second[TASK]['timing/examples_per_second'] > 0
  assert 'accuracy' in first[TASK] and 'accuracy_paper' in first[TASK]
  # No temporary files are left behind.
  assert sorted(os.listdir(os.path.join(out, TASK))) == [
      'metrics_step1.json', 'metrics_step2.json', 'predictions_step1.jsonl',
      'predictions_step2.jsonl']


def test_evaluators_built_again_reuse_the_eval_data_and_the_compiled_decoder(
    evaluator, model, params_pair, tmp_path, monkeypatch):
  """A job that builds evaluators again for the same model (a sweep per run, a checkpoint per
  call: `specialize demo` does ten) reads each task once and compiles once; a task registered
  again is read again."""
  builds = []
  original = evaluator_lib._build_task_data  # pylint: disable=protected-access

  def counting(task, config, vocabulary):
    builds.append(task.name)
    return original(task, config, vocabulary)
  monkeypatch.setattr(evaluator_lib, '_build_task_data', counting)
  evaluator.evaluate(params_pair[0], 1, str(tmp_path / 'first'))
  traces = model.traces
  again = evaluator_lib.Evaluator(model, CONFIG)
  again.evaluate(params_pair[0], 1, str(tmp_path / 'again'))
  assert builds == [] and model.traces == traces
  assert (_read_jsonl(evaluator_lib.predictions_path(str(tmp_path / 'again'), TASK, 1))
          == _read_jsonl(evaluator_lib.predictions_path(str(tmp_path / 'first'), TASK, 1)))

  # A new Task object of the same name, as registering the task again makes.
  registered_again = copy.copy(seqio.get_mixture_or_task(TASK))
  monkeypatch.setattr(seqio, 'get_mixture_or_task', lambda name: registered_again)
  evaluator_lib.Evaluator(model, CONFIG)
  assert builds == [TASK]


def _fake_predict(wrong_rows):
  """predict_batch returning each row's target tokens, except rows in `wrong_rows` (jittable: the
  evaluator traces it into its sharded decode step)."""
  vocab = seqio.get_mixture_or_task(TASK).output_features['targets'].vocabulary
  wrong = np.asarray(vocab.encode(WRONG_ANSWER) + [1], np.int32)

  def predict_batch(params, batch, rng=None, **kwargs):  # pylint: disable=unused-argument
    targets = batch['decoder_target_tokens']
    tokens = jnp.zeros((targets.shape[0], kwargs['max_decode_length']), jnp.int32)
    tokens = tokens.at[:, :targets.shape[1]].set(targets)  # [batch, max_decode_length]
    wrong_row = np.zeros(kwargs['max_decode_length'], np.int32)
    wrong_row[:len(wrong)] = wrong
    for row in wrong_rows:
      tokens = tokens.at[row].set(wrong_row)
    return tokens
  return predict_batch


def test_forced_correct_predictions_score_100(registry, params_pair, tmp_path, monkeypatch):
  model = models.EncoderDecoderModel(T5_CONFIG)
  monkeypatch.setattr(model, 'predict_batch', _fake_predict(wrong_rows=()))
  results = evaluator_lib.Evaluator(model, CONFIG).evaluate(params_pair[0], 7, str(tmp_path))
  assert results[TASK]['accuracy'] == 100.0 and results[TASK]['accuracy_paper'] == 100.0
  rows = _read_jsonl(evaluator_lib.predictions_path(str(tmp_path), TASK, 7))
  assert len(rows) == NUM_EXAMPLES and all(r['correct'] for r in rows)
  assert rows[0]['prediction'] == f'The answer is {rows[0]["target"]}'


def test_half_correct_predictions_rescore_identically(registry, params_pair, tmp_path,
                                                      monkeypatch):
  model = models.EncoderDecoderModel(T5_CONFIG)
  # Odd rows of each batch of 4 are wrong: examples 1, 3, 5, 7, 9.
  monkeypatch.setattr(model, 'predict_batch', _fake_predict(wrong_rows=(1, 3)))
  results = evaluator_lib.Evaluator(model, CONFIG).evaluate(params_pair[0], 3, str(tmp_path))
  assert results[TASK]['accuracy'] == pytest.approx(50.0)
  rows = _read_jsonl(evaluator_lib.predictions_path(str(tmp_path), TASK, 3))
  assert [r['correct'] for r in rows] == [i % 2 == 0 for i in range(NUM_EXAMPLES)]
  rescored = scoring.score(seqio.get_mixture_or_task(TASK),
                           evaluator_lib.predictions_path(str(tmp_path), TASK, 3))
  record = _read_json(evaluator_lib.metrics_path(str(tmp_path), TASK, 3))
  assert record['metrics'] == pytest.approx(rescored.metrics)
  assert record['metrics']['accuracy'] == pytest.approx(50.0)


def _reuse_compiled_model(monkeypatch, model):
  """Checkpoint entry points build their model from the loaded config; hand them the fixture's
  (same config, asserted) so the test compiles the decoder once, not once per entry point."""
  def make(config):
    assert config == T5_CONFIG, config
    return model
  monkeypatch.setattr(models, 'EncoderDecoderModel', make)


@pytest.mark.slow
def test_evaluate_checkpoints_sweeps_every_step_and_resumes(evaluator, params_pair, tmp_path,
                                                            monkeypatch):
  _reuse_compiled_model(monkeypatch, evaluator.model)
  run = tmp_path / 'run'
  for step, params in zip((10, 20), params_pair):
    orbax_pytree.save_orbax(params, T5_CONFIG, run / str(step))
  results = evaluator_lib.evaluate_checkpoints(str(run), CONFIG)
  assert sorted(results) == [10, 20]
  out = str(run / 'eval')
  for step, params in zip((10, 20), params_pair):
    written = [r['prediction']
               for r in _read_jsonl(evaluator_lib.predictions_path(out, TASK, step))]
    # The loaded checkpoint decodes like the params it was saved from.
    direct_dir = str(tmp_path / f'direct{step}')
    evaluator.evaluate(params, step, direct_dir)
    assert written == [r['prediction'] for r in _read_jsonl(
        evaluator_lib.predictions_path(direct_dir, TASK, step))]

  def fail(*args, **kwargs):
    raise AssertionError('an evaluated checkpoint was loaded again')
  readers = {name: getattr(loading, name)
             for name in ('load_checkpoint', 'load_checkpoint_sharded')}
  for name in readers:
    monkeypatch.setattr(loading, name, fail)
  again = evaluator_lib.evaluate_checkpoints(str(run), CONFIG)
  assert again == results  # read back from the metrics files (JSON floats round-trip)

  # Other eval settings (a 2-example smoke run) are evaluated again, not read back.
  for name, reader in readers.items():
    monkeypatch.setattr(loading, name, reader)
  fewer = dataclasses.replace(CONFIG, max_examples=2)
  evaluator_lib.evaluate_checkpoints(str(run), fewer)
  for step in (10, 20):
    record = evaluator_lib.read_metrics_record(evaluator_lib.metrics_path(out, TASK, step))
    assert record['num_examples'] == 2
    # The settings, with the decode dtype (none given: T5Config's default).
    assert record[evaluator_lib.SETTINGS_KEY] == evaluator_lib.eval_settings(fewer, 'float32')
    assert record[evaluator_lib.SETTINGS_KEY]['dtype'] == 'float32'


@pytest.mark.slow
def test_infer_matches_evaluator_decodes(evaluator, params_pair, tmp_path, monkeypatch):
  out = str(tmp_path / 'eval')
  evaluator.evaluate(params_pair[0], 0, out)
  expected = [r['prediction'] for r in _read_jsonl(evaluator_lib.predictions_path(out, TASK, 0))]
  vocab = seqio.get_mixture_or_task(TASK).output_features['targets'].vocabulary

  # A plain text file, 3 lines (one padded batch of 4), at the evaluator's input length.
  inputs_file = tmp_path / 'inputs.txt'
  inputs_file.write_text('\n'.join(_task_inputs(3)) + '\n', encoding='utf-8')
  output = str(tmp_path / 'file_predictions.jsonl')
  count = inference.infer(evaluator.model, params_pair[0], vocab, str(inputs_file), output,
                          batch_size=4, max_decode_length=8, max_input_length=64)
  rows = _read_jsonl(output)
  assert count == 3 and [r['index'] for r in rows] == [0, 1, 2]
  assert [r['prediction'] for r in rows] == expected[:3]
  assert 'target' not in rows[0]

  # The task itself: every example, with its gold target.
  output = str(tmp_path / 'task_predictions.jsonl')
  count = inference.infer(evaluator.model, params_pair[0], None, TASK, output, batch_size=4,
                          max_decode_length=8, max_input_length=64, max_examples=NUM_EXAMPLES)
  rows = _read_jsonl(output)
  assert count == NUM_EXAMPLES and [r['prediction'] for r in rows] == expected
  assert rows[0]['target'] == evaluator._data[TASK].targets[0]  # pylint: disable=protected-access

  # `specialize infer`'s path: params and architecture from a checkpoint.
  _reuse_compiled_model(monkeypatch, evaluator.model)
  orbax_pytree.save_orbax(params_pair[0], T5_CONFIG, tmp_path / 'checkpoint')
  output = str(tmp_path / 'checkpoint_predictions.jsonl')
  count = inference.infer_from_checkpoint(
      str(tmp_path / 'checkpoint'), str(inputs_file), output, batch_size=4, max_decode_length=8,
      max_input_length=64)
  assert count == 3 and [r['prediction'] for r in _read_jsonl(output)] == expected[:3]


def test_infer_bad_inputs_name_file_and_line(registry, tmp_path):
  vocab = seqio.get_mixture_or_task(TASK).output_features['targets'].vocabulary
  path = tmp_path / 'inputs.txt'
  path.write_text('Q: one? A:\n\nQ: three? A:\n', encoding='utf-8')
  output = tmp_path / 'out.jsonl'
  with pytest.raises(inference.InputsError, match=rf'{path}:2: blank line'):
    inference.infer(None, None, vocab, str(path), str(output))
  path.write_text('Q: one? A:\n', encoding='utf-8')
  with pytest.raises(inference.InputsError, match=rf'{path}:1: \d+ tokens .* max_input_length=3'):
    inference.infer(None, None, vocab, str(path), str(output), max_input_length=3)
  with pytest.raises(inference.InputsError, match='neither a registered task'):
    inference.infer(None, None, vocab, 'multiarith_dev_zs_aoo', str(output))
  assert not output.exists()


def test_config_checks_fail_before_decoding(registry):
  config = evaluator_lib.EvalConfig(task_names=[TASK], feature_lengths={'targets': 8, 'inputs': 16})
  assert config.feature_lengths == (('inputs', 16), ('targets', 8)) and config.task_names == (TASK,)
  with pytest.raises(ValueError, match=r'example 0 has \d+ input tokens.*EVAL_FEATURE_LENGTHS'):
    evaluator_lib.Evaluator(models.EncoderDecoderModel(T5_CONFIG), config)
  with pytest.raises(ValueError, match="closest registered names: .*'multiarith_dev_zs_ao'"):
    evaluator_lib.expand_task_names(['multiarith_dev_zs_a0'])
  assert len(evaluator_lib.expand_task_names(['bbh_cot'])) == 27
  with pytest.raises(ValueError, match='decode_method'):
    evaluator_lib.EvalConfig(decode_method='nucleus')
  # A model with a smaller vocabulary than the task's would embed NaN and decode nothing.
  small = models.EncoderDecoderModel(dataclasses.replace(T5_CONFIG, vocab_size=1000))
  with pytest.raises(ValueError, match=f"Task '{TASK}': its 'inputs' vocabulary has 32100 ids but "
                                       "the model's vocab_size is 1000"):
    evaluator_lib.Evaluator(small, evaluator_lib.EvalConfig(task_names=(TASK,)))


def test_mesh_evaluation_matches_single_device(evaluator, params_pair, tmp_path):
  """Batches split over 'data' (4 of 8 fake devices) and a vocab-sharded embedding give the
  single-device decodes."""
  mesh = jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = dict(params_pair[0])
  params['token_embedder'] = {'embedding': jax.device_put(
      params['token_embedder']['embedding'],
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('model', None)))}
  sharded = evaluator_lib.Evaluator(models.EncoderDecoderModel(T5_CONFIG), CONFIG, mesh=mesh)
  sharded.evaluate(params, 4, str(tmp_path / 'mesh'))
  evaluator.evaluate(params_pair[0], 4, str(tmp_path / 'single'))

  def predictions(d):
    return [r['prediction'] for r in _read_jsonl(evaluator_lib.predictions_path(d, TASK, 4))]
  assert predictions(str(tmp_path / 'mesh')) == predictions(str(tmp_path / 'single'))

  with pytest.raises(ValueError, match='EvalConfig.batch_size=6 is not divisible by the data axis'):
    evaluator_lib.Evaluator(models.EncoderDecoderModel(T5_CONFIG),
                            evaluator_lib.EvalConfig(task_names=(TASK,), batch_size=6),
                            mesh=mesh)
