"""The one contract shared by every DRACO decoder and every baseline aggregator.

Shape legend used across draco_jax (suffixes on array names):
  P workers, K gradient partitions (K = P), R redundancy (R = 2S+1), S adversaries,
  D flattened parameters, B examples per partition, L = P - 2S (cyclic code dimension).

A *combiner* is built by a factory that binds every hyperparameter, and is then called as

    mean_D, report = combiner(received_PxD, key)

* ``received_PxD``: the P messages as the server received them (adversarial rows may hold
  anything, NaN/Inf included; a missing straggler message is a row of NaN).
* ``key``: a PRNG key private to the combiner (attacks never see it).
* ``mean_D``: the estimate of the MEAN over the K partition gradients (never the sum).
  Always finite: when ``report.ok`` is False it is all zeros and the step applies no update.
* ``report``: a :class:`Report` with the same fixed-shape fields for every combiner.

Combiners are pure and ``jax.jit``-compatible; which workers are adversarial is never an
input, so new adversary sets or values never recompile.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
  "Report",
  "make_report",
  "check_options",
  "Combiner",
  "check_received",
  "finite_rows",
  "zero_if_not_ok",
  "rows_dot",
]


class Report(NamedTuple):
  """What a combiner says about one call.

  Attributes:
    flagged: bool [P]; rows the combiner excluded or down-weighted to zero.
    ok: bool []; the combiner's certificate held (decoders) or its output is finite
      (baselines). When False the returned mean is all zeros.
    iterations: int32 []; iterations used by iterative rules (0 for one-shot rules).
  """

  flagged: jax.Array
  ok: jax.Array
  iterations: jax.Array


Combiner = Callable[[jax.Array, jax.Array], tuple[jax.Array, Report]]


def make_report(flagged_P: jax.Array, ok: jax.Array, iterations=0) -> Report:
  """Builds a Report with canonical dtypes."""
  return Report(
    flagged=jnp.asarray(flagged_P, bool),
    ok=jnp.asarray(ok, bool),
    iterations=jnp.asarray(iterations, jnp.int32),
  )


def check_received(received_PxD: jax.Array, num_workers: int) -> None:
  """Raises ValueError unless ``received_PxD`` is a [P, D] array with P = num_workers."""
  shape = jnp.shape(received_PxD)
  if len(shape) != 2 or shape[0] != num_workers:
    raise ValueError(
      f"received must have shape [P, D] with P = num_workers = {num_workers}; got shape {shape}"
    )


def finite_rows(x_PxD: jax.Array) -> jax.Array:
  """bool [P]: rows whose every entry is finite."""
  return jnp.all(jnp.isfinite(x_PxD), axis=tuple(range(1, x_PxD.ndim)))


def rows_dot(w_P: jax.Array, x_PxD: jax.Array) -> jax.Array:
  """Σ_k w_k x_k as a matrix-vector product.

  A jitted ``jnp.sum(x, 0)`` over the worker axis runs 55-100x slower than a dot on XLA CPU
  (measured with JAX 0.10.2, float32, D = 2^20: about 0.5 GB/s against about 30 GB/s for
  ``jnp.ones(P) @ x`` and numpy), so every reduction over workers goes through here.
  """
  return jnp.matmul(w_P.astype(x_PxD.dtype), x_PxD, precision=jax.lax.Precision.HIGHEST)


def zero_if_not_ok(mean_D: jax.Array, ok: jax.Array) -> jax.Array:
  """Enforces the contract: the output is all zeros (never non-finite) when ok is False."""
  return jnp.where(ok, mean_D, jnp.zeros_like(mean_D))


def check_options(what: str, factory: Callable, options: dict) -> None:
  """Raises ValueError naming unknown keyword options and listing the valid ones."""
  params = inspect.signature(factory).parameters.values()
  valid = [q.name for q in params if q.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(
      f"{what}: unknown options {unknown}; valid options: {', '.join(valid) or 'none'}"
    )
