"""How a rule meets the combiner contract (docs/math.md §6): the argument checks every factory
runs at construction, :class:`_Slices` (whether a call sees whole rows or, inside
``jax.shard_map``, one column slice per device, and how a reduction over D is then completed), and
:func:`_combiner`, which checks the received messages, runs a rule and returns
``(mean_D, report)`` with ok = finite output and an all-zero output when not ok.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from draco_jax import contract


class _Slices(NamedTuple):
  """Where the D axis of the rows lives.

  ``axis_name=None``: each call sees whole rows. Otherwise each device of mesh axis
  ``axis_name`` holds all P rows of one column slice, and a reduction over D is the sum (or max)
  of the slices' partial results, which every device then holds alike.
  """

  axis_name: str | None = None

  def sum(self, partial):
    return partial if self.axis_name is None else jax.lax.psum(partial, self.axis_name)

  def max(self, partial):
    return partial if self.axis_name is None else jax.lax.pmax(partial, self.axis_name)

  def finite_rows(self, x_PxD: jax.Array) -> jax.Array:
    """bool [P]: rows finite in every slice."""
    if self.axis_name is None:
      return contract.finite_rows(x_PxD)
    return self.sum(jnp.sum(~jnp.isfinite(x_PxD), axis=1, dtype=jnp.int32)) == 0

  def all_finite(self, v_D: jax.Array) -> jax.Array:
    """bool []: every entry of every slice of v is finite."""
    if self.axis_name is None:
      return jnp.all(jnp.isfinite(v_D))
    return self.sum(jnp.sum(~jnp.isfinite(v_D), dtype=jnp.int32)) == 0


_WHOLE = _Slices()

# A rule maps the checked input and its slicing to (mean_D, flagged_P, iterations); the wrapper
# adds the contract.
_Rule = Callable[[jax.Array, _Slices], tuple[jax.Array, jax.Array, jax.Array | int]]


def _count(rule: str, what: str, value, minimum: int) -> int:
  """Returns ``value`` as an int, or raises ValueError naming the rule, the quantity and value."""
  return contract.check_integer(f"{rule}: {what}", value, minimum)


def _counts(rule: str, num_workers, num_adversaries) -> tuple[int, int]:
  return (
    _count(rule, "num_workers (P)", num_workers, 1),
    _count(rule, "num_adversaries (S)", num_adversaries, 0),
  )


def _require(rule: str, holds: bool, bound: str, p: int, s: int) -> None:
  if not holds:
    raise ValueError(f"{rule} needs {bound}; got P={p}, S={s}")


def _positive(rule: str, what: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
    raise ValueError(f"{rule}: {what} must be a positive number; got {value!r}")
  return float(value)


def _checked_input(rule: str, received_PxD: ArrayLike, num_workers: int) -> jax.Array:
  x_PxD = jnp.asarray(received_PxD)
  contract.check_received(x_PxD, num_workers, contract.REAL_DTYPES, f"aggregator {rule!r}")
  return x_PxD


def _combiner(
  rule_name: str, num_workers: int, rule: _Rule, slices: _Slices = _WHOLE
) -> contract.Combiner:
  """Wraps a rule into the contract: ok = finite output, zeros when not ok."""

  def aggregate(received_PxD: ArrayLike, key: ArrayLike | None = None):
    del key  # Baselines are deterministic.
    x_PxD = _checked_input(rule_name, received_PxD, num_workers)
    mean_D, flagged_P, iterations = rule(x_PxD, slices)
    ok = slices.all_finite(mean_D)
    report = contract.make_report(flagged_P, ok, iterations)
    return contract.zero_if_not_ok(mean_D, ok), report

  aggregate.__name__ = aggregate.__qualname__ = rule_name
  return aggregate
