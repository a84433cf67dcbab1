"""The original's single-format micro-batches (`prepared.micro_batches`): the counts its code derives
per format and size, one epoch's structure, O(1) steps across epochs, and the token-mean weights."""
import collections

import numpy as np
import pytest

from specialize_jax.errors import ConfigError
from specialize_jax.prepared import micro_batches

# The paper's teacher data: 207,135 correct chains of 7,473 questions; every chain gives one
# example of each CoT format, every question one of each answer-only format.
PAPER_COUNTS = {"icl_cot": 207_135, "icl_ao": 7_473, "zs_cot": 207_135, "zs_ao": 7_473}
# The original's src/conf/batch_size/*.yaml and accumulation per size.
ORIGINAL = {
    "250m": ({"icl_cot": 25, "icl_ao": 35, "zs_cot": 40, "zs_ao": 60}, 3),
    "780m": ({"icl_cot": 8, "icl_ao": 12, "zs_cot": 18, "zs_ao": 30}, 20),
    "3b": ({"icl_cot": 2, "icl_ao": 10, "zs_cot": 8, "zs_ao": 20}, 30),
    "11b": ({"icl_cot": 2, "icl_ao": 10, "zs_cot": 8, "zs_ao": 20}, 20),
}


def _plan(size, counts=None, **kwargs):
  sizes, accumulation = ORIGINAL[size]
  return micro_batches.MicroBatchPlan(counts or PAPER_COUNTS, sizes, accumulation, **kwargs)


@pytest.mark.parametrize("size, expected", [
    # floor(n / (accumulation x size)) effective batches of `accumulation` micro-batches each.
    ("3b", {"icl_cot": 103_560, "icl_ao": 720, "zs_cot": 25_890, "zs_ao": 360}),
    ("11b", {"icl_cot": 103_560, "icl_ao": 740, "zs_cot": 25_880, "zs_ao": 360}),
    ("780m", {"icl_cot": 25_880, "icl_ao": 620, "zs_cot": 11_500, "zs_ao": 240}),
    ("250m", {"icl_cot": 8_283, "icl_ao": 213, "zs_cot": 5_178, "zs_ao": 123}),
])
def test_micro_batches_per_epoch_are_the_originals_derivation(size, expected):
  plan = _plan(size)
  assert plan.micro_batches_per_epoch == expected
  assert plan.steps_per_epoch * ORIGINAL[size][1] == sum(expected.values())


@pytest.mark.parametrize("size, in_context_cot_share", [
    ("3b", 0.79), ("11b", 0.79), ("780m", 0.68), ("250m", 0.60)])
def test_the_mixture_is_the_share_of_micro_batches(size, in_context_cot_share):
  assert micro_batches.micro_batch_share(_plan(size))["icl_cot"] == pytest.approx(
      in_context_cot_share, abs=0.005)


SMALL = {"icl_cot": 130, "icl_ao": 17, "zs_cot": 130, "zs_ao": 17}


@pytest.mark.parametrize("order", micro_batches.WITHIN_FORMAT_ORDERS)
def test_an_epoch_is_single_format_micro_batches_each_example_at_most_once(order):
  plan = micro_batches.MicroBatchPlan(SMALL, {"icl_cot": 2, "icl_ao": 2, "zs_cot": 4, "zs_ao": 3},
                                      accumulation=3, seed=7, within_format_order=order)
  epoch = plan.epoch(0)
  assert len(epoch) == plan.steps_per_epoch * 3
  seen = collections.defaultdict(list)
  for micro_batch in epoch:
    assert len(micro_batch.examples) == plan.micro_batch_sizes[micro_batch.format_name]
    seen[micro_batch.format_name].extend(micro_batch.examples.tolist())
  for name, examples in seen.items():
    assert len(examples) == len(set(examples)) == plan.micro_batches_per_epoch[name] * (
        plan.micro_batch_sizes[name])
    assert max(examples) < SMALL[name]
  if order == "file":  # The original cuts a format's examples in order: whole effective batches.
    assert sorted(seen["zs_cot"]) == list(range(plan.micro_batches_per_epoch["zs_cot"] * 4))
  # The shuffle mixes formats across the sequence (not one format after another).
  formats = [m.format_name for m in epoch]
  assert len({tuple(formats[i:i + 3]) for i in range(0, len(formats), 3)}) > 4


def test_steps_are_the_epochs_in_order_and_cross_epochs():
  plan = micro_batches.MicroBatchPlan(SMALL, {"icl_cot": 2, "icl_ao": 2, "zs_cot": 4, "zs_ao": 3},
                                      accumulation=3, seed=1)
  per_epoch = plan.steps_per_epoch
  flat = [m for step in range(2 * per_epoch) for m in plan.step(step)]
  expected = plan.epoch(0) + plan.epoch(1)
  assert [(m.format_name, m.examples.tolist()) for m in flat] == [
      (m.format_name, m.examples.tolist()) for m in expected]
  assert [m.format_name for m in plan.epoch(0)] != [m.format_name for m in plan.epoch(1)]
  again = micro_batches.MicroBatchPlan(SMALL, plan.micro_batch_sizes, 3, seed=1, repeat_order=True)
  assert [m.format_name for m in again.epoch(0)] == [m.format_name for m in again.epoch(1)]


def test_settings_that_cannot_work_are_config_errors():
  with pytest.raises(ConfigError, match="No micro-batch size for format"):
    micro_batches.MicroBatchPlan(SMALL, {"icl_cot": 2}, accumulation=3)
  with pytest.raises(ConfigError, match="No format has a whole effective batch"):
    micro_batches.MicroBatchPlan({"zs_ao": 5}, {"zs_ao": 2}, accumulation=3)
  with pytest.raises(ConfigError, match="within_format_order"):
    micro_batches.MicroBatchPlan(SMALL, ORIGINAL["3b"][0], 3, within_format_order="random")
