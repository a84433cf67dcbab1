"""The training input pipeline at the paper's scale: a prepared set against the generator tasks.

Ours: `TrainIterator` over a prepared set (`specialize prepare`), i.e. `gsm8k_distill` (or
`gsm8k_distill_top5` with `--teacher_k 5`) with `$SPECIALIZE_PREPARED_DATA` pointing at it.
Peer: the distillation tasks as they were before prepared sets (`--side peer`): a SeqIO Mixture of
four generator tasks that read the teacher file into memory at every dataset build, choose
exemplars, count and tokenize with SentencePiece, shuffle with a 10,000-example buffer. It reads
only the first `--peer_questions` records of the teacher file (all of a paper-size file needs about
25 GB per copy); its memory is for that share, and grows with it.

Each side runs in its own process (so peak RSS is its own), turns alternating; printed per turn and
as medians with the ratio ours/peer. Also: time to resume at a step (ours: the O(1) start; the peer
replays the skipped batches, so its figure is the skipped examples over its measured rate).

  python tools/bench_input_pipeline.py --prepared DIR --teacher TEACHER.jsonl [--turns 2]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _register_peer(teacher_path: str, num_questions: int) -> str:
  """The pre-prepared-set distillation mixture over the first `num_questions` records."""
  import itertools  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from specialize_jax.data import formats  # pylint: disable=g-import-not-at-top
  from specialize_jax.data import splits  # pylint: disable=g-import-not-at-top
  from specialize_jax.data import vocabulary  # pylint: disable=g-import-not-at-top
  from specialize_jax.prepared import prepare  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_data  # pylint: disable=g-import-not-at-top
  from specialize_jax.tasks import common  # pylint: disable=g-import-not-at-top

  def source(format_name):
    def dataset_fn(split, shuffle_files, seed=None):  # pylint: disable=unused-argument
      records = list(itertools.islice(teacher_data.iter_records(teacher_path), num_questions))
      sampler = formats.ExemplarSampler(splits.math_split("gsm8k", "train"))
      count = formats.SentencePieceCounter(vocabulary.vocabulary_path())
      exclude = prepare.gsm8k_held_out().questions

      def generate():
        for e in formats.distillation_examples(records, format_name, sampler, 1024, count,
                                               exclude):
          yield {k: e[k] for k in ("id", "inputs", "targets", "answer")}
      text = tf.TensorSpec(shape=(), dtype=tf.string)
      return tf.data.Dataset.from_generator(generate, output_signature={
          "id": text, "inputs": text, "targets": text, "answer": text})
    return seqio.FunctionDataSource(dataset_fn, splits=("train",))

  for format_name in formats.FORMATS:
    seqio.TaskRegistry.add(
        f"peer_{format_name}", source=source(format_name),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=common.output_features(), shuffle_buffer_size=10_000)
  seqio.MixtureRegistry.add("peer", [(f"peer_{f}", r)
                                     for f, r in prepare.DEFAULT_FORMAT_RATES.items()])
  return "peer"


def _side(args) -> dict:
  """One side in this process: first batch, throughput, (ours) resume, peak RSS."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import specialize_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the tasks)
  from specialize_jax.training import input_pipeline  # pylint: disable=g-import-not-at-top
  lengths = {"inputs": args.inputs, "targets": args.targets}
  if args.side == "ours":
    os.environ["SPECIALIZE_PREPARED_DATA"] = args.prepared
    name = "gsm8k_distill_top5" if args.teacher_k else "gsm8k_distill"
  else:
    name = _register_peer(args.teacher, args.peer_questions)
  config = input_pipeline.DatasetConfig(name, lengths, batch_size=args.batch, seed=0,
                                        teacher_k=args.teacher_k if args.side == "ours" else None)
  start = time.perf_counter()
  iterator = input_pipeline.TrainIterator(config, shards=[(0, 1)])
  next(iterator)
  first_batch_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.batches):
    next(iterator)
  examples_per_s = args.batches * args.batch / (time.perf_counter() - start)
  result = {"side": args.side, "first_batch_s": first_batch_s, "examples_per_s": examples_per_s}
  if args.side == "ours":
    start = time.perf_counter()
    resumed = input_pipeline.TrainIterator(
        input_pipeline.DatasetConfig(name, lengths, batch_size=args.resume_batch, seed=0,
                                     teacher_k=config.teacher_k),
        position={"batches_consumed": args.resume_step, "seed": 0}, shards=[(0, 1)])
    next(resumed)
    result["resume_s"] = time.perf_counter() - start
  result["peak_rss_mb"] = _peak_rss_mb()
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--prepared", required=True, help="a prepared set (specialize prepare)")
  parser.add_argument("--teacher", required=True, help="the teacher file it was prepared from")
  parser.add_argument("--teacher_k", type=int, default=None, help="5: read the top-5 rows too")
  parser.add_argument("--batch", type=int, default=24, help="FlanT5-Base: 8 x 3 micro-batches")
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--inputs", type=int, default=1024)
  parser.add_argument("--targets", type=int, default=256)
  parser.add_argument("--peer_questions", type=int, default=400)
  parser.add_argument("--resume_step", type=int, default=2750, help="XXL setting: step 2,750")
  parser.add_argument("--resume_batch", type=int, default=160, help="XXL setting: 8 x 20")
  parser.add_argument("--turns", type=int, default=2)
  parser.add_argument("--side", choices=("ours", "peer"), default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    print(json.dumps(_side(args)))
    return
  runs = {"ours": [], "peer": []}
  for turn in range(args.turns):
    for side in ("ours", "peer"):
      out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side],
                           capture_output=True, text=True, check=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
      runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(f"turn {turn + 1} {side}: {json.dumps(runs[side][-1])}", flush=True)
  median = lambda side, key: statistics.median(r[key] for r in runs[side])
  ours_rate, peer_rate = median("ours", "examples_per_s"), median("peer", "examples_per_s")
  print(f"examples/s per process: ours {ours_rate:.0f}, peer {peer_rate:.0f}: "
        f"{ours_rate / peer_rate:.2f}x (batch {args.batch}, {args.inputs}->{args.targets})")
  print(f"time to first batch: ours {median('ours', 'first_batch_s'):.1f} s, peer "
        f"{median('peer', 'first_batch_s'):.1f} s (peer on {args.peer_questions} questions)")
  print(f"peak RSS: ours {median('ours', 'peak_rss_mb'):.0f} MB (whole set); peer "
        f"{median('peer', 'peak_rss_mb'):.0f} MB on {args.peer_questions} of 7,473 questions")
  skipped = args.resume_step * args.resume_batch
  print(f"resume at step {args.resume_step} x {args.resume_batch}: ours "
        f"{median('ours', 'resume_s'):.1f} s; peer replays {skipped} examples: "
        f"~{skipped / peer_rate / 60:.1f} min at its rate")


if __name__ == "__main__":
  main()
