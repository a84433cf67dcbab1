"""`specialize sweep` on a real tiny run: each (checkpoint, task) pair is decoded once, a second sweep
decodes nothing, an interrupted sweep resumes, other eval settings or another decode dtype are
evaluated again.

The run: a tiny T5 (1+1 layers, width 32, the demo's 384-piece vocabulary) trained 6 steps on
`demo_train_cot` with a checkpoint every 2 steps (checkpoints 2, 4, 6); eval on 4 examples of two
demo tasks with 8 decoded tokens, so decoding is cheap and the test is mostly one compilation.
"""
import json
import os

import pytest

from specialize_jax import cli
from specialize_jax.checkpoints import directories
from specialize_jax.evaluation import evaluator as evaluator_lib
from specialize_jax.evaluation import inference
from specialize_jax.evaluation import sweep as sweep_lib
from specialize_jax.model import models
from specialize_jax.training import checkpoint_manager
from specialize_jax.training import input_pipeline
from specialize_jax.training import optimizers
from specialize_jax.training import trainer
from tests.support import demo_data
from tests.support import tiny_model

pytestmark = pytest.mark.slow

TINY = tiny_model.config()
STEPS = (2, 4, 6)
TASKS = ('demo_id_cot', 'demo_ood_cot')
CONFIG = evaluator_lib.EvalConfig(task_names=TASKS, feature_lengths={'inputs': 256, 'targets': 80},
                                  batch_size=4, max_examples=4, max_decode_length=8)


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  with demo_data.tiny_demo_data(tmp_path_factory, 200, 8) as directory:
    yield directory


@pytest.fixture(scope='module')
def trained_run(demo_dir, tmp_path_factory):  # pylint: disable=unused-argument
  """A run directory with committed checkpoints at STEPS (train it once, copy per test)."""
  model_dir = tmp_path_factory.mktemp('run')
  dataset = input_pipeline.DatasetConfig('demo_train_cot', {'inputs': 128, 'targets': 64},
                                         batch_size=8)
  trainer.train(str(model_dir), models.EncoderDecoderModel(TINY), dataset, STEPS[-1],
                optimizer=optimizers.OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
                checkpoint=checkpoint_manager.CheckpointConfig(period=2, keep_last=5), log_period=2)
  assert [s for s, _ in evaluator_lib.committed_checkpoint_steps(str(model_dir))] == list(STEPS)
  return model_dir


@pytest.fixture
def run_dir(trained_run, tmp_path):
  """A fresh copy of the trained run (checkpoints only: no eval outputs yet)."""
  import shutil  # pylint: disable=g-import-not-at-top
  target = tmp_path / 'run'
  shutil.copytree(trained_run, target, ignore=shutil.ignore_patterns('eval', 'report', 'BEST'))
  return str(target)


@pytest.fixture
def decodes(monkeypatch):
  """Every (step, task) the evaluator decodes, in order."""
  calls = []
  original = evaluator_lib.Evaluator.evaluate

  def counting(self, params, step, output_dir=None, *, task_names=None, rng=None):
    calls.extend((step, name) for name in (task_names or self.task_names))
    return original(self, params, step, output_dir, task_names=task_names, rng=rng)
  monkeypatch.setattr(evaluator_lib.Evaluator, 'evaluate', counting)
  return calls


def _quiet(_line):
  pass


