"""The teacher-data commands, in pipeline order: `teacher` (sample a server), `teacher_import`
(released data), `teacher_filter`, `align` (onto the student's pieces) and `prepare` (the
training set the distillation tasks read)."""
# Each handler imports the libraries it uses (`prepare`'s import JAX and SeqIO), so that
# `specialize --help` and the other commands start at once.
# pylint: disable=g-import-not-at-top
import argparse
import json
import logging

from specialize_jax.errors import ConfigError


def add_arguments(sub) -> None:
  """Declares the teacher-data commands on the `specialize` subparsers `sub`."""
  p = sub.add_parser("teacher", help="sample teacher chains of thought from an OpenAI-compatible "
                     "server (key from $OPENAI_API_KEY); resumable; writes X.jsonl, "
                     "X.filtered.jsonl and, on failures, X.failures.jsonl")
  p.add_argument("--base_url", default=None, help="e.g. http://localhost:8000/v1 (default: OpenAI)")
  p.add_argument("--model", required=True)
  p.add_argument("--api", choices=("completions", "chat"), default="completions")
  p.add_argument("--split", default="gsm8k_train", help="training split to sample (gsm8k_train)")
  p.add_argument("--questions", default=None, help="sample these questions instead of --split: a "
                 "teacher-data JSONL (its ids, questions and gold answers)")
  p.add_argument("--num_samples", type=int, default=40, help="samples per question")
  p.add_argument("--temperature", type=float, default=0.5)
  p.add_argument("--top_logprobs", type=int, default=5,
                 help="per-token alternatives: completions up to 5, chat up to 20; 0 for none")
  p.add_argument("--max_tokens", type=int, default=256)
  p.add_argument("--stop", action="append", default=None,
                 help="stop sequence, backslash escapes allowed (repeatable; default \\nQuestion:)")
  p.add_argument("--prompt_file", default="prompt_complex",
                 help="name in prompts/fu2023_lib_prompt/ or a path to a .txt file")
  p.add_argument("--output", required=True, help="records JSONL (appended to; reruns resume)")
  p.add_argument("--limit", type=int, default=None, help="only the first Q questions of the split")
  p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
  p.add_argument("--samples_per_request", type=int, default=None,
                 help="split a question's samples over requests of this n (default: one request)")
  p.add_argument("--requests_per_minute", type=float, default=None)
  p.add_argument("--tokens_per_minute", type=float, default=None,
                 help="limit on estimated tokens (prompt chars/4 + max_tokens x n per request)")
  p.add_argument("--timeout_s", type=float, default=120.0, help="per request")
  p.add_argument("--max_attempts", type=int, default=8, help="per request, then the question "
                 "is recorded as failed")
  p.add_argument("--initial_backoff_s", type=float, default=1.0)
  p.add_argument("--max_backoff_s", type=float, default=60.0)
  p.add_argument("--progress_period_s", type=float, default=10.0)
  p.add_argument("--seed", type=int, default=None, help="seed of the backoff jitter")
  p.add_argument("--dry_run", action="store_true",
                 help="print estimated tokens and cost of what is left to do; send nothing")
  p.add_argument("--price_per_1k_input", type=float, default=0.0, help="for --dry_run's cost")
  p.add_argument("--price_per_1k_output", type=float, default=0.0, help="for --dry_run's cost")
  p.add_argument("--filter", action=argparse.BooleanOptionalAction, default=True,
                 help="write X.filtered.jsonl: correct samples cut after the answer line")
  p.set_defaults(fn=cmd_teacher)

  p = sub.add_parser("teacher_import", help="convert released teacher data into our schema")
  p.add_argument("--from", dest="src_format", choices=("fu2023_pickle", "fu2023_codex"),
                 required=True, help="fu2023_pickle: the paper's processed_data/*.pkl (loaded "
                 "with a restricted unpickler); fu2023_codex: its notebook JSON samples")
  p.add_argument("src")
  p.add_argument("--output", required=True)
  p.set_defaults(fn=cmd_teacher_import)

  p = sub.add_parser("teacher_filter",
                     help="keep correct teacher samples, cut after the answer line")
  p.add_argument("--input", required=True)
  p.add_argument("--output", required=True)
  p.set_defaults(fn=cmd_teacher_filter)

  p = sub.add_parser("prepare", help="teacher (+ aligned) file -> the prepared training set the "
                     "distillation tasks read (ArrayRecord shards, seeded global order)")
  p.add_argument("--teacher", default=None, help="teacher JSONL (specialize_jax.teacher/1); "
                 "default: the GSM8K gold rationales")
  p.add_argument("--aligned", default=None, help="its `specialize align` output: adds the top-k "
                 "teacher rows (for the gsm8k_distill_top{k} tasks)")
  p.add_argument("--output", required=True, help="directory (local or gs://); point "
                 "$SPECIALIZE_PREPARED_DATA at it")
  p.add_argument("--vocab", default=None, help="student SentencePiece model (default: the tasks' "
                 "vocabulary)")
  p.add_argument("--teacher_k", type=int, default=None, help="teacher candidates per position "
                 "(default 6 with --aligned: the sampled token plus the API's top-5, as the "
                 "original kept them; 21 for a chat API's top-20)")
  p.add_argument("--formats", default="zs_ao,zs_cot,icl_ao,icl_cot")
  p.add_argument("--rates", default=None, help='mixture rates as JSON, default the original\'s '
                 '{"icl_cot": 0.79, "zs_cot": 0.2, "icl_ao": 0.005, "zs_ao": 0.005}')
  p.add_argument("--max_input_tokens", type=int, default=1024)
  p.add_argument("--exemplar_seed", type=int, default=0)
  p.add_argument("--num_chunks", type=int, default=16, help="files per format")
  p.add_argument("--workers", type=int, default=1, help="processes")
  p.set_defaults(fn=cmd_prepare)

  p = sub.add_parser("align", help="move teacher top-k onto student SentencePiece pieces (DTW)")
  p.add_argument("--input", required=True, help="teacher data JSONL (specialize_jax.teacher/1)")
  p.add_argument("--output", required=True, help="aligned JSONL (specialize_jax.aligned/1)")
  p.add_argument("--vocab", required=True, help="student SentencePiece model file")
  p.add_argument("--mode", choices=("default", "paper"), default="default")
  p.add_argument("--workers", type=int, default=None, help="processes (default: usable CPUs)")
  p.set_defaults(fn=cmd_align)


