"""Reference numbers beside a run's selected checkpoint (`specialize report --reference`).

A reproduction is judged by how far its numbers are from the paper's (or from another run's), so
the report puts the two side by side with their differences, and says exactly which of its columns
were compared with which reference number and which were not.

Terms:
  reference file: a small file the user writes, e.g. the paper's table as they copy it. Numbers are
    accuracies in percent (0-100); a missing number is `null` (JSON) or an empty cell (CSV).
    JSON (`.json`): an object {"rows": {ROW: {KEY: number, ...}, ...}, "source": "...",
      "note": "..."}; `rows` is required and not empty, `source` and `note` are optional strings
      printed with the table (where the numbers come from, how far to trust them).
    CSV (`.csv`): a header `row,KEY,KEY,...`, then one line per row: its label, then the numbers.
      Lines starting with `#` are comments (`# source: ...` and `# note: ...` are kept as such).
  reference run: a run directory (MODEL_DIR with eval results) instead of a file: its one row is
    the checkpoint that the same rule selects there (else its last step), keyed by column label.
  shipped reference: a JSON file in the package's `gin/reference/`, given by its name (the CLI
    resolves it): `fu2023_flan_t5` holds the paper's specialized FlanT5 numbers.
  key: what a reference number is compared with; matched without regard to case, `-` or `_`:
    - a report column's short name (`SHORT_NAMES`): gsm8k, multiarith, asdiv, svamp (the task
      standing for that dataset's column: test split when evaluated, in-context CoT first; see
      `report.columns_for`), bbh_cot, bbh_ao (the mean over the evaluated BBH tasks); any other
      dataset's column by its name (e.g. demo_ood);
    - a report column's label as the report prints it (GSM8K, BBH-CoT, Demo OOD);
    - an eval task name (e.g. gsm8k_test_zs_cot): that one task's accuracy, whatever task stands
      for its dataset's column.
    `bbh` alone is refused: the paper reports BBH both with and without CoT.
  compared: a column with a number on both sides (in at least one reference row); missing: a key
    the run did not evaluate (or does not know), and a run column no reference row has a number
    for. Both are printed, so a silent partial comparison cannot pass for a full one.
  difference: this run minus the reference, in accuracy points.
"""
import csv
import dataclasses
import io
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from specialize_jax.data import storage
from specialize_jax.evaluation import report as report_lib
from specialize_jax.evaluation import selection as selection_lib
from specialize_jax.evaluation import task_keys
from specialize_jax.errors import ConfigError

Table = Mapping[int, Mapping[str, Optional[float]]]
SHIPPED_SUBDIR = 'reference'  # under the package's gin/ folder, which a wheel carries
SHORT_NAMES = {(dataset if fmt is None else f'{dataset}_{fmt}'): label
               for label, dataset, fmt in report_lib.PAPER_COLUMNS}
_AMBIGUOUS = {'bbh': 'write bbh_cot or bbh_ao'}
_JSON_FIELDS = ('rows', 'source', 'note')
_FORMAT_HELP = ('a reference is JSON {"rows": {"ROW": {"gsm8k": 22.4, ...}}} or CSV with the '
                'header row,gsm8k,... (see docs/evaluation.md#reference-numbers)')


@dataclasses.dataclass(frozen=True)
class ReferenceRow:
  """One row of reference numbers.

  Attributes:
    label: the row's name (e.g. "FlanT5-XL specialized").
    values: {key as written: accuracy % or None}.
    described: {key: what the number is}, for the "compared" line (a file's key, or the tasks
      behind a reference run's column).
  """
  label: str
  values: Dict[str, Optional[float]]
  described: Dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Reference:
  """Reference rows and where they come from (`origin`: a file or run directory)."""
  origin: str
  rows: Tuple[ReferenceRow, ...]
  source: Optional[str] = None
  note: Optional[str] = None


def _normalize(key: str) -> str:
  return '_'.join(key.strip().lower().replace('-', ' ').replace('_', ' ').split())


