"""`specialize report --reference`: a run's selected checkpoint beside reference numbers, from eval
result files written here (no model): the differences, which columns were compared and which were
missing, the three kinds of reference (JSON, CSV, run directory), the shipped paper numbers, and a
bad reference file as one line and exit 2.
"""
import json
import os

import pytest

from specialize_jax import cli
from specialize_jax.errors import ConfigError
from specialize_jax.evaluation import evaluator as evaluator_lib
from specialize_jax.evaluation import reference
from specialize_jax.evaluation import report
from specialize_jax.evaluation import selection
from specialize_jax.evaluation import sweep as sweep_lib
from specialize_jax.jobs import gin_config
from tests.support import REPO_ROOT
from tests.support import processes

# {step: {task: accuracy}}: step 0 is the start checkpoint; the OOD rule (MultiArith dev) picks
# 100; GSM8K test has a zero-shot task too, which a task-name key reaches; no SVAMP, no BBH-AO.
RUN = {
    0: {'multiarith_dev_icl_cot': 1.0, 'multiarith_dev_zs_cot': 1.0, 'gsm8k_test_icl_cot': 5.0},
    100: {'multiarith_dev_icl_cot': 40.0, 'multiarith_dev_zs_cot': 30.0,
          'gsm8k_test_icl_cot': 20.0, 'gsm8k_test_zs_cot': 18.5, 'multiarith_test_icl_cot': 45.0,
          'asdiv_test_icl_cot': 25.0, 'bbh_date_understanding_cot': 30.0,
          'bbh_boolean_expressions_cot': 50.0},
    200: {'multiarith_dev_icl_cot': 10.0, 'multiarith_dev_zs_cot': 10.0,
          'gsm8k_test_icl_cot': 90.0, 'multiarith_test_icl_cot': 90.0},
}
PAPER_JSON = {'source': 'typed from a table', 'note': 'check against the PDF',
              'rows': {'FlanT5-XL specialized': {'gsm8k': 22.4, 'MultiArith': 42.3, 'asdiv': 28.4,
                                                 'svamp': 23.8, 'bbh_cot': 35.0,
                                                 'gsm8k_test_zs_cot': 20.0}}}
PAPER_CSV = ('# source: typed from a table\n'
             'row,gsm8k,MultiArith,asdiv,svamp,bbh_cot,gsm8k_test_zs_cot\n'
             'FlanT5-XL specialized,22.4,42.3,28.4,23.8,35.0,20.0\n')


def _write_run(model_dir, table):
  for step, row in table.items():
    for task, accuracy in row.items():
      path = evaluator_lib.metrics_path(os.path.join(model_dir, 'eval'), task, step)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'w', encoding='utf-8') as f:
        json.dump({'task': task, 'step': step, 'num_examples': 10,
                   'metrics': {'accuracy': accuracy}, 'timing': {}}, f)
  return str(model_dir)


def _write(path, text):
  path.write_text(text, encoding='utf-8')
  return str(path)


def _compare(ref):
  step, how = selection.select_or_last(RUN, selection.OOD_DEV_RULE, start_step=0)
  assert (step, how) == (100, 'selected (ood_dev)')
  return reference.compare(RUN, step, ref, 'this run')


@pytest.mark.parametrize('kind', ['json', 'csv'])
def test_file_reference_differences_and_what_was_compared(tmp_path, kind):
  path = _write(tmp_path / f'paper.{kind}',
                json.dumps(PAPER_JSON) if kind == 'json' else PAPER_CSV)
  comparison = _compare(reference.load_file(path))
  assert comparison.columns == ['GSM8K', 'MultiArith', 'ASDiv', 'SVAMP', 'BBH-CoT',
                                'gsm8k_test_zs_cot']
  (label, values), = comparison.rows
  assert label == 'FlanT5-XL specialized'
  expected = {'GSM8K': 20.0 - 22.4, 'MultiArith': 45.0 - 42.3, 'ASDiv': 25.0 - 28.4,
              'BBH-CoT': 40.0 - 35.0, 'gsm8k_test_zs_cot': 18.5 - 20.0}
  for column, difference in expected.items():
    assert comparison.difference(values, column) == pytest.approx(difference), column
  assert comparison.difference(values, 'SVAMP') is None
  assert comparison.compared['GSM8K'] == ('gsm8k_test_icl_cot', '"gsm8k"')
  assert comparison.compared['BBH-CoT'][0].startswith('mean of 2 tasks')
  assert comparison.missing == ['"svamp" (not evaluated in this run)']

  text = reference.format_text(comparison)
  lines = text.splitlines()
  assert lines[0].split() == ['GSM8K', 'MultiArith', 'ASDiv', 'SVAMP', 'BBH-CoT',
                              'gsm8k_test_zs_cot']
  assert lines[1].split() == ['this', 'run', '20.0', '45.0', '25.0', '—', '40.0', '18.5']
  assert lines[3].split()[-6:] == ['-2.4', '+2.7', '-3.4', '—', '+5.0', '-1.5']
  assert 'Not compared: "svamp" (not evaluated in this run)' in text
  assert '(typed from a table)' in text


