"""`specialize serve`: an OpenAI-compatible `/v1/completions` endpoint, driven by the official
`openai` client against a tiny random T5 in the real T5 vocabulary: greedy text and logprobs equal
the model's own decode and log-probabilities, `n` and seeds, stop strings, concurrent requests
batched onto one decoder with unchanged results, OpenAI-shaped errors, the key, and the command."""
import concurrent.futures
import json
import signal
import subprocess
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from specialize_jax.checkpoints import pretrained
from specialize_jax.serving import completions
from specialize_jax.serving import server as server_lib
from tests.support import processes
from tests.support import shared_data
from tests.support import tiny_model

KEY = "test-key"
NAME = "tiny-t5"
PROMPTS = ("Q: How many apples are in 3 boxes of 4 apples?", "Q: What is 7 plus 5?",
           "Translate to German: good morning", "Q: A train leaves at 3 pm.", "Summarize: the cat",
           "Q: 12 eggs, 5 eaten, how many left?")


@pytest.fixture(scope="module")
def model():
  config = tiny_model.config(vocab_size=32128)
  return pretrained.PretrainedModel(config, tiny_model.random_params(config, seed=3),
                                    vocabulary=str(shared_data.shared_file(
                                        "tokenizer/t5_spiece.model")))


@pytest.fixture(scope="module")
def served(model):
  engine = completions.CompletionEngine(model, NAME, completions.Limits(
      max_prompt_tokens=2048, max_tokens=32, max_n=8, max_logprobs=5))
  server = server_lib.CompletionServer(engine, server_lib.ServeConfig(
      port=0, api_key=KEY, batch_window_s=0.2)).start()
  yield server
  server.stop()


@pytest.fixture(scope="module")
def client(served):
  return openai.OpenAI(base_url=served.url, api_key=KEY, max_retries=0, timeout=120)


def _greedy_ids(model, prompt, max_tokens):
  ids = [int(i) for i in model.generate([list(model.vocabulary.encode(prompt)) + [1]],
                                        max_new_tokens=max_tokens)[0]]
  return ids[:ids.index(1)] if 1 in ids else ids


def test_greedy_text_and_logprobs_are_the_models_own(client, model):
  response = client.completions.create(model=NAME, prompt=PROMPTS[0], temperature=0,
                                       max_tokens=12, logprobs=5)
  choice, = response.choices
  ids = _greedy_ids(model, PROMPTS[0], 12)
  pieces = [model.vocabulary.tokenizer.id_to_piece(i).replace("▁", " ") for i in ids]
  assert choice.logprobs.tokens == pieces
  assert choice.text == "".join(pieces)
  assert choice.logprobs.text_offset == list(np.cumsum([0] + [len(p) for p in pieces])[:-1])
  assert choice.finish_reason == ("stop" if len(ids) < 12 else "length")
  # Log-probabilities from an independent teacher-forced pass of the same model.
  inputs = np.asarray([list(model.vocabulary.encode(PROMPTS[0])) + [1]], np.int32)
  decoder = np.asarray([[0] + ids[:-1]], np.int32)
  logits = model.logits(inputs, decoder, np.asarray([ids], np.int32))[0].astype(np.float64)
  log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                     keepdims=True)) - logits.max(-1, keepdims=True)
  np.testing.assert_allclose(choice.logprobs.token_logprobs, log_probs[np.arange(len(ids)), ids],
                             atol=1e-4)
  for position, top in enumerate(choice.logprobs.top_logprobs):
    assert len(top) <= 5
    best = max(top.values())
    assert best == pytest.approx(log_probs[position].max(), abs=1e-4)
    assert pieces[position] in top  # greedy: the chosen token is the best one
  assert response.usage.prompt_tokens == inputs.shape[1]
  assert response.usage.completion_tokens == len(ids)


def test_n_samples_follow_the_seed_and_stop_strings_cut_the_text(client):
  first = client.completions.create(model=NAME, prompt=[PROMPTS[1], PROMPTS[2]], n=3,
                                    temperature=1.0, max_tokens=10, seed=11)
  again = client.completions.create(model=NAME, prompt=[PROMPTS[1], PROMPTS[2]], n=3,
                                    temperature=1.0, max_tokens=10, seed=11)
  assert [c.index for c in first.choices] == list(range(6))
  assert [c.text for c in first.choices] == [c.text for c in again.choices]
  assert len({c.text for c in first.choices}) > 1  # samples, not one greedy text six times
  whole = client.completions.create(model=NAME, prompt=PROMPTS[3], temperature=0, max_tokens=16,
                                    logprobs=1)
  tokens = whole.choices[0].logprobs.tokens
  assert len(tokens) >= 4
  stop = tokens[3]
  cut = client.completions.create(model=NAME, prompt=PROMPTS[3], temperature=0, max_tokens=16,
                                  stop=[stop], logprobs=1)
  choice, = cut.choices
  assert choice.finish_reason == "stop"
  assert stop not in choice.text and whole.choices[0].text.startswith(choice.text)
  assert choice.text == "".join(choice.logprobs.tokens)


