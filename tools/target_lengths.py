"""How long the training targets are in the student's pieces: the numbers behind the experiments'
`TASK_FEATURE_LENGTHS['targets']` (the original never cut a target).

  python tools/target_lengths.py [--data_dir DIR] [--vocab SPM_MODEL] [--prepared DIR]

Prints, as JSON:
- `codex`: the paper's own code-davinci-002 samples that are public (the notebook traces under
  `teacher_outputs/fu2023_codex_notebook/`): GPT tokens and T5 pieces per chain (the trigger's two
  steps and the trailing newlines dropped, as the original did) and the most T5 pieces per GPT token.
  The paper sampled at most 256 GPT tokens per chain, so `256 x` that ratio bounds its longest target.
- `gsm8k_gold`: the GSM8K train rationales as this project's gold chain-of-thought targets.
- `prepared` (with `--prepared`): the longest target per format of a prepared set, with the EOS.
"""
import argparse
import json
import os
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODEX_FILES = ("codex_gsm8k_train0_50samples_top5.json",
               "codex_gsm8k_train_extra_samples_top5.json")
GPT_TOKEN_LIMIT = 256  # the paper's max_tokens when sampling Codex


def _codex(data_dir, processor):
  gpt, t5 = [], []
  for name in CODEX_FILES:
    path = os.path.join(data_dir, "teacher_outputs", "fu2023_codex_notebook", name)
    with open(path, encoding="utf-8") as f:
      for sample in json.load(f)["samples"]:
        steps = sample["steps"][2:-2]
        gpt.append(len(steps))
        t5.append(len(processor.encode("".join(step["token"] for step in steps))))
  ratio = np.asarray(t5) / np.maximum(np.asarray(gpt), 1)
  return {"samples": len(gpt), "gpt_tokens_max": int(max(gpt)), "t5_pieces_max": int(max(t5)),
          "t5_per_gpt_token_max": round(float(ratio.max()), 3),
          "t5_per_gpt_token_mean": round(float(ratio.mean()), 3),
          "bound_t5_pieces_at_256_gpt_tokens": int(np.ceil(GPT_TOKEN_LIMIT * ratio.max()))}


def _gold(data_dir, processor):
  os.environ["SPECIALIZE_DATA_DIR"] = data_dir
  sys.path.insert(0, REPO_ROOT)
  # pylint: disable=g-import-not-at-top
  from specialize_jax.data import formats
  from specialize_jax.data import readers
  # pylint: enable=g-import-not-at-top
  lengths = np.asarray([len(processor.encode(formats.cot_target(example)))
                        for example in readers.read_gsm8k("train")])
  return {"rationales": int(len(lengths)), "t5_pieces_max": int(lengths.max()),
          "t5_pieces_p99": float(np.percentile(lengths, 99)),
          "over_255": int(np.sum(lengths > 255))}


def _prepared(directory):
  sys.path.insert(0, REPO_ROOT)
  from specialize_jax.prepared import prepared_data  # pylint: disable=g-import-not-at-top
  prepared = prepared_data.PreparedSet.open(directory)
  return {f: int(prepared.target_tokens(f).max()) + 1 for f in prepared.formats
          if prepared.num_examples(f)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default=os.environ.get(
      "SPECIALIZE_SHARED_DATA", os.path.join(REPO_ROOT, "..", "shared", "data")))
  parser.add_argument("--vocab", default=None, help="default: <data_dir>/tokenizer/t5_spiece.model")
  parser.add_argument("--prepared", default=None)
  args = parser.parse_args()
  import sentencepiece  # pylint: disable=g-import-not-at-top
  processor = sentencepiece.SentencePieceProcessor(
      model_file=args.vocab or os.path.join(args.data_dir, "tokenizer", "t5_spiece.model"))
  result = {"codex": _codex(args.data_dir, processor), "gsm8k_gold": _gold(args.data_dir, processor)}
  if args.prepared:
    result["prepared"] = _prepared(args.prepared)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
