"""Placements: which workers are adversarial at a step.

A placement is built by :func:`make_placement` and called as ``mask_P = placement(key, step)``
(bool [P], P workers); randomised kinds draw from ``fold_in(key, step)``, so a resumed run
places its adversaries as the uninterrupted one did. With the default secret row assignment
(docs/math.md §5.6) a placement picks workers, not code rows.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from draco_jax import contract

__all__ = ["PLACEMENTS", "Placement", "make_placement"]

Placement = Callable[[jax.Array, ArrayLike], jax.Array]


def _none_placement(num_workers: int, num_adversaries: int) -> Placement:
  """No adversary: every entry False (num_adversaries is ignored)."""
  return lambda key, step: jnp.zeros(num_workers, bool)


def _fixed(num_workers: int, num_adversaries: int, *, workers=None) -> Placement:
  """The same workers at every step; default the first S workers, 0..S−1.

  With S < 2S + 1 the default lies inside one FRC group and is one contiguous block for cyclic
  codes. ``workers`` lists them explicitly (S distinct indices in [0, P)).
  """
  p, s = num_workers, num_adversaries
  workers = tuple(range(s)) if workers is None else tuple(workers)
  for w in workers:
    contract.check_integer(f"fixed placement: worker index {w!r}", w, 0, p - 1)
  if len(set(workers)) != len(workers) or len(workers) != s:
    raise ValueError(
      f"fixed placement: workers must be S = {s} distinct indices in [0, {p}); got {workers}"
    )
  mask_P = np.zeros(p, bool)
  mask_P[list(workers)] = True
  return lambda key, step: jnp.asarray(mask_P)


def _random(num_workers: int, num_adversaries: int) -> Placement:
  """A fresh uniformly random set of exactly S workers each step, from fold_in(key, step)."""
  p, s = num_workers, num_adversaries

  def placement(key, step):
    chosen = jax.random.choice(jax.random.fold_in(key, step), p, (s,), replace=False)
    return jnp.zeros(p, bool).at[chosen].set(True)

  return placement


def _contiguous(num_workers: int, num_adversaries: int, *, start: int | str = 0) -> Placement:
  """S consecutive workers start, start+1, ... (mod P).

  Options:
    start: the first worker (int in [0, P), default 0), or ``"random"`` for a start drawn each
      step from fold_in(key, step).
  """
  p, s = num_workers, num_adversaries
  if start != "random":
    start = contract.check_integer(
      "contiguous placement: start ('random' or an index)", start, 0, p - 1
    )

  def placement(key, step):
    first = start
    if start == "random":
      first = jax.random.randint(jax.random.fold_in(key, step), (), 0, p)
    return (jnp.arange(p) - first) % p < s

  return placement


PLACEMENTS: dict[str, Callable[..., Placement]] = {
  "none": _none_placement,
  "fixed": _fixed,
  "random": _random,
  "contiguous": _contiguous,
}


def make_placement(kind: str, num_workers: int, num_adversaries: int, **options) -> Placement:
  """Builds a placement ``(key, step) -> mask_P`` choosing the adversarial workers.

  Args:
    kind: one of :data:`PLACEMENTS`: ``none`` (no adversary), ``fixed`` (option ``workers``;
      default the first S workers), ``random`` (a fresh set of exactly S each step),
      ``contiguous`` (S consecutive workers cyclically; option ``start``: an index or
      ``"random"`` for a new start each step).
    num_workers: P.
    num_adversaries: the number of adversarial workers, 0 <= S <= P (it may exceed the code's
      S for over-capacity experiments).
    **options: the kind's options.

  Returns:
    A pure, jit-compatible function of (key, step) (``step`` may be traced) returning bool [P]
    with exactly S True (none: all False). Randomised kinds use fold_in(key, step).

  Raises:
    ValueError: unknown kind or option, or bad P, S or option values.
  """
  if kind not in PLACEMENTS:
    raise ValueError(f"unknown placement {kind!r}; valid placements: {', '.join(PLACEMENTS)}")
  factory = PLACEMENTS[kind]
  contract.check_options(f"placement {kind!r}", factory, options)
  p = contract.check_integer(f"placement {kind!r}: num_workers (P)", num_workers, 1)
  s = contract.check_integer(f"placement {kind!r}: num_adversaries (S)", num_adversaries, 0, p)
  return factory(p, s, **options)
