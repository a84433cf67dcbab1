"""`specialize demo`: the paper's claim in miniature, on a laptop, with no download.

It writes the generated demo data (`synthetic.write_demo_data`: seeded multi-step arithmetic word
problems as teacher data, plus a 384-piece BPE vocabulary), trains two tiny students from scratch
with the real trainer and gin configs — one on chain-of-thought targets
(`gin/experiments/demo_cpu.gin`), one on answer-only targets
(`gin/experiments/demo_cpu_answer_only.gin`) — evaluates both with the real evaluator, and prints
one table: held-out in-distribution accuracy overall and by number of steps, out-of-distribution
accuracy (unseen templates, names and objects) and 4-step accuracy (length generalization).
"""
import json
import logging
import os
import time
from typing import Dict, Optional

from specialize_jax.jobs import gin_config
from specialize_jax.demo import synthetic

STUDENTS = (("cot", "CoT", "experiments/demo_cpu.gin"),
            ("ao", "answer-only", "experiments/demo_cpu_answer_only.gin"))
EVAL_SETS = (("id", "test_id", "in-distribution"), ("ood", "test_ood", "OOD wording (1-3 steps)"),
             ("long", "test_long", "4-step problems"))


def _latest_predictions(model_dir: str, task_name: str) -> str:
  task_dir = os.path.join(model_dir, "eval", task_name)
  files = [f for f in os.listdir(task_dir) if f.startswith("predictions_step")]
  if not files:
    raise FileNotFoundError(f"No predictions in {task_dir}; did the run's final evaluation run?")
  return os.path.join(task_dir, max(files, key=lambda f: int(f.split("step")[1].split(".")[0])))


def _score(model_dir: str, target: str, demo_paths) -> Dict[str, Dict[str, float]]:
  scores = {}
  for eval_name, split, _ in EVAL_SETS:
    problems = synthetic.read_problems(demo_paths[split])
    with open(_latest_predictions(model_dir, f"demo_{eval_name}_{target}"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    rows.sort(key=lambda r: r["index"])
    chosen = [problems[r["index"]] for r in rows]
    scores[eval_name] = synthetic.accuracy_by_steps(
        [r["prediction"] for r in rows], [p.answer for p in chosen], [p.num_steps for p in chosen])
  return scores


def format_table(results: Dict[str, Dict]) -> str:
  """One comparison table; rows are eval sets (and step counts), columns the students."""
  labels = [label for _, label, _ in STUDENTS]
  lines = [f"{'accuracy (%)':<32}" + "".join(f"{label:>14}" for label in labels)]

  def row(name, key, eval_name):
    cells = [results[target]["scores"][eval_name].get(key) for target, _, _ in STUDENTS]
    lines.append(f"{name:<32}" + "".join(f"{c:>14.1f}" if c is not None else f"{'-':>14}"
                                          for c in cells))

  for eval_name, _, title in EVAL_SETS:
    row(title, "accuracy", eval_name)
    if eval_name == "id":
      for steps in (1, 2, 3):
        row(f"  {steps} step{'s' if steps > 1 else ''}", f"accuracy_steps_{steps}", eval_name)
  lines.append(f"{'train + eval wall time (s)':<32}" + "".join(
      f"{results[target]['seconds']:>14.0f}" for target, _, _ in STUDENTS))
  return "\n".join(lines)


def run_demo(output_dir: str, demo_dir: str, only_data: bool = False,
             train_steps: Optional[int] = None) -> int:
  """Needs the demo tasks registered (`import tasks`, done by the CLI) over `demo_dir`."""
  import gin  # pylint: disable=g-import-not-at-top
  from specialize_jax.jobs import runs  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  paths = synthetic.write_demo_data(demo_dir)
  logging.info("Demo data in %s (%.1f s).", paths["train"].parent, time.perf_counter() - start)
  if only_data:
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
  results = {}
  for target, label, gin_file in STUDENTS:
    model_dir = os.path.abspath(os.path.join(output_dir, target))
    bindings = [f"MODEL_DIR = '{model_dir}'"]
    if train_steps:
      bindings += [f"TRAIN_STEPS = {train_steps}", f"EVAL_PERIOD = {train_steps}"]
    gin_config.parse_gin([gin_file], bindings, [])
    gin_config.write_config(model_dir)
    logging.info("Training the %s student in %s.", label, model_dir)
    run_start = time.perf_counter()
    gin.get_configurable(runs.train)()
    results[target] = {"seconds": time.perf_counter() - run_start,
                       "scores": _score(model_dir, target, paths), "model_dir": model_dir}
    gin.clear_config()
  table = format_table(results)
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "demo_results.json.tmp"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  os.replace(os.path.join(output_dir, "demo_results.json.tmp"),
             os.path.join(output_dir, "demo_results.json"))
  print(table)
  _write_reports(output_dir, results)
  return 0


def _write_reports(output_dir: str, results: Dict[str, Dict]) -> None:
  """`<run>/report/` per student and `<output_dir>/comparison/` (CoT vs answer-only), from the eval
  files training wrote: no decoding. The demo sets are test sets, so no checkpoint is selected and
  the comparison takes each run's last evaluated step; `specialize sweep` adds earlier steps."""
  from specialize_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  from specialize_jax.evaluation import sweep  # pylint: disable=g-import-not-at-top
  runs = []
  for target, label, _ in STUDENTS:
    model_dir = results[target]["model_dir"]
    table = sweep.read_accuracy_table(model_dir)
    report.write_run_report(model_dir, table)
    runs.append((label, model_dir, table))
  files = report.write_comparison(runs, os.path.join(output_dir, "comparison"))
  print(f"Reports: {', '.join(os.path.join(r[1], report.REPORT_SUBDIR) for r in runs)}; "
        f"comparison: {files['comparison.md']}")