def test_each_pair_decoded_once_and_second_sweep_decodes_nothing(run_dir, decodes, monkeypatch):
  # A decoder compiled by an earlier test of this process would leave nothing to compile.
  monkeypatch.setattr(inference, '_SHARED_DECODERS', {})
  lines = []
  first = sweep_lib.sweep(run_dir, CONFIG, progress=lines.append)
  pairs = [(s, t) for s in STEPS for t in TASKS]
  assert sorted(decodes) == pairs and sorted(first.decoded) == pairs and first.reused == 0
  assert sum('ETA' in line for line in lines) == len(pairs)
  for step, task in pairs:
    with open(evaluator_lib.metrics_path(os.path.join(run_dir, 'eval'), task, step),
              encoding='utf-8') as f:
      record = json.load(f)
    assert record[evaluator_lib.SETTINGS_KEY] == evaluator_lib.eval_settings(CONFIG, 'float32')
    assert record['num_examples'] == 4
    assert first.accuracy_table()[step][task] == record['metrics']['accuracy']
  assert 0 < first.timing['compile_seconds'] < first.timing['total_seconds']

  decodes.clear()
  second = sweep_lib.sweep(run_dir, CONFIG, progress=_quiet)
  assert decodes == [] and second.decoded == [] and second.reused == len(pairs)
  assert second.accuracy_table() == first.accuracy_table()


def test_interrupted_sweep_resumes(run_dir, decodes, monkeypatch):
  original = evaluator_lib.Evaluator.evaluate  # the counting wrapper

  def fail_after_first_checkpoint(self, params, step, *args, **kwargs):
    if step > STEPS[0]:
      raise KeyboardInterrupt('simulated interruption')
    return original(self, params, step, *args, **kwargs)
  monkeypatch.setattr(evaluator_lib.Evaluator, 'evaluate', fail_after_first_checkpoint)
  with pytest.raises(KeyboardInterrupt):
    sweep_lib.sweep(run_dir, CONFIG, progress=_quiet)
  assert decodes == [(STEPS[0], t) for t in TASKS]

  monkeypatch.setattr(evaluator_lib.Evaluator, 'evaluate', original)
  decodes.clear()
  resumed = sweep_lib.sweep(run_dir, CONFIG, progress=_quiet)
  assert sorted(decodes) == [(s, t) for s in STEPS[1:] for t in TASKS]
  assert resumed.reused == len(TASKS) and sorted(resumed.metrics) == list(STEPS)


def test_other_settings_are_evaluated_again_and_legacy_files_checked(run_dir, decodes):
  sweep_lib.sweep(run_dir, CONFIG, progress=_quiet)
  decodes.clear()
  fewer = evaluator_lib.EvalConfig(**{**CONFIG.__dict__, 'max_examples': 2})
  result = sweep_lib.sweep(run_dir, fewer, progress=_quiet)
  assert len(decodes) == len(STEPS) * len(TASKS)
  eval_dir = os.path.join(run_dir, 'eval')
  assert sorted(result.metrics) == list(STEPS)
  for step, row in result.metrics.items():
    assert sorted(row) == sorted(TASKS)
    for task, task_metrics in row.items():
      # The accuracy of the 2 examples decoded and written for this setting, not of the 4 before.
      with open(evaluator_lib.predictions_path(eval_dir, task, step), encoding='utf-8') as f:
        rows = [json.loads(line) for line in f]
      assert [r['index'] for r in rows] == [0, 1]
      assert task_metrics['accuracy'] == 100.0 * sum(r['correct'] for r in rows) / 2

  # A file without settings (written before the evaluator recorded them) is reused when its
  # example count is what the sweep evaluates, and evaluated again when not.
  for step in STEPS:
    for task in TASKS:
      path = evaluator_lib.metrics_path(eval_dir, task, step)
      with open(path, encoding='utf-8') as f:
        record = json.load(f)
      del record[evaluator_lib.SETTINGS_KEY]
      with open(path, 'w', encoding='utf-8') as f:
        json.dump(record, f)
  decodes.clear()
  sweep_lib.sweep(run_dir, fewer, progress=_quiet)
  assert decodes == []
  sweep_lib.sweep(run_dir, CONFIG, progress=_quiet)  # 4 examples wanted, files hold 2
  assert len(decodes) == len(STEPS) * len(TASKS)


def _set_settings(path, **changes):
  """Rewrites a metrics file's eval settings (a key set to None is removed)."""
  with open(path, encoding='utf-8') as f:
    record = json.load(f)
  settings = {**record[evaluator_lib.SETTINGS_KEY], **changes}
  record[evaluator_lib.SETTINGS_KEY] = {k: v for k, v in settings.items() if v is not None}
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(record, f)


