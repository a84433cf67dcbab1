"""Selection rules on constructed accuracy tables, and the run report / comparison written from
constructed metric files (no model): values, files, and PNGs that are real images of sensible size.
"""
import csv
import json
import os

from matplotlib import image as mpl_image
import pytest

from specialize_jax.evaluation import evaluator as evaluator_lib
from specialize_jax.evaluation import report
from specialize_jax.evaluation import selection
from specialize_jax.evaluation import sweep as sweep_lib

OOD = selection.OOD_DEV_RULE.task_names  # multiarith_dev_{icl,zs}_cot
ID = selection.ID_DEV_RULE.task_names  # gsm8k_dev_{icl,zs}_cot
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _row(ood, id_, **others):
  return {OOD[0]: ood, OOD[1]: ood, ID[0]: id_, ID[1]: id_, **others}


# ---------------------------------------------------------------------------------------------
# Selection


def test_ood_and_id_rules_pick_different_steps():
  table = {100: _row(10.0, 30.0), 200: _row(20.0, 25.0), 300: _row(15.0, 35.0)}
  ood = selection.select(table)
  assert ood.step == 200 and ood.score == pytest.approx(20.0) and ood.tied_steps == (200,)
  assert selection.select(table, selection.ID_DEV_RULE).step == 300
  table[200]['gsm8k_test_icl_cot'], table[300]['gsm8k_test_icl_cot'] = 22.0, 30.0
  difference = selection.pick_difference(table, ood, selection.select(
      table, selection.ID_DEV_RULE), ['gsm8k_test_icl_cot'])
  assert difference == {'gsm8k_test_icl_cot': pytest.approx(-8.0)}


def test_score_is_the_mean_over_the_rule_tasks():
  table = {1: {OOD[0]: 10.0, OOD[1]: 40.0}, 2: {OOD[0]: 30.0, OOD[1]: 10.0}}
  chosen = selection.select(table)
  assert chosen.step == 1 and chosen.scores == {1: 25.0, 2: 20.0}


def test_ties_go_to_the_earliest_step():
  table = {300: _row(20.0, 0.0), 100: _row(10.0, 0.0), 200: _row(20.0, 0.0),
           400: _row(20.0 + 1e-12, 0.0)}
  chosen = selection.select(table)
  assert chosen.step == 200 and chosen.tied_steps == (200, 300, 400)
  assert 'earliest' in chosen.explain()


def test_steps_missing_a_rule_task_are_not_eligible():
  table = {100: _row(10.0, 0.0), 200: {OOD[0]: 90.0}, 300: {**_row(50.0, 0.0), OOD[1]: None},
           400: {**_row(30.0, 0.0), OOD[1]: float('nan')}}
  chosen = selection.select(table)
  assert chosen.step == 100
  assert chosen.missing == {200: (OOD[1],), 300: (OOD[1],), 400: (OOD[1],)}
  nothing = selection.select({1: {'gsm8k_test_icl_cot': 50.0}})
  assert nothing.step is None and 'No checkpoint has every task' in nothing.explain()


def test_rules_never_read_a_test_split():
  for name in ('multiarith_test_icl_cot', 'asdiv_test_zs_cot', 'bbh_date_understanding_cot',
               'demo_ood_cot'):
    with pytest.raises(ValueError, match='test tasks'):
      selection.make_rule('custom', [name])
  assert selection.make_rule('ood_dev', ['gsm8k_dev_icl_cot']).task_names == ('gsm8k_dev_icl_cot',)
  assert selection.make_rule('id_dev') is selection.ID_DEV_RULE
  with pytest.raises(ValueError, match='Unknown selection rule'):
    selection.make_rule('best_test')


