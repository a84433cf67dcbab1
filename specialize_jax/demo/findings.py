"""The paper's six findings, measured on the demo's world: claims, numbers, verdicts, plots.

Terms:
  runs: `distribution` (the generalist specialized by distribution matching on all four formats,
    the paper's setting), `sample` (sample matching), `zero_shot` (zero-shot formats only), `raw`
    (the raw start specialized as `distribution`), and the two starts evaluated as they are,
    `generalist` and `raw_start`.
  scores (`scores`): accuracy (%) on the test splits at a run's selected checkpoint (selected by
    OOD dev, never by a test split): `id` the in-distribution family (`gsm`, in-context and
    zero-shot CoT averaged), `ood` the held-out families (same formats, averaged), `generic` the
    generic suite (in-context CoT, averaged over tasks), `icl` and `zs` the in-distribution family
    in-context and zero-shot CoT.
  seed mean: each number is averaged over the seeds run; `measured` lists every seed's value.
A finding holds when its comparison holds on the seed mean; none is tuned to hold.
"""
import statistics
from typing import Any, Dict, List, Mapping, Optional, Sequence

from specialize_jax.demo import generic_tasks
from specialize_jax.demo import world

RUNS = ("distribution", "sample", "zero_shot", "raw")
STARTS = ("generalist", "raw_start")
COT_FORMATS = ("icl_cot", "zs_cot")


def math_tasks(families: Sequence[str], split: str,
               format_names: Sequence[str] = COT_FORMATS) -> List[str]:
  return [f"world_{family}_{split}_{f}" for family in families for f in format_names]


def generic_tasks_of(split: str, format_name: str = "icl_cot") -> List[str]:
  return [f"world_bbh_{task}_{split}_{format_name}" for task in generic_tasks.TASKS]


def eval_tasks(split: str) -> List[str]:
  """What every checkpoint is evaluated on (dev) and the selected ones on (test)."""
  return (math_tasks([world.ID_FAMILY], split) + math_tasks(world.OOD_FAMILIES, split)
          + generic_tasks_of(split))


def ood_dev_tasks() -> List[str]:
  return math_tasks(world.OOD_FAMILIES, "dev")


def id_dev_tasks() -> List[str]:
  return math_tasks([world.ID_FAMILY], "dev")


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def scores(accuracies: Mapping[str, Optional[float]], split: str = "test") -> Dict[str, float]:
  """The score groups of one evaluated checkpoint (see the module docstring)."""
  get = lambda names: _mean([accuracies.get(n) for n in names])
  return {"id": get(math_tasks([world.ID_FAMILY], split)),
          "ood": get(math_tasks(world.OOD_FAMILIES, split)),
          "generic": get(generic_tasks_of(split)),
          "icl": get(math_tasks([world.ID_FAMILY], split, ("icl_cot",))),
          "zs": get(math_tasks([world.ID_FAMILY], split, ("zs_cot",)))}


def _seed_values(results: Mapping[str, Any], run: str, group: str) -> List[float]:
  return [seed_result["scores"][group] for seed_result in results[run]]


def _summary(values: Sequence[float]) -> Dict[str, Any]:
  return {"mean": statistics.fmean(values), "values": list(values),
          "spread": (max(values) - min(values)) if len(values) > 1 else 0.0}


def _compare(results, claim: str, finding_id: str, pairs) -> Dict[str, Any]:
  """`pairs`: (label, run, group, other run, other group); holds when every first mean beats its
  second."""
  measured, holds = {}, True
  for label, run, group, other, other_group in pairs:
    first = _summary(_seed_values(results, run, group))
    second = _summary(_seed_values(results, other, other_group))
    measured[label] = {f"{run}.{group}": first, f"{other}.{other_group}": second}
    holds = holds and first["mean"] > second["mean"]
  return {"id": finding_id, "claim": claim, "measured": measured, "holds": holds}


def findings(results: Mapping[str, Any]) -> List[Dict[str, Any]]:
  """The six findings from `results` ({run: [per seed {"scores", "id_best_step",
  "ood_best_step", "selected_step"}]}, runs RUNS and STARTS)."""
  out = [
      _compare(results, "Specialization lifts the target skill, in and out of distribution.", "a",
               [("in-distribution", "distribution", "id", "generalist", "id"),
                ("out-of-distribution", "distribution", "ood", "generalist", "ood")]),
      _compare(results, "Generic ability falls as the target skill rises.", "b",
               [("generic suite", "generalist", "generic", "distribution", "generic")]),
      _compare(results, "Training on in-context formats keeps in-context ability; zero-shot "
               "training loses it.", "c",
               [("in-context CoT, in distribution", "distribution", "icl", "zero_shot", "icl")]),
      _compare(results, "The generalist (instruction-tuned) start beats the raw start.", "d",
               [("in-distribution", "distribution", "id", "raw", "id"),
                ("out-of-distribution", "distribution", "ood", "raw", "ood")]),
      _compare(results, "Distribution matching beats sample matching.", "e",
               [("in-distribution", "distribution", "id", "sample", "id"),
                ("out-of-distribution", "distribution", "ood", "sample", "ood")]),
  ]
  steps = [(r["id_best_step"], r["ood_best_step"]) for r in results["distribution"]]
  differ = sum(a != b for a, b in steps)
  out.append({"id": "f", "claim": "The best in-distribution and out-of-distribution checkpoints "
              "differ.", "measured": {"(ID dev best step, OOD dev best step) per seed": steps,
                                      "seeds where they differ": differ},
              "holds": differ * 2 > len(steps)})
  return out


def _cell(summary: Mapping[str, Any]) -> str:
  text = f"{summary['mean']:.1f}"
  return text + (f" ± {summary['spread'] / 2:.1f}" if len(summary["values"]) > 1 else "")


def markdown(found: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> str:
  """The findings table: claim, numbers (seed mean, ± half the range over seeds), verdict."""
  lines = [f"Seeds: {', '.join(map(str, seeds))}. Test accuracy (%) at each run's checkpoint "
           "selected by OOD dev.", "",
           "| finding | the paper's claim | measured | holds |", "|---|---|---|---|"]
  for f in found:
    if f["id"] == "f":
      steps = f["measured"]["(ID dev best step, OOD dev best step) per seed"]
      measured = "; ".join(f"ID best step {a}, OOD best step {b}" for a, b in steps)
    else:
      parts = []
      for label, pair in f["measured"].items():
        (first, a), (second, b) = pair.items()
        parts.append(f"{label}: {first} {_cell(a)} vs {second} {_cell(b)}")
      measured = "; ".join(parts)
    lines.append(f"| ({f['id']}) | {f['claim']} | {measured} | "
                 f"{'yes' if f['holds'] else '**no**'} |")
  return "\n".join(lines) + "\n"
