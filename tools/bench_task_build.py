"""How fast the distillation tasks build: examples/s of `gsm8k_distill_icl_cot` (exemplar choice,
length policy with SentencePiece counting, tokenization) beside `gsm8k_distill_zs_cot` (tokenization
only) in the same run, and their ratio.

  SPECIALIZE_DATA_DIR=../shared/data python tools/bench_task_build.py [--num_examples 2000]

Run it on an otherwise idle machine; it prints one JSON object.
"""
import argparse
import json
import os
import time


def _rate(task_name: str, num_examples: int) -> dict:
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  start = time.perf_counter()
  dataset = task.get_dataset({"inputs": 1024, "targets": 256}, split="train", shuffle=False)
  iterator = dataset.as_numpy_iterator()
  next(iterator)  # Reading the teacher data and building the pipeline: reported separately.
  first = time.perf_counter()
  count = 1
  for _ in range(num_examples - 1):
    next(iterator)
    count += 1
  end = time.perf_counter()
  return {"task": task_name, "startup_s": round(first - start, 2),
          "examples_per_s": round((count - 1) / (end - first), 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_examples", type=int, default=2000)
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tasks  # pylint: disable=g-import-not-at-top,unused-import
  in_context = _rate("gsm8k_distill_icl_cot", args.num_examples)
  zero_shot = _rate("gsm8k_distill_zs_cot", args.num_examples)
  print(json.dumps({"icl_cot": in_context, "zs_cot": zero_shot,
                    "icl_over_zs_ratio": round(in_context["examples_per_s"] /
                                               zero_shot["examples_per_s"], 3)}))


if __name__ == "__main__":
  main()
