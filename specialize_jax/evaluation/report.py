"""A run's checkpoint report (`MODEL_DIR/report/`) and the comparison of several runs.

Terms:
  column: one number per checkpoint in the paper-style table: GSM8K, MultiArith, ASDiv, SVAMP (each
    one task: the test split when evaluated, else dev; in-context CoT when evaluated, else the
    first of `task_keys.FORMAT_ORDER`), BBH-CoT and BBH-AO (the mean over the evaluated BBH tasks of
    that format; a checkpoint missing one has no value), then any other dataset (e.g. the demo's)
    by the same rule. A cell without a value is "—"; plots draw only columns with values.
  run report: `report.md` (selection explained, the table, the plots), `results.csv` (the table,
    plus every task's accuracy), `results.json` (everything, machine-readable) and PNGs:
    `accuracy_vs_step.png` (ID and OOD columns, selection score, chosen step marked),
    `math_vs_bbh.png` (only with BBH and math values), `formats.png` (in-context vs zero-shot,
    CoT vs answer-only per dataset).
  comparison: `comparison.md`, `comparison.csv`, `comparison.json`, `comparison.png`: one row per
    run, at the checkpoint its rule selects (or its last step when none is eligible).

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch).
"""
import csv
import dataclasses
import io
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from specialize_jax.data import storage
from specialize_jax.evaluation import selection as selection_lib
from specialize_jax.evaluation import task_keys
from specialize_jax.errors import ConfigError

Table = Mapping[int, Mapping[str, Optional[float]]]
REPORT_SUBDIR = 'report'
MISSING = '—'
PAPER_COLUMNS = (('GSM8K', 'gsm8k', None), ('MultiArith', 'multiarith', None),
                 ('ASDiv', 'asdiv', None), ('SVAMP', 'svamp', None), ('BBH-CoT', 'bbh', 'cot'),
                 ('BBH-AO', 'bbh', 'ao'))
MATH_DATASETS = ('gsm8k', 'multiarith', 'asdiv', 'svamp')
DATASET_LABELS = {'demo_id': 'Demo ID', 'demo_ood': 'Demo OOD', 'demo_long': 'Demo 4-step'}
PANEL_LABELS = {'gsm8k': 'GSM8K', 'multiarith': 'MultiArith', 'asdiv': 'ASDiv', 'svamp': 'SVAMP',
                'bbh': 'BBH (mean over tasks)', **DATASET_LABELS}
FORMAT_LABELS = {'icl_cot': 'in-context CoT', 'zs_cot': 'zero-shot CoT', 'icl_ao':
                 'in-context answer-only', 'zs_ao': 'zero-shot answer-only', 'cot': 'CoT',
                 'ao': 'answer-only'}
_FIGURE_SIZE = (8.0, 5.0)  # inches, at _DPI: 960 x 600 pixels
_DPI = 120


@dataclasses.dataclass(frozen=True)
class Column:
  """A table column: the mean accuracy of `task_names` (all needed), labelled `label`."""
  label: str
  dataset: str
  task_names: Tuple[str, ...]
  distribution: str

  def value(self, row: Mapping[str, Optional[float]]) -> Optional[float]:
    if not self.task_names:
      return None
    values = [row.get(n) for n in self.task_names]
    if any(v is None for v in values):
      return None
    return sum(values) / len(values)

  def describe(self) -> str:
    if not self.task_names:
      return 'not evaluated'
    if len(self.task_names) == 1:
      return self.task_names[0]
    return f'mean of {len(self.task_names)} tasks ({", ".join(self.task_names)})'


def _all_tasks(table: Table) -> List[str]:
  return sorted({name for row in table.values() for name, v in row.items() if v is not None})


def _dataset_task(keys: Sequence[task_keys.TaskKey]) -> Optional[str]:
  """The task standing for a dataset: test split first, then dev; format by FORMAT_ORDER."""
  for split in ('test', 'dev', None):
    in_split = [k for k in keys if k.split == split]
    if in_split:
      order = {f: i for i, f in enumerate(task_keys.FORMAT_ORDER)}
      return min(in_split, key=lambda k: (order.get(k.format, len(order)), k.name)).name
  return None


