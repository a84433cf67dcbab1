"""The XLA CPU flags entry points apply: added once, never overriding the user's own setting, and
only in processes where JAX runs on the CPU alone."""
import os

import pytest

from specialize_jax.runtime import platforms
from specialize_jax.runtime import xla_flags


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_adds_missing_flags_once(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  first = xla_flags.apply()
  assert first == ("--xla_force_host_platform_device_count=8 "
                   "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla_flags.apply() == first


def test_user_setting_wins(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise")
  assert xla_flags.apply() == "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"


def test_works_without_xla_flags(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla_flags.apply() == "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_decoding_on_cpu_drops_ynnpack_unless_the_user_chose_a_setting(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla_flags.decode_compiler_options("cpu") == {
      "xla_cpu_experimental_ynn_fusion_type": ""}
  monkeypatch.delenv("XLA_FLAGS")
  assert xla_flags.decode_compiler_options("cpu") == {
      "xla_cpu_experimental_ynn_fusion_type": ""}
  assert xla_flags.decode_compiler_options("gpu") == {}
  assert xla_flags.decode_compiler_options("tpu") == {}
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise")
  assert xla_flags.decode_compiler_options("cpu") == {}


def test_the_decoder_option_is_one_this_jaxlib_accepts():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  double = jax.jit(lambda x: x @ x, compiler_options=xla_flags.DECODE_CPU_OPTIONS)
  assert float(double(jnp.full((2, 2), 1.0))[0, 0]) == 2.0


@pytest.mark.parametrize("platforms", ["tpu", "cuda", "gpu", "rocm", "cpu,tpu", "cuda,cpu"])
@pytest.mark.parametrize("existing_flags", [None, "--xla_force_host_platform_device_count=8"])
def test_accelerator_platforms_leave_the_environment_untouched(monkeypatch, platforms, existing_flags):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  if existing_flags is None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
  else:
    monkeypatch.setenv("XLA_FLAGS", existing_flags)
  before = dict(os.environ)
  assert xla_flags.apply() == (existing_flags or "")
  assert dict(os.environ) == before


@pytest.mark.parametrize("installed, expected", [
    (True, None), (False, "--xla_cpu_experimental_ynn_fusion_type=dot")])
def test_unset_platforms_follow_the_installed_plugins(monkeypatch, installed, expected):
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(platforms, "accelerator_installed", lambda: installed)
  xla_flags.apply()
  assert os.environ.get("XLA_FLAGS") == expected


@pytest.mark.parametrize("environ, accelerator, default, only", [
    ({}, False, True, True),
    ({}, True, False, False),  # a TPU/GPU plugin is installed
    ({"JAX_PLATFORMS": "cpu"}, True, True, True),
    ({"JAX_PLATFORMS": " CPU "}, True, True, True),
    ({"JAX_PLATFORMS": "cpu,tpu"}, False, True, False),
    ({"JAX_PLATFORMS": "cuda,cpu"}, False, False, False),
    ({"JAX_PLATFORMS": ""}, True, False, False),  # empty means unset
])
def test_platform_decisions(environ, accelerator, default, only):
  assert platforms.cpu_is_default(environ, accelerator) is default
  assert platforms.cpu_only(environ, accelerator) is only
