"""The prepared training set: written once (resumably, never replacing a good set with a broken
one), read in a seeded global order that visits every sample once per epoch, spreads questions,
splits over data shards without overlap, and starts anywhere in O(1)."""
import collections
import dataclasses
import os

import numpy as np
import pytest
import seqio

from specialize_jax.prepared import prepare
from specialize_jax.prepared import prepared_data
from specialize_jax.teacher import teacher_data
from specialize_jax.align import teacher_features
from specialize_jax.training import input_pipeline

NUM_QUESTIONS = 4096
SAMPLES = 3


def _records(num_questions=NUM_QUESTIONS, samples=SAMPLES):
  for i in range(num_questions):
    yield teacher_data.TeacherRecord(
        id=f"toy/train/{i}", source="toy", split="train", question=f"How many apples in box {i}?",
        gold_answer=str(i), gold_number=float(i),
        samples=tuple(teacher_data.TeacherSample(text=f"Box {i} holds {i} apples, way {j}.\nThe "
                                                      f"answer is {i}.", answer=float(i),
                                                 correct=True)
                      for j in range(samples)))


def _prepare(output, vocab_path, num_questions=NUM_QUESTIONS, aligned=None, **kwargs):
  config = prepare.PrepareConfig(output_dir=str(output), vocab_path=str(vocab_path),
                                 **{"format_names": ("zs_cot", "zs_ao"), "num_chunks": 4,
                                    "rates": {"zs_cot": 0.75, "zs_ao": 0.25}, **kwargs})
  return prepare.prepare(lambda: _records(num_questions), config, aligned=aligned,
                         sources={"teacher": "toy"})


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory):
  vocab = os.environ["SPECIALIZE_VOCAB_PATH"]
  return _prepare(tmp_path_factory.mktemp("prepared") / "toy", vocab, workers=2)


def _stream(directory, format_names, n, seed=0, shuffle=True, split="train", shard=(0, 1),
            rates=None):
  source = prepared_data.PreparedSource(directory, format_names, rates=rates)
  dataset = source.get_dataset(split, shuffle=shuffle, seed=seed,
                               shard_info=seqio.ShardInfo(*shard))
  return [(e["id"].decode(), int(e["sample_index"]), e["format"].decode())
          for e in dataset.take(n).as_numpy_iterator()]


def test_quotas_round_by_largest_remainder():
  assert prepared_data.quotas({"icl_cot": 0.79, "zs_cot": 0.2, "icl_ao": 0.005,
                               "zs_ao": 0.005}) == {"icl_cot": 790, "zs_cot": 200, "icl_ao": 5,
                                                    "zs_ao": 5}
  assert prepared_data.quotas({"a": 1, "b": 1, "c": 1}, block=10) == {"a": 4, "b": 3, "c": 3}
  assert prepared_data.quotas({"a": 1.0, "b": 0.0}) == {"a": 1000}
  with pytest.raises(ValueError, match="no format a positive rate"):
    prepared_data.quotas({"a": 0.0})


def test_the_set_holds_what_was_decided_at_prepare_time(toy_set):
  formats = toy_set.metadata["formats"]
  assert formats["zs_cot"]["num_examples"] == NUM_QUESTIONS * SAMPLES
  assert formats["zs_ao"]["num_examples"] == NUM_QUESTIONS
  assert formats["zs_cot"]["num_questions"] == NUM_QUESTIONS
  assert len(formats["zs_cot"]["files"]) == 4
  assert toy_set.metadata["rates"] == {"zs_cot": 0.75, "zs_ao": 0.25}
  questions = toy_set.questions("zs_cot")
  np.testing.assert_array_equal(questions, np.repeat(np.arange(NUM_QUESTIONS), SAMPLES))
  assert not os.path.exists(f"{toy_set.directory}.partial")


