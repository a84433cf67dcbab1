"""Teacher sampling: chain-of-thought samples with per-token top-k from an OpenAI-compatible server.

Any server that speaks the OpenAI API works (OpenAI itself, vLLM's ``vllm serve``, hosted open
models); requests go through the official ``openai`` client, whose own retries are off
(``max_retries=0``) because this module retries with its own policy.

Terms:
  api: ``completions`` (``/v1/completions``: the few-shot prompt is the raw prompt; ``logprobs``
    up to 5 gives per-token ``tokens``, ``token_logprobs``, ``top_logprobs``) or ``chat``
    (``/v1/chat/completions``: the same prompt text is one user message; ``logprobs=true`` with
    ``top_logprobs`` up to 20, read from ``logprobs.content``).
  prompt: the few-shot prompt file (default the original's
    ``prompt_complex.txt``), then ``"\\nQuestion: " + q + "\\nLet's think step by step\\n"``.
    Departure: the trailing newline, so a completion starts at the chain itself (the original's
    completions began with the newline ending the trigger).
  question: one dataset example; all its ``num_samples`` samples form ONE teacher record
    (``teacher_data`` schema), appended durably only once every sample has arrived, so the output
    never holds a partial question.
  output files, beside ``--output X.jsonl``: ``X.jsonl`` the raw records (every sample, correct
    or not), ``X.failures.jsonl`` one line per question that failed every attempt this run (id,
    attempts, last error), ``X.filtered.jsonl`` what ``teacher_filter`` keeps (written at the end).
  resume: ids already in ``X.jsonl`` are skipped (a line cut short by a crash is ignored and
    removed by the next append), so rerunning the same command finishes the job with no
    duplicate and no lost question. The records in the file must come from the same teacher and
    sampling settings, else the run stops (use another ``--output``).
  rate limits: two token buckets refilled continuously, one of requests per minute and one of
    tokens per minute; a request costs its estimated tokens, prompt tokens + max_tokens x n.
  estimated tokens: characters / 4, rounded up (``CHARS_PER_TOKEN``). No tokenizer is used: the
    rule is good to about 10-20 % for English with GPT-style BPE, enough for budgets and rate
    limits; the summary reports the server's real counts (``usage``).
  retries: 429, 408/409, 5xx, timeouts, connection errors and malformed responses are retried with
    exponential backoff and full jitter; a ``Retry-After`` header (seconds or an HTTP date) is a
    lower bound on the wait. Other 4xx (bad request, authentication) fail the question at once.

The API key is read from ``OPENAI_API_KEY`` only, passed to the client, and never logged or
written: error texts are scrubbed of it before they reach the log, the failures file or the
summary.
"""
import concurrent.futures
import dataclasses
import email.utils
import json
import logging
import math
import os
import pathlib
import random
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from specialize_jax.data import answers
from specialize_jax.data import readers
from specialize_jax.data import splits
from specialize_jax.teacher import teacher_data
from specialize_jax.teacher import teacher_filter
from specialize_jax.data.records import MathExample
from specialize_jax.teacher.teacher_data import TeacherInfo
from specialize_jax.teacher.teacher_data import TeacherRecord
from specialize_jax.teacher.teacher_data import TeacherSample
from specialize_jax.errors import ConfigError

API_KEY_ENV = "OPENAI_API_KEY"
APIS = {"completions": "openai.completions", "chat": "openai.chat"}
MAX_TOP_LOGPROBS = {"completions": 5, "chat": 20}
# Teacher data is training data: only training splits can be sampled (gsm8k/train already
# excludes the 200 dev questions, see `splits`).
SPLITS = {"gsm8k_train": ("gsm8k", "train")}
DEFAULT_PROMPT = "prompt_complex"
COT_TRIGGER = "Let's think step by step"
CHARS_PER_TOKEN = 4
# A logprob the server reports as -inf (or absurdly low) is stored as this; JSON has no -inf.
MIN_LOGPROB = -9999.0
RETRYABLE_STATUS = (408, 409, 429)
MAX_ERROR_CHARS = 500
LOG = logging.getLogger(__name__)


