"""`specialize demo --quick`: every stage of the paper in miniature through the real command, then a
rerun that reuses every cached stage and run. (The full demo's numbers are in docs/demo.md.)"""
import json

import pytest

from tests.support import processes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  output_dir = tmp_path_factory.mktemp("runs") / "demo"
  env = processes.environment(SPECIALIZE_DATA_DIR=str(data_dir))
  first = processes.run_specialize(["demo", "--quick", "--output_dir", str(output_dir)], env=env,
                                   timeout=900)
  return data_dir, output_dir, env, first


def test_quick_demo_runs_every_stage_and_reports_six_findings(quick_demo):
  data_dir, output_dir, _, first = quick_demo
  assert first.returncode == 0, first.stderr[-3000:]
  for stage in ("world", "pretrain: trained", "generalist: trained", "teacher: trained",
                "teacher data", "starts", "specialize: distribution", "specialize: sample",
                "specialize: zero_shot", "specialize: raw", "report"):
    assert stage in first.stderr, stage
  assert "ETA" in first.stderr
  results = json.loads((output_dir / "demo_results.json").read_text())
  found = results["findings"]
  assert [f["id"] for f in found] == list("abcdef")
  for f in found:
    assert set(f) == {"id", "claim", "measured", "holds"} and isinstance(f["holds"], bool)
  assert results["seeds"] == [0]
  # The served teacher's chains went through filter, align and prepare into four formats.
  prepared = json.loads((data_dir / "world_quick" / "prepared" / "metadata.json").read_text())
  assert prepared["teacher_k"] == 6
  assert all(prepared["formats"][f]["num_examples"] > 0 for f in prepared["formats"])
  report = output_dir / "report"
  for name in ("findings.md", "tradeoff.png", "formats.png", "dev_curves.png"):
    assert (report / name).stat().st_size > 0, name
  table = (report / "findings.md").read_text()
  assert table.count("\n| (") == 6
  for run in ("distribution", "sample", "zero_shot", "raw"):
    assert (output_dir / run / "seed_0" / "BEST").is_file()


def test_rerun_reuses_the_cached_stages_and_runs(quick_demo):
  _, output_dir, env, first = quick_demo
  assert first.returncode == 0
  before = (output_dir / "demo_results.json").read_text()
  second = processes.run_specialize(["demo", "--quick", "--output_dir", str(output_dir)], env=env,
                                    timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  for stage in ("pretrain", "generalist", "teacher"):
    assert f"{stage}: reused" in second.stderr
  assert "0 to decode" in second.stderr  # Every sweep pair was decoded before.
  after = json.loads((output_dir / "demo_results.json").read_text())
  assert after["findings"] == json.loads(before)["findings"]
