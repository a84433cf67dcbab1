"""`specialize serve`: an OpenAI-compatible HTTP server (`/v1/completions`, `/v1/models`) for one
checkpoint, with concurrent requests batched onto its decoder.

Terms:
  batching: HTTP threads parse and check each request, then queue it; one decode thread takes the
    oldest request, waits up to `batch_window_s` for more with the same sampling settings, and
    answers them all with one decode of at most `max_batch_rows` rows (`CompletionEngine`). The
    decoder runs on one thread only: JAX work is never interleaved.
  key: with `api_key`, every request needs `Authorization: Bearer <key>` (401 otherwise).
  errors: OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request,
    401, 404 for an unknown path or model, 500 (logged with its traceback) for a failure here.
"""
import concurrent.futures
import dataclasses
import hmac
import http.server
import json
import logging
import queue
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from specialize_jax.serving import completions

MAX_BODY_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  host: str = "127.0.0.1"
  port: int = 8000
  api_key: Optional[str] = None
  batch_window_s: float = 0.01
  max_batch_rows: int = 64


class _Pending:
  def __init__(self, request: completions.CompletionRequest):
    self.request = request
    self.rows = len(request.prompts) * request.n
    self.future: concurrent.futures.Future = concurrent.futures.Future()


class CompletionServer:
  """The HTTP server and its decode thread; `start()` returns once it listens (`url`)."""

  def __init__(self, engine: completions.CompletionEngine, config: ServeConfig = ServeConfig(),
               log=logging.info):
    self.engine, self.config, self.log = engine, config, log
    self._queue: "queue.Queue[Optional[_Pending]]" = queue.Queue()
    self._held: List[_Pending] = []
    self._httpd = http.server.ThreadingHTTPServer((config.host, config.port), self._handler())
    self._httpd.daemon_threads = True
    self._threads: List[threading.Thread] = []
    self.batches = 0  # decodes run, for tests and the log

  @property
  def url(self) -> str:
    host, port = self._httpd.server_address[:2]
    return f"http://{host}:{port}/v1"

  def start(self) -> "CompletionServer":
    self._threads = [threading.Thread(target=self._decode_loop, name="decode", daemon=True),
                     threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)]
    for thread in self._threads:
      thread.start()
    return self

  def stop(self) -> None:
    self._httpd.shutdown()
    self._queue.put(None)
    for thread in self._threads:
      thread.join(timeout=30)
    self._httpd.server_close()

  # -- decoding ------------------------------------------------------------------------------------

  def submit(self, request: completions.CompletionRequest) -> Dict[str, Any]:
    """Queues a checked request and waits for its response (raises its `RequestError`)."""
    self.engine.check(request)  # A bad prompt or model fails here, not in someone's batch.
    pending = _Pending(request)
    self._queue.put(pending)
    return pending.future.result()

  def _next_batch(self) -> Optional[List[_Pending]]:
    first = self._held.pop(0) if self._held else self._queue.get()
    if first is None:
      return None
    batch, rows = [first], first.rows
    deadline = time.monotonic() + self.config.batch_window_s
    while rows < self.config.max_batch_rows:
      try:
        more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if more is None:
        self._queue.put(None)
        break
      if (more.request.sampling == first.request.sampling and
          rows + more.rows <= self.config.max_batch_rows):
        batch.append(more)
        rows += more.rows
      else:
        self._held.append(more)
    return batch

  def _decode_loop(self) -> None:
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      try:
        responses = self.engine.complete([p.request for p in batch])
        self.batches += 1
        for pending, response in zip(batch, responses):
          pending.future.set_result(response)
      except Exception as e:  # pylint: disable=broad-except
        for pending in batch:
          pending.future.set_exception(e)

  # -- HTTP ----------------------------------------------------------------------------------------

  def _answer(self, method: str, path: str, headers, body: bytes) -> Tuple[int, Dict[str, Any]]:
    if self.config.api_key is not None:
      given = headers.get("Authorization", "")
      if not hmac.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
        return 401, completions.RequestError(
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", status=401,
            code="invalid_api_key").body()
    path = path.split("?", 1)[0].rstrip("/")
    if method == "GET" and path == "/v1/models":
      return 200, {"object": "list", "data": [
          {"id": self.engine.model_name, "object": "model", "created": 0,
           "owned_by": "specialize_jax"}]}
    if method != "POST" or path != "/v1/completions":
      return 404, completions.RequestError(
          f"No route {method} {path}; this server has POST /v1/completions and GET /v1/models.",
          status=404).body()
    try:
      request = completions.CompletionRequest.parse(json.loads(body or b"null"),
                                                    self.engine.limits)
      return 200, self.submit(request)
    except json.JSONDecodeError as e:
      return 400, completions.RequestError(f"The body is not valid JSON: {e}.").body()
    except completions.RequestError as e:
      return e.status, e.body()

  def _handler(self):
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def _respond(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
          status, payload = 413, completions.RequestError(
              f"The body is {length} bytes; at most {MAX_BODY_BYTES}.", status=413).body()
          self.close_connection = True
        else:
          body = self.rfile.read(length) if length else b""
          try:
            status, payload = server._answer(method, self.path, self.headers, body)  # pylint: disable=protected-access
          except Exception:  # pylint: disable=broad-except
            logging.exception("serve: %s %s failed", method, self.path)
            status, payload = 500, completions.RequestError(
                "The server failed on this request (its log has the traceback).", status=500,
                error_type="server_error").body()
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def do_POST(self):  # pylint: disable=invalid-name
        self._respond("POST")

      def do_GET(self):  # pylint: disable=invalid-name
        self._respond("GET")

      def log_message(self, fmt, *args):  # pylint: disable=arguments-differ
        logging.debug("serve: " + fmt, *args)

    return Handler