class MalformedResponse(ValueError):
  """A 200 response whose body is not what the API promises (retried like a server error)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """What to ask the teacher. ``top_logprobs`` 0 asks for no per-token data."""
  model: str
  api: str = "completions"
  num_samples: int = 40
  temperature: float = 0.5
  max_tokens: int = 256
  top_logprobs: int = 5
  stop: Tuple[str, ...] = ("\nQuestion:",)
  samples_per_request: Optional[int] = None  # None: all num_samples in one request (n=...).
  prompt_file: str = DEFAULT_PROMPT

  def check(self) -> None:
    """Raises ValueError naming the flag to fix."""
    if self.api not in APIS:
      raise ConfigError(f"--api {self.api!r} is not one of {sorted(APIS)}.")
    limit = MAX_TOP_LOGPROBS[self.api]
    if not 0 <= self.top_logprobs <= limit:
      raise ConfigError(f"--top_logprobs {self.top_logprobs} is out of range for --api {self.api}: "
                        f"use 0 to {limit} (the API's limit).")
    if self.num_samples < 1 or self.max_tokens < 1:
      raise ConfigError("--num_samples and --max_tokens must be at least 1.")
    if self.samples_per_request is not None and self.samples_per_request < 1:
      raise ConfigError("--samples_per_request must be at least 1.")
    if len(self.stop) > 4:
      raise ConfigError(f"at most 4 --stop sequences (OpenAI's limit), got {len(self.stop)}.")

  def request_sizes(self) -> List[int]:
    """``n`` of each request for one question."""
    per = self.samples_per_request or self.num_samples
    sizes = [per] * (self.num_samples // per)
    return sizes + ([self.num_samples % per] if self.num_samples % per else [])

  def teacher_info(self) -> TeacherInfo:
    return TeacherInfo(name=self.model, api=APIS[self.api], params={
        "temperature": self.temperature, "max_tokens": self.max_tokens, "n": self.num_samples,
        "top_logprobs": self.top_logprobs, "stop": list(self.stop),
        "prompt": f"{self.prompt_file}.txt + \\nQuestion: {{q}}\\n{COT_TRIGGER}\\n"})


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How to talk to the server: limits, retries, timeouts, concurrency, progress period."""
  base_url: Optional[str] = None  # None: the client's default (OpenAI).
  concurrency: int = 8
  requests_per_minute: Optional[float] = None
  tokens_per_minute: Optional[float] = None
  timeout_s: float = 120.0
  max_attempts: int = 8
  initial_backoff_s: float = 1.0
  max_backoff_s: float = 60.0
  progress_period_s: float = 10.0


# ----------------------------------------------------------------------------- prompts and files

def build_prompt(few_shot_prompt: str, question: str) -> str:
  """The exact text the teacher continues (see ``prompt`` in the module docstring)."""
  return f"{few_shot_prompt}\nQuestion: {question}\n{COT_TRIGGER}\n"


def estimate_tokens(text: str) -> int:
  """Token count estimated as characters / ``CHARS_PER_TOKEN``, rounded up (no tokenizer)."""
  return math.ceil(len(text) / CHARS_PER_TOKEN)


def split_examples(split: str) -> List[MathExample]:
  if split not in SPLITS:
    raise ConfigError(f"--split {split!r} is not a training split; use one of {sorted(SPLITS)} "
                      "(dev and test questions must never become training data).")
  return splits.math_split(*SPLITS[split])


def file_examples(path) -> List[MathExample]:
  """The questions of a teacher-data JSONL (ids, questions and gold answers; samples ignored): what
  `--questions FILE` samples, e.g. another dataset's training questions."""
  return [MathExample(id=r.id, question=r.question, answer_text=r.gold_answer,
                      answer_number=r.gold_number, source=r.source)
          for r in teacher_data.read_records(path, strict=True).records]


