"""How fast `specialize align` is: samples/s on realistic code-davinci-002 samples, extrapolated to
the paper's 207,135 chains (the original needed 58 minutes), and the ratio to a straightforward
pure-Python DTW (the original's loops) run in the same process on a subset.

  python tools/bench_align.py [--num_samples 10000] [--workers 2] [--mode default]
      [--reference_samples 100] [--data_dir DIR]

Samples are the real Codex samples (train[0] x 50, train[1], train[32]) cycled, each copy with its
digits permuted (text, tokens and candidates alike) so numbers, and therefore SentencePiece pieces
and edit-distance pairs, vary the way they do across GSM8K; copies are grouped 40 per question as in
the real data. Reading/validating the teacher file is not timed (see `read_seconds` of the CLI).
Run it on an otherwise idle machine; it prints one JSON line.
"""
import argparse
import json
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from specialize_jax.align import alignment  # noqa: E402
from specialize_jax.data import data_dir  # noqa: E402
from specialize_jax.teacher import teacher_data  # noqa: E402
from specialize_jax.teacher import teacher_sources  # noqa: E402

PAPER_SAMPLES = 207_135
PAPER_MINUTES = 58.0
SAMPLES_PER_QUESTION = 40


def _permuted(sample: teacher_data.TeacherSample, table) -> teacher_data.TeacherSample:
  tr = lambda s: s.translate(table)
  return teacher_data.TeacherSample(
      text=tr(sample.text), answer=sample.answer, correct=True,
      tokens=tuple(tr(t) for t in sample.tokens), logprobs=sample.logprobs,
      top_logprobs=tuple(tuple((tr(t), lp) for t, lp in pos) for pos in sample.top_logprobs),
      offsets=sample.offsets)


def build_records(data_root: pathlib.Path, num_samples: int, seed: int = 0):
  base = []
  folder = data_root / "teacher_outputs" / "fu2023_codex_notebook"
  for name in ("codex_gsm8k_train0_50samples_top5.json", "codex_gsm8k_train_extra_samples_top5.json"):
    for record in teacher_sources.records_from_fu2023_codex(folder / name):
      base.extend((record, s) for s in record.samples if alignment.target_span(s.text))
  rng = random.Random(seed)
  records = []
  for q in range(0, num_samples, SAMPLES_PER_QUESTION):
    samples = []
    for k in range(q, min(num_samples, q + SAMPLES_PER_QUESTION)):
      digits = list("0123456789")
      rng.shuffle(digits)
      samples.append(_permuted(base[k % len(base)][1], str.maketrans("0123456789", "".join(digits))))
    first = base[q % len(base)][0]
    records.append(teacher_data.TeacherRecord(
        id=f"bench/{q // SAMPLES_PER_QUESTION}", source="gsm8k", split="train",
        question=first.question, gold_answer=first.gold_answer, gold_number=first.gold_number,
        samples=tuple(samples)))
  return records, [s for _, s in base]


def _reference_per_sample_s(samples, spm_path: str, mode: str) -> float:
  """Seconds per sample of the pure-Python DTW (cost, recurrence, backtrack) on the same inputs."""
  aligner = alignment.Aligner(spm_path, mode)
  pairs = []
  for sample in samples:
    start, end = alignment.target_span(sample.text)
    positions = aligner._teacher_positions(sample, start, end)  # pylint: disable=protected-access
    pieces = [aligner._pieces[i] for i in aligner.encode(sample.text[start:end])]  # pylint: disable=protected-access
    pairs.append(([sample.tokens[j] for j in positions], pieces))
  begin = time.perf_counter()
  for teacher, student in pairs:
    alignment.reference_dtw(teacher, student, mode)
  return (time.perf_counter() - begin) / len(pairs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_samples", type=int, default=10_000)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--mode", choices=alignment.MODES, default="default")
  parser.add_argument("--reference_samples", type=int, default=100)
  parser.add_argument("--data_dir", default=str(data_dir.data_dir()))
  args = parser.parse_args()
  data_root = pathlib.Path(args.data_dir)
  spm_path = str(data_root / "tokenizer" / "t5_spiece.model")
  records, base = build_records(data_root, args.num_samples)
  tokens = [len(s.tokens) for r in records for s in r.samples]

  begin = time.perf_counter()
  lines, stats = alignment.align_records(records, spm_path, args.mode, workers=args.workers)
  wall_s = time.perf_counter() - begin
  # Single process, in-process (no worker start-up): the per-core rate.
  subset = records[:max(1, len(records) // 5)]
  begin = time.perf_counter()
  _, sub_stats = alignment.align_records(subset, spm_path, args.mode, workers=1)
  one_core_s = (time.perf_counter() - begin) / max(sub_stats.written, 1)

  rate = stats.written / wall_s
  reference_s = _reference_per_sample_s(
      [base[k % len(base)] for k in range(args.reference_samples)], spm_path, args.mode)
  print(json.dumps({
      "mode": args.mode, "workers": args.workers, "samples": stats.written,
      "mean_teacher_tokens": round(sum(tokens) / len(tokens), 1),
      "mean_student_pieces": round(stats.positions / max(stats.written, 1), 1),
      "share_kept": stats.to_json()["share_kept"],
      "wall_s": round(wall_s, 2), "samples_per_s": round(rate, 1),
      "ms_per_sample_one_process": round(one_core_s * 1e3, 3),
      "extrapolated_207k_s": round(PAPER_SAMPLES / rate, 1),
      "original_207k_s": PAPER_MINUTES * 60,
      "speedup_vs_original": round(PAPER_MINUTES * 60 / (PAPER_SAMPLES / rate), 1),
      "reference_python_dtw_ms_per_sample": round(reference_s * 1e3, 2),
      "reference_samples": args.reference_samples,
      "ratio_vs_reference_one_process": round(reference_s / one_core_s, 1),
      "note": "timings are noisy if other jobs share the machine",
      "lines_bytes": sum(len(line) for line in lines),
  }))


if __name__ == "__main__":
  main()