@pytest.mark.slow
def test_one_epoch_visits_every_sample_once_in_a_seeded_spread_order(toy_set):
  epoch = NUM_QUESTIONS * SAMPLES
  stream = _stream(toy_set.directory, ["zs_cot"], epoch + 64, seed=0)
  first = [(i, s) for i, s, _ in stream[:epoch]]
  assert len(set(first)) == epoch  # every (question, sample) exactly once
  assert {i for i, _ in first} == {f"toy/train/{q}" for q in range(NUM_QUESTIONS)}
  second = [(i, s) for i, s, _ in stream[epoch:]]
  assert second != first[:64] and set(second) <= set(first)  # the next epoch, reshuffled
  assert _stream(toy_set.directory, ["zs_cot"], 500, seed=0) == stream[:500]
  assert _stream(toy_set.directory, ["zs_cot"], 500, seed=1) != stream[:500]
  # Questions spread: batches of 64 hold 64 distinct questions (a uniform shuffle: about 61 %, by
  # the birthday bound).
  batches = [first[k:k + 64] for k in range(0, epoch - 63, 64)]
  distinct = np.mean([len({i for i, _ in b}) == 64 for b in batches])
  assert distinct >= 0.9, distinct
  # Not file order: the first batch spans the whole set.
  positions = sorted(int(i.rsplit("/", 1)[1]) for i, _ in first[:64])
  assert positions[0] < NUM_QUESTIONS // 4 and positions[-1] > 3 * NUM_QUESTIONS // 4


def test_without_shuffle_the_order_is_the_files():
  questions = np.repeat(np.arange(5), 2)
  order = prepared_data.ExampleOrder([10], [questions], [1], seed=0, shuffle=False)
  np.testing.assert_array_equal(order.lookup(np.arange(12))[1], list(range(10)) + [0, 1])


def test_mixture_quotas_hold_in_every_block(toy_set):
  stream = _stream(toy_set.directory, ["zs_cot", "zs_ao"], 2000, seed=3)
  for block in (stream[:1000], stream[1000:]):
    assert collections.Counter(f for _, _, f in block) == {"zs_cot": 750, "zs_ao": 250}
  assert [f for _, _, f in stream[:1000]] != [f for _, _, f in stream[1000:]]  # seeded per block
  only_cot = _stream(toy_set.directory, ["zs_cot", "zs_ao"], 300, seed=3, rates={"zs_cot": 1.0})
  assert {f for _, _, f in only_cot} == {"zs_cot"}


