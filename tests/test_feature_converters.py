"""TeacherEncDecFeatureConverter: SeqIO parity, teacher alignment under packing, errors."""
import functools
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import seqio
import tensorflow as tf

from specialize_jax.data import feature_converters as fc

K = 3
LENGTHS = {"inputs": 12, "targets": 10}
TOKEN_FEATURES = ("encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens",
                  "decoder_loss_weights")
PACKING_FEATURES = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids",
                    "decoder_positions")

Example = Dict[str, np.ndarray]


def make_examples(num: int, seed: int, max_inputs: int, max_targets: int,
                  with_teacher: bool = True) -> List[Example]:
  """Random examples of varied lengths; teacher values are unique per (example, position, slot).

  Slot 0 of every teacher row is the target token (so `ids[..., 0] == targets` checks alignment);
  every third example has no teacher distribution and carries one-hot rows instead.
  """
  rng = np.random.default_rng(seed)
  examples = []
  for e in range(num):
    n_inputs = int(rng.integers(1, max_inputs + 1))
    n_targets = int(rng.integers(1, max_targets + 1))
    example = {"inputs": rng.integers(2, 100, n_inputs).astype(np.int32),
               "targets": np.append(rng.integers(2, 100, n_targets - 1), 1).astype(np.int32)}
    if with_teacher:
      if e % 3 == 2:
        example.update({name: value.numpy() for name, value in
                        fc.one_hot_teacher_features(example["targets"], K).items()})
      else:
        t, j = np.meshgrid(np.arange(n_targets), np.arange(K), indexing="ij")  # [n, k]
        ids = 1000 * (e + 1) + 10 * t + j
        ids[:, 0] = example["targets"]
        example[fc.TEACHER_TOPK_IDS] = ids.astype(np.int32)
        example[fc.TEACHER_TOPK_LOGPROBS] = -(e + 0.01 * t + 0.001 * j + 0.5).astype(np.float32)
    examples.append(example)
  return examples


def to_dataset(examples: Sequence[Example], k: Optional[int] = K,
               drop: Sequence[str] = ()) -> tf.data.Dataset:
  signature = {"inputs": tf.TensorSpec([None], tf.int32),
               "targets": tf.TensorSpec([None], tf.int32)}
  if fc.TEACHER_TOPK_IDS in examples[0]:
    signature[fc.TEACHER_TOPK_IDS] = tf.TensorSpec([None, k], tf.int32)
    signature[fc.TEACHER_TOPK_LOGPROBS] = tf.TensorSpec([None, k], tf.float32)
  for name in drop:
    del signature[name]
  rows = [{name: ex[name] for name in signature} for ex in examples]
  return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=signature)


def strip_teacher(examples: Sequence[Example]) -> List[Example]:
  return [{"inputs": ex["inputs"], "targets": ex["targets"]} for ex in examples]


def convert(converter: seqio.FeatureConverter, examples: Sequence[Example],
            lengths: Optional[Dict[str, int]] = None) -> List[Example]:
  return list(converter(to_dataset(examples), lengths or LENGTHS).as_numpy_iterator())


def assert_rows_equal(actual: Sequence[Example], expected: Sequence[Example]) -> None:
  """Every feature of `expected` is in `actual` with equal values, row by row."""
  assert len(actual) == len(expected)
  for a, b in zip(actual, expected):
    assert set(b) <= set(a)
    for name in b:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def packed_segments(rows: Sequence[Example]):
  """Yields (row, columns, positions) per packed target segment, in example order."""
  for row in rows:
    segment_ids = row["decoder_segment_ids"]
    for segment in sorted(set(segment_ids.tolist()) - {0}):
      columns = np.flatnonzero(segment_ids == segment)
      yield row, columns, row["decoder_positions"][columns]


# Twenty examples span two packing windows (max(12, 10) = 12 examples each).
EXAMPLES = make_examples(20, seed=0, max_inputs=LENGTHS["inputs"],
                         max_targets=LENGTHS["targets"])
# Lengths up to twice the feature lengths, converted with apply_length_check=False (trimmed).
LONG_EXAMPLES = make_examples(16, seed=1, max_inputs=2 * LENGTHS["inputs"],
                              max_targets=2 * LENGTHS["targets"])
EXAMPLE_SETS = {"fit": EXAMPLES, "trimmed": LONG_EXAMPLES}


@functools.lru_cache(maxsize=None)
def seqio_rows(pack: bool, examples: str) -> List[Example]:
  """SeqIO's own conversion of an example set without its teacher features (computed once)."""
  return convert(seqio.EncDecFeatureConverter(pack=pack, apply_length_check=False),
                 strip_teacher(EXAMPLE_SETS[examples]))