def sibling_path(output, kind: str) -> pathlib.Path:
  """``X.jsonl`` -> ``X.<kind>.jsonl`` (``failures``, ``filtered``)."""
  output = pathlib.Path(output)
  stem = output.name[:-len(".jsonl")] if output.name.endswith(".jsonl") else output.name
  return output.with_name(f"{stem}.{kind}.jsonl")


def existing_ids(output: pathlib.Path, teacher: TeacherInfo) -> set:
  """Ids already in ``output``; raises if its records came from another teacher or settings."""
  if not output.exists():
    return set()
  result = teacher_data.read_records(output, strict=True)  # A torn last line is only a warning.
  for record in result.records:
    if record.teacher != teacher:
      theirs = record.teacher.to_json() if record.teacher else None
      raise ConfigError(
          f"{output}: record {record.id!r} was sampled with {theirs}, this run asks for "
          f"{teacher.to_json()}; resume with the same flags or write to another --output.")
  return {record.id for record in result.records}


def pending(examples: Sequence[MathExample], output, teacher: TeacherInfo) -> List[MathExample]:
  """The examples whose ids are not yet in ``output`` (see ``existing_ids``)."""
  done = existing_ids(pathlib.Path(output), teacher)
  return [e for e in examples if e.id not in done]


# ----------------------------------------------------------------------------- secrets

def scrub(text: str, secret: Optional[str]) -> str:
  """``text`` with every occurrence of ``secret`` replaced, cut to ``MAX_ERROR_CHARS``."""
  if secret:
    text = text.replace(secret, "***")
  return text[:MAX_ERROR_CHARS]


# ----------------------------------------------------------------------------- rate limits

class TokenBucket:
  """Allows ``rate_per_minute`` units a minute with bursts up to one minute's worth; thread-safe.

  A request larger than the bucket waits for a full bucket and leaves it in debt, so it is
  delayed, never refused.
  """

  def __init__(self, rate_per_minute: Optional[float], clock: Callable[[], float] = time.monotonic):
    self._rate_per_s = None if rate_per_minute is None else rate_per_minute / 60.0
    self._capacity = rate_per_minute
    self._level = rate_per_minute
    self._clock = clock
    self._last = clock()
    self._lock = threading.Lock()

  def acquire(self, amount: float) -> float:
    """Blocks until ``amount`` units are available, takes them; returns the seconds waited."""
    if self._rate_per_s is None:
      return 0.0
    waited = 0.0
    while True:
      with self._lock:
        now = self._clock()
        self._level = min(self._capacity, self._level + (now - self._last) * self._rate_per_s)
        self._last = now
        need = min(amount, self._capacity)
        if self._level >= need:
          self._level -= amount
          return waited
        delay = (need - self._level) / self._rate_per_s
      time.sleep(delay)
      waited += delay


# ----------------------------------------------------------------------------- responses

def _finite_logprob(value: Any) -> float:
  value = float(value) if value is not None else MIN_LOGPROB
  return min(0.0, max(MIN_LOGPROB, value)) if math.isfinite(value) else MIN_LOGPROB


def _offsets(tokens: Sequence[str], text: str) -> Tuple[int, ...]:
  """Char offset of each token in ``text`` (cumulative lengths, kept within the text)."""
  out, at = [], 0
  for token in tokens:
    out.append(min(at, len(text)))
    at += len(token)
  return tuple(out)


def _sorted_top(pairs: Sequence[Tuple[str, Any]]) -> Tuple[Tuple[str, float], ...]:
  """Best first. Everything the server sent is kept (OpenAI's completions may add the sampled
  token as a k+1-th entry), up to the schema's limit."""
  pairs = [(str(t), _finite_logprob(lp)) for t, lp in pairs]
  return tuple(sorted(pairs, key=lambda p: -p[1])[:teacher_data.MAX_TOP_LOGPROBS])