def columns_for(table: Table) -> List[Column]:
  """The table's columns (see the module docstring): paper columns when any has a value (the
  empty ones kept, shown as "—"), then the other datasets."""
  keys = [task_keys.describe_task(n) for n in _all_tasks(table)]
  paper: List[Column] = []
  for label, dataset, fmt in PAPER_COLUMNS:
    mine = [k for k in keys if k.dataset == dataset]
    if dataset == 'bbh':
      names = tuple(sorted(k.name for k in mine if k.format == fmt))
    else:
      task = _dataset_task(mine)
      names = (task,) if task else ()
    paper.append(Column(label, dataset, names, task_keys.describe_task(names[0]).distribution
                        if names else task_keys.UNKNOWN))
  others = []
  for dataset in sorted({k.dataset for k in keys} - {d for _, d, _ in PAPER_COLUMNS}):
    task = _dataset_task([k for k in keys if k.dataset == dataset])
    others.append(Column(DATASET_LABELS.get(dataset, dataset), dataset, (task,),
                         task_keys.describe_task(task).distribution))
  return (paper if any(c.task_names for c in paper) else []) + others


def _cell(value: Optional[float], signed: bool = False) -> str:
  if value is None:
    return MISSING
  return f'{value:+.1f}' if signed else f'{value:.1f}'


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def _write_text(path: str, text: str) -> None:
  with storage.atomic_write(path) as f:
    f.write(text)


def _write_json(path: str, value: Any) -> None:
  _write_text(path, json.dumps(value, indent=2, sort_keys=True) + '\n')


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(header)
  writer.writerows(rows)
  _write_text(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Plots


def new_figure(nrows: int = 1, ncols: int = 1, size: Tuple[float, float] = _FIGURE_SIZE):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=size, dpi=_DPI)
  FigureCanvasAgg(figure)
  axes = figure.subplots(nrows, ncols, squeeze=False)
  return figure, axes


def save_figure(figure, path: str) -> str:
  figure.tight_layout()
  with storage.atomic_write(path, mode='wb') as f:
    figure.savefig(f, format='png', dpi=_DPI)
  return path


def _series(table: Table, steps: Sequence[int], column: Column) -> Tuple[List[int], List[float]]:
  points = [(s, column.value(table[s])) for s in steps]
  kept = [(s, v) for s, v in points if v is not None]
  return [s for s, _ in kept], [v for _, v in kept]


_LINE_STYLES = {task_keys.IN_DISTRIBUTION: '-', task_keys.OUT_OF_DISTRIBUTION: '--',
                task_keys.GENERIC: ':', task_keys.UNKNOWN: '-.'}
_SHORT_DISTRIBUTION = {task_keys.IN_DISTRIBUTION: 'ID', task_keys.OUT_OF_DISTRIBUTION: 'OOD',
                       task_keys.GENERIC: 'generic', task_keys.UNKNOWN: '?'}


def _step_label(start_step: Optional[int]) -> str:
  return 'training step' + (f' ({start_step} = start checkpoint)' if start_step is not None else '')


