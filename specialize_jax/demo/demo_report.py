"""The demo's report (`OUTPUT_DIR/report/`): the findings table and three plots.

Files:
  `findings.md`: one row per finding of the paper (`findings.markdown`), then each run's test
    scores at its selected checkpoint.
  `tradeoff.png`: the paper's trade-off figure: target skill (in-distribution dev accuracy) against
    generic ability (generic suite dev accuracy) over each run's checkpoints, starting from the
    generalist (or the raw start).
  `formats.png`: the format ablation: in-context vs zero-shot CoT test accuracy (in distribution)
    of the generalist and of the students trained on all four formats and on zero-shot formats.
  `dev_curves.png`: in-distribution and out-of-distribution dev accuracy over the steps of the
    distribution-matching run, with the step each selects.
Numbers are means over the seeds run.
"""
import os
import statistics
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from specialize_jax.data import storage
from specialize_jax.demo import findings as findings_lib
from specialize_jax.evaluation import report

LABELS = {"distribution": "distribution matching, 4 formats",
          "sample": "sample matching, 4 formats",
          "zero_shot": "distribution matching, zero-shot formats",
          "raw": "raw start, distribution matching",
          "generalist": "generalist (unspecialized)", "raw_start": "raw start (unspecialized)"}
GROUPS = ("id", "ood", "generic", "icl", "zs")


def _mean(values: Sequence[float]) -> float:
  return statistics.fmean(values) if values else float("nan")


def _dev_curve(runs: Sequence[Mapping[str, Any]], group: str) -> Tuple[List[int], List[float]]:
  """Seed-mean dev score `group` per step present in every seed's sweep."""
  steps = sorted(set.intersection(*(set(int(s) for s in r["dev"]) for r in runs)))
  values = [_mean([findings_lib.scores(r["dev"][str(s)], "dev")[group] for r in runs])
            for s in steps]
  return steps, values


def plot_tradeoff(summary: Mapping[str, Any], path: str) -> str:
  figure, axes = report.new_figure()
  ax = axes[0][0]
  runs = summary["runs"]
  for run in findings_lib.RUNS:
    start = "raw_start" if run == "raw" else "generalist"
    start_dev = findings_lib.scores(runs[start][0]["test"], "dev")
    steps, target = _dev_curve(runs[run], "id")
    _, generic = _dev_curve(runs[run], "generic")
    ax.plot([start_dev["generic"]] + generic, [start_dev["id"]] + target, marker="o",
            label=LABELS[run])
  for start in findings_lib.STARTS:
    dev = findings_lib.scores(runs[start][0]["test"], "dev")
    ax.scatter([dev["generic"]], [dev["id"]], marker="*", s=160, zorder=3, label=LABELS[start])
  ax.set_xlabel("generic suite, dev accuracy (%)")
  ax.set_ylabel("target skill (in-distribution math), dev accuracy (%)")
  ax.set_title("Specialization trades generic ability for the target skill")
  ax.legend(fontsize=7)
  return report.save_figure(figure, path)


def plot_formats(summary: Mapping[str, Any], path: str) -> str:
  figure, axes = report.new_figure()
  ax = axes[0][0]
  runs = summary["runs"]
  names = ("generalist", "distribution", "zero_shot")
  width = 0.38
  for offset, (group, label) in enumerate((("icl", "in-context CoT"), ("zs", "zero-shot CoT"))):
    values = [_mean([r["scores"][group] for r in runs[n]]) for n in names]
    ax.bar([i + (offset - 0.5) * width for i in range(len(names))], values, width, label=label)
  ax.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=7)
  ax.set_ylabel("in-distribution test accuracy (%)")
  ax.set_title("Format ablation: what training formats keep")
  ax.legend()
  return report.save_figure(figure, path)


def plot_dev_curves(summary: Mapping[str, Any], path: str) -> str:
  figure, axes = report.new_figure()
  ax = axes[0][0]
  runs = summary["runs"]["distribution"]
  for group, label in (("id", "in-distribution dev"), ("ood", "out-of-distribution dev")):
    steps, values = _dev_curve(runs, group)
    ax.plot(steps, values, marker="o", label=label)
    best = steps[max(range(len(values)), key=lambda i: (values[i], -steps[i]))]
    ax.axvline(best, linestyle=":", color=ax.lines[-1].get_color())
  ax.set_xlabel("step")
  ax.set_ylabel("accuracy (%)")
  ax.set_title("Distribution matching: ID and OOD dev over steps (dotted: each one's best)")
  ax.legend()
  return report.save_figure(figure, path)


def _scores_table(summary: Mapping[str, Any]) -> str:
  lines = ["| run | selected step(s) | " + " | ".join(GROUPS) + " |",
           "|---|---|" + "---|" * len(GROUPS)]
  for name in findings_lib.STARTS + findings_lib.RUNS:
    runs = summary["runs"][name]
    steps = ", ".join(str(r.get("selected_step", 0)) for r in runs)
    cells = [f"{_mean([r['scores'][g] for r in runs]):.1f}" for g in GROUPS]
    lines.append(f"| {LABELS[name]} | {steps} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_report(report_dir: str, summary: Mapping[str, Any]) -> Dict[str, str]:
  """Writes the report files (module docstring); returns their paths by name."""
  storage.makedirs(report_dir)
  files = {"tradeoff.png": plot_tradeoff(summary, os.path.join(report_dir, "tradeoff.png")),
           "formats.png": plot_formats(summary, os.path.join(report_dir, "formats.png")),
           "dev_curves.png": plot_dev_curves(summary, os.path.join(report_dir, "dev_curves.png"))}
  text = ["# The paper in miniature: findings", "",
          findings_lib.markdown(summary["findings"], summary["seeds"]),
          "## Test scores (%) at the selected checkpoints", "",
          "`id`/`ood`: in-distribution / held-out math families (in-context and zero-shot CoT); "
          "`generic`: the generic suite (in-context CoT); `icl`/`zs`: in-distribution in-context / "
          "zero-shot CoT.", "", _scores_table(summary),
          "![trade-off](tradeoff.png)", "", "![formats](formats.png)", "",
          "![dev curves](dev_curves.png)", ""]
  files["findings.md"] = os.path.join(report_dir, "findings.md")
  storage.write_text(files["findings.md"], "\n".join(text))
  return files