def _field(obj: Any, name: str) -> Any:
  """Attribute or key ``name`` of a response object (pydantic model or dict)."""
  return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def parse_completion_choice(choice: Any, k: int) -> TeacherSample:
  """One ``/v1/completions`` choice -> sample (answer and correctness filled in later)."""
  text = _field(choice, "text")
  if not isinstance(text, str):
    raise MalformedResponse("a completions choice has no string 'text'")
  fields: Dict[str, Any] = {}
  if k:
    logprobs = _field(choice, "logprobs")
    tokens = _field(logprobs, "tokens") if logprobs is not None else None
    token_logprobs = _field(logprobs, "token_logprobs") if logprobs is not None else None
    top = _field(logprobs, "top_logprobs") if logprobs is not None else None
    if not isinstance(tokens, list) or not isinstance(token_logprobs, list) or len(
        token_logprobs) != len(tokens) or (top is not None and len(top) != len(tokens)):
      raise MalformedResponse("a completions choice lacks per-token logprobs (tokens, "
                              "token_logprobs, top_logprobs of equal length)")
    top = top if top is not None else [None] * len(tokens)
    fields = {
        "tokens": tuple(str(t) for t in tokens),
        "logprobs": tuple(_finite_logprob(lp) for lp in token_logprobs),
        "top_logprobs": tuple(_sorted_top(list((pos or {}).items())) for pos in top),
        "offsets": _offsets(tokens, text)}
  return TeacherSample(text=text, answer=None, correct=None,
                       finish_reason=_field(choice, "finish_reason"), **fields)


def parse_chat_choice(choice: Any, k: int) -> TeacherSample:
  """One ``/v1/chat/completions`` choice -> sample; offsets computed from the token strings."""
  message = _field(choice, "message")
  text = _field(message, "content") if message is not None else None
  if not isinstance(text, str):
    raise MalformedResponse("a chat choice has no string message.content")
  fields: Dict[str, Any] = {}
  if k:
    logprobs = _field(choice, "logprobs")
    content = _field(logprobs, "content") if logprobs is not None else None
    if not isinstance(content, list):
      raise MalformedResponse("a chat choice lacks logprobs.content")
    tokens = tuple(str(_field(c, "token")) for c in content)
    fields = {
        "tokens": tokens,
        "logprobs": tuple(_finite_logprob(_field(c, "logprob")) for c in content),
        "top_logprobs": tuple(_sorted_top([(_field(t, "token"), _field(t, "logprob"))
                                           for t in (_field(c, "top_logprobs") or [])])
                              for c in content),
        "offsets": _offsets(tokens, text)}
  return TeacherSample(text=text, answer=None, correct=None,
                       finish_reason=_field(choice, "finish_reason"), **fields)


def _scored(sample: TeacherSample, gold: Optional[float]) -> TeacherSample:
  answer = answers.extract_answer(sample.text)
  return dataclasses.replace(sample, answer=answer, correct=teacher_data.is_correct(answer, gold))


# ----------------------------------------------------------------------------- requests

def _retry_after_s(error: BaseException) -> Optional[float]:
  """Seconds from a ``Retry-After`` (or ``retry-after-ms``) header of the error's response."""
  response = getattr(error, "response", None)
  headers = getattr(response, "headers", None)
  if headers is None:
    return None
  try:
    if headers.get("retry-after-ms") is not None:
      return float(headers["retry-after-ms"]) / 1000.0
    value = headers.get("retry-after")
    if value is None:
      return None
    try:
      return max(0.0, float(value))
    except ValueError:
      when = email.utils.parsedate_to_datetime(value)
      return max(0.0, when.timestamp() - time.time())
  except (TypeError, ValueError, OverflowError):
    return None


