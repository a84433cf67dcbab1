"""Cross-tokenizer alignment: DTW, the paper and default mapping rules, the aligned file, the CLI."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from specialize_jax import cli
from specialize_jax.align import aligned_data
from specialize_jax.align import alignment
from specialize_jax.teacher import teacher_data
from specialize_jax.teacher import teacher_sources
from tests.support import shared_data


CODEX_DIR = "teacher_outputs/fu2023_codex_notebook"


@pytest.fixture(scope="module")
def codex_records():
  return teacher_sources.records_from_fu2023_codex(
      shared_data.shared_file(f"{CODEX_DIR}/codex_gsm8k_train0_50samples_top5.json"))


@pytest.fixture(scope="module")
def spm_path():
  return str(shared_data.shared_file("tokenizer/t5_spiece.model"))


# ----------------------------------------------------------------------------- DTW

def test_dtw_one_to_one_and_merged():
  # Teacher " $" "12" merge into the piece "▁$12"; "/" "2" into "/2".
  aligned = alignment.dtw_align([" $", "12", "/", "2"], ["\u2581$12", "/2"])
  assert aligned == [[0, 1], [2, 3]]
  aligned = alignment.dtw_align([" earns"], ["\u2581earn", "s"])
  assert aligned == [[0], [0]]


def test_dtw_ties_prefer_diagonal_then_up_then_left():
  # All costs equal (disjoint single chars): the diagonal is taken whenever available.
  assert alignment.dtw_align(["a", "b"], ["x", "y"]) == [[0], [1]]
  # 3 teacher tokens, 2 pieces, all costs 1: from (2,1) diag -> (1,0), then up -> (0,0).
  assert alignment.dtw_align(["a", "b", "c"], ["x", "y"]) == [[0, 1], [2]]
  # 2 teacher tokens, 3 pieces: from (1,2) diag -> (0,1), then left -> (0,0).
  assert alignment.dtw_align(["a", "b"], ["x", "y", "z"]) == [[0], [0], [1]]


def test_dtw_empty_strings_and_sequences():
  assert alignment.dtw_align([], ["\u2581a"]) == [[]]
  assert alignment.dtw_align(["a"], []) == []
  # A newline token (empty core) costs len(piece core) everywhere; ties send it up (to "x").
  assert alignment.dtw_align(["x", "\n", "y"], ["x", "\u2581y"]) == [[0, 1], [2]]


def test_vectorized_dtw_equals_reference_on_real_samples(codex_records, spm_path):
  aligner = alignment.Aligner(spm_path)
  for sample in codex_records[0].samples[:8]:
    start, end = alignment.target_span(sample.text)
    teacher = [sample.tokens[j] for j in aligner._teacher_positions(sample, start, end)]
    pieces = [aligner._pieces[i] for i in aligner.encode(sample.text[start:end])]
    for mode in alignment.MODES:
      assert alignment.dtw_align(teacher, pieces, mode) == alignment.reference_dtw(
          teacher, pieces, mode)


def test_edit_distances_match_python():
  rng = np.random.default_rng(0)
  a = ["".join(rng.choice(list("ab\u2581c"), rng.integers(0, 9))) for _ in range(300)]
  b = ["".join(rng.choice(list("abc"), rng.integers(0, 14))) for _ in range(300)]

  lev = alignment.reference_edit_distance
  assert [lev("kitten", "sitting"), lev("", "ab"), lev("ab", ""), lev("flaw", "lawn")] == [3, 2, 2, 2]
  assert alignment.edit_distances(a, b).tolist() == [lev(x, y) for x, y in zip(a, b)]
  assert alignment.edit_distances(["kitten", ""], ["sitting", "abc"]).tolist() == [3, 3]


# ----------------------------------------------------------------------------- target, offsets

def test_target_span_drops_trigger_tail_and_cuts_after_answer_line():
  text = " step\nIf she has 5.\nThe answer is 5.\n\nQuestion: next"
  start, end = alignment.target_span(text)
  assert text[start:end] == "If she has 5.\nThe answer is 5."
  assert alignment.student_target("No answer here") is None
  assert alignment.student_target("  A step\nThe answer is 3\n") == "A step\nThe answer is 3"


def test_token_offsets_resync_after_byte_fragments():
  text = "It\u2019s 5"
  tokens = ["It", "\ufffd", "\ufffd", "s", " 5"]  # Byte-level BPE split the apostrophe.
  assert alignment.token_offsets(text, tokens) == [(0, 2), (2, 3), (2, 3), (3, 4), (4, 6)]


def _sample(tokens, top, text=None):
  text = "".join(tokens) if text is None else text
  logprobs = tuple(dict(pos).get(tok, -1.0) for tok, pos in zip(tokens, top))
  return teacher_data.TeacherSample(
      text=text, answer=5.0, correct=True, tokens=tuple(tokens), logprobs=logprobs,
      top_logprobs=tuple(tuple(pos) for pos in top))


def _record(samples):
  return teacher_data.TeacherRecord(id="t/train/0", source="t", split="train", question="q",
                                    gold_answer="5", gold_number=5.0, samples=tuple(samples))


def _rows_as_pieces(aligner, row):
  return [[(aligner._pieces[i], round(math.exp(lp), 4)) for i, lp in zip(ids, lps)]
          for ids, lps in zip(row.topk_ids, row.topk_logprobs)]


def test_space_marker_and_line_initial_rules(spm_path):
  tokens = ["If", " she", " has", " 5", " now", ".", "\n", "The", " answer", " is", " 5"]
  top = [[("If", math.log(0.5)), (" If", math.log(0.1)), ("So", math.log(0.2))],
         [(" she", -0.1)], [(" has", -0.1)],
         [(" 5", math.log(0.6)), ("5", math.log(0.3)), (" 6", math.log(0.05))],
         [(" now", -0.1)], [(".", -0.1)], [("\n", -0.1)],
         [("The", math.log(0.7)), ("So", math.log(0.1))],
         [(" answer", -0.1)], [(" is", -0.1)], [(" 5", -0.1)]]
  records = [_record([_sample(tokens, top)])]
  default = alignment.Aligner(spm_path, "default")
  paper = alignment.Aligner(spm_path, "paper")
  row_default = default.align_records(records)[0]
  row_paper = paper.align_records(records)[0]
  assert row_default.target == "If she has 5 now.\nThe answer is 5"
  assert [default._pieces[i] for i in row_default.target_ids][:7] == [
      "\u2581If", "\u2581she", "\u2581has", "\u25815", "\u2581now", ".", "\u2581The"]
  pieces = _rows_as_pieces(default, row_default)
  # Line-initial "If" (target start) and "The" (after "\n") keep their distributions; " If" and
  # "If" are one student event ("▁If"), so their probabilities add up.
  assert pieces[0] == [("\u2581If", 0.6), ("\u2581So", 0.2)]
  assert pieces[6] == [("\u2581The", 0.7), ("\u2581So", 0.1)]
  # " 5" -> "▁5", "5" -> "5", " 6" -> "▁6".
  assert pieces[3] == [("\u25815", 0.6), ("5", 0.3), ("\u25816", 0.05)]
  paper_pieces = _rows_as_pieces(paper, row_paper)
  assert paper_pieces[0] == [("\u2581If", 1.0)] and paper_pieces[6] == [("\u2581The", 1.0)]
  # Paper mode also loses "." (aligned to "." and "\n"); default ignores the whitespace token.
  assert row_default.kept == len(row_default.target_ids) == row_paper.kept + 3


def test_merged_tokens_use_the_chain_rule(spm_path):
  tokens = ["She", " sold", " 48", "/", "2", " =", " 24", ".", "\n", "The", " answer", " is", " 24"]
  top = [[(t, -0.01)] for t in tokens]
  top[3] = [("/", math.log(0.8)), (" *", math.log(0.15))]
  top[4] = [("2", math.log(0.5)), ("3", math.log(0.4))]
  aligner = alignment.Aligner(spm_path, "default")
  row = aligner.align_records([_record([_sample(tokens, top)])])[0]
  pieces = _rows_as_pieces(aligner, row)
  at = [aligner._pieces[i] for i in row.target_ids].index("/2")
  assert aligner.align_records([_record([_sample(tokens, top)])])[0].kept == len(row.target_ids)
  # "/2" gets p("/") * p("2" | "/"); the first token's alternative " *" is its own piece "▁*".
  assert pieces[at] == [("/2", 0.4), ("\u2581*", 0.15)]
  paper = alignment.Aligner(spm_path, "paper")
  assert _rows_as_pieces(paper, paper.align_records([_record([_sample(tokens, top)])])[0])[at] == [
      ("/2", 1.0)]


def test_byte_fragments_do_not_crash_and_stay_one_hot(spm_path):
  tokens = ["It", "\ufffd", "\ufffd", "s", " 5", ".", "\n", "The", " answer", " is", " 5"]
  text = "It\u2019s 5.\nThe answer is 5"
  sample = _sample(tokens, [[(t, -0.01)] for t in tokens], text=text)
  aligner = alignment.Aligner(spm_path, "default")
  row = aligner.align_records([_record([sample])])[0]
  assert row.target == text
  assert len(row.topk_ids) == len(row.target_ids)
  assert 0 < row.kept < len(row.target_ids)


# ----------------------------------------------------------------------------- real samples

def test_paper_mode_reproduces_the_originals_output(codex_records, spm_path):
  """train[0] sample 0: the original notebook's printed ``per_step_probs`` (T5 piece, probability
  to 4 decimals; a one-hot step is ``[[piece, 1.0]]``). We store ids and natural logs of the same
  4-decimal probabilities, and a one-hot row as ``[id]`` / ``[0.0]``: exp and round to compare."""
  with open(shared_data.shared_file(f"{CODEX_DIR}/processed_data_format_examples.json"),
            encoding="utf-8") as f:
    golden = json.load(f)["dtw_transformed_per_step_probs_train0_sample0"]
  aligner = alignment.Aligner(spm_path, "paper")
  row = aligner.align_records(codex_records)[0]
  assert (row.id, row.sample_index) == ("gsm8k/train/0", 0)
  assert row.target == golden["codex_text"]
  expected = [[(piece, prob) for piece, prob in step] for step in golden["per_step_probs"]]
  assert _rows_as_pieces(aligner, row) == expected
  assert row.kept == sum(step != [(step[0][0], 1.0)] for step in expected) == 34


def test_default_mode_keeps_more_positions_on_real_samples(codex_records, spm_path):
  shares = {}
  for mode in alignment.MODES:
    stats = alignment.AlignStats()
    rows = alignment.Aligner(spm_path, mode).align_records(codex_records, stats)
    assert stats.written == len(rows) == 50 and stats.positions == 2193
    shares[mode] = stats.kept_positions / stats.positions
    for row in rows:
      assert all(math.isfinite(x) and x <= 0 for r in row.topk_logprobs for x in r)
      assert all(r[0] == t or len(r) > 1 or row.kept for r, t in zip(row.topk_ids, row.target_ids))
  assert shares["paper"] == pytest.approx(1792 / 2193)  # 81.7 %
  assert shares["default"] == pytest.approx(2179 / 2193)  # 99.4 %
  assert shares["default"] > shares["paper"]


def test_skips_incorrect_and_answerless_samples(spm_path):
  good = _sample([" The", " answer", " is", " 5"], [[(" The", -0.1)]] * 4)
  wrong = teacher_data.TeacherSample(text="The answer is 6", answer=6.0, correct=False)
  answerless = teacher_data.TeacherSample(text="I give up", answer=None, correct=True)
  gold_only = teacher_data.TeacherSample(text="5 apples.\nThe answer is 5", answer=5.0,
                                         correct=True)
  stats = alignment.AlignStats()
  rows = alignment.Aligner(spm_path).align_records(
      [_record([good, wrong, answerless, gold_only])], stats)
  assert [r.sample_index for r in rows] == [0, 3]
  assert stats.skipped == {"incorrect": 1, "no_answer_line": 1}
  assert stats.without_top_logprobs == 1 and rows[1].kept == 0
  assert rows[1].topk_ids == tuple((t,) for t in rows[1].target_ids)


# ----------------------------------------------------------------------------- files, CLI

def test_write_read_round_trip(tmp_path, codex_records, spm_path):
  rows = alignment.Aligner(spm_path).align_records(codex_records[:1])[:3]
  path = tmp_path / "aligned.jsonl"
  assert aligned_data.write_aligned(path, rows) == 3
  assert aligned_data.read_aligned(path) == rows
  first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
  assert first["schema"] == aligned_data.SCHEMA
  assert set(first) == {"schema", "id", "sample_index", "question", "gold_answer", "target",
                        "target_ids", "topk_ids", "topk_logprobs", "kept", "meta"}


def test_bad_aligned_file_names_file_line_and_field(tmp_path, codex_records, spm_path):
  rows = alignment.Aligner(spm_path).align_records(codex_records[:1])[:2]
  path = tmp_path / "aligned.jsonl"
  aligned_data.write_aligned(path, rows)
  lines = path.read_text(encoding="utf-8").splitlines()
  bad = json.loads(lines[1])
  bad["topk_logprobs"][4] = [0.5]
  path.write_text(lines[0] + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
  with pytest.raises(aligned_data.AlignedDataError, match=r"aligned\.jsonl:2: topk_logprobs\[4\]"):
    aligned_data.read_aligned(path)
  del bad["kept"]
  path.write_text(json.dumps(bad) + "\n", encoding="utf-8")
  with pytest.raises(aligned_data.AlignedDataError, match=r"aligned\.jsonl:1: kept: missing"):
    aligned_data.read_aligned(path)


def test_cli_align_writes_file_and_prints_summary(tmp_path, capsys, codex_records, spm_path):
  teacher_path = tmp_path / "teacher.jsonl"
  teacher_data.write_records(teacher_path, codex_records)
  out = tmp_path / "aligned.jsonl"
  shares = {}
  for mode in ("paper", "default"):
    code = cli.main(["align", "--input", str(teacher_path), "--output", str(out),
                     "--vocab", spm_path, "--mode", mode, "--workers", "1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == mode and summary["written"] == 50 and summary["samples"] == 50
    assert summary["skipped"] == {"incorrect": 0, "no_answer_line": 0}
    shares[mode] = summary["share_kept"]
    assert len(aligned_data.read_aligned(out)) == 50
  assert shares == {"paper": round(1792 / 2193, 6), "default": round(2179 / 2193, 6)}
  code = cli.main(["align", "--input", str(tmp_path / "missing.jsonl"), "--output", str(out),
                   "--vocab", spm_path])
  assert code == 2 and "does not exist" in capsys.readouterr().err


_FORKED_WORKERS = """
import sys
from specialize_jax.align import alignment
from specialize_jax.teacher import teacher_sources
assert "jax" not in sys.modules
records = tuple(teacher_sources.records_from_fu2023_codex(sys.argv[1]) * 2)
one, _ = alignment.align_records(records, sys.argv[2], workers=1, records_per_chunk=1)
two, stats = alignment.align_records(records, sys.argv[2], workers=2, records_per_chunk=1)
assert one == two and stats.written == 100, (len(one), len(two), stats.written)
print("ok")
"""


def test_two_forked_workers_give_the_same_lines(spm_path):
  # Forking is only safe without JAX's threads, so this runs in a fresh interpreter.
  codex = shared_data.shared_file(f"{CODEX_DIR}/codex_gsm8k_train0_50samples_top5.json")
  done = subprocess.run([sys.executable, "-c", _FORKED_WORKERS, str(codex), spm_path],
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_two_spawned_workers_give_the_same_lines(codex_records, spm_path, monkeypatch):
  # With JAX loaded (e.g. called from a training process) workers are spawned, not forked.
  monkeypatch.setitem(sys.modules, "jax", sys.modules.get("jax", object()))
  records = tuple(codex_records * 2)  # read_records gives a tuple
  one, _ = alignment.align_records(records, spm_path, workers=1, records_per_chunk=1)
  two, stats = alignment.align_records(records, spm_path, workers=2, records_per_chunk=1)
  assert one == two and stats.written == 100
