"""Baseline robust aggregators (no coding) under the combiner contract.

Specification: docs/math.md §6 (formulas, handling of non-finite rows) and §7
(test oracles). Shape legend: P workers, S declared adversaries (f = S), D parameters,
T rows selected by Bulyan's first stage (T = P - 2S), M rows averaged by Multi-Krum.

Every rule is built by a factory in :data:`AGGREGATORS` and called as

    mean_D, report = aggregator(received_PxD, key)

Baselines run with R = 1 (worker k sends g_k) and estimate the mean of the P gradients. They are
deterministic: ``key`` is accepted for the contract and ignored. ``report.ok`` is True iff the
output is finite; otherwise the output is all zeros. ``report.flagged`` marks the rows not selected
(Krum, Multi-Krum, Bulyan) or the non-finite rows (every other rule). ``report.iterations`` counts
Weiszfeld iterations (geometric median), clipping iterations (centered clipping), else 0.

Numerics: non-finite rows are removed with ``jnp.where`` (never multiplied by 0, since
0 * Inf = NaN); reductions over workers are dot products (``contract.rows_dot``); pairwise
distances (Krum, Bulyan) come from a Gram matrix at HIGHEST precision, clamped at 0; point-to-row
distances (geometric median, centered clipping) from explicit differences, which keep their
precision for rows near the point. Rows whose squared norm overflows (1e30 entries in float32)
are rescaled by a power of two instead of being treated as infinitely far.

Sharding: every reduction over D (row finiteness, norms, distances, Gram matrices) goes through a
:class:`~draco_jax.aggregators.combiner._Slices` object, so the same rules run on whole rows
(:func:`make_aggregator`) or, inside ``jax.shard_map``, on one column slice per device with those
reductions psum'd over a mesh axis (:func:`make_sliced_aggregator`, used by
:mod:`draco_jax.sharded`). Coordinate-wise steps need no communication; selections and iterations
read only psum'd values, so every device decides alike.

Layout: this module holds the registry and the two builders; :mod:`.combiner` the argument checks,
``_Slices`` and the contract wrapper; :mod:`.kernels` the shared numerics (sorting network,
medians, distances, Gram matrices, Krum scores, selections); :mod:`.rules` the eight rules.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from draco_jax import contract
from draco_jax.aggregators.combiner import _combiner, _Rule, _Slices
from draco_jax.aggregators.kernels import krum_scores
from draco_jax.aggregators.rules import (
  _bulyan,
  _centered_clipping,
  _coordinate_median_rule,
  _geometric_median,
  _krum,
  _mean,
  _multi_krum,
  _trimmed_mean,
)

__all__ = [
  "AGGREGATORS",
  "FLAGS_ONLY_NON_FINITE",
  "make_aggregator",
  "make_sliced_aggregator",
  "krum_scores",
]

# Rule factories: (num_workers, num_adversaries, **options) -> rule; make_aggregator wraps a rule
# into a combiner.
AGGREGATORS: dict[str, Callable[..., _Rule]] = {
  "mean": _mean,
  "coordinate_median": _coordinate_median_rule,
  "trimmed_mean": _trimmed_mean,
  "geometric_median": _geometric_median,
  "krum": _krum,
  "multi_krum": _multi_krum,
  "bulyan": _bulyan,
  "centered_clipping": _centered_clipping,
}
# Rules that select no rows: their report.flagged marks only the non-finite rows, so they can
# never flag a finite adversarial row (Krum, Multi-Krum and Bulyan flag the rows not selected).
FLAGS_ONLY_NON_FINITE = (
  "mean",
  "coordinate_median",
  "trimmed_mean",
  "geometric_median",
  "centered_clipping",
)


def _rule(name: str, num_workers, num_adversaries, options: dict) -> tuple[_Rule, int]:
  """(the validated rule, P); raises ValueError for an unknown name or option or a bad value."""
  if name not in AGGREGATORS:
    raise ValueError(f"unknown aggregator {name!r}; valid aggregators: {', '.join(AGGREGATORS)}")
  factory = AGGREGATORS[name]
  contract.check_options(f"aggregator {name!r}", factory, options)
  return factory(num_workers, num_adversaries, **options), operator.index(num_workers)


def make_aggregator(
  name: str, num_workers: int, num_adversaries: int, **options
) -> contract.Combiner:
  """Builds a baseline aggregator.

  Args:
    name: one of :data:`AGGREGATORS`: ``mean``, ``coordinate_median``, ``trimmed_mean``,
      ``geometric_median``, ``krum``, ``multi_krum``, ``bulyan``, ``centered_clipping``.
    num_workers: P.
    num_adversaries: S, the declared number of adversaries f (>= 0).
    **options: rule options (``geometric_median``: init, tol, max_iters, eps;
      ``multi_krum``: m; ``centered_clipping``: tau, iters).

  Returns:
    A pure, jitted combiner ``(received_PxD, key) -> (mean_D, Report)`` of float32 or
    float64 messages; it warns when float64 messages arrive with jax_enable_x64 off (jit
    combines them in float32), and raises ValueError when called on any other dtype.

  Raises:
    ValueError: unknown name or option, S < 0, or P below the rule's bound (Krum and
      Multi-Krum P >= 2S+3, Bulyan P >= 4S+3, trimmed mean P > 2S).
  """
  rule, p = _rule(name, num_workers, num_adversaries, options)
  return contract.jit_combiner(_combiner(name, p, rule), f"aggregator {name!r}")


def make_sliced_aggregator(
  name: str, num_workers: int, num_adversaries: int, *, axis_name: str, **options
) -> contract.Combiner:
  """The aggregator ``name`` on column slices, to be called inside ``jax.shard_map``.

  Each device of mesh axis ``axis_name`` passes ``slice_PxW``: all P rows, restricted to its own
  W columns (the slices of the devices, in axis order, tile the D columns; zero columns may pad
  them). It gets back its W columns of the mean the whole-row aggregator would return, and the
  same Report on every device: reductions over D (finiteness, norms, distances, Gram matrices)
  are psum'd partial results, so selections and stopping tests agree across devices. Results
  equal :func:`make_aggregator`'s up to the order of floating-point summation.

  Args:
    name, num_workers, num_adversaries, **options: as for :func:`make_aggregator`.
    axis_name: the mesh axis over which the columns are split.

  Returns:
    ``(slice_PxW, key) -> (mean_W, Report)``; ``mean_W`` is all zeros on every device when
    ``report.ok`` is False.
  """
  rule, p = _rule(name, num_workers, num_adversaries, options)
  return _combiner(name, p, rule, _Slices(axis_name))
