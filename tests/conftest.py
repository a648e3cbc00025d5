"""Test set-up: 8 simulated CPU devices, rank promotion errors, fixed seeds.

XLA_FLAGS must be set before jax is imported anywhere, so this file sets it first.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["DRACO_JAX_OFFLINE"] = "1"  # no test downloads a dataset from the internet

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