def test_run_directory_as_reference(tmp_path):
  other = {100: {'multiarith_dev_icl_cot': 9.0, 'multiarith_dev_zs_cot': 9.0,
                 'gsm8k_test_icl_cot': 12.0, 'svamp_test_icl_cot': 7.0},
           300: {'multiarith_dev_icl_cot': 5.0, 'multiarith_dev_zs_cot': 5.0,
                 'gsm8k_test_icl_cot': 30.0}}
  ref = reference.from_run('/runs/other', other, selection.OOD_DEV_RULE, start_step=0)
  assert ref.rows[0].label == 'other (step 100)' and 'selected (ood_dev)' in ref.source
  comparison = _compare(ref)
  assert comparison.columns == ['GSM8K', 'MultiArith', 'ASDiv', 'SVAMP', 'BBH-CoT']
  values = comparison.rows[0][1]
  assert comparison.difference(values, 'GSM8K') == pytest.approx(8.0)
  assert comparison.difference(values, 'MultiArith') == pytest.approx(45.0 - 9.0)
  # The other run has no MultiArith test: the line says its dev task stands for the column.
  assert comparison.compared == {
      'GSM8K': ('gsm8k_test_icl_cot', 'gsm8k_test_icl_cot'),
      'MultiArith': ('multiarith_test_icl_cot', 'multiarith_dev_icl_cot')}
  assert comparison.missing == ['"SVAMP" (not evaluated in this run)',
                                'ASDiv, BBH-CoT (no reference number)']


@pytest.mark.parametrize('name, text, message', [
    ('bad.json', '{"rows": {"XL": {"gsm8k": 22.4,}}}', r'bad.json:1: not valid JSON'),
    ('bad.json', '{"rows": {"XL": {"gsm8k": "n/a"}}}', r'rows\["XL"\]\["gsm8k"\]: .* not a number'),
    ('bad.json', '{"rows": {"XL": {"gsm8k": 0.224, "asdiv": 140}}}', r'"asdiv"\]: 140 .*percent'),
    ('bad.json', '{"row": {"XL": {"gsm8k": 22.4}}}', r'no "rows" object'),
    ('bad.json', '{"rows": {"XL": {"bbh": 40.0}}}', r'"bbh"\]: column .* ambiguous; write bbh_cot'),
    ('bad.csv', 'model,gsm8k\nXL,22.4\n', r'bad.csv:1: the header must start with "row"'),
    ('bad.csv', '# c\nrow,gsm8k,svamp\nXL,22.4\n', r'bad.csv:3: 2 cells for 3 header columns'),
    ('bad.csv', 'row,gsm8k\nXL,22,4\n', r'bad.csv:2: 3 cells'),
    ('bad.csv', 'row,gsm8k\nXL,twenty\n', r"bad.csv:2 column 'gsm8k': 'twenty' is not a number"),
    ('bad.json', '{"rows": {"XL": {"gsm8k": 22.4, "GSM8K": 22.4}}}', r'names a column twice'),
    ('bad.txt', 'gsm8k 22.4\n', r'neither .json nor .csv'),
])
def test_a_bad_reference_file_names_the_file_the_place_and_the_fix(tmp_path, name, text,
                                                                     message):
  with pytest.raises(ConfigError, match=message):
    reference.load_file(_write(tmp_path / name, text))