def plot_accuracy_vs_step(table: Table, columns: Sequence[Column], chosen: selection_lib.Selection,
                          alternative: Optional[selection_lib.Selection], path: str,
                          start_step: Optional[int] = None) -> Optional[str]:
  """ID and OOD columns (not BBH) against step, the rule's score, the chosen step marked."""
  steps = sorted(table)
  drawn = [c for c in columns if c.dataset != 'bbh' and _series(table, steps, c)[0]]
  if not drawn:
    return None
  figure, axes = new_figure()
  ax = axes[0][0]
  for column in drawn:
    xs, ys = _series(table, steps, column)
    ax.plot(xs, ys, _LINE_STYLES[column.distribution], marker='o',
            label=f'{column.label} ({_SHORT_DISTRIBUTION[column.distribution]}, '
                  f'{column.describe()})')
  if chosen.scores:
    xs = sorted(chosen.scores)
    ax.plot(xs, [chosen.scores[s] for s in xs], ':', color='black', marker='s', markersize=4,
            label=f'selection score ({chosen.rule.name}, dev)')
  if chosen.step is not None:
    ax.axvline(chosen.step, color='tab:red', linewidth=2, alpha=0.6,
               label=f'selected: step {chosen.step} ({chosen.rule.name})')
  if alternative is not None and alternative.step is not None and (
      alternative.step != chosen.step):
    ax.axvline(alternative.step, color='gray', linestyle='--', linewidth=1.5,
               label=f'{alternative.rule.name} would pick step {alternative.step}')
  ax.set_title('Accuracy vs training step (solid: in-distribution, dashed: out-of-distribution)',
               fontsize=10)
  ax.set_xlabel(_step_label(start_step))
  ax.set_ylabel('accuracy (%)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='best')
  return save_figure(figure, path)


def plot_math_vs_bbh(table: Table, columns: Sequence[Column], chosen: selection_lib.Selection,
                     path: str) -> Optional[str]:
  """Mean math accuracy (x) against BBH-CoT and BBH-AO (y), one point per step, labelled."""
  math_columns = [c for c in columns if c.dataset in MATH_DATASETS and c.task_names]
  bbh_columns = [c for c in columns if c.dataset == 'bbh' and c.task_names]
  if not math_columns or not bbh_columns:
    return None
  figure, axes = new_figure()
  ax = axes[0][0]
  drew = False
  for column in bbh_columns:
    points = []
    for step in sorted(table):
      maths = [c.value(table[step]) for c in math_columns]
      bbh = column.value(table[step])
      if bbh is not None and all(m is not None for m in maths):
        points.append((step, sum(maths) / len(maths), bbh))
    if not points:
      continue
    drew = True
    ax.plot([p[1] for p in points], [p[2] for p in points], '-o', label=column.label)
    for step, x, y in points:
      ax.annotate(f'{step}' + (' *' if step == chosen.step else ''), (x, y), fontsize=7,
                  textcoords='offset points', xytext=(4, 4))
  if not drew:
    return None
  ax.set_title('Math vs generic ability (BBH), one point per checkpoint (* = selected)',
               fontsize=10)
  ax.set_xlabel('math accuracy (%): mean of ' + ', '.join(c.label for c in math_columns))
  ax.set_ylabel('BBH accuracy (%): mean over the evaluated BBH tasks')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return save_figure(figure, path)


def _format_series(table: Table) -> Dict[str, Dict[str, List[str]]]:
  """{dataset: {format: tasks}} at each dataset's preferred split (BBH: all its tasks)."""
  keys = [task_keys.describe_task(n) for n in _all_tasks(table)]
  result: Dict[str, Dict[str, List[str]]] = {}
  for dataset in dict.fromkeys(k.dataset for k in keys):
    mine = [k for k in keys if k.dataset == dataset and k.format]
    split = next((s for s in ('test', 'dev', None) if any(k.split == s for k in mine)), None)
    for k in mine:
      if k.split == split:
        result.setdefault(dataset, {}).setdefault(k.format, []).append(k.name)
  return result


def plot_formats(table: Table, path: str, start_step: Optional[int] = None) -> Optional[str]:
  """One panel per dataset, one line per prompt format, against step."""
  series = _format_series(table)
  if not series:
    return None
  order = [d for _, d, _ in PAPER_COLUMNS] + sorted(series)
  datasets = [d for d in dict.fromkeys(order) if d in series]
  ncols = min(3, len(datasets))
  nrows = -(-len(datasets) // ncols)
  figure, axes = new_figure(nrows, ncols, (4.0 * ncols, 3.2 * nrows + 0.6))
  steps = sorted(table)
  for index, dataset in enumerate(datasets):
    ax = axes[index // ncols][index % ncols]
    for fmt in sorted(series[dataset], key=lambda f: task_keys.FORMAT_ORDER.index(f)
                      if f in task_keys.FORMAT_ORDER else 99):
      column = Column(fmt, dataset, tuple(series[dataset][fmt]), task_keys.UNKNOWN)
      xs, ys = _series(table, steps, column)
      if xs:
        ax.plot(xs, ys, '-o', markersize=4, label=FORMAT_LABELS.get(fmt, fmt))
    split = task_keys.describe_task(next(iter(series[dataset].values()))[0]).split
    ax.set_title(f'{PANEL_LABELS.get(dataset, dataset)}' + (f' ({split})' if split else ''),
                 fontsize=10)
    ax.set_xlabel(_step_label(start_step) if start_step is None else 'step (0 = start)',
                  fontsize=8)
    ax.set_ylabel('accuracy (%)', fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for index in range(len(datasets), nrows * ncols):
    axes[index // ncols][index % ncols].set_visible(False)
  figure.suptitle('Accuracy by prompt format (in-context vs zero-shot, CoT vs answer-only)',
                  fontsize=11)
  return save_figure(figure, path)


# ---------------------------------------------------------------------------------------------
# Run report


@dataclasses.dataclass
class RunReport:
  """The selections and the files written."""
  chosen: selection_lib.Selection
  alternative: selection_lib.Selection
  files: Dict[str, str]


def write_run_report(model_dir: str, table: Table, *,
                     rule: selection_lib.SelectionRule = selection_lib.OOD_DEV_RULE,
                     alternative_rule: selection_lib.SelectionRule = selection_lib.ID_DEV_RULE,
                     checkpoint_paths: Optional[Mapping[int, str]] = None,
                     start_step: Optional[int] = None,
                     timing: Optional[Mapping[str, float]] = None,
                     output_dir: Optional[str] = None,
                     reference_markdown: Optional[str] = None) -> RunReport:
  """Selects by `rule` (the start checkpoint is a reference row, never a candidate), compares with
  `alternative_rule`, and writes the run report into `output_dir` (default MODEL_DIR/report).

  `reference_markdown` (`reference.format_markdown`: the selected step beside reference numbers)
  goes after the accuracy table; the caller builds it, as the reference is its input.
  """
  output_dir = output_dir or storage.join(model_dir, REPORT_SUBDIR)
  storage.makedirs(output_dir)
  checkpoint_paths = dict(checkpoint_paths or {})
  candidates = [s for s in table if s != start_step]
  chosen = selection_lib.select(table, rule, candidates)
  alternative = selection_lib.select(table, alternative_rule, candidates)
  columns = columns_for(table)
  test_columns = [c for c in columns if c.task_names and all(
      task_keys.describe_task(n).is_test for n in c.task_names)]
  differences = {}
  for column in test_columns:
    if chosen.step is not None and alternative.step is not None:
      a, b = column.value(table[chosen.step]), column.value(table[alternative.step])
      differences[column.label] = None if a is None or b is None else a - b
    else:
      differences[column.label] = None

  def path_of(step: int) -> str:
    return checkpoint_paths.get(step, storage.join(model_dir, f'checkpoint_{step}'))

  files = {}
  for name, fn in (('accuracy_vs_step', lambda p: plot_accuracy_vs_step(
      table, columns, chosen, alternative, p, start_step)),
                   ('math_vs_bbh', lambda p: plot_math_vs_bbh(table, columns, chosen, p)),
                   ('formats', lambda p: plot_formats(table, p, start_step))):
    written = fn(storage.join(output_dir, f'{name}.png'))
    if written:
      files[name] = written
    elif storage.exists(storage.join(output_dir, f'{name}.png')):
      storage.remove(storage.join(output_dir, f'{name}.png'))  # stale: its data is gone

  # Table rows: every step (the selected one marked), then start vs selected and their difference.
  header = ['checkpoint', 'step', f'score ({rule.name})'] + [c.label for c in columns]
  md_rows, csv_rows = [], []
  tasks = _all_tasks(table)
  for step in sorted(table):
    name = 'start' if step == start_step else storage.basename(path_of(step))
    if step == chosen.step:
      name = f'**{name} (selected)**'
    values = [c.value(table[step]) for c in columns]
    md_rows.append([name, str(step), _cell(chosen.scores.get(step))] + [_cell(v) for v in values])
    csv_rows.append([storage.basename(path_of(step)) if step != start_step else 'start', step,
                     chosen.scores.get(step), step == chosen.step] + values +
                    [table[step].get(t) for t in tasks])
  comparison_rows = []
  if start_step is not None and start_step in table and chosen.step is not None:
    start_values = [c.value(table[start_step]) for c in columns]
    chosen_values = [c.value(table[chosen.step]) for c in columns]
    comparison_rows = [
        ['start', str(start_step)] + [_cell(v) for v in start_values],
        [f'selected (step {chosen.step})', str(chosen.step)] + [_cell(v) for v in chosen_values],
        ['selected − start', ''] + [_cell(None if a is None or b is None else b - a, signed=True)
                                    for a, b in zip(start_values, chosen_values)]]

  lines = [f'# Checkpoint report: `{model_dir}`', '', '## Selection', '',
           f'- **Rule** {rule.describe()} (dev splits only; ties go to the earliest step; a '
           'checkpoint missing any rule task is not eligible; the start checkpoint is never a '
           'candidate).',
           f'- **Selected:** {chosen.explain()}']
  if chosen.step is not None:
    lines.append(f'- **Checkpoint:** `{path_of(chosen.step)}` (pointer: `{model_dir}/'
                 f'{selection_lib.BEST_FILE}`). Export to Hugging Face: '
                 f'`{selection_lib.export_command(path_of(chosen.step))}`')
  lines.append(f'- **In-distribution rule** {alternative_rule.describe()} would pick: '
               f'{alternative.explain()}')
  if differences:
    lines.append('- **Test-set difference, selected minus in-distribution pick** (points): ' +
                 ', '.join(f'{k} {_cell(v, signed=True)}' for k, v in differences.items()))
  for sel in (chosen, alternative):
    if sel.missing:
      lines.append(f'- Not eligible under `{sel.rule.name}`: ' + '; '.join(
          f'step {s} (missing {", ".join(m)})' for s, m in sorted(sel.missing.items())))
  lines += ['', '## Accuracy (%)', '', _markdown_table(header, md_rows), '']
  if comparison_rows:
    lines += ['### Start vs selected', '',
              _markdown_table(['', 'step'] + [c.label for c in columns], comparison_rows), '']
  lines += ['Columns: ' + '; '.join(f'{c.label} = {c.describe()}' for c in columns) +
            f'. {MISSING} = not evaluated.', '']
  if reference_markdown:
    lines += [reference_markdown]
  if files:
    lines += ['## Plots', ''] + [f'![{name}]({storage.basename(p)})' for name, p in files.items()]
    lines.append('')
  if timing:
    lines += ['## Sweep timing', '', f'{timing.get("total_seconds", 0):.1f} s in total, of which '
              f'compilation {timing.get("compile_seconds", 0):.1f} s '
              f'({100 * timing.get("compile_share", 0):.0f}%), checkpoint loading '
              f'{timing.get("load_seconds", 0):.1f} s.', '']
  _write_text(storage.join(output_dir, 'report.md'), '\n'.join(lines))
  files['report.md'] = storage.join(output_dir, 'report.md')

  csv_header = ['checkpoint', 'step', f'score_{rule.name}', 'selected'] + [
      c.label for c in columns] + tasks
  _write_csv(storage.join(output_dir, 'results.csv'), csv_header, csv_rows)
  files['results.csv'] = storage.join(output_dir, 'results.csv')

  def selection_json(sel: selection_lib.Selection) -> Dict[str, Any]:
    return {'rule': sel.rule.name, 'rule_tasks': list(sel.rule.task_names), 'step': sel.step,
            'score': sel.score, 'tied_steps': list(sel.tied_steps),
            'checkpoint': path_of(sel.step) if sel.step is not None else None,
            'scores': {str(k): v for k, v in sel.scores.items()},
            'missing': {str(k): list(v) for k, v in sel.missing.items()}}
  _write_json(storage.join(output_dir, 'results.json'), {
      'model_dir': model_dir, 'start_step': start_step,
      'selected': selection_json(chosen), 'in_distribution_pick': selection_json(alternative),
      'test_difference_selected_minus_id_pick': differences,
      'columns': {c.label: list(c.task_names) for c in columns},
      'rows': {str(s): {c.label: c.value(table[s]) for c in columns} for s in sorted(table)},
      'accuracy': {str(s): dict(table[s]) for s in sorted(table)},
      'timing': dict(timing or {})})
  files['results.json'] = storage.join(output_dir, 'results.json')
  return RunReport(chosen, alternative, files)


# ---------------------------------------------------------------------------------------------
# Comparison of runs


def write_comparison(runs: Sequence[Tuple[str, str, Table]], output_dir: str, *,
                     rule: selection_lib.SelectionRule = selection_lib.OOD_DEV_RULE,
                     start_step: Optional[int] = None) -> Dict[str, str]:
  """One table and one bar plot of runs given as (label, model_dir, accuracy table), each at its
  selected checkpoint, or its last step when `rule` selects none (`start_step` is never chosen)."""
  if not runs:
    raise ValueError('write_comparison needs at least one run.')
  storage.makedirs(output_dir)
  entries = []
  labels_in_order: List[str] = []
  for label, model_dir, table in runs:
    step, how = selection_lib.select_or_last(table, rule, start_step)
    if step is None:
      raise ConfigError(f'Run {model_dir} ({label}) has no eval results under '
                        f'{storage.join(model_dir, "eval")}; run `specialize sweep {model_dir}`.')
    columns = {c.label: c for c in columns_for(table) if c.task_names}
    labels_in_order += [k for k in columns if k not in labels_in_order]
    entries.append({'label': label, 'model_dir': model_dir, 'step': step, 'chosen_by': how,
                    'values': {k: c.value(table[step]) for k, c in columns.items()},
                    'tasks': {k: list(c.task_names) for k, c in columns.items()}})
  order = [label for label, _, _ in PAPER_COLUMNS] + list(DATASET_LABELS.values())
  labels_in_order.sort(key=lambda k: order.index(k) if k in order else len(order))
  header = ['run', 'step', 'chosen by'] + labels_in_order
  md_rows = [[e['label'], str(e['step']), e['chosen_by']] +
             [_cell(e['values'].get(k)) for k in labels_in_order] for e in entries]
  notes = [f'- {e["label"]} (`{e["model_dir"]}`): ' + '; '.join(
      f'{k} = {", ".join(v)}' for k, v in e['tasks'].items()) for e in entries]
  text = '\n'.join(['# Run comparison', '', f'Each run at the checkpoint rule '
                    f'{rule.describe()} selects, else its last step. Accuracy (%).', '',
                    _markdown_table(header, md_rows), '', 'Tasks behind each value:', ''] + notes +
                   ['', f'{MISSING} = not evaluated.', '', '![comparison](comparison.png)', ''])
  files = {'comparison.md': storage.join(output_dir, 'comparison.md'),
           'comparison.csv': storage.join(output_dir, 'comparison.csv'),
           'comparison.json': storage.join(output_dir, 'comparison.json')}
  _write_text(files['comparison.md'], text)
  _write_csv(files['comparison.csv'], ['run', 'model_dir', 'step', 'chosen_by'] + labels_in_order,
             [[e['label'], e['model_dir'], e['step'], e['chosen_by']] +
              [e['values'].get(k) for k in labels_in_order] for e in entries])
  _write_json(files['comparison.json'], {'rule': rule.name, 'rule_tasks': list(rule.task_names),
                                         'columns': labels_in_order, 'runs': entries})
  plotted = plot_comparison(entries, labels_in_order, storage.join(output_dir, 'comparison.png'))
  if plotted:
    files['comparison.png'] = plotted
  return files


def plot_comparison(entries: Sequence[Mapping[str, Any]], labels: Sequence[str],
                    path: str) -> Optional[str]:
  """Grouped bars: one group per column with values, one bar per run, values printed."""
  labels = [k for k in labels if any(e['values'].get(k) is not None for e in entries)]
  if not labels:
    return None
  figure, axes = new_figure(size=(min(12.0, max(6.0, 0.8 * len(labels) * len(entries) + 2)), 5.0))
  ax = axes[0][0]
  width = 0.8 / len(entries)
  for index, entry in enumerate(entries):
    xs = [i + (index - (len(entries) - 1) / 2) * width for i in range(len(labels))]
    values = [entry['values'].get(k) for k in labels]
    bars = ax.bar([x for x, v in zip(xs, values) if v is not None],
                  [v for v in values if v is not None], width,
                  label=f'{entry["label"]} (step {entry["step"]})')
    ax.bar_label(bars, fmt='%.1f', fontsize=7, padding=2)
  ax.set_xticks(range(len(labels)), labels)
  ax.set_ylabel('accuracy (%)')
  ax.set_title('Runs compared at their selected (or last) checkpoints', fontsize=10)
  top = max(v for e in entries for v in e['values'].values() if v is not None)
  ax.set_ylim(0, max(top * 1.15, 1.0))
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  return save_figure(figure, path)
