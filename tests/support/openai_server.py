"""A real OpenAI-compatible HTTP server on loopback, for testing the teacher client end to end.

It serves ``POST /v1/completions`` and ``POST /v1/chat/completions`` with logprobs. The question is
parsed out of the prompt's last ``Question:``/``Q:`` block and looked up in the GSM8K train file;
choice ``i`` of a request is built from the gold rationale by ``CHOICE_KINDS[i % 4]``:

  correct     rationale + "The answer is N"
  correct     the same
  wrong       rationale + "The answer is N+1"
  no_answer   "I am not sure." (no answer line, no number)

so with n=4 a question has 2 correct samples, 1 incorrect, 1 without an answer line; per-sample
accuracy 0.5 and majority vote 1.0. Text is split into word-ish tokens (``\\n``, or an optional
space and non-space run) that join back to the text, each with a fake top-k list whose best entry
is the sampled token.

Faults, consumed one per request in order from ``server.faults`` (a list the test fills):
``"429"`` (with ``Retry-After: server.retry_after_s``), ``"500"``, ``"slow"`` (sleeps
``server.slow_s``, past the client's timeout, then answers), ``"malformed"`` (200 with a JSON body
cut short), ``"bad_shape"`` (valid JSON with no choices), ``"drop"`` (closes the socket without a
response). Questions whose text contains one of ``server.always_fail`` get a 500 every time.
``server.delay_s`` delays every response.
"""
import http.server
import json
import math
import re
import socket
import threading
import time
from typing import Dict, List, Optional, Tuple

CHOICE_KINDS = ("correct", "correct", "wrong", "no_answer")
FAULTS = ("429", "500", "slow", "malformed", "bad_shape", "drop")
_LAST_QUESTION = re.compile(r"(?:^|\n)(?:Question|Q):\s*((?:(?!\n(?:Question|Q):).)*)\Z", re.DOTALL)
_TOKEN = re.compile(r"\n|[ ]?[^\s]+|\s")
_ALTERNATIVES = (" the", " a", " is", ".", " and", " of", " to", " in", " we", " so", " 1", " 2",
                 " 3", " 4", " 5", " he", " she", " it", " that", " for")