def _classify(error: BaseException) -> str:
  """``retry``, ``permanent`` (an API error retrying cannot fix) or ``bug`` (anything else)."""
  import openai  # pylint: disable=g-import-not-at-top
  if isinstance(error, (MalformedResponse, openai.APITimeoutError, openai.APIConnectionError,
                        openai.APIResponseValidationError)):
    return "retry"
  if isinstance(error, openai.APIStatusError):
    status = error.status_code
    return "retry" if status in RETRYABLE_STATUS or status >= 500 else "permanent"
  if isinstance(error, openai.OpenAIError):
    return "permanent"
  if isinstance(error, (ValueError, KeyError, TypeError)):  # A body that could not be parsed.
    return "retry"
  return "bug"


def backoff_s(attempt: int, run: RunConfig, retry_after: Optional[float],
              rng: random.Random) -> float:
  """Wait before retry ``attempt`` (1-based): full-jitter exponential, at least ``Retry-After``."""
  ceiling = min(run.max_backoff_s, run.initial_backoff_s * 2 ** (attempt - 1))
  wait = rng.uniform(0.0, ceiling)
  if retry_after is not None:
    wait = max(wait, retry_after + rng.uniform(0.0, 0.1 * max(retry_after, 0.1)))
  return wait


@dataclasses.dataclass
class QuestionResult:
  """The outcome of one question: a record, or the last error after ``attempts`` tries."""
  example: MathExample
  record: Optional[TeacherRecord]
  attempts: int
  error: Optional[str]
  usage: Dict[str, int]


class TeacherSampler:
  """Samples questions through one ``openai`` client, within the rate limits, with retries."""

  def __init__(self, sampling: SamplingConfig, run: RunConfig, few_shot_prompt: str,
               api_key: str, seed: Optional[int] = None):
    import openai  # pylint: disable=g-import-not-at-top  (only when sampling for real)
    sampling.check()
    self._sampling = sampling
    self._run = run
    self._few_shot_prompt = few_shot_prompt
    self._api_key = api_key
    self._client = openai.OpenAI(api_key=api_key, base_url=run.base_url, timeout=run.timeout_s,
                                 max_retries=0)
    self._requests = TokenBucket(run.requests_per_minute)
    self._tokens = TokenBucket(run.tokens_per_minute)
    self._rng = random.Random(seed)
    self._rng_lock = threading.Lock()
    self._teacher = sampling.teacher_info()

  def _request(self, prompt: str, n: int) -> Tuple[List[TeacherSample], Dict[str, int]]:
    s = self._sampling
    self._requests.acquire(1)
    self._tokens.acquire(estimate_tokens(prompt) + s.max_tokens * n)
    common = dict(model=s.model, n=n, temperature=s.temperature, max_tokens=s.max_tokens,
                  stop=list(s.stop) or None)
    if s.api == "completions":
      response = self._client.completions.create(
          prompt=prompt, logprobs=s.top_logprobs or None, **common)
      parse = parse_completion_choice
    else:
      extra = {"logprobs": True, "top_logprobs": s.top_logprobs} if s.top_logprobs else {}
      response = self._client.chat.completions.create(
          messages=[{"role": "user", "content": prompt}], **extra, **common)
      parse = parse_chat_choice
    choices = _field(response, "choices")
    if not isinstance(choices, list) or len(choices) != n:
      raise MalformedResponse(f"expected {n} choices, got "
                              f"{len(choices) if isinstance(choices, list) else type(choices)}")
    # Servers may return choices out of order; `index` says which is which.
    choices = sorted(choices, key=lambda c: _field(c, "index") or 0)
    usage = _field(response, "usage")
    counts = {name: int(_field(usage, name) or 0) if usage is not None else 0
              for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return [parse(c, s.top_logprobs) for c in choices], counts

  def _wait(self, attempt: int, error: BaseException) -> None:
    with self._rng_lock:
      delay = backoff_s(attempt, self._run, _retry_after_s(error), self._rng)
    time.sleep(delay)

  def sample_question(self, example: MathExample) -> QuestionResult:
    """All samples of one question, or the last error once retries are used up."""
    prompt = build_prompt(self._few_shot_prompt, example.question)
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "requests": 0,
             "retries": 0}
    samples: List[TeacherSample] = []
    attempts = 0
    for n in self._sampling.request_sizes():
      tries = 0  # Of this request; `attempts` counts every request of the question.
      while True:
        tries += 1
        attempts += 1
        usage["requests"] += 1
        try:
          got, counts = self._request(prompt, n)
        except Exception as e:  # pylint: disable=broad-except  (classified: re-raised or recorded)
          kind = _classify(e)
          if kind == "bug":
            raise  # Not a server problem: stop loudly rather than record it per question.
          message = scrub(f"{type(e).__name__}: {e}", self._api_key)
          if kind == "permanent" or tries >= self._run.max_attempts:
            LOG.warning("%s: giving up after %d attempts: %s", example.id, tries, message)
            return QuestionResult(example, None, attempts, message, usage)
          usage["retries"] += 1
          LOG.info("%s: attempt %d failed (%s); retrying", example.id, tries, message)
          self._wait(tries, e)
          continue
        for name, value in counts.items():
          usage[name] += value
        samples.extend(got)
        break
    record = TeacherRecord(
        id=example.id, source=example.source, split=example.id.split("/")[1],
        question=example.question, gold_answer=example.answer_text,
        gold_number=example.answer_number,
        samples=tuple(_scored(s, example.answer_number) for s in samples),
        teacher=self._teacher, meta={"attempts": attempts, "usage": usage})
    return QuestionResult(example, record, attempts, None, usage)