def test_results_in_another_dtype_are_decoded_again(run_dir, decodes, capsys):
  """A sweep decodes every pair in one dtype: pairs recorded in another are decoded again, and a
  run's accuracy table holds one dtype. The command's default is the dtype of the model the run
  trained (its config.gin); a file recording no dtype counts as float32."""
  pairs = [(s, t) for s in STEPS for t in TASKS]
  eval_dir = os.path.join(run_dir, 'eval')
  first = sweep_lib.sweep(run_dir, CONFIG, progress=_quiet)
  assert first.dtype == 'float32' and sorted(first.decoded) == pairs

  # A float32 file without a dtype (written before it was recorded) is reused as float32.
  legacy = (STEPS[0], TASKS[0])
  _set_settings(evaluator_lib.metrics_path(eval_dir, legacy[1], legacy[0]), dtype=None)
  decodes.clear()
  assert sweep_lib.sweep(run_dir, CONFIG, progress=_quiet).reused == len(pairs)
  assert decodes == []

  # The run trained in bfloat16 (the config.gin `specialize train` writes, macro and all): the
  # command decodes every pair again, the legacy one included.
  with open(os.path.join(run_dir, 'config.gin'), 'w', encoding='utf-8') as f:
    f.write("from __gin__ import dynamic_registration\n"
            "from specialize_jax.model import config as model_config\n"
            "MODEL_DTYPE = 'bfloat16'\n"
            "model_config.T5Config.dtype = %MODEL_DTYPE\n")
  args = ['sweep', run_dir, '--tasks', *TASKS, '--bbh_tasks', '--max_examples', '4',
          '--batch_size', '8', '--input_length', '256', '--target_length', '80',
          '--max_decode_length', '8']  # CONFIG's eval settings
  assert cli.main(args) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary['dtype'] == 'bfloat16' and summary['reused_pairs'] == 0
  assert sorted(decodes) == pairs
  for step, task in pairs:
    record = evaluator_lib.read_metrics_record(evaluator_lib.metrics_path(eval_dir, task, step))
    assert record[evaluator_lib.SETTINGS_KEY] == evaluator_lib.eval_settings(CONFIG, 'bfloat16')

  # A float32 file among bfloat16 ones: left out of the bfloat16 table; no table mixes them.
  _set_settings(evaluator_lib.metrics_path(eval_dir, legacy[1], legacy[0]), dtype='float32')
  table = sweep_lib.read_accuracy_table(run_dir, 'bfloat16')
  assert sorted((s, t) for s, row in table.items() for t in row) == sorted(set(pairs) - {legacy})
  with pytest.raises(ValueError, match=r"\['bfloat16', 'float32'\]"):
    sweep_lib.read_accuracy_table(run_dir)


def _uncommit(step_dir):
  """Makes `step_dir` look like a save in flight: no commit marker, no commit timestamp."""
  marker = os.path.join(step_dir, directories.COMMIT_MARKER)
  os.remove(marker)
  metadata = os.path.join(step_dir, directories.STEP_METADATA_FILE)
  with open(metadata, encoding='utf-8') as f:
    record = json.load(f)
  timestamp = record.pop('commit_timestamp_nsecs', None)
  with open(metadata, 'w', encoding='utf-8') as f:
    json.dump(record, f)

  def commit():
    with open(metadata, 'w', encoding='utf-8') as f:
      json.dump({**record, 'commit_timestamp_nsecs': timestamp}, f)
    with open(marker, 'w', encoding='utf-8') as f:
      f.write('committed')
  return commit


def _restored_paths(monkeypatch):
  """The checkpoint paths `inference.restore_params` reads, in order."""
  paths = []
  original = inference.restore_params

  def recording(path, *args, **kwargs):
    paths.append(str(path))
    return original(path, *args, **kwargs)
  monkeypatch.setattr(inference, 'restore_params', recording)
  return paths


