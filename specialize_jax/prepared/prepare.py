"""`specialize prepare`: a teacher file (+ its aligned file) -> a prepared training set
(`prepared_data`), written once, resumably and atomically.

Decided here, once, for every example: its format, its seeded exemplars (never the target
question), the held-out exclusion, the input budget (whole exemplars dropped to fit), the token ids
in the student's vocabulary, and the dense top-k teacher rows on the student's pieces. The mixture
rates are recorded for the training tasks.

Work is split in chunks of consecutive questions (`num_chunks`, one ArrayRecord file per format and
chunk) over `workers` processes. Finished chunks are kept in `<output>.partial/` with a marker, so
an interrupted prepare resumes where it stopped (with the same settings; other settings are
refused). The set is published only when complete: locally by renaming the directory into place
(an older set at that path is replaced only then), on object stores by copying every file and the
metadata last (readers refuse a directory without it).
"""
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from specialize_jax.data import data_dir
from specialize_jax.data import feature_converters
from specialize_jax.data import formats
from specialize_jax.data import readers
from specialize_jax.data import splits
from specialize_jax.data import storage
from specialize_jax.data.records import MathExample
from specialize_jax.prepared import prepared_data
from specialize_jax.teacher import teacher_data
from specialize_jax.align import teacher_features
from specialize_jax.teacher import teacher_sources
from specialize_jax.errors import ConfigError

DEFAULT_FORMAT_RATES = {"icl_cot": 0.79, "zs_cot": 0.20, "icl_ao": 0.005, "zs_ao": 0.005}
DEFAULT_MAX_INPUT_TOKENS = 1024


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Questions no training example may hold: by id (the check), and by text (a safety net for
  files whose ids differ). A file of `full_size` records (all of GSM8K train) must have exactly
  `expected` of them excluded by id. `name` says which questions these are; it is recorded in the
  set's metadata (`held_out`) so that training can refuse a set that held out other ones."""
  ids: frozenset = frozenset()
  questions: frozenset = frozenset()
  full_size: Optional[int] = None
  expected: Optional[int] = None
  name: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """What `prepare` writes (every field is recorded in the set's metadata)."""
  output_dir: str
  vocab_path: str
  format_names: Tuple[str, ...] = formats.FORMATS
  rates: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_FORMAT_RATES))
  teacher_k: Optional[int] = None
  max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS
  num_exemplars: int = formats.NUM_EXEMPLARS
  exemplar_seed: int = 0
  num_chunks: int = 16
  workers: int = 1

  def __post_init__(self):
    for name in self.format_names:
      formats.check_format(name)
    unknown = set(self.rates) - set(formats.FORMATS)
    if unknown:
      raise ConfigError(f"Unknown formats in rates: {sorted(unknown)}; expected {formats.FORMATS}.")
    if self.num_chunks < 1 or self.workers < 1:
      raise ConfigError(f"num_chunks={self.num_chunks} and workers={self.workers} must be >= 1.")

  def settings(self) -> Dict:
    out = dataclasses.asdict(self)
    for name in ("output_dir", "workers"):  # Where and how fast: not what is written.
      out.pop(name)
    out["format_names"] = list(self.format_names)
    out["rates"] = dict(self.rates)
    return out


# ------------------------------------------------------------------------------- one chunk


@dataclasses.dataclass(frozen=True)
class _Chunk:
  index: int
  positions: Tuple[int, ...]
  records: Tuple[teacher_data.TeacherRecord, ...]
  aligned: Mapping  # {(id, sample_index): teacher_features.DenseAlignedRow}


def _light(record: teacher_data.TeacherRecord) -> teacher_data.TeacherRecord:
  """The record without per-token fields (all a training example needs is the text)."""
  samples = tuple(teacher_data.TeacherSample(text=s.text, answer=s.answer, correct=s.correct)
                  for s in record.samples)
  return dataclasses.replace(record, samples=samples)


