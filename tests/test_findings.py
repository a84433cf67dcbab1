"""The demo's findings: each verdict follows its comparison on the seed mean, and the table says so."""
import pytest

from specialize_jax.demo import findings


def _run(seed, ood_best=300, id_best=150, **scores):
  base = {"id": 50.0, "ood": 40.0, "generic": 30.0, "icl": 50.0, "zs": 50.0}
  return {"seed": seed, "scores": dict(base, **scores), "ood_best_step": ood_best,
          "id_best_step": id_best, "selected_step": ood_best}


def _results(**overrides):
  """Two seeds where every finding holds, with per-run score overrides for both seeds."""
  runs = {
      "generalist": dict(id=10.0, ood=8.0, generic=60.0, icl=10.0, zs=9.0),
      "raw_start": dict(id=0.0, ood=0.0, generic=0.0, icl=0.0, zs=0.0),
      "distribution": dict(id=60.0, ood=40.0, generic=20.0, icl=62.0, zs=58.0),
      "sample": dict(id=55.0, ood=35.0, generic=21.0, icl=56.0, zs=54.0),
      "zero_shot": dict(id=58.0, ood=38.0, generic=22.0, icl=30.0, zs=60.0),
      "raw": dict(id=40.0, ood=20.0, generic=5.0, icl=40.0, zs=40.0),
  }
  for run, scores in overrides.items():
    runs[run].update(scores)
  return {run: [_run(0, **scores), _run(1, **scores)] for run, scores in runs.items()}


def _verdicts(results):
  return {f["id"]: f["holds"] for f in findings.findings(results)}


def test_every_finding_holds_when_the_numbers_say_so():
  assert _verdicts(_results()) == dict.fromkeys("abcdef", True)


@pytest.mark.parametrize("overrides, broken", [
    ({"distribution": {"ood": 5.0}}, "a"),  # Below the generalist out of distribution.
    ({"generalist": {"generic": 10.0}}, "b"),  # Generic ability rose.
    ({"zero_shot": {"icl": 70.0}}, "c"),
    ({"raw": {"id": 65.0}}, "d"),
    ({"sample": {"ood": 41.0}}, "e"),
])
def test_a_finding_that_does_not_hold_is_reported_as_not_holding(overrides, broken):
  assert not _verdicts(_results(**overrides))[broken]
  table = findings.markdown(findings.findings(_results(**overrides)), [0, 1])
  row = next(line for line in table.splitlines() if line.startswith(f"| ({broken})"))
  assert row.endswith("| **no** |")


def test_best_checkpoints_must_differ_on_most_seeds():
  results = _results()
  results["distribution"][1]["id_best_step"] = results["distribution"][1]["ood_best_step"]
  assert not _verdicts(results)["f"]  # One seed of two is not most.


def test_measured_numbers_carry_every_seed_and_the_mean():
  results = _results()
  results["distribution"][1]["scores"]["id"] = 70.0
  (a,) = [f for f in findings.findings(results) if f["id"] == "a"]
  measured = a["measured"]["in-distribution"]["distribution.id"]
  assert measured["values"] == [60.0, 70.0] and measured["mean"] == 65.0
  assert measured["spread"] == 10.0
  assert "65.0 ± 5.0" in findings.markdown([a], [0, 1])


def test_scores_average_the_documented_tasks():
  accuracies = {t: 0.0 for t in findings.eval_tasks("test")}
  accuracies["world_gsm_test_icl_cot"] = 80.0
  accuracies["world_svamp_test_zs_cot"] = 60.0
  accuracies["world_bbh_navigate_test_icl_cot"] = 60.0
  scores = findings.scores(accuracies)
  assert scores["id"] == 40.0 and scores["icl"] == 80.0 and scores["zs"] == 0.0
  assert scores["ood"] == 10.0 and scores["generic"] == 10.0
  assert set(findings.ood_dev_tasks()) == {f"world_{f}_dev_{c}" for f in (
      "multiarith", "svamp", "asdiv") for c in ("icl_cot", "zs_cot")}
