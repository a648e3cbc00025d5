"""Test set-up: 8 simulated CPU devices, rank promotion errors, fixed seeds.

XLA_FLAGS must be set before jax is imported anywhere, so this file sets it first.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["DRACO_JAX_OFFLINE"] = "1"  # no test downloads a dataset from the internet

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Releases each test module's compiled programs when it ends.

  XLA CPU maps memory sections for every executable it keeps, and the whole suite's worth in
  one process exceeded vm.max_map_count (65530 here): LLVM then aborts the process ("Unable to
  allocate section memory"). The cached codes and decoders of draco_jax.testing go too.
  """
  yield
  from draco_jax import testing  # noqa: PLC0415

  testing.cached_decoder.cache_clear()
  testing.cached_code.cache_clear()
  jax.clear_caches()