@functools.lru_cache(maxsize=None)
def teacher_dataset(pack: bool, examples: str) -> tf.data.Dataset:
  """Our conversion of an example set with teacher features (built once)."""
  converter = fc.TeacherEncDecFeatureConverter(pack=pack, apply_length_check=False)
  return converter(to_dataset(EXAMPLE_SETS[examples]), LENGTHS)


@functools.lru_cache(maxsize=None)
def teacher_rows(pack: bool, examples: str) -> List[Example]:
  return list(teacher_dataset(pack, examples).as_numpy_iterator())


@pytest.mark.parametrize("pack", [False, True])
def test_without_teacher_features_equals_seqio(pack):
  examples = strip_teacher(EXAMPLES)
  expected = seqio_rows(pack, "fit")
  converter = fc.TeacherEncDecFeatureConverter(pack=pack)
  actual_ds = converter(to_dataset(examples), LENGTHS)
  assert set(actual_ds.element_spec) == set(expected[0])
  assert_rows_equal(list(actual_ds.as_numpy_iterator()), expected)
  assert len(expected) < len(examples) if pack else len(expected) == len(examples)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("examples", ["fit", "trimmed"])
def test_token_features_with_teacher_equal_seqio(pack, examples):
  """Carrying teacher features changes neither which examples share a row nor any token."""
  assert_rows_equal(teacher_rows(pack, examples), seqio_rows(pack, examples))


def test_packed_and_unpacked_teacher_values_identical_per_token():
  unpacked, packed = teacher_rows(False, "fit"), teacher_rows(True, "fit")
  segments = list(packed_segments(packed))
  assert len(segments) == len(EXAMPLES) == len(unpacked)
  for (row, columns, positions), single in zip(segments, unpacked):
    np.testing.assert_array_equal(positions, np.arange(len(columns)))
    assert len(columns) == single["decoder_loss_weights"].sum()
    for name in ("decoder_target_tokens",) + fc.TEACHER_FEATURES:
      np.testing.assert_array_equal(row[name][columns], single[name][positions], err_msg=name)
  # Unpacked rows hold the task's values, then one-hot rows on the pad token.
  for example, single in zip(EXAMPLES, unpacked):
    n = len(example["targets"])
    for name in fc.TEACHER_FEATURES:
      np.testing.assert_array_equal(single[name][:n], example[name], err_msg=name)


@pytest.mark.parametrize("pack", [False, True])
def test_padding_positions_hold_one_hot_rows_on_pad(pack):
  rows = teacher_rows(pack, "fit")
  assert any((row["decoder_loss_weights"] == 0).any() for row in rows)
  for row in rows:
    padding = row["decoder_loss_weights"] == 0
    np.testing.assert_array_equal(row[fc.TEACHER_TOPK_IDS][padding], 0)
    logprobs = row[fc.TEACHER_TOPK_LOGPROBS][padding]
    np.testing.assert_array_equal(logprobs[:, 0], 0.0)
    np.testing.assert_array_equal(logprobs[:, 1:], fc.TEACHER_PAD_LOGPROB)
    # Slot 0 is the target everywhere, padding included: the alignment invariant of EXAMPLES.
    np.testing.assert_array_equal(row[fc.TEACHER_TOPK_IDS][:, 0], row["decoder_target_tokens"])


@pytest.mark.parametrize("pack", [False, True])
def test_truncation_keeps_teacher_aligned(pack):
  rows = teacher_rows(pack, "trimmed")
  assert any(len(ex["targets"]) > LENGTHS["targets"] for ex in LONG_EXAMPLES)
  if pack:
    pieces = [(row, columns, positions) for row, columns, positions in packed_segments(rows)]
  else:
    pieces = [(row, np.flatnonzero(row["decoder_loss_weights"]),
               np.flatnonzero(row["decoder_loss_weights"])) for row in rows]
  assert len(pieces) == len(LONG_EXAMPLES)
  for (row, columns, positions), example in zip(pieces, LONG_EXAMPLES):
    kept = min(len(example["targets"]), LENGTHS["targets"])
    np.testing.assert_array_equal(positions, np.arange(kept))
    np.testing.assert_array_equal(row["decoder_target_tokens"][columns], example["targets"][:kept])
    for name in fc.TEACHER_FEATURES:
      np.testing.assert_array_equal(row[name][columns], example[name][:kept], err_msg=name)


