"""The path layer (`specialize_jax.data.storage`): local paths and `gs://` alike.

`gs://` is a real HTTP server on loopback: PyPI's `gcp-storage-emulator`, started by the fixture
(tests/support/gcs_emulator.py, which adds the generation header real GCS sends).
The project's files reach it through etils epath's fsspec backend (`EPATH_USE_TF=false`, gcsfs
honours `STORAGE_EMULATOR_HOST`) and orbax's arrays through tensorstore
(`TENSORSTORE_GCS_HTTP_URL`). What cannot be pointed at an emulator: TensorFlow's own GCS client
(a fixed endpoint), used by TensorBoard event files (`--gin.TENSORBOARD=False` here) and by
tf.data/TFDS reading task data (the data stays local here).

The end-to-end test types the README's commands with every run path `gs://bucket/...`: train
(from a prepared set in the bucket, read by `array_record`'s GCS client, which finds the emulator
through `CLOUD_STORAGE_EMULATOR_ENDPOINT`), resume, eval, sweep (which writes the report and BEST)
and `convert --to hf`, and checks that nothing but temp files touched the local disk.

The emulator logs every object it stores with its size, so a test counts the bytes a client moves.
"""
import dataclasses
import json
import os
import pathlib
import re
import socket
import subprocess
import time

import numpy as np
import pytest
import seqio

from specialize_jax.data import storage
from specialize_jax.prepared import prepare
from specialize_jax.prepared import prepared_data
from specialize_jax.demo import synthetic
from specialize_jax.teacher import teacher_data
from specialize_jax.training import metric_writers
from tests.support import demo_data
from tests.support import processes
from tests.support import tiny_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'bucket'

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
    'specialize_jax/demo/synthetic.py': "the demo's data, generated in the local data directory",
    'specialize_jax/demo/miniature.py': 'the demo writes its local runs/ folder',
    'tasks/demo.py': "the demo's tasks over the local data directory",
    'specialize_jax/demo/world.py': "the demo's world, generated in the local data directory",
    'specialize_jax/demo/stages.py': "the demo's cached stages in the local data directory",
    'tasks/world.py': "the demo world's tasks over the local data directory",
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


