"""OpenAI's `/v1/completions` over a loaded checkpoint: requests checked against limits, answered in
batches on one decoder, with the API's logprobs.

Terms:
  request: the JSON body of `POST /v1/completions` (`CompletionRequest.parse`): `prompt` (a string
    or a list of them), `max_tokens` (16), `temperature` (1.0; 0 decodes greedily), `top_p`, `n`,
    `logprobs` (top-k per token, at most `Limits.max_logprobs`), `stop` (up to 4 strings), `seed`.
    Not supported, and refused by name: `stream`, `echo`, `best_of` other than `n`, `suffix`,
    `logit_bias`, penalties.
  token text: a SentencePiece piece with `▁` as a space. A completion's `text` is its tokens joined
    (so `logprobs.text_offset` indexes it exactly; it may begin with a space, as GPT tokens do), up
    to the end of sequence, or to the last whole token before the first stop string.
  logprobs: the model's own log-probabilities (temperature 1) of each generated token and of the
    top-k tokens at its position, from one teacher-forced pass over prompt and completion, as
    `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`.
  batch: the rows of several requests with the same sampling settings, decoded together
    (`CompletionEngine.complete`); prompt lengths, row counts and decode lengths are rounded up to
    buckets so a few compiled shapes serve every request.
"""
import dataclasses
import time
import uuid
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from specialize_jax.checkpoints import pretrained
from specialize_jax.model import decoding

UNSUPPORTED = ("stream", "echo", "suffix", "logit_bias", "presence_penalty", "frequency_penalty",
               "user")
MAX_STOP = 4


