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
:class:`_Slices` object, so the same rules run on whole rows (:func:`make_aggregator`) or, inside
``jax.shard_map``, on one column slice per device with those reductions psum'd over a mesh axis
(:func:`make_sliced_aggregator`, used by :mod:`draco_jax.sharded`). Coordinate-wise steps need no
communication; selections and iterations read only psum'd values, so every device decides alike.
"""

from __future__ import annotations

import functools
import numbers
import operator
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from draco_jax import contract

__all__ = [
  "AGGREGATORS",
  "FLAGS_ONLY_NON_FINITE",
  "make_aggregator",
  "make_sliced_aggregator",
  "krum_scores",
]

_HIGHEST = jax.lax.Precision.HIGHEST


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


# ----------------------------------------------------------------------------------------------
# Validation and the contract wrapper.


def _count(rule: str, what: str, value, minimum: int) -> int:
  """Returns ``value`` as an int, or raises ValueError naming the rule, the quantity and value."""
  try:
    if isinstance(value, bool):
      raise TypeError
    number = operator.index(value)
  except TypeError:
    raise ValueError(f"{rule}: {what} must be an integer; got {value!r}") from None
  if number < minimum:
    raise ValueError(f"{rule}: {what} must be >= {minimum}; got {number}")
  return number


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


# ----------------------------------------------------------------------------------------------
# Shared kernels.


def _nan_to_inf(x: jax.Array) -> jax.Array:
  """NaN entries become +Inf (docs/math.md §6: medians and trimmed means sort NaN as +Inf)."""
  return jnp.where(jnp.isnan(x), jnp.inf, x)


@functools.cache
def _sorting_network(p: int) -> tuple[tuple[np.ndarray, ...], ...]:
  """Batcher's odd-even merge sort for P rows as parallel stages (lower, upper, rest, inverse).

  Built for the next power of two; comparators that touch the virtual +Inf rows past P are
  no-ops and are dropped.
  """
  n = 1 << max(p - 1, 1).bit_length()
  stages = []
  size = 1
  while size < n:
    gap = size
    while gap >= 1:
      pairs = [
        (i + j, i + j + gap)
        for j in range(gap % size, n - gap, 2 * gap)
        for i in range(min(gap, n - j - gap))
        if (i + j) // (2 * size) == (i + j + gap) // (2 * size) and i + j + gap < p
      ]
      if pairs:
        lower, upper = np.array(pairs).T
        rest = np.setdiff1d(np.arange(p), np.array(pairs))
        inverse = np.argsort(np.concatenate([lower, upper, rest]))
        stages.append(tuple(v.astype(np.int32) for v in (lower, upper, rest, inverse)))
      gap //= 2
    size *= 2
  return tuple(stages)


def _sort_rows(x_PxD: jax.Array) -> jax.Array:
  """Sorts along the worker axis with a sorting network (inputs must hold no NaN).

  On XLA CPU, ``jnp.sort(x, axis=0)`` is 4-9x slower than one elementwise min/max pass per
  network stage (measured for P = 3..128, D = 2^18..2^20). The barrier keeps each stage one
  pass: letting XLA fuse stages compiled 2-5x slower and ran up to 1.8x slower.
  """
  for lower, upper, rest, inverse in _sorting_network(x_PxD.shape[0]):
    a_PxD, b_PxD = x_PxD[lower], x_PxD[upper]
    merged_PxD = jnp.concatenate(
      [jnp.minimum(a_PxD, b_PxD), jnp.maximum(a_PxD, b_PxD), x_PxD[rest]]
    )
    x_PxD = jax.lax.optimization_barrier(merged_PxD[inverse])
  return x_PxD


def _middle(sorted_PxD: jax.Array) -> jax.Array:
  """Median of rows already sorted along axis 0 (average of the two middle ones for even P)."""
  p = sorted_PxD.shape[0]
  if p % 2:
    return sorted_PxD[p // 2]
  # 0.5a + 0.5b cannot overflow where (a + b) / 2 can.
  return 0.5 * sorted_PxD[p // 2 - 1] + 0.5 * sorted_PxD[p // 2]


def _coordinate_median(x_PxD: jax.Array) -> jax.Array:
  """Coordinate-wise median with NaN treated as +Inf."""
  return _middle(_sort_rows(_nan_to_inf(x_PxD)))


def _finite_median(x_PxD: jax.Array, finite_P: jax.Array) -> jax.Array:
  """Coordinate-wise median of the finite rows only (their number is traced)."""
  sorted_PxD = _sort_rows(jnp.where(finite_P[:, None], x_PxD, jnp.inf))
  n = jnp.sum(finite_P)
  lower_D = jnp.take(sorted_PxD, (n - 1) // 2, axis=0, mode="clip")
  upper_D = jnp.take(sorted_PxD, n // 2, axis=0, mode="clip")
  return 0.5 * lower_D + 0.5 * upper_D


def _distances(x_PxD: jax.Array, y_D: jax.Array, slices: _Slices) -> jax.Array:
  """‖x_k − y‖ for every row, from explicit differences.

  Used for point-to-rows distances (Weiszfeld, clipping), where a Gram form would lose all
  precision for rows near y, exactly where the Vardi-Zhang step needs them. A row whose square
  sum overflows (e.g. 1e30 entries in float32) is recomputed scaled by 2^-e, under ``lax.cond``
  so the second pass only runs when some row overflowed.
  """
  # Differences are recomputed inside the branch: capturing them would materialise a [P, D]
  # temporary instead of fusing the subtraction into the reduction.
  d2_P = slices.sum(jnp.sum(jnp.square(x_PxD - y_D[None, :]), axis=1))
  exponent = jnp.finfo(x_PxD.dtype).maxexp * 3 // 4
  scale, unscale = 2.0**-exponent, 2.0**exponent

  def rescaled():
    scaled_PxD = x_PxD * scale - y_D[None, :] * scale
    scaled_P = jnp.sqrt(slices.sum(jnp.sum(jnp.square(scaled_PxD), axis=1))) * unscale
    return jnp.where(jnp.isinf(d2_P), scaled_P, jnp.sqrt(d2_P))

  return jax.lax.cond(jnp.any(jnp.isinf(d2_P)), rescaled, lambda: jnp.sqrt(d2_P))


def _norm(v_D: jax.Array, slices: _Slices) -> jax.Array:
  """‖v‖ without overflow or underflow of the squares (scaled by max |v_i|)."""
  m = slices.max(jnp.max(jnp.abs(v_D)))
  safe = jnp.where((m > 0) & jnp.isfinite(m), m, 1)
  return jnp.where(m > 0, safe * jnp.sqrt(slices.sum(jnp.sum(jnp.square(v_D / safe)))), 0)


def _finite_mean(x0_PxD: jax.Array, finite_P: jax.Array) -> jax.Array:
  """Mean of the finite rows (NaN when there are none); x0 has non-finite rows zeroed."""
  count = jnp.sum(finite_P)
  weights_P = jnp.where(finite_P, 1.0 / jnp.maximum(count, 1), 0.0)
  return jnp.where(count > 0, contract.rows_dot(weights_P, x0_PxD), jnp.nan)


def _gram_sq_distances(
  x_PxD: jax.Array, slices: _Slices, u_P: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """(‖x_i − x_j‖², ‖x̃_i‖²) from the Gram matrix of x̃_i = x_i / u_i (u_i powers of two).

  d²_ij = ((u_i/u_j)·‖x̃_i‖² + (u_j/u_i)·‖x̃_j‖² − 2 x̃_i·x̃_j)·u_i·u_j, exact in the scaling;
  ``u_P=None`` is the plain form (no extra pass over x). Clamped at 0: for rows close to each
  other relative to their norms, rounding can make the difference slightly negative.
  """
  xs_PxD = x_PxD if u_P is None else x_PxD / u_P[:, None]
  gram_PxP = slices.sum(jnp.matmul(xs_PxD, xs_PxD.T, precision=_HIGHEST))
  norms_P = jnp.diagonal(gram_PxP)
  if u_P is None:
    return jnp.maximum(norms_P[:, None] + norms_P[None, :] - 2 * gram_PxP, 0), norms_P
  ratio_PxP = u_P[:, None] / u_P[None, :]
  inner_PxP = ratio_PxP * norms_P[:, None] + norms_P[None, :] / ratio_PxP - 2 * gram_PxP
  return jnp.maximum(inner_PxP, 0) * u_P[:, None] * u_P[None, :], norms_P


def _pairwise_sq_distances(x_PxD: jax.Array, slices: _Slices) -> jax.Array:
  """‖x_i − x_j‖² from the Gram matrix (HIGHEST precision, clamped at 0).

  Rows whose squared norm overflows (e.g. 1e30 entries in float32) are rescaled by 2^-e in a
  second Gram pass, run under ``lax.cond`` only when needed, so that such rows still get their
  true distance to each other (0 for identical rows); a distance beyond the dtype's range is
  +Inf. +Inf also where either row is non-finite, and on the diagonal (a row is never its own
  neighbour). Honest pairs are unaffected by huge rows: G_ij only reads rows i and j.
  """
  p = x_PxD.shape[0]
  finite_P = slices.finite_rows(x_PxD)
  d2_PxP, norms_P = _gram_sq_distances(x_PxD, slices)
  overflow_P = finite_P & jnp.isinf(norms_P)
  exponent = jnp.finfo(x_PxD.dtype).maxexp * 3 // 4

  def rescaled():
    u_P = jnp.where(overflow_P, 2.0**exponent, 1.0).astype(x_PxD.dtype)
    return _gram_sq_distances(x_PxD, slices, u_P)[0]

  d2_PxP = jax.lax.cond(jnp.any(overflow_P), rescaled, lambda: d2_PxP)
  valid_PxP = finite_P[:, None] & finite_P[None, :] & ~jnp.eye(p, dtype=bool)
  return jnp.where(valid_PxP & jnp.isfinite(d2_PxP), d2_PxP, jnp.inf)


def _neighbour_scores(d2_PxP: jax.Array, num_neighbours: ArrayLike) -> jax.Array:
  """Σ of the ``num_neighbours`` smallest entries of each row (may be traced)."""
  sorted_PxP = jnp.sort(d2_PxP, axis=1)
  keep_PxP = jnp.arange(d2_PxP.shape[1])[None, :] < num_neighbours
  return jnp.sum(jnp.where(keep_PxP, sorted_PxP, 0), axis=1)


def krum_scores(x_PxD: ArrayLike, num_adversaries: int) -> jax.Array:
  """Krum scores (Blanchard et al., NeurIPS 2017; docs/math.md §6).

  score(i) = Σ of the P − f − 2 smallest ‖x_i − x_j‖² over j ≠ i, with distances to non-finite
  rows counted as +Inf.

  Args:
    x_PxD: the received rows (real).
    num_adversaries: f; needs P >= 2f + 3.

  Returns:
    float [P]; +Inf for rows with fewer than P − f − 2 finite neighbours (e.g. non-finite rows).
  """
  x_PxD = jnp.asarray(x_PxD)
  p = x_PxD.shape[0]
  _require("krum", p >= 2 * num_adversaries + 3, "P >= 2S+3", p, num_adversaries)
  return _krum_scores(x_PxD, num_adversaries, _WHOLE)


def _krum_scores(x_PxD: jax.Array, num_adversaries: int, slices: _Slices) -> jax.Array:
  p = x_PxD.shape[0]
  return _neighbour_scores(_pairwise_sq_distances(x_PxD, slices), p - num_adversaries - 2)


def _selection_mask(index_M: jax.Array, num_workers: int) -> jax.Array:
  return jnp.zeros(num_workers, bool).at[index_M].set(True)


def _average_of_rows(x_PxD: jax.Array, index_M: jax.Array) -> jax.Array:
  """Mean of the gathered rows x[index] (gathered, so unselected Inf/NaN rows never enter)."""
  m = index_M.shape[0]
  return contract.rows_dot(jnp.full((m,), 1.0 / m), x_PxD[index_M])


# ----------------------------------------------------------------------------------------------
# Rules. Each factory validates at construction and returns a contract combiner.


def _mean(num_workers: int, num_adversaries: int) -> _Rule:
  """Plain mean (1/P) Σ_k y_k; no defence (docs/math.md §6). Non-finite rows make ok False."""
  p, _ = _counts("mean", num_workers, num_adversaries)

  def rule(x_PxD, slices):
    mean_D = contract.rows_dot(jnp.full((p,), 1.0 / p), x_PxD)
    return mean_D, ~slices.finite_rows(x_PxD), 0

  return rule


def _coordinate_median_rule(num_workers: int, num_adversaries: int) -> _Rule:
  """Coordinate-wise median, NaN as +Inf; even P averages the two middle values (§6)."""
  _counts("coordinate_median", num_workers, num_adversaries)

  def rule(x_PxD, slices):
    return _coordinate_median(x_PxD), ~slices.finite_rows(x_PxD), 0

  return rule


def _trimmed_mean(num_workers: int, num_adversaries: int) -> _Rule:
  """Coordinate-wise trimmed mean (§6).

  Per coordinate: sort (NaN as +Inf), drop the f largest and f smallest, average the other
  P − 2f. Needs P > 2f. With f = 0 it is the mean.
  """
  p, s = _counts("trimmed_mean", num_workers, num_adversaries)
  _require("trimmed_mean", p > 2 * s, "P > 2S", p, s)
  kept = p - 2 * s

  def rule(x_PxD, slices):
    sorted_PxD = _sort_rows(_nan_to_inf(x_PxD))
    mean_D = contract.rows_dot(jnp.full((kept,), 1.0 / kept), sorted_PxD[s : p - s])
    return mean_D, ~slices.finite_rows(x_PxD), 0

  return rule


def _weiszfeld_step(x0_PxD, finite_P, y_D, eps, slices):
  """One Weiszfeld step with the Vardi-Zhang correction; returns (y⁺, every point at y)."""
  d_P = jnp.where(finite_P, _distances(x0_PxD, y_D, slices), jnp.inf)
  w_P = jnp.where(d_P > eps, 1.0 / d_P, 0.0)  # 1/Inf = 0: rows at +Inf never pull.
  eta = jnp.sum(finite_P & (d_P <= eps)).astype(y_D.dtype)
  total_w = jnp.sum(w_P)
  t_D = contract.rows_dot(w_P, x0_PxD) / total_w
  r = _norm(t_D - y_D, slices) * total_w
  ratio = jnp.where(r > eps, eta / r, 0.0)  # y⁺ = T when r <= eps.
  corrected_D = jnp.maximum(0.0, 1.0 - ratio) * t_D + jnp.minimum(1.0, ratio) * y_D
  coincide = total_w == 0
  y_next_D = jnp.where(coincide, y_D, jnp.where(eta == 0, t_D, corrected_D))
  return y_next_D, coincide


def _geometric_median(
  num_workers: int,
  num_adversaries: int,
  *,
  init: str = "mean",
  tol: float | None = None,
  max_iters: int = 1000,
  eps: float = 1e-8,
) -> _Rule:
  """Geometric median argmin_y Σ_k ‖x_k − y‖ by Weiszfeld with the Vardi-Zhang correction.

  docs/math.md §6, following hdmedians (Vardi & Zhang, PNAS 2000). Non-finite rows are excluded.
  Start at the mean (``init="mean"``) or coordinate median (``"median"``) of the finite rows.
  Each iteration: d_i = ‖x_i − y‖, w_i = 1/d_i for d_i > ε (else 0), T = Σ w_i x_i / Σ w_i,
  η = #{d_i <= ε}; y⁺ = T if η = 0, else with r = ‖T − y‖·Σ w_i,
  y⁺ = max(0, 1 − η/r)·T + min(1, η/r)·y (y⁺ = T if r <= ε); stop if every point is at y.
  Stop when ‖y⁺ − y‖ <= tol·max(1, ‖y‖) (relative: a deviation from the reference's absolute
  test, which float32 cannot meet) or after ``max_iters``. Runs inside ``lax.while_loop``;
  ``report.iterations`` is the number of iterations used.

  Options:
    init: "mean" or "median".
    tol: relative stop tolerance; None means 1e-6 for float32 inputs, 1e-8 for float64.
    max_iters: at most this many iterations (default 1000, from the reference).
    eps: distance under which a point counts as coinciding with y (default 1e-8).
  """
  rule_name = "geometric_median"
  _counts(rule_name, num_workers, num_adversaries)
  if init not in ("mean", "median"):
    raise ValueError(f"{rule_name}: init must be 'mean' or 'median'; got {init!r}")
  if tol is not None:
    tol = _positive(rule_name, "tol", tol)
  max_iters = _count(rule_name, "max_iters", max_iters, 1)
  if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
    raise ValueError(f"{rule_name}: eps must be a number >= 0; got {eps!r}")

  def rule(x_PxD, slices):
    finite_P = slices.finite_rows(x_PxD)
    x0_PxD = jnp.where(finite_P[:, None], x_PxD, 0)
    if init == "mean":
      y0_D = _finite_mean(x0_PxD, finite_P)
    else:
      y0_D = _finite_median(x_PxD, finite_P)
    stop_tol = tol if tol is not None else (1e-6 if x_PxD.dtype.itemsize <= 4 else 1e-8)

    def body(state):
      y_D, it, _ = state
      y_next_D, coincide = _weiszfeld_step(x0_PxD, finite_P, y_D, eps, slices)
      step = _norm(y_next_D - y_D, slices)
      small = step <= stop_tol * jnp.maximum(1.0, _norm(y_D, slices))
      done = coincide | small | ~slices.all_finite(y_next_D)
      return y_next_D, it + 1, done

    state = (y0_D, jnp.int32(0), ~slices.all_finite(y0_D))
    y_D, iterations, _ = jax.lax.while_loop(lambda s: ~s[2] & (s[1] < max_iters), body, state)
    return y_D, ~finite_P, iterations

  return rule


def _krum(num_workers: int, num_adversaries: int) -> _Rule:
  """Krum (Blanchard et al., NeurIPS 2017): the row with the smallest :func:`krum_scores`.

  Needs P >= 2f + 3. Ties go to the lower index. Flagged: every row but the selected one.
  """
  p, s = _counts("krum", num_workers, num_adversaries)
  _require("krum", p >= 2 * s + 3, "P >= 2S+3", p, s)

  def rule(x_PxD, slices):
    winner = jnp.argmin(_krum_scores(x_PxD, s, slices))
    return x_PxD[winner], jnp.arange(p) != winner, 0

  return rule


def _multi_krum(num_workers: int, num_adversaries: int, *, m: int | None = None) -> _Rule:
  """Multi-Krum: the mean of the m rows with the lowest Krum scores (docs/math.md §6).

  This project's convention is m = P − f (other codebases use P − f − 2 or 1); m = 1 is Krum.
  Needs P >= 2f + 3 and 1 <= m <= P. Flagged: the rows not averaged.
  """
  p, s = _counts("multi_krum", num_workers, num_adversaries)
  _require("multi_krum", p >= 2 * s + 3, "P >= 2S+3", p, s)
  m = p - s if m is None else _count("multi_krum", "m", m, 1)
  if m > p:
    raise ValueError(f"multi_krum: m must be <= P = {p}; got m={m}")

  def rule(x_PxD, slices):
    index_M = jnp.argsort(_krum_scores(x_PxD, s, slices), stable=True)[:m]
    return _average_of_rows(x_PxD, index_M), ~_selection_mask(index_M, p), 0

  return rule


def _iterated_krum(d2_PxP: jax.Array, num_adversaries: int, rounds: int) -> jax.Array:
  """Bulyan's first stage: ``rounds`` Krum winners, each removed before the next round.

  Round r runs Krum on the n_r = P − r remaining rows with max(n_r − f − 2, 1) neighbours.
  Returns int [rounds], the winners in order.
  """
  p = d2_PxP.shape[0]

  def body(r, carry):
    remaining_P, chosen_T = carry
    d2_r_PxP = jnp.where(remaining_P[None, :], d2_PxP, jnp.inf)
    scores_P = _neighbour_scores(d2_r_PxP, jnp.maximum(p - r - num_adversaries - 2, 1))
    winner = jnp.argmin(jnp.where(remaining_P, scores_P, jnp.inf))
    # If every remaining score is +Inf, argmin may land on a removed row: take a remaining one.
    winner = jnp.where(remaining_P[winner], winner, jnp.argmax(remaining_P))
    return remaining_P.at[winner].set(False), chosen_T.at[r].set(winner.astype(jnp.int32))

  init = (jnp.ones(p, bool), jnp.zeros(rounds, jnp.int32))
  return jax.lax.fori_loop(0, rounds, body, init)[1]


def _closest_to_median_mean(selected_TxD: jax.Array, beta: int) -> jax.Array:
  """Per coordinate, the mean of the β values closest to the median of the T values.

  The β values nearest to a point form a window of the sorted values; the window is the one of
  the T − β + 1 candidates with the smallest radius max(med − lo, hi − med).
  """
  t = selected_TxD.shape[0]
  sorted_TxD = _sort_rows(_nan_to_inf(selected_TxD))
  median_D = _middle(sorted_TxD)
  starts = t - beta + 1
  radius_WxD = jnp.maximum(
    median_D[None, :] - sorted_TxD[:starts], sorted_TxD[beta - 1 :] - median_D[None, :]
  )
  start_D = jnp.argmin(_nan_to_inf(radius_WxD), axis=0)
  window_BxD = jnp.take_along_axis(sorted_TxD, start_D[None, :] + jnp.arange(beta)[:, None], axis=0)
  return contract.rows_dot(jnp.full((beta,), 1.0 / beta), window_BxD)


def _bulyan(num_workers: int, num_adversaries: int) -> _Rule:
  """Bulyan (El Mhamdi, Guerraoui & Rouault, ICML 2018), original form (docs/math.md §6).

  1. Select T = P − 2f rows by iterated Krum (:func:`krum_scores` on the remaining rows with
     max(n_r − f − 2, 1) neighbours; the winner is removed each round).
  2. Per coordinate, average the β = T − 2f selected values closest to the coordinate median of
     the T selected values.
  Needs P >= 4f + 3. Flagged: the rows not selected in step 1.
  """
  p, s = _counts("bulyan", num_workers, num_adversaries)
  _require("bulyan", p >= 4 * s + 3, "P >= 4S+3", p, s)
  rounds, beta = p - 2 * s, p - 4 * s

  def rule(x_PxD, slices):
    chosen_T = _iterated_krum(_pairwise_sq_distances(x_PxD, slices), s, rounds)
    mean_D = _closest_to_median_mean(x_PxD[chosen_T], beta)
    return mean_D, ~_selection_mask(chosen_T, p), 0

  return rule


def _centered_clipping(
  num_workers: int, num_adversaries: int, *, tau: float = 10.0, iters: int = 3
) -> _Rule:
  """Centered clipping (Karimireddy, He & Jaggi, ICML 2021), stateless variant (§6).

  v_0 = coordinate-wise median (NaN as +Inf); v_{l+1} = v_l + (1/P) Σ_i clip(x_i − v_l) with
  clip(d) = d·min(1, τ/‖d‖). Non-finite rows contribute 0.

  Options:
    tau: clipping radius τ (default 10).
    iters: number of clipping iterations (default 3; 0 returns the median).
  """
  rule_name = "centered_clipping"
  p, _ = _counts(rule_name, num_workers, num_adversaries)
  tau = _positive(rule_name, "tau", tau)
  iters = _count(rule_name, "iters", iters, 0)

  def rule(x_PxD, slices):
    finite_P = slices.finite_rows(x_PxD)
    x0_PxD = jnp.where(finite_P[:, None], x_PxD, 0)

    def body(_, v_D):
      d_P = jnp.where(finite_P, _distances(x0_PxD, v_D, slices), jnp.inf)
      c_P = jnp.where(finite_P, jnp.minimum(1.0, tau / d_P), 0.0)  # d = 0 gives τ/0 = Inf.
      # Σ c_i (x_i − v) without materialising x − v.
      return v_D + (contract.rows_dot(c_P, x0_PxD) - jnp.sum(c_P) * v_D) / p

    v_D = jax.lax.fori_loop(0, iters, body, _coordinate_median(x_PxD))
    return v_D, ~finite_P, iters

  return rule


# ----------------------------------------------------------------------------------------------
# Registry.

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