def test_the_shipped_paper_numbers_load_and_travel_with_a_wheel():
  path = os.path.join(gin_config.SHIPPED_GIN_DIR, 'reference', 'fu2023_flan_t5.json')
  ref = reference.load_file(path)
  rows = {r.label: r.values for r in ref.rows}
  assert rows['paper: FlanT5-XL (3B) specialized'] == {
      'gsm8k': 22.4, 'multiarith': 42.3, 'asdiv': 28.4, 'svamp': 23.8}
  assert [r['gsm8k'] for r in rows.values()] == [27.1, 22.4, 20.2, 13.4]
  assert 'RECALLED' in ref.source and 'not known here' in ref.source
  setup = (REPO_ROOT / 'setup.py').read_text(encoding='utf-8')
  assert '"reference/*.json"' in setup


def test_report_command_prints_the_table_and_writes_the_markdown(tmp_path, capsys):
  model_dir = _write_run(tmp_path / 'run', RUN)
  path = _write(tmp_path / 'paper.csv', PAPER_CSV)
  assert cli.main(['report', model_dir, '--reference', path, '--write']) == 0
  out = capsys.readouterr().out
  assert 'Selected: Step 100 by rule `ood_dev`' in out
  assert f'Checkpoint: {os.path.join(model_dir, "checkpoint_100")}' in out
  row = next(line for line in out.splitlines() if line.startswith('  this run − reference'))
  assert row.split()[-6:] == ['-2.4', '+2.7', '-3.4', '—', '+5.0', '-1.5']
  markdown = open(os.path.join(model_dir, report.REPORT_SUBDIR, 'report.md'),
                  encoding='utf-8').read()
  assert '## Reference numbers' in markdown
  assert '|   this run − reference | -2.4 | +2.7 | -3.4 | — | +5.0 | -1.5 |' in markdown
  assert '- Not compared: "svamp" (not evaluated in this run)' in markdown

  assert cli.main(['report', model_dir, '--reference', 'fu2023_flan_t5']) == 0
  assert 'paper: FlanT5-Base (250M) specialized' in capsys.readouterr().out
  assert cli.main(['report', model_dir, '--reference', model_dir]) == 0  # itself: all +0.0
  row = next(line for line in capsys.readouterr().out.splitlines()
             if line.startswith('  this run − reference'))
  assert set(row.split()[4:]) == {'+0.0'}

  assert cli.main(['report', model_dir]) == 0  # no reference: the selected step's columns
  lines = capsys.readouterr().out.splitlines()
  header = next(i for i, line in enumerate(lines) if line.split()[:1] == ['GSM8K'])
  assert lines[header].split() == ['GSM8K', 'MultiArith', 'ASDiv', 'BBH-CoT']
  assert lines[header + 1].split() == ['this', 'run', '(step', '100)', '20.0', '45.0', '25.0',
                                       '40.0']


def test_sweep_report_carries_the_reference_section(tmp_path):
  model_dir = str(tmp_path / 'run')
  result = sweep_lib.SweepResult(
      checkpoints={s: f'{model_dir}/checkpoint_{s}' for s in RUN},
      metrics={s: {t: {'accuracy': a} for t, a in row.items()} for s, row in RUN.items()},
      decoded=[], reused=0, timing={}, start_step=0)
  ref = reference.load_file(_write(tmp_path / 'paper.csv', PAPER_CSV))
  summary = sweep_lib.write_report_and_best(model_dir, result, selection.OOD_DEV_RULE, ref)
  assert summary['selected_step'] == 100
  markdown = open(os.path.join(model_dir, 'report', 'report.md'), encoding='utf-8').read()
  assert '| this run (step 100) | 20.0 | 45.0 | 25.0 | — | 40.0 | 18.5 |' in markdown


@pytest.mark.slow  # one `specialize` subprocess (~6 s on the 2-core VM)
def test_a_bad_reference_is_one_line_and_exit_2(tmp_path):
  model_dir = _write_run(tmp_path / 'run', RUN)
  bad = _write(tmp_path / 'paper.csv', 'row,gsm8k\nXL,22,4\n')
  result = processes.run_specialize(['report', model_dir, '--reference', bad])
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('specialize report:')]
  assert lines == [f'specialize report: {bad}:2: 3 cells for 2 header columns; give a label and '
                   'one cell per column (empty when not reported).']
  assert 'Traceback' not in result.stderr