class RequestError(ValueError):
  """A request the API refuses: becomes an OpenAI-shaped error body with this HTTP status."""

  def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
               error_type: str = "invalid_request_error", code: Optional[str] = None):
    super().__init__(message)
    self.param, self.status, self.error_type, self.code = param, status, error_type, code

  def body(self) -> Dict[str, Any]:
    return {"error": {"message": str(self), "type": self.error_type, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for."""
  max_prompt_tokens: int = 1024
  max_tokens: int = 512
  max_n: int = 64
  max_logprobs: int = 20
  max_prompts: int = 64
  max_rows: int = 64  # completions (prompts x n) per request: one decode's rows at most


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
  """A checked `/v1/completions` request."""
  model: str
  prompts: Tuple[str, ...]
  max_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  n: int = 1
  logprobs: Optional[int] = None
  stop: Tuple[str, ...] = ()
  seed: Optional[int] = None

  @property
  def sampling(self) -> Tuple[float, float]:
    """What rows must share to be decoded together."""
    return (self.temperature, self.top_p)

  @classmethod
  def parse(cls, body: Any, limits: Limits) -> "CompletionRequest":
    if not isinstance(body, dict):
      raise RequestError("The request body must be a JSON object.")
    for name in UNSUPPORTED:
      if body.get(name) not in (None, False, 0, 0.0, {}, ""):
        raise RequestError(f"{name!r} is not supported by this server.", param=name)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
      prompts = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
      prompts = tuple(prompt)
    else:
      raise RequestError("'prompt' must be a string or a non-empty list of strings (token-id "
                         "prompts are not supported).", param="prompt")
    if len(prompts) > limits.max_prompts:
      raise RequestError(f"{len(prompts)} prompts; at most {limits.max_prompts} per request.",
                         param="prompt")
    n = _integer(body, "n", 1, 1, limits.max_n)
    if len(prompts) * n > limits.max_rows:
      raise RequestError(f"{len(prompts)} prompts x n={n} is {len(prompts) * n} completions; at "
                         f"most {limits.max_rows} per request.", param="n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
      raise RequestError("'best_of' other than 'n' is not supported.", param="best_of")
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
      raise RequestError(f"'stop' must be a non-empty string or up to {MAX_STOP} of them.",
                         param="stop")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
      raise RequestError("'top_p' must be above 0.", param="top_p")
    model = body.get("model")
    if not isinstance(model, str) or not model:
      raise RequestError("'model' is required (GET /v1/models lists it).", param="model")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
      raise RequestError("'seed' must be an integer.", param="seed")
    logprobs = body.get("logprobs")
    if logprobs is not None:
      logprobs = _integer(body, "logprobs", 0, 0, limits.max_logprobs)
    return cls(model=model, prompts=prompts,
               max_tokens=_integer(body, "max_tokens", 16, 1, limits.max_tokens),
               temperature=temperature, top_p=top_p, n=n, logprobs=logprobs, stop=stop,
               seed=seed)


def _integer(body: Mapping, name: str, default: int, low: int, high: int) -> int:
  value = body.get(name, default)
  if value is None:
    value = default
  if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
    raise RequestError(f"'{name}' must be an integer in [{low}, {high}], got {value!r}.",
                       param=name)
  return value


def _number(body: Mapping, name: str, default: float, low: float, high: float) -> float:
  value = body.get(name, default)
  if value is None:
    value = default
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
    raise RequestError(f"'{name}' must be a number in [{low}, {high}], got {value!r}.",
                       param=name)
  return float(value)


def _bucket(value: int, smallest: int = 8) -> int:
  """The next power of two at least `value` (and `smallest`): few compiled shapes."""
  return max(smallest, 1 << (max(value, 1) - 1).bit_length())


@dataclasses.dataclass
class _Row:
  """One decode: prompt `prompt_index` of `request`, its `sample`-th choice."""
  request: int
  prompt_index: int
  sample: int


class CompletionEngine:
  """Answers `CompletionRequest`s with a `PretrainedModel` that has a SentencePiece vocabulary."""

  def __init__(self, model: pretrained.PretrainedModel, model_name: str,
               limits: Limits = Limits(), seed: int = 0):
    if model.vocabulary is None:
      raise ValueError("Serving needs the model's vocabulary: load_pretrained(path, "
                       "vocabulary=SPM_MODEL).")
    self.model, self.model_name, self.limits = model, model_name, limits
    processor = model.vocabulary.tokenizer
    self._pieces = [processor.id_to_piece(i).replace("▁", " ")
                    for i in range(processor.get_piece_size())]
    self._calls = 0
    self._seed = seed
    self._log_softmax = jax.jit(lambda logits: jax.nn.log_softmax(logits, axis=-1))

  def token_text(self, token_id: int) -> str:
    return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else ""

  def check(self, request: CompletionRequest) -> List[List[int]]:
    """The request's prompts as ids (with EOS), refusing a wrong model name or a long prompt."""
    if request.model != self.model_name:
      raise RequestError(f"The model {request.model!r} does not exist; this server serves "
                         f"{self.model_name!r}.", param="model", status=404,
                         code="model_not_found")
    prompts = []
    for prompt in request.prompts:
      ids = list(self.model.vocabulary.encode(prompt)) + [decoding.EOS_ID]
      if len(ids) > self.limits.max_prompt_tokens:
        raise RequestError(f"The prompt is {len(ids)} tokens; this server takes at most "
                           f"{self.limits.max_prompt_tokens}.", param="prompt",
                           code="context_length_exceeded")
      prompts.append(ids)
    return prompts

  def complete(self, requests: Sequence[CompletionRequest]) -> List[Dict[str, Any]]:
    """Responses to `requests`, which must share `sampling`: all their rows in one decode."""
    if len({r.sampling for r in requests}) != 1:
      raise ValueError("complete() takes requests with the same temperature and top_p.")
    prompts = [self.check(r) for r in requests]
    rows = [_Row(i, p, s) for i, r in enumerate(requests) for p in range(len(r.prompts))
            for s in range(r.n)]
    temperature, top_p = requests[0].sampling
    decode_length = _bucket(max(r.max_tokens for r in requests))
    input_length = _bucket(max(len(ids) for request in prompts for ids in request))
    tokens = np.zeros((_bucket(len(rows), 1), input_length), np.int32)
    for j, row in enumerate(rows):
      ids = prompts[row.request][row.prompt_index]
      tokens[j, :len(ids)] = ids
    seed = next((r.seed for r in requests if r.seed is not None), None)
    if seed is None:
      seed, self._calls = self._seed + self._calls, self._calls + 1
    method = "greedy" if temperature == 0.0 else "sample"
    generated = np.asarray(self.model.model.predict_batch(
        self.model.params, {"encoder_input_tokens": jnp.asarray(tokens)},
        jax.random.key(seed) if method == "sample" else None, decode_method=method,
        max_decode_length=decode_length, temperature=max(temperature, 1e-6), topp=top_p))
    wants_logprobs = any(r.logprobs is not None for r in requests)
    log_probs = self._logprobs(tokens, generated) if wants_logprobs else None
    choices: List[List[Dict[str, Any]]] = [[] for _ in requests]
    for j, row in enumerate(rows):
      request = requests[row.request]
      choice = self._choice(generated[j], request, None if log_probs is None else log_probs[j])
      choice["index"] = row.prompt_index * request.n + row.sample
      choices[row.request].append(choice)
    responses = []
    for request, request_prompts, request_choices in zip(requests, prompts, choices):
      completion_tokens = sum(c.pop("_tokens") for c in request_choices)
      prompt_tokens = sum(len(ids) for ids in request_prompts)
      responses.append({
          "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
          "created": int(time.time()), "model": self.model_name,
          "choices": sorted(request_choices, key=lambda c: c["index"]),
          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}})
    return responses

  def _logprobs(self, inputs: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Log-probabilities `[rows, length, vocab]` of the model at each generated position."""
    decoder_inputs = np.pad(generated[:, :-1], ((0, 0), (1, 0)))  # BOS 0, shifted right
    logits = self.model.logits(inputs, decoder_inputs, np.maximum(generated, 1))
    return np.asarray(self._log_softmax(jnp.asarray(logits)))

  def _choice(self, ids: np.ndarray, request: CompletionRequest,
              log_probs: Optional[np.ndarray]) -> Dict[str, Any]:
    ids = [int(i) for i in ids[:request.max_tokens]]
    finish = "length"
    if decoding.EOS_ID in ids:
      ids, finish = ids[:ids.index(decoding.EOS_ID)], "stop"
    texts = [self.token_text(i) for i in ids]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in texts])]).astype(int)
    text = "".join(texts)
    cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=None)
    if cut is not None:  # The whole tokens before the stop string.
      kept = int(np.sum(offsets[1:] <= cut))
      ids, texts, finish = ids[:kept], texts[:kept], "stop"
      text = "".join(texts)
    choice = {"text": text, "logprobs": None, "finish_reason": finish, "_tokens": len(ids)}
    if request.logprobs is not None and log_probs is not None:
      top = []
      for position, token in enumerate(ids):
        row = log_probs[position]
        best = np.argsort(-row, kind="stable")[:request.logprobs]
        entries: Dict[str, float] = {}
        for candidate in best:
          name = self.token_text(int(candidate))
          entries.setdefault(name, float(row[candidate]))
        top.append(entries)
      choice["logprobs"] = {
          "tokens": texts, "token_logprobs": [float(log_probs[p][t]) for p, t in enumerate(ids)],
          "top_logprobs": top, "text_offset": [int(o) for o in offsets[:len(ids)]]}
    return choice