def _number(value, where: str) -> Optional[float]:
  """A reference cell as a percentage, or a ConfigError naming `where`."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if isinstance(value, bool):
    value = repr(value)
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f'{where}: {value!r} is not a number; write an accuracy in percent (e.g. '
                      '22.4), or leave it empty (CSV) / null (JSON) when not reported.') from None
  if not math.isfinite(number) or not 0.0 <= number <= 100.0:
    raise ConfigError(f'{where}: {value!r} is not an accuracy in percent; write a number from 0 '
                      'to 100 (22.4, not 0.224).')
  return number


def _check_key(key, where: str) -> str:
  if not isinstance(key, str) or not key.strip():
    raise ConfigError(f'{where}: an empty column name; name each column (gsm8k, multiarith, '
                      'asdiv, svamp, bbh_cot, bbh_ao, or an eval task name).')
  fix = _AMBIGUOUS.get(_normalize(key))
  if fix:
    raise ConfigError(f'{where}: column {key!r} is ambiguous; {fix}.')
  return key.strip()


def _parse_json(path: str, text: str) -> Reference:
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path}:{e.lineno}: not valid JSON ({e.msg}); {_FORMAT_HELP}.') from None
  if not isinstance(data, dict) or not isinstance(data.get('rows'), dict) or not data['rows']:
    raise ConfigError(f'{path}: no "rows" object with at least one row; {_FORMAT_HELP}.')
  unknown = sorted(set(data) - set(_JSON_FIELDS))
  if unknown:
    raise ConfigError(f'{path}: unknown field(s) {unknown}; the fields are {list(_JSON_FIELDS)}.')
  for field in ('source', 'note'):
    if data.get(field) is not None and not isinstance(data[field], str):
      raise ConfigError(f'{path}: field "{field}" must be a string.')
  rows = []
  for label, values in data['rows'].items():
    where = f'{path}: rows[{json.dumps(label)}]'
    if not label.strip():
      raise ConfigError(f'{where}: an empty row label; name the row (e.g. "FlanT5-XL").')
    if not isinstance(values, dict) or not values:
      raise ConfigError(f'{where}: must be an object of numbers, e.g. {{"gsm8k": 22.4}}.')
    if len({_normalize(k) for k in values}) != len(values):
      raise ConfigError(f'{where}: names a column twice (case, "-" and "_" are ignored); keep '
                        'one of each.')
    rows.append(ReferenceRow(label, {
        _check_key(k, f'{where}[{json.dumps(k)}]'): _number(v, f'{where}[{json.dumps(k)}]')
        for k, v in values.items()}))
  return Reference(path, tuple(rows), data.get('source'), data.get('note'))


def _parse_csv(path: str, text: str) -> Reference:
  comments: Dict[str, str] = {}
  numbered = []
  text = text.lstrip('\ufeff')  # a byte-order mark, as spreadsheets write CSV
  for number, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith('#'):
      field, colon, value = line.lstrip()[1:].partition(':')
      if colon and field.strip() in ('source', 'note'):
        comments[field.strip()] = value.strip()
    elif line.strip():
      numbered.append((number, line))
  if not numbered:
    raise ConfigError(f'{path}: no header line; {_FORMAT_HELP}.')
  parsed = [(n, next(csv.reader(io.StringIO(line)))) for n, line in numbered]
  header_line, header = parsed[0]
  if not header or header[0].strip().lower() != 'row':
    raise ConfigError(f'{path}:{header_line}: the header must start with "row" (the column of row '
                      'labels), e.g. row,gsm8k,multiarith,asdiv,svamp.')
  keys = [_check_key(k, f'{path}:{header_line}') for k in header[1:]]
  if not keys or len(set(map(_normalize, keys))) != len(keys):
    raise ConfigError(f'{path}:{header_line}: the header needs distinct column names after "row".')
  if len(parsed) < 2:
    raise ConfigError(f'{path}: a header but no rows; add one line per row: label, then numbers.')
  rows, labels = [], set()
  for line, cells in parsed[1:]:
    if len(cells) != len(header):
      raise ConfigError(f'{path}:{line}: {len(cells)} cells for {len(header)} header columns; '
                        'give a label and one cell per column (empty when not reported).')
    label = cells[0].strip()
    if not label or label in labels:
      raise ConfigError(f'{path}:{line}: row label {label!r} is empty or repeated; give each row '
                        'its own label.')
    labels.add(label)
    rows.append(ReferenceRow(label, {k: _number(v, f'{path}:{line} column {k!r}')
                                     for k, v in zip(keys, cells[1:])}))
  return Reference(path, tuple(rows), comments.get('source'), comments.get('note'))


def load_file(path: str) -> Reference:
  """The reference in a `.json` or `.csv` file; a malformed one is a ConfigError naming the file,
  the line or field, and the fix."""
  if not storage.exists(path):
    raise ConfigError(f'Reference file {path} (--reference) does not exist; give a .json or .csv '
                      'file, a run directory, or a shipped reference name.')
  extension = os.path.splitext(path)[1].lower()
  if extension not in ('.json', '.csv'):
    raise ConfigError(f'Reference file {path} (--reference) is neither .json nor .csv; '
                      f'{_FORMAT_HELP}.')
  text = storage.read_text(path)
  return _parse_json(path, text) if extension == '.json' else _parse_csv(path, text)


def from_run(model_dir: str, table: Table, rule: selection_lib.SelectionRule,
             start_step: Optional[int] = None, label: Optional[str] = None) -> Reference:
  """Another run as the reference: its columns at the step `rule` selects (else its last)."""
  step, how = selection_lib.select_or_last(table, rule, start_step)
  if step is None:
    raise ConfigError(f'Reference run {model_dir} (--reference) has no eval results under '
                      f'{storage.join(model_dir, "eval")}; run `specialize sweep {model_dir}`.')
  columns = [c for c in report_lib.columns_for(table) if c.task_names]
  row = ReferenceRow(f'{label or storage.basename(model_dir.rstrip("/"))} (step {step})',
                     {c.label: c.value(table[step]) for c in columns},
                     {c.label: c.describe() for c in columns})
  return Reference(model_dir, (row,), source=f'run {model_dir}, step {step}, {how}')


@dataclasses.dataclass
class Comparison:
  """A run's step beside the reference rows.

  Attributes:
    run_label: the run row's label.
    columns: the compared columns, in the report's order (then task-name keys).
    run_values: {column: this run's accuracy}.
    rows: [(reference row label, {column: reference accuracy})].
    compared: {column: (what this run's value is, what the reference's is)}.
    missing: reasons, one per key or column not compared.
  """
  reference: Reference
  run_label: str
  columns: List[str]
  run_values: Dict[str, Optional[float]]
  rows: List[Tuple[str, Dict[str, Optional[float]]]]
  compared: Dict[str, Tuple[str, str]]
  missing: List[str]

  def difference(self, row: Mapping[str, Optional[float]], column: str) -> Optional[float]:
    a, b = self.run_values.get(column), row.get(column)
    return None if a is None or b is None else a - b


def compare(table: Table, step: int, reference: Reference, run_label: str) -> Comparison:
  """Matches the reference keys to `table`'s columns (see the module docstring) at `step`."""
  columns = {c.label: c for c in report_lib.columns_for(table)}
  # Every key a column answers to, the paper's columns included when this run has none of them
  # (their reference numbers are still shown, beside "—").
  labels = {_normalize(short): label for short, label in SHORT_NAMES.items()}
  labels.update({_normalize(label): label for label in SHORT_NAMES.values()})
  for column in columns.values():
    labels[_normalize(column.label)] = column.label
    if column.dataset != 'bbh':
      labels[_normalize(column.dataset)] = column.label
  tasks = {n for row in table.values() for n, v in row.items() if v is not None}
  row_values: Dict[str, Dict[str, Optional[float]]] = {r.label: {} for r in reference.rows}
  compared: Dict[str, Tuple[str, str]] = {}
  run_values: Dict[str, Optional[float]] = {}
  missing: Dict[str, str] = {}
  order: List[str] = []
  for row in reference.rows:
    for key, value in row.values.items():
      label = labels.get(_normalize(key))
      column = columns.get(label)
      if label is not None:
        name = label
        run_value = column.value(table[step]) if column and column.task_names else None
        described = column.describe() if column else 'not evaluated'
      elif key.strip() in tasks:
        name, run_value, described = key.strip(), table[step].get(key.strip()), key.strip()
      else:
        why = ('not evaluated in this run' if task_keys.describe_task(key.strip()).split
               else 'neither a column nor an evaluated task of this run')
        missing.setdefault(key, f'"{key}" ({why})')
        continue
      row_values[row.label][name] = value
      run_values[name] = run_value
      if name not in order:
        order.append(name)
      if value is not None and run_value is not None and name not in compared:
        compared[name] = (described, row.described.get(key, f'"{key}"'))
      elif column is None or not column.task_names:
        missing.setdefault(name, f'"{key}" (not evaluated in this run)')
  for name in order:
    if name not in compared:
      missing.setdefault(name, f'{name} (no number on both sides at step {step})')
  reasons = list(missing.values())
  uncovered = [c.label for c in columns.values() if c.task_names and c.label not in order]
  if uncovered and reference.rows:
    reasons.append(f'{", ".join(uncovered)} (no reference number)')
  # The table shows every column this run has a value in, beside the reference's columns.
  for name in uncovered:
    run_values[name] = columns[name].value(table[step])
  order += uncovered
  known = [label for label, _, _ in report_lib.PAPER_COLUMNS] + list(columns)
  order.sort(key=lambda k: known.index(k) if k in known else len(known))
  return Comparison(reference, run_label, order, run_values,
                    [(r.label, row_values[r.label]) for r in reference.rows], compared, reasons)


def _rows(comparison: Comparison) -> List[List[str]]:
  """The table body: the run, then each reference row and its difference row."""
  cell = report_lib._cell  # pylint: disable=protected-access
  body = [[comparison.run_label] + [cell(comparison.run_values.get(c)) for c in comparison.columns]]
  for label, values in comparison.rows:
    body.append([label] + [cell(values.get(c)) for c in comparison.columns])
    body.append(['  this run − reference'] + [
        cell(comparison.difference(values, c), signed=True) for c in comparison.columns])
  return body


def _notes(comparison: Comparison) -> List[str]:
  reference = comparison.reference
  if not reference.rows:
    return [f'Accuracy (%); {report_lib.MISSING} = not evaluated.']
  lines = [f'Reference: {reference.origin}' + (f' ({reference.source})' if reference.source
                                                else '')]
  if reference.note:
    lines.append(f'Note: {reference.note}')
  lines.append('Compared: ' + ('; '.join(f'{c} = {run} vs {ref}' for c, (run, ref) in
                                          comparison.compared.items()) or 'nothing'))
  if comparison.missing:
    lines.append('Not compared: ' + '; '.join(comparison.missing))
  lines.append(f'Accuracy (%); differences in points; {report_lib.MISSING} = no number.')
  return lines


def format_text(comparison: Comparison) -> str:
  """A plain-text table (columns aligned) and the compared / missing lines."""
  header = [''] + comparison.columns
  body = _rows(comparison)
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  lines = ['  '.join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])])
           .rstrip() for r in [header] + body]
  return '\n'.join(lines + [''] + _notes(comparison))


def format_markdown(comparison: Comparison) -> str:
  """The same as a markdown section, for the run report."""
  table = report_lib._markdown_table(  # pylint: disable=protected-access
      [''] + comparison.columns, _rows(comparison))
  return '\n'.join(['## Reference numbers', '', table, ''] +
                   [f'- {line}' for line in _notes(comparison)] + [''])
