"""Every registered SeqIO task and mixture builds and yields correct examples on the shared data."""
import numpy as np
import pytest
import seqio

from specialize_jax.prepared import prepared_data
from tests.support import shared_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(gsm8k_gold_set):
  shared_data.point_tasks_here()
  import specialize_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import
  return seqio.TaskRegistry


REQUIRED = ([f"{d}_{f}" for d in ("gsm8k_test", "gsm8k_dev", "multiarith_dev", "multiarith_test",
                                   "asdiv_test", "svamp_test")
             for f in ("icl_cot", "zs_cot", "icl_ao", "zs_ao")] +
            ["bbh_date_understanding_cot", "bbh_date_understanding_ao", "gsm8k_distill_icl_cot"])
# Math inputs need up to 610 tokens, BBH 3-shot CoT prompts up to 1,970 (measured on the data).
LENGTHS = {"inputs": 2048, "targets": 256}


def test_required_names_registered(registry):
  names = set(registry.names())
  assert not set(REQUIRED) - names
  assert sum(n.startswith("bbh_") for n in names) == 4 * 27
  assert {"bbh_cot", "bbh_ao", "bbh_ao_paper", "bbh_cot_paper"} <= set(
      seqio.MixtureRegistry.names())
  assert {"gsm8k_distill", "gsm8k_distill_top5", "gsm8k_distill_top20"} <= names


def _first(task_name, split):
  task = seqio.get_mixture_or_task(task_name)
  dataset = task.get_dataset(LENGTHS, split=split, shuffle=False)
  return next(dataset.as_numpy_iterator())


@pytest.mark.slow
def test_every_task_iterates(registry, tmp_path):
  """Walks every registered task: first example tokenized, non-empty, within the feature lengths.
  (The TFDS-backed tasks are covered by tests/test_tfds_gsm8k.py, which prepares the dataset, and
  the generated demo and world tasks by tests/test_synthetic.py and tests/test_world.py, which
  write their data.)"""
  vocab = seqio.get_mixture_or_task("gsm8k_test_zs_cot").output_features["inputs"].vocabulary
  is_prepared = lambda name: isinstance(registry.get(name).source, prepared_data.PreparedSource)
  # Not walked: TFDS and demo tasks (see above), the top-k tasks (the gold set has no teacher rows:
  # tests/test_teacher_features.py covers them), prepared tasks other tests register, and the BBH
  # `_ao_paper` and `_cot_paper` tasks but one each (the sources of `_ao` and `_cot`, other
  # prompts; tests/test_bbh_prompts.py pins their inputs).
  names = [n for n in sorted(registry.names())
           if not n.startswith(("gsm8k_tfds_", "demo_", "world_", "gsm8k_distill_top"))
           and (not n.endswith(("_ao_paper", "_cot_paper")) or n in (
               "bbh_date_understanding_ao_paper", "bbh_date_understanding_cot_paper"))
           and (n.startswith("gsm8k_distill") or not is_prepared(n))]
  assert len([n for n in names if n.startswith("gsm8k_distill")]) == 5 and len(names) > 80
  for name in names:
    task = registry.get(name)
    prepared = is_prepared(name)
    example = _first(name, "train" if prepared else "test")
    assert 0 < len(example["inputs"]) <= LENGTHS["inputs"], name
    assert example["inputs"][-1] == 1 and example["targets"][-1] == 1, name  # EOS
    if prepared:  # Tokens only, no pretokenized text.
      assert vocab.decode(example["inputs"].tolist()).startswith("Q:"), name
      assert "The answer is" in vocab.decode(example["targets"].tolist()), name
    else:
      # The tokens are the whole pretokenized text: nothing was truncated away.
      assert example["inputs"].tolist() == vocab.encode(
          example["inputs_pretokenized"].decode()) + [1], name
    assert task.postprocess_fn(None, example=example, is_target=True), name


def test_math_eval_task_sizes_and_golds(registry):
  def golds(name):
    task = seqio.get_mixture_or_task(name)
    return [task.postprocess_fn(None, example=e, is_target=True)
            for e in task.source.get_dataset("test", shuffle=False).as_numpy_iterator()]
  assert len(golds("gsm8k_test_icl_cot")) == 1319
  assert len(golds("gsm8k_dev_zs_cot")) == 200
  assert len(golds("multiarith_test_zs_cot")) == 400
  assert golds("asdiv_test_zs_ao")[0] == "9 (apples)"
  assert len(golds("svamp_test_icl_ao")) == 1000


def test_distillation_mixture_rates_and_held_out_questions(registry):
  source = seqio.get_mixture_or_task("gsm8k_distill").source
  assert source.mixture_quotas(source.prepared()) == {
      "zs_ao": 5, "zs_cot": 200, "icl_ao": 5, "icl_cot": 790}
  from specialize_jax.prepared import prepare  # pylint: disable=g-import-not-at-top
  held_out = prepare.gsm8k_held_out()
  assert len(held_out.ids) == 200 + 1319
  task = seqio.get_mixture_or_task("gsm8k_distill_zs_ao")
  epoch = [e["id"].decode() for e in task.get_dataset(LENGTHS, split="train", shuffle=False)
           .take(7273 + 1).as_numpy_iterator()]
  assert len(set(epoch[:-1])) == 7473 - 200 and epoch[-1] == epoch[0]  # then the next epoch
  assert not set(epoch) & held_out.ids


def test_input_budget_is_checked_before_training(registry):
  task = seqio.get_mixture_or_task("gsm8k_distill_icl_cot")
  with pytest.raises(ValueError, match=r"TASK_FEATURE_LENGTHS\['inputs'\]=512.*1024"):
    task.get_dataset({"inputs": 512, "targets": 256}, split="train", shuffle=False)


def test_in_context_inputs_fit_their_budget(registry):
  task = seqio.get_mixture_or_task("gsm8k_distill_icl_cot")
  lengths = [len(e["inputs"]) for e in task.get_dataset(
      {"inputs": 1024, "targets": 256}, split="train", shuffle=False).take(200).as_numpy_iterator()]
  assert max(lengths) <= 1024 and np.mean(lengths) > 400  # 4 exemplars present.