# ----------------------------------------------------------------------------- the run

def dry_run_estimate(examples: Sequence[MathExample], sampling: SamplingConfig,
                     few_shot_prompt: str, price_per_1k_input: float = 0.0,
                     price_per_1k_output: float = 0.0) -> Dict[str, Any]:
  """Token and cost estimate for sampling ``examples`` (no request is made).

  Input tokens count the prompt once per request; output tokens are the upper bound
  ``max_tokens x num_samples`` per question (real chains of GSM8K are ~100 tokens, so expect less).
  """
  requests_per_question = len(sampling.request_sizes())
  input_tokens = sum(estimate_tokens(build_prompt(few_shot_prompt, e.question))
                     for e in examples) * requests_per_question
  output_tokens = len(examples) * sampling.max_tokens * sampling.num_samples
  return {"dry_run": True, "questions": len(examples),
          "requests": len(examples) * requests_per_question,
          "estimated_input_tokens": input_tokens,
          "estimated_output_tokens_max": output_tokens,
          "token_estimator": f"characters / {CHARS_PER_TOKEN}, rounded up",
          "estimated_cost_max": round(input_tokens / 1000 * price_per_1k_input +
                                      output_tokens / 1000 * price_per_1k_output, 4)}


def _append_failure(path: pathlib.Path, result: QuestionResult) -> None:
  line = json.dumps({"id": result.example.id, "attempts": result.attempts,
                     "last_error": result.error, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
  with open(path, "a", encoding="utf-8") as f:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())


class _Progress:
  """Logs done/total, rate and ETA at most every ``period_s`` seconds."""

  def __init__(self, total: int, period_s: float):
    self._total, self._period_s = total, period_s
    self._start = self._last = time.monotonic()
    self.done = 0

  def step(self, force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self._last < self._period_s:
      return
    self._last = now
    rate = self.done / max(now - self._start, 1e-9)
    eta = (self._total - self.done) / rate if rate > 0 else float("inf")
    LOG.info("teacher: %d/%d questions, %.2f questions/s, ETA %s", self.done, self._total, rate,
             f"{eta:.0f}s" if math.isfinite(eta) else "unknown")


def run_teacher(examples: Sequence[MathExample], output, sampling: SamplingConfig,
                run: RunConfig, few_shot_prompt: str, api_key: str,
                write_filtered: bool = True, seed: Optional[int] = None) -> Dict[str, Any]:
  """Samples every example not yet in ``output``; returns the summary (see the module docstring).

  Finished questions are appended one record each as they complete; failures are appended to the
  failures file (which starts empty each run: its questions are retried).
  """
  if "://" in os.fspath(output):
    raise ConfigError(f"--output {output}: the teacher run appends one durable line per response, "
                      "which needs a local file; write it locally and copy it to the bucket after.")
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  failures_path = sibling_path(output, "failures")
  start = time.monotonic()
  sampler = TeacherSampler(sampling, run, few_shot_prompt, api_key, seed=seed)
  todo = pending(examples, output, sampling.teacher_info())
  if failures_path.exists():
    LOG.info("%s: retrying the questions that failed last run", failures_path)
    failures_path.unlink()
  LOG.info("teacher: %d questions, %d already in %s, %d to sample", len(examples),
           len(examples) - len(todo), output, len(todo))
  usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "requests": 0,
           "retries": 0}
  failed: List[Dict[str, Any]] = []
  progress = _Progress(len(todo), run.progress_period_s)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, run.concurrency))
  in_flight = {pool.submit(sampler.sample_question, e) for e in todo}
  try:
    while in_flight:
      finished, in_flight = concurrent.futures.wait(
          in_flight, timeout=run.progress_period_s, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in finished:
        result = future.result()
        for name, value in result.usage.items():
          usage[name] += value
        if result.record is not None:
          teacher_data.append_record(output, result.record)  # Only this thread writes.
        else:
          _append_failure(failures_path, result)
          failed.append({"id": result.example.id, "attempts": result.attempts,
                         "last_error": result.error})
        progress.done += 1
      progress.step()
  finally:  # On an error or Ctrl-C, start nothing new; what is already written stays.
    pool.shutdown(wait=True, cancel_futures=True)
  progress.step(force=True)
  summary = {
      "output": str(output),
      "questions": {"requested": len(examples), "skipped_already_done": len(examples) - len(todo),
                    "done": len(todo) - len(failed), "failed": len(failed)},
      "usage": usage, "failures_file": str(failures_path) if failed else None,
      "failed": failed[:20]}
  summary.update(summarize_output(output, write_filtered))
  summary["seconds"] = round(time.monotonic() - start, 3)
  return summary


def summarize_output(output: pathlib.Path, write_filtered: bool) -> Dict[str, Any]:
  """Teacher accuracy over every record in ``output`` and, optionally, its filtered file."""
  if not output.exists():
    return {"teacher": None, "filter": None}
  records = teacher_data.read_records(output, strict=True).records
  stats = teacher_data.summarize(records)
  out: Dict[str, Any] = {"teacher": {
      "questions": stats["questions"], "samples": stats["samples"],
      "per_sample_accuracy": stats["per_sample_accuracy"],
      "majority_vote_accuracy": stats["majority_vote_accuracy"]}, "filter": None}
  if write_filtered:
    kept, report = teacher_filter.filter_records(records)
    filtered_path = sibling_path(output, "filtered")
    teacher_data.write_records(filtered_path, kept)
    out["filter"] = dict(report.to_json(), output=str(filtered_path))
  return out


def read_api_key(environ: Mapping[str, str] = os.environ) -> str:
  key = environ.get(API_KEY_ENV, "")
  if not key:
    raise ConfigError(f"set {API_KEY_ENV} (for a local vLLM server any value works, e.g. "
                      f"{API_KEY_ENV}=EMPTY); the key is read from the environment only.")
  return key


def load_few_shot_prompt(name_or_path: str) -> str:
  """A prompt file name in the data dir's ``prompts/fu2023_lib_prompt`` or a path to a file."""
  path = pathlib.Path(name_or_path)
  if path.suffix == ".txt" and path.is_file():
    return path.read_text(encoding="utf-8")
  return readers.read_prompt(name_or_path[:-4] if name_or_path.endswith(".txt") else name_or_path)