def cmd_teacher(args: argparse.Namespace) -> int:
  from specialize_jax.teacher import teacher_client
  logging.getLogger("httpx").setLevel(logging.WARNING)  # One line per request otherwise.
  logging.getLogger("httpx2").setLevel(logging.WARNING)
  sampling = teacher_client.SamplingConfig(
      model=args.model, api=args.api, num_samples=args.num_samples, temperature=args.temperature,
      max_tokens=args.max_tokens, top_logprobs=args.top_logprobs,
      stop=(teacher_client.SamplingConfig.stop if args.stop is None else
            tuple(s.replace("\\n", "\n") for s in args.stop if s)),
      samples_per_request=args.samples_per_request, prompt_file=args.prompt_file)
  run = teacher_client.RunConfig(
      base_url=args.base_url, concurrency=args.concurrency,
      requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute,
      timeout_s=args.timeout_s, max_attempts=args.max_attempts,
      initial_backoff_s=args.initial_backoff_s, max_backoff_s=args.max_backoff_s,
      progress_period_s=args.progress_period_s)
  sampling.check()
  prompt = teacher_client.load_few_shot_prompt(args.prompt_file)
  examples = (teacher_client.file_examples(args.questions) if args.questions else
              teacher_client.split_examples(args.split))[:args.limit]
  if args.dry_run:
    todo = teacher_client.pending(examples, args.output, sampling.teacher_info())
    print(json.dumps(dict(teacher_client.dry_run_estimate(
        todo, sampling, prompt, args.price_per_1k_input, args.price_per_1k_output),
        skipped_already_done=len(examples) - len(todo))))
    return 0
  summary = teacher_client.run_teacher(examples, args.output, sampling, run, prompt,
                                       teacher_client.read_api_key(),
                                       write_filtered=args.filter, seed=args.seed)
  print(json.dumps(summary))
  return 1 if summary["questions"]["failed"] else 0


def cmd_teacher_import(args: argparse.Namespace) -> int:
  from specialize_jax.teacher import teacher_data
  from specialize_jax.teacher import teacher_sources
  kept, excluded = teacher_sources.import_released(args.src_format, args.src)
  count = teacher_data.write_records(args.output, kept)
  stats = teacher_data.summarize(kept)
  print(json.dumps({"output": args.output, "records": count, "samples": stats["samples"],
                    "excluded_dev_questions": excluded,
                    "per_sample_accuracy": stats["per_sample_accuracy"]}))
  return 0


def cmd_teacher_filter(args: argparse.Namespace) -> int:
  from specialize_jax.teacher import teacher_data
  from specialize_jax.teacher import teacher_filter
  kept, report = teacher_filter.filter_records(
      teacher_data.read_records(args.input, strict=True).records)
  teacher_data.write_records(args.output, kept)
  print(json.dumps(dict(report.to_json(), output=args.output)))
  return 0


def cmd_align(args: argparse.Namespace) -> int:
  from specialize_jax.align import alignment
  summary = alignment.align_file(args.input, args.output, args.vocab, mode=args.mode,
                                 workers=args.workers or alignment.default_workers())
  print(json.dumps(summary))
  return 0


def _rates(text) -> dict:
  """The `--rates` JSON object (None: the original's rates)."""
  from specialize_jax.prepared import prepare
  if not text:
    return dict(prepare.DEFAULT_FORMAT_RATES)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"--rates {text!r} is not JSON ({e}); give an object such as "
                      '\'{"icl_cot": 0.79, "zs_cot": 0.2}\'.') from e


def cmd_prepare(args: argparse.Namespace) -> int:
  from specialize_jax.data import vocabulary
  from specialize_jax.prepared import prepare
  config = prepare.PrepareConfig(
      output_dir=args.output, vocab_path=args.vocab or vocabulary.vocabulary_path(),
      format_names=tuple(args.formats.split(",")), rates=_rates(args.rates),
      teacher_k=args.teacher_k, max_input_tokens=args.max_input_tokens,
      exemplar_seed=args.exemplar_seed, num_chunks=args.num_chunks, workers=args.workers)
  prepared = prepare.prepare_gsm8k(config, args.teacher, args.aligned)
  print(json.dumps({"output": prepared.directory, "formats": prepared.metadata["formats"],
                    "excluded": prepared.metadata["excluded"],
                    "seconds": prepared.metadata["seconds"]}))
  return 0