def test_concurrent_requests_are_batched_without_changing_results(client, served):
  one_by_one = [client.completions.create(model=NAME, prompt=p, temperature=0,
                                          max_tokens=8).choices[0].text for p in PROMPTS]
  before = served.batches
  with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
    together = list(pool.map(lambda p: client.completions.create(
        model=NAME, prompt=p, temperature=0, max_tokens=8).choices[0].text, PROMPTS))
  assert together == one_by_one
  assert served.batches - before < len(PROMPTS)  # some requests shared a decode


@pytest.mark.parametrize("kwargs, error, words", [
    ({"n": 9}, openai.BadRequestError, "'n' must be an integer in [1, 8]"),
    ({"max_tokens": 33}, openai.BadRequestError, "'max_tokens' must be an integer in [1, 32]"),
    ({"logprobs": 6}, openai.BadRequestError, "'logprobs' must be an integer in [0, 5]"),
    ({"temperature": 3}, openai.BadRequestError, "'temperature' must be a number"),
    ({"echo": True}, openai.BadRequestError, "'echo' is not supported"),
    ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "'stop' must be"),
    ({"prompt": "word " * 2100}, openai.BadRequestError, "at most 2048"),
    ({"model": "gpt-4"}, openai.NotFoundError, "does not exist"),
    ({"prompt": ["a"] * 9, "n": 8}, openai.BadRequestError, "72 completions; at most 64"),
])
def test_bad_requests_get_openai_shaped_errors(client, kwargs, error, words):
  request = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 4, **kwargs}
  with pytest.raises(error) as raised:
    client.completions.create(**request)
  assert words in raised.value.body["message"]
  assert raised.value.body["type"] == "invalid_request_error"


def test_the_key_is_required_and_a_bad_body_is_a_400(served):
  wrong = openai.OpenAI(base_url=served.url, api_key="nope", max_retries=0)
  with pytest.raises(openai.AuthenticationError):
    wrong.completions.create(model=NAME, prompt="x", max_tokens=2)
  request = urllib.request.Request(f"{served.url}/completions", data=b"{not json", method="POST",
                                   headers={"Authorization": f"Bearer {KEY}"})
  with pytest.raises(urllib.error.HTTPError) as raised:
    urllib.request.urlopen(request, timeout=30)
  assert raised.value.code == 400
  assert "not valid JSON" in json.loads(raised.value.read())["error"]["message"]
  models = openai.OpenAI(base_url=served.url, api_key=KEY).models.list()
  assert [m.id for m in models.data] == [NAME]


def test_specialize_teacher_samples_a_served_checkpoint(served, data_dir, tmp_path, monkeypatch):
  """The served checkpoint as the teacher: the real client, the 8 Wei et al. exemplars (the paper's
  complex prompt is 2,230 T5 tokens, over this server's limit), top-5 logprobs per token, records
  whose tokens make up their text."""
  from specialize_jax import cli  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_data  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  output = tmp_path / "teacher.jsonl"
  assert cli.main(["teacher", "--base_url", served.url, "--model", NAME, "--api", "completions",
                   "--split", "gsm8k_train", "--num_samples", "2", "--temperature", "0.5",
                   "--top_logprobs", "5", "--max_tokens", "16", "--limit", "2",
                   "--prompt_file", "prompt_original", "--output", str(output), "--concurrency", "2",
                   "--no-filter"]) == 0
  records = teacher_data.read_records(output).records
  assert len(records) == 2 and all(len(r.samples) == 2 for r in records)
  for sample in (s for r in records for s in r.samples):
    assert "".join(sample.tokens) == sample.text
    assert all(1 <= len(top) <= 5 for top in sample.top_logprobs)


@pytest.mark.slow
def test_specialize_serve_answers_and_stops_on_sigterm(model, tmp_path):
  from specialize_jax.checkpoints import orbax_pytree  # pylint: disable=g-import-not-at-top
  checkpoint = orbax_pytree.save_orbax(model.params, model.config, tmp_path / "ckpt")
  port = processes.free_port()
  argv = processes.specialize_argv(
      "serve", str(checkpoint), "--vocab", str(shared_data.shared_file(
          "tokenizer/t5_spiece.model")), "--port", str(port), "--model_name", NAME)
  server = subprocess.Popen(argv, env=processes.environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  try:
    line = server.stdout.readline()
    assert f"at http://127.0.0.1:{port}/v1" in line, server.stderr.read()[-3000:]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    response = client.completions.create(model=NAME, prompt=PROMPTS[0], temperature=0,
                                         max_tokens=6)
    assert response.choices[0].text == "".join(
        model.vocabulary.tokenizer.id_to_piece(i).replace("▁", " ")
        for i in _greedy_ids(model, PROMPTS[0], 6))
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
  finally:
    if server.poll() is None:
      server.kill()
  # Beyond loopback without a key: refused before loading anything.
  refused = processes.run_specialize(["serve", str(checkpoint), "--vocab", "x", "--host",
                                      "0.0.0.0"], env=processes.environment(
                                          drop=("XLA_FLAGS", "SPECIALIZE_SERVE_API_KEY")))
  assert refused.returncode == 2 and "give it a key" in refused.stderr
