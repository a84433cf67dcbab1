"""Top-k distillation tasks: teacher features from a real aligned file, joined to the same examples
as the sample-loss tasks, with one-hot rows where there is no teacher distribution."""
import json
import pathlib

import numpy as np
import pytest
import seqio

from specialize_jax.align import aligned_data
from specialize_jax.data import feature_converters as fc
from specialize_jax.align import teacher_features
from tests.support import prepared_sets

K = 5


def _register(prefix, teacher_path, aligned_path, k=K, rates=None):
  """Prepares the teacher file with its aligned file (as `specialize prepare --aligned`) and
  registers the distillation tasks over the set."""
  from specialize_jax.tasks import distillation  # pylint: disable=g-import-not-at-top
  output = pathlib.Path(aligned_path).parent / f"prepared_{prefix}_{pathlib.Path(aligned_path).stem}"
  directory = prepared_sets.prepare_gsm8k_set(output, teacher_path, aligned_path, teacher_k=k,
                                              format_names=("zs_ao", "zs_cot"), num_chunks=1)
  return distillation.register_distillation_tasks(prefix, directory, teacher_k=k, rates=rates)


def _examples(task_name, targets_length=512):
  """One epoch of a one-format task, in file order (the stream itself never ends)."""
  task = seqio.get_mixture_or_task(task_name)
  format_name = "_".join(task_name.split("_")[-2:])  # e.g. topk_test_zs_cot -> zs_cot
  count = task.source.prepared().num_examples(format_name)
  ds = task.get_dataset({"inputs": 2048, "targets": targets_length}, split="train", shuffle=False)
  return list(ds.take(count).as_numpy_iterator())