def test_best_pointer(tmp_path):
  chosen = selection.select({5: _row(1.0, 0.0), 7: _row(2.0, 0.0)})
  path = selection.write_best(str(tmp_path), chosen, '/runs/x/checkpoint_7')
  best = selection.read_best(str(tmp_path))
  assert best['step'] == 7 and best['path'] == '/runs/x/checkpoint_7' and best['score'] == 2.0
  assert best['export_command'] == 'specialize convert /runs/x/checkpoint_7 --to hf EXPORT_DIR'
  assert os.listdir(tmp_path) == ['BEST'] and path == str(tmp_path / 'BEST')
  assert selection.remove_stale_best(str(tmp_path)) and selection.read_best(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------------
# Report from metric files

MATH = ('gsm8k', 'multiarith', 'asdiv', 'svamp')
BBH = ('boolean_expressions', 'date_understanding')


def _accuracy(step, task):
  """A distinct, recognisable accuracy per (step, task)."""
  return round((step * 7 + sum(map(ord, task))) % 97 + 0.25, 2)


def _write_metrics(eval_dir, task, step, accuracy):
  path = evaluator_lib.metrics_path(str(eval_dir), task, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({'task': task, 'step': step, 'num_examples': 10,
               'metrics': {'accuracy': accuracy, 'accuracy_paper': 0.0}, 'timing': {}}, f)


@pytest.fixture
def run_with_metrics(tmp_path):
  """MODEL_DIR/eval/ with the default sweep's tasks at steps 0 (start), 100, 200, 300, step 300
  lacking multiarith_dev_zs_cot; the OOD rule picks 100, the ID rule 200 (set explicitly)."""
  model_dir = tmp_path / 'run'
  tasks = list(sweep_lib.DEFAULT_MATH_TASKS) + sweep_lib.bbh_task_names(BBH)
  for step in (0, 100, 200, 300):
    for task in tasks:
      if step == 300 and task == 'multiarith_dev_zs_cot':
        continue
      _write_metrics(model_dir / 'eval', task, step, _accuracy(step, task))
  for step, ood, id_ in ((100, 60.0, 10.0), (200, 20.0, 40.0), (300, 99.0, 5.0)):
    for task in OOD:
      if os.path.exists(evaluator_lib.metrics_path(str(model_dir / 'eval'), task, step)):
        _write_metrics(model_dir / 'eval', task, step, ood)
    for task in ID:
      _write_metrics(model_dir / 'eval', task, step, id_)
  return str(model_dir)


def _check_png(path, min_size=(400, 300)):
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE, path
  height, width = mpl_image.imread(path).shape[:2]
  assert width >= min_size[0] and height >= min_size[1], (path, width, height)
  assert width <= 4000 and height <= 4000, (path, width, height)


def test_run_report_holds_the_metric_files_values(run_with_metrics):
  table = sweep_lib.read_accuracy_table(run_with_metrics)
  assert sorted(table) == [0, 100, 200, 300]
  assert table[200]['svamp_test_icl_cot'] == _accuracy(200, 'svamp_test_icl_cot')
  written = report.write_run_report(run_with_metrics, table, start_step=0,
                                    timing={'total_seconds': 10.0, 'compile_seconds': 4.0,
                                            'compile_share': 0.4})
  assert written.chosen.step == 100 and written.alternative.step == 200
  assert 300 in written.chosen.missing  # 99% but missing a rule task: not eligible
  out = os.path.join(run_with_metrics, 'report')
  assert sorted(os.listdir(out)) == ['accuracy_vs_step.png', 'formats.png', 'math_vs_bbh.png',
                                     'report.md', 'results.csv', 'results.json']
  for name in ('accuracy_vs_step.png', 'formats.png', 'math_vs_bbh.png'):
    _check_png(os.path.join(out, name))

  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    results = json.load(f)
  assert results['selected']['step'] == 100 and results['in_distribution_pick']['step'] == 200
  assert results['columns']['GSM8K'] == ['gsm8k_test_icl_cot']
  assert results['columns']['BBH-AO'] == [f'bbh_{t}_ao' for t in BBH]
  for step in (0, 100, 200, 300):
    assert results['rows'][str(step)]['ASDiv'] == _accuracy(step, 'asdiv_test_icl_cot')
    bbh_cot = sum(_accuracy(step, f'bbh_{t}_cot') for t in BBH) / len(BBH)
    assert results['rows'][str(step)]['BBH-CoT'] == pytest.approx(bbh_cot)
  expected_difference = (_accuracy(100, 'gsm8k_test_icl_cot') -
                         _accuracy(200, 'gsm8k_test_icl_cot'))
  assert results['test_difference_selected_minus_id_pick']['GSM8K'] == pytest.approx(
      expected_difference)

  with open(os.path.join(out, 'results.csv'), encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  assert [int(r['step']) for r in rows] == [0, 100, 200, 300]
  assert [r['selected'] for r in rows] == ['False', 'True', 'False', 'False']
  assert float(rows[2]['SVAMP']) == _accuracy(200, 'svamp_test_icl_cot')
  assert float(rows[3]['multiarith_test_zs_cot']) == _accuracy(300, 'multiarith_test_zs_cot')

  markdown = open(os.path.join(out, 'report.md'), encoding='utf-8').read()
  assert '**checkpoint_100 (selected)**' in markdown
  assert f'{_accuracy(300, "asdiv_test_icl_cot"):.1f}' in markdown
  assert 'would pick: Step 200' in markdown and f'GSM8K {expected_difference:+.1f}' in markdown
  assert 'specialize convert' in markdown and 'selected − start' in markdown
  assert 'step 300 (missing multiarith_dev_zs_cot)' in markdown
  assert '40%' in markdown  # compile share


def test_missing_columns_are_dashes_and_not_drawn(tmp_path):
  model_dir = str(tmp_path / 'run')
  for step in (10, 20):
    _write_metrics(os.path.join(model_dir, 'eval'), 'gsm8k_test_zs_cot', step, 30.0 + step)
  table = sweep_lib.read_accuracy_table(model_dir)
  written = report.write_run_report(model_dir, table)
  assert written.chosen.step is None  # no dev tasks: nothing selected
  out = os.path.join(model_dir, 'report')
  assert 'math_vs_bbh' not in written.files and not os.path.exists(
      os.path.join(out, 'math_vs_bbh.png'))
  markdown = open(os.path.join(out, 'report.md'), encoding='utf-8').read()
  row = next(line for line in markdown.splitlines() if line.startswith('| checkpoint_20 '))
  assert row.split(' | ')[3:] == ['50.0', '—', '—', '—', '—', '— |']
  _check_png(os.path.join(out, 'accuracy_vs_step.png'))


def test_comparison_of_runs(tmp_path, run_with_metrics):
  other = str(tmp_path / 'answer_only')
  for step in (50, 150):
    _write_metrics(os.path.join(other, 'eval'), 'gsm8k_test_icl_ao', step, 5.0 + step / 10)
  runs = [('CoT', run_with_metrics, sweep_lib.read_accuracy_table(run_with_metrics)),
          ('AO', other, sweep_lib.read_accuracy_table(other))]
  files = report.write_comparison(runs, str(tmp_path / 'cmp'), start_step=0)
  with open(files['comparison.json'], encoding='utf-8') as f:
    result = json.load(f)
  cot, ao = result['runs']
  assert cot['step'] == 100 and cot['chosen_by'] == 'selected (ood_dev)'
  assert cot['values']['GSM8K'] == _accuracy(100, 'gsm8k_test_icl_cot')
  assert ao['step'] == 150 and ao['chosen_by'].startswith('last step')
  assert ao['values'] == {'GSM8K': 20.0} and ao['tasks'] == {'GSM8K': ['gsm8k_test_icl_ao']}
  with open(files['comparison.csv'], encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == ['CoT', 'AO'] and rows[1]['ASDiv'] == ''
  markdown = open(files['comparison.md'], encoding='utf-8').read()
  assert '| AO | 150 |' in markdown and '20.0' in markdown
  _check_png(files['comparison.png'])