@dataclasses.dataclass(frozen=True)
class Emulator:
  environ: dict  # The variables that point every client at it.
  writes_log: pathlib.Path  # `NAME<TAB>BYTES` per object stored.

  def bytes_written(self, prefix: str) -> int:
    """Bytes of every object stored so far whose `bucket/name` starts with `prefix`."""
    with open(self.writes_log, encoding='utf-8') as f:
      rows = [line.rstrip('\n').rsplit('\t', 1) for line in f]
    return sum(int(size) for name, size in rows if name.startswith(prefix))


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The emulator (its variables are also set in this process while the module runs)."""
  port = processes.free_port()
  directory = tmp_path_factory.mktemp('gcs')
  log, writes_log = directory / 'emulator.log', directory / 'writes.tsv'
  writes_log.touch()
  with open(log, 'wb') as out:
    server = subprocess.Popen(
        processes.module_argv('tests.support.gcs_emulator', str(port), BUCKET, str(writes_log)),
        stdout=out, stderr=subprocess.STDOUT, env=processes.environment(), cwd=REPO_ROOT)
  url = f'http://127.0.0.1:{port}'
  environ = {'EPATH_USE_TF': 'false', 'STORAGE_EMULATOR_HOST': url,
             'TENSORSTORE_GCS_HTTP_URL': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',
             'FSSPEC_GCS_TOKEN': 'anon', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
             'CLOUD_STORAGE_EMULATOR_ENDPOINT': url}
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
    yield Emulator(environ, writes_log)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
    server.kill()
    server.wait()


@pytest.mark.slow
def test_atomic_write_to_a_bucket_is_all_or_nothing(gcs):
  path = f'gs://{BUCKET}/unit/out.jsonl'
  with pytest.raises(RuntimeError):
    with storage.atomic_write(path) as f:
      f.write('half\n')
      raise RuntimeError('boom')
  assert not storage.exists(path)
  storage.write_text(path, 'a\n')
  assert storage.read_text(path) == 'a\n'
  assert storage.listdir(f'gs://{BUCKET}/unit') == ['out.jsonl']


# One logged step as the loop writes it (12 scalars: about 420 bytes a line).
SCALARS = {name: 1.2345678901 * i for i, name in enumerate(
    ('loss', 'cross_entropy', 'z_loss', 'accuracy', 'learning_rate', 'grad_norm', 'num_examples',
     'num_target_tokens', 'num_input_tokens', 'steps_per_s', 'target_tokens_per_s', 'seconds'))}


def _steps(model_dir):
  return [r['step'] for r in metric_writers.read_metrics(model_dir)]


@pytest.mark.slow
def test_a_bucket_log_uploads_each_byte_once(gcs):
  """metrics.jsonl on a bucket: the bytes stored grow linearly with the steps logged, even with an
  upload after every record (flush_secs=0). Rewriting the object at every record (as before)
  stored 1 + 2 + ... + n lines: 21 kB per logged step at 100 steps, 84 kB at 400."""
  def logged_bytes(steps):
    run = f'gs://{BUCKET}/linear/{steps}'
    writer = metric_writers.MetricWriter(run, enable_tensorboard=False, flush_secs=0)
    for step in range(1, steps + 1):
      writer.write(step, 'train', SCALARS)
    writer.close()
    assert _steps(run) == list(range(1, steps + 1))
    text = storage.read_log(f'{run}/{metric_writers.METRICS_FILE}')
    uploaded = gcs.bytes_written(f'{BUCKET}/linear/{steps}/{metric_writers.METRICS_FILE}/')
    assert uploaded == len(text.encode())  # Every byte once.
    return uploaded

  n = 16
  once, twice = logged_bytes(n), logged_bytes(2 * n)
  assert twice <= 2.2 * once
  assert twice < (2 * n + 1) / 2 / 1.5 * once  # Far below what rewriting stored: (2n+1)/2 times.


@pytest.mark.slow
def test_a_bucket_log_loses_only_its_unflushed_tail_and_resumes(gcs):
  run = f'gs://{BUCKET}/crash/run'
  writer = metric_writers.MetricWriter(run, enable_tensorboard=False)  # flush_secs 60
  writer.write(1, 'train', SCALARS)  # The first record is uploaded at once.
  writer.write(2, 'train', SCALARS)
  assert _steps(run) == [1]
  writer.flush()  # As before every checkpoint save.
  writer.write(3, 'train', SCALARS)
  del writer  # Killed: step 3 was never uploaded.
  assert _steps(run) == [1, 2]
  resumed = metric_writers.MetricWriter(run, enable_tensorboard=False)
  resumed.write(3, 'train', SCALARS)
  resumed.write(4, 'eval', {'accuracy': 1.0})
  resumed.close()
  assert _steps(run) == [1, 2, 3, 4]
  # Parts: step 1; step 2; the resumed writer's first record (3), then 4 at close.
  parts = storage.listdir(f'{run}/metrics.jsonl')
  assert [re.sub(r'\d{8}T\d{12}Z', 'START', p) for p in parts] == [
      'part-START-000000.jsonl', 'part-START-000001.jsonl', 'part-START-000000.jsonl',
      'part-START-000001.jsonl']


def test_a_local_log_is_one_file_appended_at_every_write(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path), enable_tensorboard=False)
  writer.write(1, 'train', SCALARS)
  writer.write(2, 'train', SCALARS)
  assert [json.loads(line)['step'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
          ] == [1, 2]  # Before any flush.
  writer.close()
  assert _steps(str(tmp_path)) == [1, 2]


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  """The demo data (with its local prepared set) at tiny sizes, the demo tasks over it."""
  with demo_data.tiny_demo_data(tmp_path_factory, num_train=400, num_eval=16) as directory:
    yield directory


@pytest.fixture(scope='module')
def bucket_set(gcs, demo):
  """The demo's prepared set written again by `prepare` to the bucket (same settings). The path
  is this process's own: `prepare` names its local work folder after it."""
  paths = synthetic.demo_paths(demo)
  config = prepare.PrepareConfig(output_dir=f'gs://{BUCKET}/prepared/demo-{os.getpid()}',
                                 vocab_path=str(paths['vocab']),
                                 format_names=synthetic.PREPARED_FORMATS,
                                 rates={f: 1.0 for f in synthetic.PREPARED_FORMATS}, num_chunks=4)
  return prepare.prepare(lambda: teacher_data.iter_records(paths['train']), config,
                         sources={'teacher': 'demo'}).directory