def test_step_committed_mid_sweep_is_read_by_the_next_sweep_only(run_dir, decodes, monkeypatch):
  """A save in flight (the last step, uncommitted) is skipped by `sweep` and `specialize eval`'s
  `evaluate_checkpoints`, never read; committed while the sweep decodes, it waits for the next
  sweep, which decodes only it."""
  last = os.path.join(run_dir, f'checkpoint_{STEPS[-1]}')
  commit = _uncommit(last)
  assert [s for s, _ in evaluator_lib.committed_checkpoint_steps(run_dir)] == list(STEPS[:-1])
  # pylint: disable-next=protected-access
  plan = evaluator_lib._evaluation_plan(run_dir, CONFIG, None, TASKS, 'float32')
  assert [entry['step'] for entry in plan['steps']] == list(STEPS[:-1])
  with pytest.raises(ValueError, match='is not committed'):
    evaluator_lib.evaluate_checkpoints(last, CONFIG)
  restore = _restored_paths(monkeypatch)
  original = evaluator_lib.Evaluator.evaluate  # the counting wrapper

  def commit_during_the_first_decode(self, *args, **kwargs):
    commit()
    return original(self, *args, **kwargs)
  monkeypatch.setattr(evaluator_lib.Evaluator, 'evaluate', commit_during_the_first_decode)
  first = sweep_lib.sweep(run_dir, CONFIG, progress=_quiet)
  assert sorted(first.metrics) == list(STEPS[:-1])
  assert sorted(decodes) == [(s, t) for s in STEPS[:-1] for t in TASKS]
  assert last not in restore and len(restore) == len(STEPS) - 1

  monkeypatch.setattr(evaluator_lib.Evaluator, 'evaluate', original)
  decodes.clear()
  second = sweep_lib.sweep(run_dir, CONFIG, progress=_quiet)
  assert decodes == [(STEPS[-1], t) for t in TASKS] and sorted(second.metrics) == list(STEPS)
  # `specialize eval` over the run reuses every pair now.
  decodes.clear()
  results = evaluator_lib.evaluate_checkpoints(run_dir, CONFIG)
  assert decodes == [] and results == second.metrics


def test_cli_sweep_with_start_checkpoint_writes_report(run_dir, decodes, capsys):
  # The command decodes on every device (8 fake ones, data parallel): a batch of 8.
  args = ['sweep', run_dir, '--tasks', *TASKS, '--bbh_tasks', '--max_examples', '4',
          '--batch_size', '8', '--input_length', '256', '--target_length', '80',
          '--max_decode_length', '8', '--include_start', os.path.join(run_dir, 'checkpoint_2')]
  assert cli.main(args) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary['decoded_pairs'] == (len(STEPS) + 1) * len(TASKS)
  assert summary['dtype'] == 'float32'  # the run records no model dtype (no config.gin)
  assert sorted({s for s, _ in decodes}) == [0, *STEPS]
  # The demo sets are test sets: no rule may select on them, so nothing is selected.
  assert summary['selected_step'] is None
  assert not os.path.exists(os.path.join(run_dir, 'BEST'))
  report_dir = os.path.join(run_dir, 'report')
  assert {'report.md', 'results.csv', 'results.json', 'accuracy_vs_step.png',
          'formats.png'} <= set(os.listdir(report_dir))
  with open(os.path.join(report_dir, 'results.json'), encoding='utf-8') as f:
    results = json.load(f)
  assert results['start_step'] == 0
  # Step 0 is the start checkpoint, a copy of checkpoint_2: same decodes, same accuracies.
  assert results['accuracy']['0'] == results['accuracy']['2']

  decodes.clear()
  assert cli.main(args) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['decoded_pairs'] == 0
  assert decodes == []
  # A rule on a test split is refused before anything is loaded.
  assert cli.main(['sweep', run_dir, '--rule_tasks', 'multiarith_test_icl_cot']) == 2
  assert 'test tasks' in capsys.readouterr().err