def test_cot_examples_carry_the_aligned_rows(data_dir, codex_aligned_files):
  teacher_path, aligned_path, records = codex_aligned_files
  _register("topk_test", teacher_path, aligned_path)
  rows = {(r.id, r.sample_index): r for r in aligned_data.read_aligned(aligned_path)}
  examples = _examples("topk_test_zs_cot")
  correct = [i for i, s in enumerate(records[0].samples) if s.correct]
  assert len(examples) == len(correct) == len(rows) > 10
  kept_total = 0
  for example, sample_index in zip(examples, correct):
    row = rows[(records[0].id, sample_index)]
    targets = example["targets"]
    ids, logprobs = example[fc.TEACHER_TOPK_IDS], example[fc.TEACHER_TOPK_LOGPROBS]
    n = len(row.target_ids)
    assert ids.shape == logprobs.shape == (len(targets), K) and len(targets) == n + 1
    np.testing.assert_array_equal(targets[:n], row.target_ids)
    assert targets[-1] == 1  # EOS, one-hot
    np.testing.assert_array_equal(ids[-1], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(logprobs[-1, 1:], fc.TEACHER_PAD_LOGPROB)
    for t in range(n):
      width = min(len(row.topk_ids[t]), K)
      order = np.arange(width)  # rows within k keep their order; longer ones their k most probable
      if len(row.topk_ids[t]) > K:
        order = np.argsort(-np.asarray(row.topk_logprobs[t]), kind="stable")[:K]
      np.testing.assert_array_equal(ids[t, :width], np.asarray(row.topk_ids[t])[order])
      np.testing.assert_allclose(logprobs[t, :width],
                                 np.asarray(row.topk_logprobs[t])[order], rtol=1e-6)
      assert np.all(logprobs[t, width:] == fc.TEACHER_PAD_LOGPROB)
    kept_total += row.kept
  assert kept_total > 0.9 * sum(len(r.target_ids) for r in rows.values())


def test_mixture_keeps_the_teacher_features_through_the_converter(data_dir, codex_aligned_files):
  """A SeqIO Mixture keeps only its tasks' output features: the teacher features must be among
  them, or the top-k mixture would reach the model without its teacher distributions."""
  teacher_path, aligned_path, _ = codex_aligned_files
  mixture = _register("topk_mix", teacher_path, aligned_path, rates={"zs_cot": 1.0})
  lengths = {"inputs": 256, "targets": 128}
  batch = next(seqio.get_dataset(
      mixture, task_feature_lengths=lengths, dataset_split="train", shuffle=False, num_epochs=1,
      feature_converter=fc.TeacherEncDecFeatureConverter(pack=True)).as_numpy_iterator())
  assert batch[fc.TEACHER_TOPK_IDS].shape == batch[fc.TEACHER_TOPK_LOGPROBS].shape == (128, K)
  real = batch["decoder_target_tokens"] > 0
  mass = np.exp(batch[fc.TEACHER_TOPK_LOGPROBS]).sum(-1)[real]
  assert 0.5 < mass.mean() < 1.0  # top-k teacher rows, not only one-hot rows (mass 1)


def test_answer_only_and_unaligned_examples_are_one_hot(data_dir, codex_aligned_files, tmp_path):
  teacher_path, aligned_path, _ = codex_aligned_files
  empty = tmp_path / "empty_aligned.jsonl"
  empty.write_text("", encoding="utf-8")
  for prefix, path, task in (("topk_ao", aligned_path, "topk_ao_zs_ao"),
                             ("topk_none", empty, "topk_none_zs_cot")):
    _register(prefix, teacher_path, path)
    for example in _examples(task):
      targets = example["targets"]
      np.testing.assert_array_equal(example[fc.TEACHER_TOPK_IDS][:, 0], targets)
      assert np.all(example[fc.TEACHER_TOPK_LOGPROBS][:, 0] == 0.0)
      assert np.all(example[fc.TEACHER_TOPK_LOGPROBS][:, 1:] == fc.TEACHER_PAD_LOGPROB)


def test_trimmed_targets_end_in_a_one_hot_eos_row(data_dir, codex_aligned_files):
  teacher_path, aligned_path, _ = codex_aligned_files
  _register("topk_trim", teacher_path, aligned_path)
  example = _examples("topk_trim_zs_cot", targets_length=8)[0]
  assert len(example["targets"]) == 8 and example["targets"][-1] == 1
  assert example[fc.TEACHER_TOPK_IDS].shape == (8, K)
  np.testing.assert_array_equal(example[fc.TEACHER_TOPK_IDS][-1], [1, 0, 0, 0, 0])


def test_aligned_file_from_another_vocabulary_fails_loudly(data_dir, codex_aligned_files, tmp_path):
  teacher_path, aligned_path, _ = codex_aligned_files
  lines = aligned_path.read_text(encoding="utf-8").splitlines()
  row = json.loads(lines[0])
  row["target_ids"][0] += 1  # as if tokenized by another vocabulary
  row["topk_ids"][0] = [row["target_ids"][0]]
  row["topk_logprobs"][0] = [0.0]
  bad = tmp_path / "other_vocab.jsonl"
  bad.write_text(json.dumps(row) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match="another vocabulary"):
    _register("topk_bad", teacher_path, bad)


def test_aligned_file_from_another_teacher_file_names_the_sample(data_dir, codex_aligned_files,
                                                                 tmp_path):
  teacher_path, aligned_path, records = codex_aligned_files
  row = json.loads(aligned_path.read_text(encoding="utf-8").splitlines()[0])
  row["target"] = row["target"] + " extra"
  stale = tmp_path / "stale.jsonl"
  stale.write_text(json.dumps(row) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match=f"{records[0].id} sample {row['sample_index']}.*specialize "
                                       "align"):
    _register("topk_stale", teacher_path, stale)


def test_dense_rows_keep_the_k_most_probable():
  ids, logprobs = teacher_features.dense_rows([[7, 8, 9], [4]], [[-3.0, -0.1, -1.0], [0.0]], 2)
  np.testing.assert_array_equal(ids, [[8, 9], [4, fc.TEACHER_PAD_ID]])
  np.testing.assert_allclose(logprobs, [[-0.1, -1.0], [0.0, fc.TEACHER_PAD_LOGPROB]])


def test_the_default_width_keeps_the_sampled_token_where_the_top5_misses_it(codex_aligned_files):
  """The original keeps the sampled token plus Codex's top-5 (up to six candidates); at width 5 the
  sampled token is dropped where it is outside the top-5, and the loader says where to get it back."""
  from specialize_jax.prepared import prepare  # pylint: disable=g-import-not-at-top
  _, aligned_path, _ = codex_aligned_files
  six = [(row, t) for row in aligned_data.read_aligned(aligned_path)
         for t, ids in enumerate(row.topk_ids) if len(ids) == 6]
  assert len(six) == 1  # train[0]'s 50 samples: one kept position
  row, t = six[0]
  sampled = row.topk_ids[t][0]  # the aligner lists the sampled token first
  messages = []
  wide = teacher_features.load_dense_rows(aligned_path, prepare.DEFAULT_TEACHER_K)
  narrow = teacher_features.load_dense_rows(aligned_path, 5, log=messages.append)
  key = (row.id, row.sample_index)
  assert sampled in wide[key].topk_ids[t] and sampled not in narrow[key].topk_ids[t]
  assert sorted(wide[key].topk_ids[t].tolist()) == sorted(row.topk_ids[t])
  assert any("1 positions had more than 5 candidates" in m and "--teacher_k 6" in m
             for m in messages)