def test_data_shards_read_disjoint_positions_of_one_stream(toy_set):
  whole = _stream(toy_set.directory, ["zs_cot", "zs_ao"], 1200, seed=5)
  shards = [_stream(toy_set.directory, ["zs_cot", "zs_ao"], 400, seed=5, shard=(s, 3))
            for s in range(3)]
  # Shard s holds positions s, s + 3, ...: batch k of any shard count has the same examples.
  assert [shards[p % 3][p // 3] for p in range(1200)] == whole
  assert not set(shards[0]) & set(shards[1])
  # With 4 rows a batch, shard s reads rows [4s, 4s + 4) of every batch of 12, in order.
  blocks = [_stream(toy_set.directory, ["zs_cot", "zs_ao"], 400, seed=5, shard=(s, 3),
                    split=prepared_data.split_with_start("train", 0, 4)) for s in range(3)]
  assert [blocks[(p % 12) // 4][(p // 12) * 4 + p % 4] for p in range(1200)] == whole


def test_a_stream_starts_at_any_position(toy_set):
  whole = _stream(toy_set.directory, ["zs_cot", "zs_ao"], 2600, seed=2, shard=(1, 2))
  resumed = _stream(toy_set.directory, ["zs_cot", "zs_ao"], 100, seed=2, shard=(1, 2),
                    split=prepared_data.split_with_start("train", 2500))
  assert resumed == whole[2500:]
  assert _stream(toy_set.directory, ["zs_cot", "zs_ao"], 100, seed=2, shard=(1, 2),
                 split=prepared_data.split_with_start("train", 2500, 1)) == whole[2500:]
  for bad in ("train@x", "train@3:0", "test"):
    with pytest.raises(ValueError, match="'train'"):
      _stream(toy_set.directory, ["zs_cot"], 1, split=bad)


def test_a_saved_tf_data_iterator_resumes_where_it_stopped(toy_set, tmp_path):
  """T5X's save_dataset checkpoints the tf.data iterator: the reader's py_function must not stop
  that, and the restored iterator continues the stream."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  source = prepared_data.PreparedSource(toy_set.directory, ["zs_cot", "zs_ao"])
  dataset = source.get_dataset("train", shuffle=True, seed=1).map(lambda e: e["id"])
  iterator = iter(dataset)
  for _ in range(5):
    next(iterator)
  path = tf.train.Checkpoint(data=iterator).write(str(tmp_path / "data"))
  expected = [next(iterator).numpy() for _ in range(3)]
  restored = iter(dataset)
  tf.train.Checkpoint(data=restored).read(path).assert_consumed()
  assert [next(restored).numpy() for _ in range(3)] == expected


@pytest.mark.slow
def test_a_resumed_train_iterator_starts_at_its_batch_without_rereading(toy_set, vocab_path):
  from specialize_jax.tasks import distillation  # pylint: disable=g-import-not-at-top
  distillation.register_prepared_task("toy_prepared", lambda: toy_set.directory,
                                      ("zs_cot", "zs_ao"), vocabulary_path=str(vocab_path))
  config = input_pipeline.DatasetConfig("toy_prepared", {"inputs": 32, "targets": 32},
                                        batch_size=8, seed=4)
  shards = [input_pipeline.TrainIterator(config, shards=[(s, 2)]) for s in range(2)]
  for _ in range(5):
    for shard in shards:
      next(shard)
  resumed = [input_pipeline.TrainIterator(config, position=s.position(), shards=[(i, 2)])
             for i, s in enumerate(shards)]
  sixth = []
  for _ in range(3):
    for shard, again in zip(shards, resumed):
      expected, got = next(shard), next(again)
      sixth.append(expected)
      for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
  # Resumed on one data shard (another host count): global batch 6 holds the same examples.
  one = input_pipeline.TrainIterator(config, position={"batches_consumed": 5, "seed": 4},
                                     shards=[(0, 1)])
  sixth_global = next(one)
  for name, value in sixth_global.items():
    np.testing.assert_array_equal(np.concatenate([sixth[0][name], sixth[1][name]]), value)
  # Resumed on interleaved blocks, as a TPU host feeds them (`DataLayout.shards`: rows 0-1 and
  # 4-5 of every batch of 8, and rows 2-3 and 6-7): the same rows of global batch 6, in order.
  interleaved = [input_pipeline.TrainIterator(config, position={"batches_consumed": 5, "seed": 4},
                                              shards=[(i, 4), (i + 2, 4)]) for i in range(2)]
  parts = [next(it) for it in interleaved]
  for name, value in sixth_global.items():
    np.testing.assert_array_equal(parts[0][name], value[[0, 1, 4, 5]], err_msg=name)
    np.testing.assert_array_equal(parts[1][name], value[[2, 3, 6, 7]], err_msg=name)


def test_prepare_resumes_and_never_replaces_a_good_set(tmp_path, vocab_path, caplog):
  output = tmp_path / "set"
  good = _prepare(output, vocab_path, num_questions=40, aligned={}, teacher_k=5)
  before = {name: (output / name).read_bytes() for name in os.listdir(output)}
  # A stale aligned row in the last chunk: the prepare fails there, after three chunks.
  stale = {("toy/train/39", 0): teacher_features.DenseAlignedRow(
      "other text", np.zeros(2, np.int32), np.zeros((2, 5), np.int32), np.zeros((2, 5),
                                                                                np.float32))}
  config = prepare.PrepareConfig(output_dir=str(output), vocab_path=str(vocab_path),
                                 format_names=("zs_cot", "zs_ao"), num_chunks=4,
                                 rates={"zs_cot": 0.75, "zs_ao": 0.25}, teacher_k=5)
  with pytest.raises(ValueError, match="toy/train/39 sample 0.*specialize align"):
    prepare.prepare(lambda: _records(40), config, aligned=stale, sources={"teacher": "toy"})
  assert {name: (output / name).read_bytes() for name in os.listdir(output)} == before
  partial = tmp_path / "set.partial"
  assert sorted(p.name for p in partial.glob("chunk-*.done.json")) == [
      f"chunk-{i:05d}.done.json" for i in range(3)]
  with pytest.raises(ValueError, match="other settings or inputs.*exemplar_seed"):
    prepare.prepare(lambda: _records(40), dataclasses.replace(config, exemplar_seed=1),
                    aligned={}, sources={"teacher": "toy"})
  with caplog.at_level("INFO"):
    resumed = prepare.prepare(lambda: _records(40), config, aligned={}, sources={"teacher": "toy"})
  assert "Resuming: 3 of 4 chunks" in caplog.text
  after = {name: (output / name).read_bytes() for name in os.listdir(output)}
  assert sorted(after) == sorted(before)
  for name in before:
    if name != prepared_data.METADATA_FILE:
      assert after[name] == before[name], name
  assert resumed.metadata["formats"] == good.metadata["formats"]
  assert not partial.exists()


def test_held_out_questions_are_excluded_by_id_and_text_and_counted(tmp_path, vocab_path):
  config = prepare.PrepareConfig(output_dir=str(tmp_path / "set"), vocab_path=str(vocab_path),
                                 format_names=("zs_ao",), num_chunks=2, rates={"zs_ao": 1.0})
  held = prepare.HeldOut(ids=frozenset({"toy/train/1", "toy/train/7"}),
                         questions=frozenset({"How many apples in box 3?"}), full_size=10,
                         expected=2)
  prepared = prepare.prepare(lambda: _records(10), config, held)
  assert prepared.metadata["excluded"] == {"by_id": 2, "by_text": 1}
  assert prepared.num_examples("zs_ao") == 7
  assert set(prepared.questions("zs_ao")) == {0, 2, 4, 5, 6, 8, 9}
  wrong_ids = prepare.HeldOut(ids=frozenset({"toy/train/1"}), full_size=10, expected=2)
  with pytest.raises(ValueError, match="1 of the 2 held-out ones were found by id"):
    prepare.prepare(lambda: _records(10),
                    dataclasses.replace(config, output_dir=str(tmp_path / "b")), wrong_ids)


def test_a_set_that_held_out_other_questions_is_refused_before_training(tmp_path, vocab_path):
  """GSM8K dev changed meaning once (a seeded draw, then the original's validation_index.npy): a
  set prepared under another definition would train on today's dev questions."""
  config = prepare.PrepareConfig(output_dir=str(tmp_path / "set"), vocab_path=str(vocab_path),
                                 format_names=("zs_ao",), num_chunks=2, rates={"zs_ao": 1.0})
  held = prepare.HeldOut(ids=frozenset({"toy/train/1"}), name="toy dev v2")
  prepared = prepare.prepare(lambda: _records(10), config, held)
  assert prepared.metadata["held_out"] == "toy dev v2"
  prepared_data.PreparedSource(prepared.directory, ["zs_ao"], held_out="toy dev v2").get_dataset(
      "train", seed=0)
  with pytest.raises(prepared_data.PreparedDataError,
                     match=r"set .*/set held out 'toy dev v2', but training expects 'toy dev v3'"
                           r".*specialize prepare --output .*/set"):
    prepared_data.PreparedSource(prepared.directory, ["zs_ao"],
                                 held_out="toy dev v3").get_dataset("train", seed=0)
  # A set from before held-out names were recorded, which excluded questions: refused too.
  old = dict(prepared.metadata)
  old.pop("held_out")
  with pytest.raises(prepared_data.PreparedDataError, match="excluded 1 held-out questions under "
                                                            "an earlier definition"):
    prepared_data.check_held_out(prepared_data.PreparedSet(prepared.directory, old), "toy dev v2")
  # A set that held nothing out (a toy or demo set) trains anywhere.
  prepared_data.check_held_out(prepared_data.PreparedSet(
      "toy", {"held_out": None, "excluded": {"by_id": 0, "by_text": 0}}), "toy dev v2")
  # An interrupted prepare under another definition does not resume.
  (tmp_path / "b.partial").mkdir()
  prepare._check_settings(str(tmp_path / "b.partial"),  # pylint: disable=protected-access
                          {**config.settings(), "held_out": "toy dev v1"}, {})
  with pytest.raises(ValueError, match="other settings or inputs .*held_out"):
    prepare.prepare(lambda: _records(10),
                    dataclasses.replace(config, output_dir=str(tmp_path / "b")), held)


def test_a_set_that_does_not_fit_the_task_fails_before_training(toy_set, tmp_path, vocab_path):
  with pytest.raises(prepared_data.PreparedDataError, match="specialize prepare --output"):
    prepared_data.PreparedSet.open(str(tmp_path / "missing"))
  other_vocab = tmp_path / "other.model"
  other_vocab.write_bytes(b"not the vocabulary")
  with pytest.raises(prepared_data.PreparedDataError, match="tokenized with .*--vocab"):
    prepared_data.PreparedSource(toy_set.directory, ["zs_cot"],
                                 vocabulary_path=str(other_vocab)).get_dataset("train")
  with pytest.raises(prepared_data.PreparedDataError, match="has no 'icl_cot' examples"):
    prepared_data.PreparedSource(toy_set.directory, ["icl_cot"]).get_dataset("train")
  with pytest.raises(prepared_data.PreparedDataError, match="teacher rows of width None"):
    prepared_data.PreparedSource(toy_set.directory, ["zs_cot"], teacher_k=5).get_dataset("train")


def test_sample_and_distribution_tasks_read_the_same_examples(tmp_path, vocab_path):
  """One set serves both losses: the top-k task adds teacher rows to exactly the examples, in
  exactly the order, of the sample task."""
  from specialize_jax.tasks import distillation  # pylint: disable=g-import-not-at-top
  target = "Box 0 holds 0 apples, way 0.\nThe answer is 0."
  import sentencepiece  # pylint: disable=g-import-not-at-top
  ids = np.asarray(sentencepiece.SentencePieceProcessor(model_file=str(vocab_path))
                   .EncodeAsIds(target), np.int32)
  rows = np.tile(np.arange(5, dtype=np.int32), (len(ids), 1))
  rows[:, 0] = ids
  aligned = {("toy/train/0", 0): teacher_features.DenseAlignedRow(
      target, ids, rows, np.full((len(ids), 5), -1.0, np.float32))}
  directory = _prepare(tmp_path / "set", vocab_path, num_questions=50, aligned=aligned,
                       teacher_k=5).directory
  assert prepared_data.PreparedSet.open(directory).metadata["formats"]["zs_cot"][
      "with_teacher"] == 1
  distillation.register_distillation_tasks("toy_both", directory)
  distillation.register_distillation_tasks("toy_both_top5", directory, teacher_k=5)
  lengths = {"inputs": 64, "targets": 64}
  sample, distribution = (
      list(seqio.get_mixture_or_task(name).get_dataset(lengths, split="train", seed=7)
           .take(400).as_numpy_iterator()) for name in ("toy_both", "toy_both_top5"))
  assert [e["id"] for e in sample] == [e["id"] for e in distribution]
  for a, b in zip(sample, distribution):
    for name in ("inputs", "targets"):
      np.testing.assert_array_equal(a[name], b[name])
    assert "teacher_topk_ids" not in a and b["teacher_topk_ids"].shape == (len(b["targets"]), 5)
  with_rows = [b for b in distribution if b["id"] == b"toy/train/0" and b["sample_index"] == 0]
  assert with_rows and np.all(with_rows[0]["teacher_topk_logprobs"][:-1] == -1.0)
