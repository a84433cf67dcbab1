"""`specialize download` against a real HTTP server on 127.0.0.1 that serves the shared data folder.

The server can corrupt a file, drop the connection mid-body once, or always; the tests check that a
bad download never creates or replaces its target. Loopback only: no test touches the network.
"""
import collections
import contextlib
import dataclasses
import filecmp
import hashlib
import http.server
import pathlib
import re
import shutil
import threading
import urllib.parse

import pytest

from specialize_jax.data import download
from tests.support import shared_data

# Small backoff and timeout so the retry tests take milliseconds.
FAST = dict(timeout_s=5, retries=2, retry_backoff_s=0.01)
DERIVED_FILES = ("asdiv/ASDiv.jsonl", "tokenizer/flan_t5_golden_tokenization.json",
                 "teacher_outputs/fu2023_codex_notebook/")


@dataclasses.dataclass
class ServerBehaviour:
  """What the test server does wrong, per relative path, and what it was asked for."""
  root: pathlib.Path
  corrupt: frozenset = frozenset()
  drop_first: frozenset = frozenset()
  drop_always: frozenset = frozenset()
  requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _handler_for(behaviour: ServerBehaviour):
  """A request handler class bound to ``behaviour`` (http.server instantiates it per request)."""

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):  # pylint: disable=invalid-name
      relative_path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
      with behaviour.lock:
        behaviour.requests[relative_path] += 1
        count = behaviour.requests[relative_path]
      path = (behaviour.root / relative_path).resolve()
      if not path.is_file() or behaviour.root not in path.parents:
        self.send_error(404, f"no file {relative_path}")
        return
      body = path.read_bytes()
      if relative_path in behaviour.corrupt:
        body = bytes([body[0] ^ 0xFF]) + body[1:]  # same length, wrong bytes
      self.send_response(200)
      self.send_header("Content-Type", "application/octet-stream")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      drop = (relative_path in behaviour.drop_always or
              (relative_path in behaviour.drop_first and count == 1))
      if drop:  # promise the whole body, send half, hang up
        self.wfile.write(body[:len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        return
      self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output clean
      del args

  return Handler


@contextlib.contextmanager
def serve(behaviour: ServerBehaviour):
  """Serves ``behaviour.root`` on an ephemeral 127.0.0.1 port; yields the base URL."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(behaviour))
  server.daemon_threads = True
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                            daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
  """urllib honours *_proxy variables; loopback requests must never leave the machine."""
  for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def shared_dir():
  return shared_data.shared_data_dir()


def _entry(relative_path):
  return next(e for e in download.MANIFEST if e.relative_path == relative_path)


def _leftover_temp_files(root: pathlib.Path):
  return sorted(str(p) for p in root.rglob("*.part"))


def test_manifest_checksums_match_shared_data(shared_dir):
  present, mismatches = 0, []
  for entry in download.MANIFEST:
    path = shared_dir / entry.relative_path
    if not path.exists():
      continue
    present += 1
    data = path.read_bytes()
    if len(data) != entry.size_bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
      mismatches.append(f"{entry.relative_path}: {len(data)} bytes, "
                        f"sha256 {hashlib.sha256(data).hexdigest()}")
  assert not mismatches, "manifest disagrees with the shared data:\n" + "\n".join(mismatches)
  assert present > 0, f"no manifest file found in {shared_dir}"


def test_manifest_is_well_formed():
  paths = [e.relative_path for e in download.MANIFEST]
  assert len(paths) == len(set(paths))
  assert {e.dataset for e in download.MANIFEST} == set(download.DATASETS)
  for entry in download.MANIFEST:
    assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256), entry
    assert entry.size_bytes > 0 and entry.license, entry
    assert entry.url.startswith("https://"), entry
    if "raw.githubusercontent.com" in entry.url:  # pinned to a commit, never a branch
      assert re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[0-9a-f]{40}/", entry.url)
    assert not any(entry.relative_path.startswith(derived) for derived in DERIVED_FILES), entry
  tasks_json = {p[len("bbh/bbh/"):-len(".json")] for p in paths if p.startswith("bbh/bbh/")}
  tasks_txt = {p[len("bbh/cot-prompts/"):-len(".txt")] for p in paths
               if p.startswith("bbh/cot-prompts/")}
  assert len(tasks_json) == 27 and tasks_json == tasks_txt
  assert "asdiv/ASDiv.xml" in paths and "tokenizer/t5_spiece.model" in paths


def test_download_subset_is_byte_identical_then_skipped(shared_dir, tmp_path):
  only = ("gsm8k", "multiarith", "prompts")
  selected = [e.relative_path for e in download.select_entries(only)]
  assert len(selected) == 13
  behaviour = ServerBehaviour(shared_dir)
  lines = []
  with serve(behaviour) as url:
    first = download.download(tmp_path, only=only, base_url_override=url, progress=lines.append,
                              **FAST)
    assert first.ok and first.exit_code == 0, download.format_summary(first)
    assert sorted(first.downloaded) == sorted(selected) and not first.already_present
    for relative_path in selected:
      assert filecmp.cmp(tmp_path / relative_path, shared_dir / relative_path, shallow=False)
    assert _leftover_temp_files(tmp_path) == []
    assert download.verify(tmp_path, only=only) == []
    assert any("MB/s" in line for line in lines)

    requests_after_first = sum(behaviour.requests.values())
    second = download.download(tmp_path, only=only, base_url_override=url, progress=None, **FAST)
  assert second.ok and second.downloaded == ()
  assert sorted(second.already_present) == sorted(selected)
  assert sum(behaviour.requests.values()) == requests_after_first == len(selected)
  assert "Downloaded 0 file(s); 13 already present" in download.format_summary(second)


def test_corrupted_download_fails_and_never_touches_target(shared_dir, tmp_path):
  bad = "prompts/fu2023_lib_prompt/prompt_direct.txt"
  good_bytes = (shared_dir / bad).read_bytes()
  served = bytes([good_bytes[0] ^ 0xFF]) + good_bytes[1:]
  behaviour = ServerBehaviour(shared_dir, corrupt=frozenset({bad}))
  with serve(behaviour) as url:
    summary = download.download(tmp_path, only="prompts", base_url_override=url, progress=None,
                                **FAST)
    assert summary.exit_code == 1 and len(summary.downloaded) == 6
    (failure,) = summary.failed
    assert failure.relative_path == bad
    assert _entry(bad).sha256 in failure.reason
    assert hashlib.sha256(served).hexdigest() in failure.reason
    assert not (tmp_path / bad).exists()
    assert behaviour.requests[bad] == 1  # wrong bytes are not retried
    text = download.format_summary(summary)
    assert bad in text and "--only=prompts" in text and "1 failed" in text

    # A good file already in place survives a forced, corrupted re-download.
    (tmp_path / bad).write_bytes(good_bytes)
    forced = download.download(tmp_path, only="prompts", force=True, base_url_override=url,
                               progress=None, **FAST)
  assert [p.relative_path for p in forced.failed] == [bad] and len(forced.downloaded) == 6
  assert (tmp_path / bad).read_bytes() == good_bytes
  assert _leftover_temp_files(tmp_path) == []


def test_dropped_connection_is_retried_then_succeeds(shared_dir, tmp_path):
  flaky = "multiarith/MultiArith.json"
  behaviour = ServerBehaviour(shared_dir, drop_first=frozenset({flaky}))
  lines = []
  with serve(behaviour) as url:
    summary = download.download(tmp_path, only="multiarith", base_url_override=url,
                                progress=lines.append, **FAST)
  assert summary.ok, download.format_summary(summary)
  assert behaviour.requests[flaky] == 2
  assert filecmp.cmp(tmp_path / flaky, shared_dir / flaky, shallow=False)
  assert any("truncated" in line and "retry 1/2" in line for line in lines), lines


def test_always_dropping_server_is_reported(shared_dir, tmp_path):
  broken = "svamp/SVAMP.json"
  behaviour = ServerBehaviour(shared_dir, drop_always=frozenset({broken}))
  with serve(behaviour) as url:
    summary = download.download(tmp_path, only="svamp", base_url_override=url, progress=None,
                                **FAST)
  (failure,) = summary.failed
  assert failure.relative_path == broken and summary.exit_code == 1
  size = _entry(broken).size_bytes
  assert f"connection dropped after {size // 2} of {size} bytes" in failure.reason
  assert "gave up after 3 attempt(s)" in failure.reason and _entry(broken).sha256 in failure.reason
  assert behaviour.requests[broken] == 3
  assert not (tmp_path / broken).exists() and _leftover_temp_files(tmp_path) == []


def test_existing_corrupt_file_is_replaced(shared_dir, tmp_path):
  target = tmp_path / "addsub/AddSub.json"
  target.parent.mkdir(parents=True)
  target.write_bytes(b"not the file")
  with serve(ServerBehaviour(shared_dir)) as url:
    summary = download.download(tmp_path, only=["addsub"], base_url_override=url, progress=None,
                                **FAST)
  assert summary.downloaded == ("addsub/AddSub.json",)
  assert filecmp.cmp(target, shared_dir / "addsub/AddSub.json", shallow=False)


def test_http_404_is_final_and_not_retried(shared_dir, tmp_path):
  behaviour = ServerBehaviour(shared_dir)
  with serve(behaviour) as url:
    summary = download.download(tmp_path, only="singleeq", base_url_override=f"{url}/missing/",
                                progress=None, **FAST)
  (failure,) = summary.failed
  assert "HTTP 404" in failure.reason
  assert behaviour.requests["missing/singleeq/questions.json"] == 1


def test_verify_lists_missing_and_corrupt_files(shared_dir, tmp_path):
  good, bad = "multiarith/MultiArith.json", "multiarith/validation_index.npy"
  for relative_path in (good, bad):
    (tmp_path / relative_path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared_dir / relative_path, tmp_path / relative_path)
  data = (tmp_path / bad).read_bytes()
  (tmp_path / bad).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  problems = download.verify(tmp_path, only="multiarith,svamp")
  assert [(p.relative_path, p.reason.split(" ")[0]) for p in problems] == [
      (bad, "sha256"), ("svamp/SVAMP.json", "missing")]
  message = download.format_problems(problems, tmp_path)
  assert f"--data_dir={tmp_path} --only=multiarith,svamp" in message and bad in message


def test_unknown_dataset_names_the_closest():
  with pytest.raises(ValueError, match="Did you mean gsm8k"):
    download.select_entries("gsm8kk")
  with pytest.raises(ValueError, match="names no dataset"):
    download.select_entries(" , ")