class _Tokenizer:
  """SentencePiece ids, remembering the last text: the length policy counts an input's tokens
  (`count_tokens`, + EOS as the model sees it) and the record then takes the same input's ids."""

  def __init__(self, vocab_path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self._processor = sentencepiece.SentencePieceProcessor(
        model_proto=storage.read_bytes(vocab_path))
    self._last: Tuple[Optional[str], List[int]] = (None, [])

  def ids(self, text: str) -> List[int]:
    if self._last[0] != text:
      self._last = (text, self._processor.EncodeAsIds(text))
    return self._last[1]

  def count_tokens(self, text: str) -> int:
    return len(self.ids(text)) + 1


def _write_chunk(chunk: _Chunk, config: PrepareConfig, work_dir: str,
                 pool: Sequence[MathExample]) -> Dict:
  """Writes one chunk's file per format; returns its marker (counts, questions, stats)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  tokenizer = _Tokenizer(config.vocab_path)
  sampler = (formats.ExemplarSampler(pool, config.num_exemplars, config.exemplar_seed)
             if any(formats.is_in_context(f) for f in config.format_names) else None)
  marker = {"chunk": chunk.index, "formats": {}}
  for format_name in config.format_names:
    name = prepared_data.shard_file(format_name, chunk.index, config.num_chunks)
    tmp = os.path.join(work_dir, f".{name}.tmp")
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    stats: Dict = {}
    questions, target_tokens, with_teacher = [], [], 0
    position_of = dict(zip((r.id for r in chunk.records), chunk.positions))
    examples = formats.distillation_examples(
        chunk.records, format_name, sampler, config.max_input_tokens, tokenizer.count_tokens,
        stats=stats, positions=chunk.positions)
    for example in examples:
      inputs = tokenizer.ids(example["inputs"])
      targets = tokenizer.ids(example["targets"])
      ids = logprobs = None
      if config.teacher_k:
        row = (chunk.aligned.get((example["id"], example["sample_index"]))
               if formats.is_chain_of_thought(format_name) else None)
        where = f"{example['id']} sample {example['sample_index']}"
        rows = teacher_features.example_rows(row, example["targets"], targets, config.teacher_k,
                                             where)
        with_teacher += row is not None
        ids = rows[feature_converters.TEACHER_TOPK_IDS]
        logprobs = rows[feature_converters.TEACHER_TOPK_LOGPROBS]
      writer.write(prepared_data.serialize_example(example, inputs, targets, format_name, ids,
                                                   logprobs))
      questions.append(position_of[example["id"]])
      target_tokens.append(len(targets))
    writer.close()
    final = os.path.join(work_dir, name)
    os.replace(tmp, final)  # local: work dir
    marker["formats"][format_name] = {"file": name, "num_examples": len(questions),
                                      "questions": questions, "target_tokens": target_tokens,
                                      "with_teacher": with_teacher,
                                      "stats": stats}
  return marker


def _marker_path(work_dir: str, index: int) -> str:
  return os.path.join(work_dir, f"chunk-{index:05d}.done.json")


def _run_chunk(args) -> Dict:
  chunk, config, work_dir, pool = args
  marker = _write_chunk(chunk, config, work_dir, pool)
  tmp = _marker_path(work_dir, chunk.index) + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:  # local: work dir
    json.dump(marker, f)
  os.replace(tmp, _marker_path(work_dir, chunk.index))  # local: work dir
  return marker


# ------------------------------------------------------------------------------- the whole set


def _chunks(records: Iterable[teacher_data.TeacherRecord], held_out: HeldOut, num_chunks: int,
            aligned: Mapping, excluded: Dict) -> List[_Chunk]:
  """Kept records split into `num_chunks` runs of consecutive questions; counts exclusions."""
  kept: List[Tuple[int, teacher_data.TeacherRecord]] = []
  for position, record in enumerate(records):
    if record.id in held_out.ids:
      excluded["by_id"] += 1
    elif record.question in held_out.questions:
      excluded["by_text"] += 1
    else:
      kept.append((position, _light(record)))
  bounds = np.linspace(0, len(kept), num_chunks + 1).astype(int)
  chunks = []
  for index, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    part = kept[lo:hi]
    ids = {r.id for _, r in part}
    chunks.append(_Chunk(index, tuple(p for p, _ in part), tuple(r for _, r in part),
                         {key: row for key, row in aligned.items() if key[0] in ids}))
  return chunks


def _check_settings(work_dir: str, settings: Dict, sources: Dict) -> None:
  path = os.path.join(work_dir, "settings.json")
  wanted = {"settings": settings, "sources": sources}
  if os.path.exists(path):  # local: work dir
    with open(path, encoding="utf-8") as f:  # local: work dir
      found = json.load(f)
    if found != wanted:
      differ = sorted(k for k in set(found["settings"]) | set(settings)
                      if found["settings"].get(k) != settings.get(k))
      differ += sorted(k for k in sources if found["sources"].get(k) != sources[k])
      raise ConfigError(
          f"{work_dir} holds an interrupted prepare with other settings or inputs "
          f"({', '.join(differ)} differ); rerun with the same ones to resume, or delete "
          f"{work_dir} to start over.")
    return
  os.makedirs(work_dir, exist_ok=True)  # local: work dir
  with open(path, "w", encoding="utf-8") as f:  # local: work dir
    json.dump(wanted, f, indent=1)


def _publish(work_dir: str, output_dir: str, metadata: Dict, files: List[str]) -> None:
  """Metadata last; the set replaces an older one only once complete."""
  metadata_path = os.path.join(work_dir, prepared_data.METADATA_FILE)
  with open(metadata_path, "w", encoding="utf-8") as f:  # local: work dir
    json.dump(metadata, f, indent=1)
  keep = set(files) | {prepared_data.METADATA_FILE}
  if storage.is_url(output_dir):
    for name in sorted(keep - {prepared_data.METADATA_FILE}) + [prepared_data.METADATA_FILE]:
      storage.copy_file(os.path.join(work_dir, name), storage.join(output_dir, name))
    shutil.rmtree(work_dir)  # local: work dir
    return
  for name in os.listdir(work_dir):  # local: work dir
    if name not in keep:
      os.remove(os.path.join(work_dir, name))  # local: work dir
  if os.path.exists(output_dir):  # local: not a URL (above)
    old = f"{output_dir}.old-{os.getpid()}"
    os.replace(output_dir, old)  # local: not a URL (above)
    os.replace(work_dir, output_dir)  # local: not a URL (above)
    shutil.rmtree(old)  # local: not a URL (above)
  else:
    os.replace(work_dir, output_dir)  # local: not a URL (above)


def prepare(records_fn: Callable[[], Iterable[teacher_data.TeacherRecord]], config: PrepareConfig,
            held_out: HeldOut = HeldOut(), aligned: Optional[Mapping] = None,
            exemplar_pool: Sequence[MathExample] = (), sources: Optional[Dict] = None,
            log: Callable[[str], None] = logging.info) -> prepared_data.PreparedSet:
  """Writes the prepared set of `records_fn()`'s records to `config.output_dir`.

  Args:
    records_fn: the teacher records, in file order (their position keys the exemplars).
    config: formats, rates, budget, vocabulary, chunks and workers.
    held_out: what no example may hold; the count excluded by id is logged and, with `expected`,
      checked.
    aligned: `{(id, sample_index): DenseAlignedRow}` (width `config.teacher_k`) for CoT targets.
    exemplar_pool: the in-context exemplars' pool (GSM8K train without dev).
    sources: what the inputs were (paths, hashes), recorded and compared on resume.
  """
  if config.teacher_k and aligned is None:
    raise ConfigError("teacher_k is set but no aligned rows were given; pass --aligned FILE.")
  start = time.perf_counter()
  sources = dict(sources or {})
  local_output = "://" not in config.output_dir
  work_dir = (f"{config.output_dir.rstrip('/')}.partial" if local_output else
              os.path.join(tempfile.gettempdir(), "specialize_prepare",
                           config.output_dir.replace("://", "_").replace("/", "_")))
  # The held-out name joins the settings a resume must match: the chunks of an interrupted prepare
  # under another dev split hold (and take exemplars from) questions now held out.
  _check_settings(work_dir, {**config.settings(), "held_out": held_out.name}, sources)
  excluded = {"by_id": 0, "by_text": 0}
  chunks = _chunks(records_fn(), held_out, config.num_chunks, aligned or {}, excluded)
  log(f"Held out: {excluded['by_id']} questions excluded by id, {excluded['by_text']} more by "
      f"question text; {sum(len(c.records) for c in chunks)} questions kept.")
  num_records = sum(len(c.records) for c in chunks) + excluded["by_id"] + excluded["by_text"]
  if num_records == held_out.full_size and excluded["by_id"] != held_out.expected:
    raise ConfigError(
        f"The teacher file has all {num_records} GSM8K train questions but {excluded['by_id']} of "
        f"the {held_out.expected} held-out ones were found by id: its ids are not GSM8K's "
        "(expected gsm8k/train/N, N the line of GSM8K's train.jsonl). Rebuild it with ids from "
        "`specialize teacher` or `teacher_import`.")
  markers: Dict[int, Dict] = {}
  for chunk in chunks:
    if os.path.exists(_marker_path(work_dir, chunk.index)):  # local: work dir
      with open(_marker_path(work_dir, chunk.index), encoding="utf-8") as f:  # local: work dir
        marker = json.load(f)
      # A chunk written before target lengths were recorded is written again.
      if all("target_tokens" in m for m in marker["formats"].values()):
        markers[chunk.index] = marker
  todo = [c for c in chunks if c.index not in markers]
  if markers:
    log(f"Resuming: {len(markers)} of {len(chunks)} chunks were already written in {work_dir}.")
  jobs = [(c, config, work_dir, exemplar_pool) for c in todo]
  done_examples, chunks_start, resumed = 0, time.perf_counter(), len(markers)
  if config.workers > 1 and len(jobs) > 1:
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(config.workers, len(jobs))) as pool:
      results = pool.imap_unordered(_run_chunk, jobs)
      for marker in results:
        markers[marker["chunk"]] = marker
        done_examples += sum(f["num_examples"] for f in marker["formats"].values())
        log(_progress(len(markers), len(chunks), resumed, done_examples, chunks_start))
  else:
    for job in jobs:
      marker = _run_chunk(job)
      markers[marker["chunk"]] = marker
      done_examples += sum(f["num_examples"] for f in marker["formats"].values())
      log(_progress(len(markers), len(chunks), resumed, done_examples, chunks_start))

  metadata = {"schema": prepared_data.SCHEMA, "formats": {},
              "rates": {f: config.rates.get(f, 0.0) for f in config.format_names},
              "teacher_k": config.teacher_k, "settings": config.settings(), "sources": sources,
              "held_out": held_out.name, "excluded": excluded,
              "vocabulary": {"path": config.vocab_path,
                             "sha256": prepared_data.file_sha256(config.vocab_path)}}
  files = []
  for format_name in config.format_names:
    parts = [markers[i]["formats"][format_name] for i in sorted(markers)]
    questions = np.asarray([q for p in parts for q in p["questions"]], np.int32)
    np.save(os.path.join(work_dir, prepared_data.questions_file(format_name)), questions)
    target_tokens = np.asarray([n for p in parts for n in p["target_tokens"]], np.int32)
    np.save(os.path.join(work_dir, prepared_data.target_tokens_file(format_name)), target_tokens)
    names = [p["file"] for p in parts if p["num_examples"]]
    files += names + [prepared_data.questions_file(format_name),
                      prepared_data.target_tokens_file(format_name)]
    stats: Dict = {}
    for p in parts:
      for key, value in p["stats"].items():
        stats[key] = stats.get(key, 0) + value
    metadata["formats"][format_name] = {
        "num_examples": int(len(questions)), "files": names,
        "num_questions": int(len(np.unique(questions))),
        "with_teacher": sum(p["with_teacher"] for p in parts), "skipped": stats}
    log(f"{format_name}: {len(questions)} examples of {len(np.unique(questions))} questions"
        + (f", {metadata['formats'][format_name]['with_teacher']} with a teacher distribution"
           if config.teacher_k else "") + f"; skipped {stats}.")
  metadata["seconds"] = round(time.perf_counter() - start, 1)
  _publish(work_dir, config.output_dir, metadata, files)
  log(f"Prepared {config.output_dir} in {metadata['seconds']} s.")
  return prepared_data.PreparedSet.open(config.output_dir)


def _progress(done: int, total: int, resumed: int, examples: int, start: float) -> str:
  """A progress line; rate and ETA count only the chunks written by this run."""
  elapsed = time.perf_counter() - start
  eta = elapsed / (done - resumed) * (total - done) if done > resumed else 0.0
  return (f"chunk {done}/{total}: {examples} examples, {examples / max(elapsed, 1e-9):.0f}/s, "
          f"ETA {eta:.0f} s")


def gsm8k_held_out() -> HeldOut:
  """GSM8K dev (the original's 200 train questions) and test: never trained on (by id, and by
  text)."""
  held = [e for split in ("dev", "test") for e in splits.math_split("gsm8k", split)]
  dev = splits.math_split("gsm8k", "dev")
  full = len(dev) + len(splits.math_split("gsm8k", "train"))
  return HeldOut(ids=frozenset(e.id for e in held), questions=frozenset(e.question for e in held),
                 full_size=full, expected=len(dev), name=splits.GSM8K_HELD_OUT)


# Candidates per position of a set prepared with --aligned: the sampled token plus the completions
# API's top-5, as the original kept them (the sampled token is outside the top-5 at a few positions;
# `--teacher_k 5` drops it there).
DEFAULT_TEACHER_K = 6


def prepare_gsm8k(config: PrepareConfig, teacher_path: Optional[str] = None,
                  aligned_path: Optional[str] = None,
                  log: Callable[[str], None] = logging.info) -> prepared_data.PreparedSet:
  """`specialize prepare`: GSM8K teacher data (a file, else the gold rationales) -> a prepared set
  with GSM8K dev/test held out and GSM8K train (without dev) as the exemplar pool."""
  if teacher_path:
    records_fn = lambda: teacher_data.iter_records(teacher_path)
    sources = {"teacher": teacher_path, "teacher_sha256": prepared_data.file_sha256(teacher_path)}
  else:
    gold = data_dir.data_path(readers.GSM8K_FILES["train"])
    records_fn = lambda: teacher_sources.records_from_gsm8k_gold(gold)
    sources = {"teacher": f"GSM8K gold rationales ({gold})"}
  aligned = None
  if aligned_path:
    if not config.teacher_k:
      config = dataclasses.replace(config, teacher_k=DEFAULT_TEACHER_K)
    aligned = teacher_features.load_dense_rows(aligned_path, config.teacher_k, log)
    sources.update(aligned=aligned_path, aligned_sha256=prepared_data.file_sha256(aligned_path))
  return prepare(records_fn, config, gsm8k_held_out(), aligned,
                 exemplar_pool=splits.math_split("gsm8k", "train"), sources=sources, log=log)
