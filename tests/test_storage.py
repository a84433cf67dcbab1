"""The path layer (`specialize_jax.data.storage`): local paths and `gs://` alike.

`gs://` is a real HTTP server on loopback: PyPI's `gcp-storage-emulator`, started by the fixture
(tests/gcs_emulator.py, which adds the generation header real GCS sends).
The project's files reach it through etils epath's fsspec backend (`EPATH_USE_TF=false`, gcsfs
honours `STORAGE_EMULATOR_HOST`) and orbax's arrays through tensorstore
(`TENSORSTORE_GCS_HTTP_URL`). What cannot be pointed at an emulator: TensorFlow's own GCS client
(a fixed endpoint), used by TensorBoard event files (`--gin.TENSORBOARD=False` here) and by
tf.data/TFDS reading task data (the data stays local here).

The end-to-end test types the README's commands with every run path `gs://bucket/...`: train,
resume, eval, sweep (which writes the report and BEST) and `convert --to hf`, and checks that
nothing but temp files touched the local disk.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import demo_data
from specialize_jax.data import storage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'bucket'
TIMEOUT_S = 600

# Calls that treat their argument as a local file. Every path a user gives goes through `storage`
# (or epath); a line that works on a path the code itself made locally (a temp file, a staging
# directory, /proc) says so with a `# local:` comment.
LOCAL_FILE_CALL = re.compile(
    r'\bos\.(makedirs|mkdir|listdir|scandir|walk|remove|unlink|rmdir|replace|rename|stat)\(|'
    r'\bos\.path\.(exists|isdir|isfile|getsize|getmtime|abspath|realpath)\(|'
    r'\bshutil\.\w+\(|\bglob\.glob\(|(?<![\w.])(?<!def )open\(|\bpathlib\.Path\(')
# Files that only ever touch local paths (relative to the repository), with the reason.
LOCAL_ONLY_FILES = {
    'specialize_jax/data/storage.py': 'the layer itself: its local branch',
    'specialize_jax/data/download.py': 'downloads public datasets into the local data directory',
    'specialize_jax/data/tfds_gsm8k.py': 'builds the TFDS dataset in the local data directory',
    'specialize_jax/data/data_dir.py': 'resolves the local data directory',
    'specialize_jax/teacher/synthetic.py': "the demo's data, generated in the local data directory",
    'specialize_jax/demo.py': 'the demo writes its local runs/ folder',
    'tasks/demo.py': "the demo's tasks over the local data directory",
    'specialize_jax/teacher/teacher_client.py': 'appends one durable line per teacher response: a '
                                                'local file (a URL --output is refused)',
    'specialize_jax/teacher/teacher_sources.py': "imports the original repository's files from a "
                                                 'local checkout',
}


def _code_lines():
  for root in ('specialize_jax', 'tasks'):
    for directory, _, names in os.walk(os.path.join(REPO_ROOT, root)):
      for name in sorted(names):
        path = os.path.join(directory, name)
        relative = os.path.relpath(path, REPO_ROOT)
        if name.endswith('.py') and relative not in LOCAL_ONLY_FILES:
          with open(path, encoding='utf-8') as f:
            for number, line in enumerate(f, 1):
              code = line.split('#', 1)[0]
              if LOCAL_FILE_CALL.search(code) and '# local:' not in line:
                yield f'{relative}:{number}: {line.strip()}'


def test_every_local_only_file_exists():
  for relative in LOCAL_ONLY_FILES:
    assert os.path.isfile(os.path.join(REPO_ROOT, relative)), relative


def test_no_local_file_call_on_a_user_path():
  offending = list(_code_lines())
  assert not offending, ('local-only file calls (use specialize_jax.data.storage, or mark a '
                         'path the code made itself with `# local: why`):\n' + '\n'.join(offending))


def test_the_grep_finds_what_it_bans():
  for line in ('os.makedirs(model_dir)', 'with open(path) as f:', 'os.path.exists(p)',
               'shutil.rmtree(d)', 'x = pathlib.Path(p)'):
    assert LOCAL_FILE_CALL.search(line), line
  for line in ('storage.open_file(p)', 'epath.Path(p).open()', 'PreparedSet.open(d)'):
    assert not LOCAL_FILE_CALL.search(line), line


def test_local_atomic_write_keeps_the_old_file_on_failure(tmp_path):
  path = tmp_path / 'a' / 'out.json'
  storage.write_text(path, 'old')
  with pytest.raises(RuntimeError):
    with storage.atomic_write(path) as f:
      f.write('half')
      raise RuntimeError('boom')
  assert path.read_text() == 'old'
  assert sorted(os.listdir(path.parent)) == ['out.json']  # no temp file left behind


def test_paths_keep_their_scheme():
  assert storage.absolute('gs://b/run') == 'gs://b/run'
  assert storage.absolute('run') == os.path.join(os.getcwd(), 'run')
  assert storage.join('gs://b/run', 'eval', 'x.json') == 'gs://b/run/eval/x.json'
  assert storage.dirname('gs://b/run/checkpoint_4') == 'gs://b/run'
  assert storage.basename('gs://b/run/checkpoint_4') == 'checkpoint_4'


# ---------------------------------------------------------------------------------------------
# The emulator


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The emulator's environment variables (also set in this process while the module runs)."""
  port = _free_port()
  log = tmp_path_factory.mktemp('gcs') / 'emulator.log'
  with open(log, 'wb') as out:
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, 'tests', 'gcs_emulator.py'), str(port), BUCKET],
        stdout=out, stderr=subprocess.STDOUT)
  url = f'http://127.0.0.1:{port}'
  environ = {'EPATH_USE_TF': 'false', 'STORAGE_EMULATOR_HOST': url,
             'TENSORSTORE_GCS_HTTP_URL': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',
             'FSSPEC_GCS_TOKEN': 'anon', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        pytest.fail(f'the GCS emulator did not start; see {log}')
      time.sleep(0.2)
  saved = {k: os.environ.get(k) for k in environ}
  os.environ.update(environ)
  # epath caches its choice of backend (TensorFlow's, read from EPATH_USE_TF) on first use.
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  try:
    yield environ
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
    server.kill()
    server.wait()


def test_atomic_write_to_a_bucket_is_all_or_nothing(gcs):
  path = f'gs://{BUCKET}/unit/out.jsonl'
  with pytest.raises(RuntimeError):
    with storage.atomic_write(path) as f:
      f.write('half\n')
      raise RuntimeError('boom')
  assert not storage.exists(path)
  storage.write_text(path, 'a\n')
  storage.append_lines(path, ['b\n', 'c\n'])
  assert storage.read_text(path) == 'a\nb\nc\n'
  assert storage.listdir(f'gs://{BUCKET}/unit') == ['out.jsonl']


TINY = {
    'BATCH_SIZE': 8, 'LOG_PERIOD': 2, 'CHECKPOINT_PERIOD': 3, 'KEEP_LAST_CHECKPOINTS': 3,
    'EVAL_PERIOD': 3, 'EVAL_MAX_EXAMPLES': 8, 'EVAL_BATCH_SIZE': 8, 'EVAL_MAX_DECODE_LENGTH': 8,
    'EVAL_TASKS': "('demo_id_cot',)", 'TENSORBOARD': False, 'WARMUP_STEPS': 1,
    'LR_SCHEDULE': "'constant'", 'USE_PACKING': False,
    'model_config.T5Config.emb_dim': 32, 'model_config.T5Config.num_heads': 2,
    'model_config.T5Config.head_dim': 16, 'model_config.T5Config.num_encoder_layers': 1,
    'model_config.T5Config.num_decoder_layers': 1, 'model_config.T5Config.mlp_dim': 64,
}


def _specialize(args, env, cwd):
  result = subprocess.run([sys.executable, '-m', 'specialize_jax.cli', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, f'specialize {args[0]} failed:\n{result.stderr[-4000:]}'
  return result.stdout


def _local_files(directory):
  return sorted(os.path.relpath(os.path.join(d, n), directory)
                for d, _, names in os.walk(directory) for n in names)


def test_a_run_lives_in_a_bucket(gcs, tmp_path_factory):
  """train -> resume -> eval -> sweep (report, BEST) -> convert --to hf, every path gs://."""
  run = f'gs://{BUCKET}/runs/tiny'
  cwd = tmp_path_factory.mktemp('cwd')
  with demo_data.tiny_demo_data(tmp_path_factory, num_train=400, num_eval=16) as data:
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(gcs, SPECIALIZE_DATA_DIR=str(data.parent), JAX_PLATFORMS='cpu',
               SPECIALIZE_PREPARED_DATA=os.environ.get('SPECIALIZE_PREPARED_DATA', ''),
               PYTHONPATH=os.pathsep.join([REPO_ROOT] + [
                   p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    if not env['SPECIALIZE_PREPARED_DATA']:
      env.pop('SPECIALIZE_PREPARED_DATA')
    gin = lambda steps: ['--gin_file=experiments/demo_cpu.gin', f"--gin.MODEL_DIR='{run}'",
                         f'--gin.TRAIN_STEPS={steps}'] + [f'--gin.{k}={v}' for k, v in TINY.items()]
    _specialize(['train', *gin(3)], env, cwd)
    _specialize(['train', *gin(6)], env, cwd)  # resumes at step 3
    lines = [json.loads(line) for line in storage.read_text(f'{run}/metrics.jsonl').splitlines()]
    train_steps = [r['step'] for r in lines if r['split'] == 'train']
    # Logged every 2 steps and at each run's end; the resumed run starts at step 4.
    assert train_steps == [2, 3, 4, 6]
    assert [r['step'] for r in lines if r['split'] == 'eval'] == [3, 6]
    assert storage.exists(f'{run}/config.gin')
    assert storage.exists(f'{run}/eval/demo_id_cot/metrics_step6.json')

    _specialize(['eval', '--gin_file=runs/eval.gin', f"--gin.CHECKPOINT_PATH='{run}/checkpoint_6'",
                 "--gin.EVAL_TASKS=('demo_ood_cot',)", '--gin.EVAL_MAX_EXAMPLES=8',
                 '--gin.EVAL_BATCH_SIZE=8', '--gin.EVAL_MAX_DECODE_LENGTH=8',
                 "--gin.EVAL_FEATURE_LENGTHS={'inputs': 512, 'targets': 128}"], env, cwd)
    assert storage.exists(f'{run}/eval/demo_ood_cot/metrics_step6.json')

    swept = json.loads(_specialize(['sweep', run, '--tasks', 'demo_id_cot', '--bbh_tasks',
                                    '--max_examples', '8', '--batch_size', '8',
                                    '--input_length', '512', '--target_length', '128',
                                    '--max_decode_length', '8'],
                                   env, cwd).strip().splitlines()[-1])
    assert swept['report'] == f'{run}/report'
    for name in ('report.md', 'results.csv', 'results.json'):
      assert storage.exists(f'{run}/report/{name}'), name
    # Both checkpoints decoded again (other lengths than the in-loop eval); the default rule's
    # dev tasks are not among the demo's, so nothing is selected and no BEST is written.
    assert (swept['decoded_pairs'], swept['selected_step']) == (2, None)
    assert storage.listdir(run) == ['checkpoint_3', 'checkpoint_6', 'config.gin', 'eval',
                                    'metrics.jsonl', 'report']

    export = f'gs://{BUCKET}/export/tiny_hf'
    _specialize(['convert', f'{run}/checkpoint_6', '--to', 'hf', export], env, cwd)
    assert storage.listdir(export) == ['config.json', 'model.safetensors']
    from specialize_jax.model import checkpoints  # pylint: disable=g-import-not-at-top
    _, exported = checkpoints.load_checkpoint(export)
    _, trained = checkpoints.load_checkpoint(f'{run}/checkpoint_6')
    from specialize_jax.model import hf_conversion  # pylint: disable=g-import-not-at-top
    a, b = hf_conversion.flatten_params(exported), hf_conversion.flatten_params(trained)
    assert sorted(a) == sorted(b)
    for name in a:
      np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)

  assert _local_files(cwd) == []  # nothing under the working directory (no `gs:` folder)