def test_task_trimmed_targets_with_longer_teacher_features_are_cut_to_match():
  """A SeqIO Task trims `targets` to the targets length but not the teacher features."""
  example = make_examples(1, seed=2, max_inputs=4, max_targets=1)[0]
  long = make_examples(1, seed=3, max_inputs=4, max_targets=1)[0]
  targets = np.arange(2, 2 + LENGTHS["targets"] + 4, dtype=np.int32)
  long.update(fc.one_hot_teacher_features(targets, K))
  long = {name: np.asarray(value) for name, value in long.items()}
  long["targets"] = targets[:LENGTHS["targets"]]
  _, row = convert(fc.TeacherEncDecFeatureConverter(pack=False), [example, long])
  np.testing.assert_array_equal(row[fc.TEACHER_TOPK_IDS][:, 0], long["targets"])
  np.testing.assert_array_equal(row[fc.TEACHER_TOPK_IDS][:, 1:], 0)


def test_decoder_inputs_are_bos_shifted_per_segment():
  """SeqIO's documented packing example, with teacher features riding along."""
  examples = [{"inputs": np.array(i, np.int32), "targets": np.array(t, np.int32)}
              for i, t in (([7, 8, 5, 1], [3, 9, 1]), ([8, 4, 9, 3, 1], [4, 1]))]
  for example in examples:
    example.update({n: v.numpy() for n, v in
                    fc.one_hot_teacher_features(example["targets"], K).items()})
  row, = convert(fc.TeacherEncDecFeatureConverter(pack=True), examples,
                 {"inputs": 10, "targets": 7})
  expected = {
      "encoder_input_tokens": [7, 8, 5, 1, 8, 4, 9, 3, 1, 0],
      "encoder_segment_ids": [1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
      "encoder_positions": [0, 1, 2, 3, 0, 1, 2, 3, 4, 0],
      "decoder_target_tokens": [3, 9, 1, 4, 1, 0, 0],
      "decoder_input_tokens": [0, 3, 9, 0, 4, 0, 0],
      "decoder_loss_weights": [1, 1, 1, 1, 1, 0, 0],
      "decoder_segment_ids": [1, 1, 1, 2, 2, 0, 0],
      "decoder_positions": [0, 1, 2, 0, 1, 0, 0],
  }
  assert_rows_equal([row], [expected])
  np.testing.assert_array_equal(row[fc.TEACHER_TOPK_IDS][:, 0], expected["decoder_target_tokens"])


def test_empty_inputs_keep_encoder_and_decoder_segment_ids_matched():
  """Deliberate departure from SeqIO, which numbers each feature's segments separately.

  An example with no tokens at all takes no segment id, as in SeqIO.
  """
  examples = [{"inputs": np.array(i, np.int32), "targets": np.array(t, np.int32)}
              for i, t in (([], [5, 1]), ([], []), ([7, 1], [6, 1]))]
  for example in examples:
    example.update({n: v.numpy() for n, v in
                    fc.one_hot_teacher_features(example["targets"], K).items()})
  row, = convert(fc.TeacherEncDecFeatureConverter(pack=True), examples)
  np.testing.assert_array_equal(row["encoder_segment_ids"][:3], [2, 2, 0])
  np.testing.assert_array_equal(row["decoder_segment_ids"][:5], [1, 1, 2, 2, 0])


@pytest.mark.parametrize("pack", [False, True])
def test_dtypes_and_shapes(pack):
  spec = teacher_dataset(pack, "fit").batch(4, drop_remainder=True).element_spec
  expected_names = set(TOKEN_FEATURES) | set(fc.TEACHER_FEATURES)
  if pack:
    expected_names |= set(PACKING_FEATURES)
  assert set(spec) == expected_names
  for name in expected_names - set(fc.TEACHER_FEATURES):
    length = LENGTHS["inputs"] if name.startswith("encoder") else LENGTHS["targets"]
    assert spec[name] == tf.TensorSpec([4, length], tf.int32), name
  assert spec[fc.TEACHER_TOPK_IDS] == tf.TensorSpec([4, LENGTHS["targets"], K], tf.int32)
  assert spec[fc.TEACHER_TOPK_LOGPROBS] == tf.TensorSpec([4, LENGTHS["targets"], K], tf.float32)


def test_get_model_feature_lengths():
  packed = fc.TeacherEncDecFeatureConverter(pack=True)
  assert packed.get_model_feature_lengths(LENGTHS) == seqio.EncDecFeatureConverter(
      pack=True).get_model_feature_lengths(LENGTHS)
  lengths = fc.TeacherEncDecFeatureConverter(pack=False, teacher_k=K).get_model_feature_lengths(
      LENGTHS)
  assert lengths == {"encoder_input_tokens": 12, "decoder_target_tokens": 10,
                     "decoder_input_tokens": 10, "decoder_loss_weights": 10,
                     fc.TEACHER_TOPK_IDS: 10, fc.TEACHER_TOPK_LOGPROBS: 10}


def test_teacher_lengths_in_task_feature_lengths_must_be_the_targets_length():
  converter = fc.TeacherEncDecFeatureConverter(pack=True)
  ds = converter(to_dataset(EXAMPLES[:2]), {**LENGTHS, fc.TEACHER_TOPK_IDS: 10,
                                            fc.TEACHER_TOPK_LOGPROBS: 10})
  assert ds.element_spec[fc.TEACHER_TOPK_IDS].shape == [10, K]
  with pytest.raises(ValueError, match="teacher features always take the targets length"):
    converter(to_dataset(EXAMPLES[:2]), {**LENGTHS, fc.TEACHER_TOPK_IDS: 7})


def test_one_hot_teacher_features():
  one_hot = fc.one_hot_teacher_features(tf.constant([5, 1]), 3)
  np.testing.assert_array_equal(one_hot[fc.TEACHER_TOPK_IDS], [[5, 0, 0], [1, 0, 0]])
  pad = fc.TEACHER_PAD_LOGPROB
  np.testing.assert_array_equal(one_hot[fc.TEACHER_TOPK_LOGPROBS], [[0, pad, pad], [0, pad, pad]])
  assert one_hot[fc.TEACHER_TOPK_LOGPROBS].dtype == tf.float32
  with pytest.raises(ValueError, match="at least 1"):
    fc.one_hot_teacher_features(tf.constant([5]), 0)


def _with_spec(name: str, spec: tf.TensorSpec) -> tf.data.Dataset:
  """EXAMPLES[:2] with one teacher feature replaced by a zero tensor of the given spec."""
  shape = [3 if dim is None else dim for dim in spec.shape]
  return to_dataset(EXAMPLES[:2]).map(lambda ex: {**ex, name: tf.zeros(shape, spec.dtype)})


@pytest.mark.parametrize("ds_fn, converter_kwargs, message", [
    (lambda: _with_spec(fc.TEACHER_TOPK_IDS, tf.TensorSpec([None], tf.int32)), {},
     r"teacher_topk_ids has shape \(3,\) \(rank 1\); expected rank 2"),
    (lambda: _with_spec(fc.TEACHER_TOPK_LOGPROBS, tf.TensorSpec([None, K, 2], tf.float32)), {},
     "teacher_topk_logprobs .* expected rank 2"),
    (lambda: _with_spec(fc.TEACHER_TOPK_LOGPROBS, tf.TensorSpec([None, K + 1], tf.float32)), {},
     "k mismatch: teacher_topk_ids has k=3 but teacher_topk_logprobs has k=4"),
    (lambda: to_dataset(EXAMPLES[:2]), {"teacher_k": K + 2},
     "k mismatch: .* k=3 but the converter has teacher_k=5"),
    (lambda: _with_spec(fc.TEACHER_TOPK_IDS, tf.TensorSpec([None, K], tf.int64)), {},
     "teacher_topk_ids has dtype int64; expected int32"),
    (lambda: to_dataset(EXAMPLES[:2], k=None), {}, "top-k width is not static"),
    (lambda: to_dataset(EXAMPLES[:2], drop=[fc.TEACHER_TOPK_LOGPROBS]), {},
     "has teacher_topk_ids but not teacher_topk_logprobs"),
    (lambda: to_dataset(strip_teacher(EXAMPLES[:2])), {"teacher_k": K},
     "no teacher_topk_ids / teacher_topk_logprobs but teacher_k=3 requires them"),
    (lambda: to_dataset(EXAMPLES[:2]), {"use_custom_packing_ops": True},
     "use_custom_packing_ops=True cannot pack teacher features"),
])
def test_malformed_teacher_features_raise(ds_fn, converter_kwargs, message):
  converter = fc.TeacherEncDecFeatureConverter(pack=True, **converter_kwargs)
  with pytest.raises(ValueError, match=message):
    converter(ds_fn(), LENGTHS)


def test_teacher_rows_not_matching_targets_raise_when_read():
  """The check runs before the packed/unpacked split, so the packed path covers both."""
  example = dict(EXAMPLES[0])
  example[fc.TEACHER_TOPK_IDS] = example[fc.TEACHER_TOPK_IDS][:-1]
  example[fc.TEACHER_TOPK_LOGPROBS] = example[fc.TEACHER_TOPK_LOGPROBS][:-1]
  ds = fc.TeacherEncDecFeatureConverter(pack=True)(to_dataset([example]), LENGTHS)
  with pytest.raises(tf.errors.InvalidArgumentError, match="one row per target token"):
    list(ds.as_numpy_iterator())


def test_invalid_teacher_k_raises():
  with pytest.raises(ValueError, match="teacher_k=0"):
    fc.TeacherEncDecFeatureConverter(teacher_k=0)