@pytest.mark.slow
def test_a_prepared_set_in_a_bucket_reads_as_the_local_one(bucket_set, demo):
  """One data shard's rows from a resumed position, read by array_record from the bucket, equal
  those read from the local copy of the same set."""
  def rows(directory):
    source = prepared_data.PreparedSource(directory, ('zs_cot',))
    dataset = source.get_dataset(prepared_data.split_with_start('train', 37, 2), seed=3,
                                 shard_info=seqio.ShardInfo(1, 2))
    return [(e['id'], e['inputs'].tolist(), e['targets'].tolist())
            for e in dataset.take(12).as_numpy_iterator()]

  assert bucket_set.startswith(f'gs://{BUCKET}/prepared/')
  remote = rows(bucket_set)
  assert remote == rows(str(demo / synthetic.PREPARED_SUBDIR))
  assert len({r[0] for r in remote}) == 12


TINY = {
    'BATCH_SIZE': 8, 'LOG_PERIOD': 2, 'CHECKPOINT_PERIOD': 3, 'KEEP_LAST_CHECKPOINTS': 3,
    'EVAL_PERIOD': 3, 'EVAL_MAX_EXAMPLES': 8, 'EVAL_BATCH_SIZE': 8, 'EVAL_MAX_DECODE_LENGTH': 8,
    'EVAL_TASKS': "('demo_id_cot',)", 'TENSORBOARD': False, 'WARMUP_STEPS': 1,
    'LR_SCHEDULE': "'constant'", 'USE_PACKING': False, **tiny_model.gin_bindings(),
}


def _specialize(args, env, cwd):
  return processes.run_specialize(args, env, cwd, check=True).stdout


def _local_files(directory):
  return sorted(os.path.relpath(os.path.join(d, n), directory)
                for d, _, names in os.walk(directory) for n in names)


@pytest.mark.slow
def test_a_run_lives_in_a_bucket(gcs, demo, bucket_set, tmp_path_factory):
  """train (from the prepared set in the bucket) -> resume -> eval -> sweep (report, BEST) ->
  convert --to hf, every path gs://.

  The training task is the README's, `gsm8k_distill_zs_cot` over $SPECIALIZE_PREPARED_DATA: here
  the demo's problems in the demo vocabulary ($SPECIALIZE_VOCAB_PATH; 384 pieces + 100 extra ids,
  hence a 512-entry embedding)."""
  run = f'gs://{BUCKET}/runs/tiny'
  cwd = tmp_path_factory.mktemp('cwd')
  env = processes.environment(**gcs.environ, SPECIALIZE_DATA_DIR=str(demo.parent),
                              JAX_PLATFORMS='cpu', SPECIALIZE_PREPARED_DATA=bucket_set,
                              SPECIALIZE_VOCAB_PATH=str(demo / synthetic.VOCAB_FILE))
  gin = lambda steps: ['--gin_file=experiments/demo_cpu.gin', f"--gin.MODEL_DIR='{run}'",
                       f'--gin.TRAIN_STEPS={steps}',
                       "--gin.MIXTURE_OR_TASK_NAME='gsm8k_distill_zs_cot'",
                       '--gin.model_config.T5Config.vocab_size=512'] + [
                           f'--gin.{k}={v}' for k, v in TINY.items()]
  _specialize(['train', *gin(3)], env, cwd)
  _specialize(['train', *gin(6)], env, cwd)  # resumes at step 3
  lines = metric_writers.read_metrics(run)
  train_steps = [r['step'] for r in lines if r['split'] == 'train']
  # Logged every 2 steps and at each run's end; the resumed run starts at step 4.
  assert train_steps == [2, 3, 4, 6]
  assert [r['step'] for r in lines if r['split'] == 'eval'] == [3, 6]
  # One part per flush: at least each run's first record and its checkpoint.
  assert len(storage.listdir(f'{run}/metrics.jsonl')) >= 4
  assert storage.exists(f'{run}/config.gin')
  # The first run's outputs survive the resume (orbax's cleanup deleted every folder of a bucket's
  # MODEL_DIR without a commit marker: eval/, metrics.jsonl/, tensorboard/).
  assert storage.exists(f'{run}/eval/demo_id_cot/metrics_step3.json')
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
  from specialize_jax.checkpoints import loading  # pylint: disable=g-import-not-at-top
  from specialize_jax.checkpoints import param_tree  # pylint: disable=g-import-not-at-top
  _, exported = loading.load_checkpoint(export)
  _, trained = loading.load_checkpoint(f'{run}/checkpoint_6')
  a, b = param_tree.flatten_params(exported), param_tree.flatten_params(trained)
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)

  assert _local_files(cwd) == []  # nothing under the working directory (no `gs:` folder)
