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


def test_decoding_on_cpu_drops_ynnpack_unless_the_user_chose_a_setting(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla_cpu_flags.decode_compiler_options("cpu") == {
      "xla_cpu_experimental_ynn_fusion_type": ""}
  monkeypatch.delenv("XLA_FLAGS")
  assert xla_cpu_flags.decode_compiler_options("cpu") == {
      "xla_cpu_experimental_ynn_fusion_type": ""}
  assert xla_cpu_flags.decode_compiler_options("gpu") == {}
  assert xla_cpu_flags.decode_compiler_options("tpu") == {}
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise")
  assert xla_cpu_flags.decode_compiler_options("cpu") == {}


def test_the_decoder_option_is_one_this_jaxlib_accepts():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  double = jax.jit(lambda x: x @ x, compiler_options=xla_cpu_flags.DECODE_CPU_OPTIONS)
  assert float(double(jnp.full((2, 2), 1.0))[0, 0]) == 2.0