def gold_solutions(gsm8k_train_path) -> Dict[str, Tuple[str, str]]:
  """question -> (rationale without calculator notes, final answer) from GSM8K train."""
  out = {}
  with open(gsm8k_train_path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      rationale, final = row["answer"].rsplit("####", 1)
      rationale = re.sub(r"<<[^>]*>>", "", rationale).strip() + "\n"
      out[row["question"].strip()] = (rationale, final.strip())
  return out


def question_of(prompt: str) -> str:
  match = _LAST_QUESTION.search(prompt.rstrip())
  if match is None:
    return ""
  question = match.group(1).strip()
  trigger = "Let's think step by step"
  return question[:-len(trigger)].rstrip() if question.endswith(trigger) else question


def choice_text(gold: Optional[Tuple[str, str]], index: int) -> str:
  if gold is None:
    return "I do not know this question."
  rationale, final = gold
  kind = CHOICE_KINDS[index % len(CHOICE_KINDS)]
  if kind == "correct":
    return f"{rationale}The answer is {final}"
  if kind == "wrong":
    return f"{rationale}The answer is {float(final.replace(',', '')) + 1:g}"
  return "I am not sure."


def tokenize(text: str) -> List[str]:
  tokens = _TOKEN.findall(text)
  assert "".join(tokens) == text
  return tokens


def top_k(token: str, position: int, k: int) -> List[Tuple[str, float]]:
  """The sampled token first, then alternatives with lower, distinct logprobs; like a real API's,
  the k probabilities sum to less than one."""
  best = 0.7 - 0.05 * (position % 5)
  pairs = [(token, math.log(best))]
  for alt in _ALTERNATIVES:
    if len(pairs) >= k:
      break
    if alt != token:
      pairs.append((alt, math.log((1.0 - best) * 0.8 * 0.5 ** len(pairs))))
  return pairs


class FakeOpenAIServer:
  """``http.server.ThreadingHTTPServer`` on 127.0.0.1:<free port>, in a daemon thread."""

  def __init__(self, solutions: Dict[str, Tuple[str, str]], api_key: str):
    self.solutions = solutions
    self.api_key = api_key
    self.faults: List[str] = []
    self.always_fail: List[str] = []
    self.retry_after_s = 1.0
    self.slow_s = 2.0
    self.delay_s = 0.0
    self.requests: List[Dict] = []  # {"time", "path", "question", "fault", "authorized"}
    self.lock = threading.Lock()
    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
    self._httpd.daemon_threads = True
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

  def start(self) -> "FakeOpenAIServer":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()

  def next_fault(self, question: str) -> Optional[str]:
    with self.lock:
      if any(s in question for s in self.always_fail):
        return "500"
      return self.faults.pop(0) if self.faults else None

  def response_body(self, path: str, body: Dict) -> Dict:
    chat = path.endswith("/chat/completions")
    prompt = body["messages"][-1]["content"] if chat else body["prompt"]
    gold = self.solutions.get(question_of(prompt))
    n = int(body.get("n") or 1)
    if chat:
      k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    else:
      k = int(body.get("logprobs") or 0)
    choices, completion_tokens = [], 0
    # Returned in reverse order: the client must sort by `index`.
    for i in reversed(range(n)):
      text = choice_text(gold, i)
      tokens = tokenize(text)
      completion_tokens += len(tokens)
      if chat:
        logprobs = None if not k else {"content": [
            {"token": t, "logprob": top_k(t, j, k)[0][1], "bytes": list(t.encode()),
             "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(a.encode())}
                              for a, lp in top_k(t, j, k)]} for j, t in enumerate(tokens)]}
        choices.append({"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs, "finish_reason": "stop"})
      else:
        offsets, at = [], len(prompt)  # OpenAI's text_offset counts from the prompt's start.
        for t in tokens:
          offsets.append(at)
          at += len(t)
        logprobs = None if not k else {
            "tokens": tokens,
            "token_logprobs": [top_k(t, j, k)[0][1] for j, t in enumerate(tokens)],
            "top_logprobs": [dict(top_k(t, j, k)) for j, t in enumerate(tokens)],
            "text_offset": offsets}
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": "stop"})
    prompt_tokens = len(prompt) // 4
    return {"id": "cmpl-test", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.get("model", "?"), "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _handler_class(server: FakeOpenAIServer):

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # Quiet.
      pass

    def _send(self, status: int, payload: bytes, headers: Dict[str, str] = None) -> None:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(payload)))
      for name, value in (headers or {}).items():
        self.send_header(name, value)
      self.end_headers()
      try:
        self.wfile.write(payload)
        self.wfile.flush()
      except (BrokenPipeError, ConnectionResetError):
        pass

    def _error(self, status: int, message: str, headers: Dict[str, str] = None) -> None:
      self._send(status, json.dumps({"error": {"message": message, "type": "test"}}).encode(),
                 headers)

    def do_POST(self):  # pylint: disable=invalid-name
      length = int(self.headers.get("Content-Length", 0))
      body = json.loads(self.rfile.read(length) or b"{}")
      chat = self.path.endswith("/chat/completions")
      prompt = (body.get("messages") or [{}])[-1].get("content", "") if chat else body.get(
          "prompt", "")
      question = question_of(prompt)
      fault = server.next_fault(question)
      authorized = self.headers.get("Authorization") == f"Bearer {server.api_key}"
      with server.lock:
        server.requests.append({"time": time.monotonic(), "path": self.path,
                                "question": question, "fault": fault, "authorized": authorized})
      if self.path not in ("/v1/completions", "/v1/chat/completions"):
        return self._error(404, f"no route {self.path}")
      if not authorized:
        return self._error(401, "bad key")
      if server.delay_s:
        time.sleep(server.delay_s)
      if fault == "429":
        return self._error(429, "slow down", {"Retry-After": f"{server.retry_after_s:g}"})
      if fault == "500":
        return self._error(500, "internal error")
      if fault == "drop":
        self.close_connection = True
        try:
          self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass
        return None
      if fault == "malformed":
        return self._send(200, b'{"id": "cmpl-test", "choices": [{"index": 0, "te')
      if fault == "bad_shape":
        return self._send(200, json.dumps({"id": "cmpl-test", "object": "text_completion",
                                           "created": 0, "model": "m", "choices": []}).encode())
      if fault == "slow":
        time.sleep(server.slow_s)
      return self._send(200, json.dumps(server.response_body(self.path, body)).encode())

  return Handler
