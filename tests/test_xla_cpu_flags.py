"""The XLA CPU flags entry points apply: added once, never overriding the user's own setting."""
from specialize_jax import xla_cpu_flags


def test_adds_missing_flags_once(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  first = xla_cpu_flags.apply()
  assert first == ("--xla_force_host_platform_device_count=8 "
                   "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla_cpu_flags.apply() == first


def test_user_setting_wins(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise")
  assert xla_cpu_flags.apply() == "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"


def test_works_without_xla_flags(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla_cpu_flags.apply() == "--xla_cpu_experimental_ynn_fusion_type=dot"
