"""Numerical kernels shared by the rules (docs/math.md §6): a sorting network over the worker
axis and the medians built on it, point-to-row distances and overflow-safe norms, pairwise squared
distances from a Gram matrix (HIGHEST precision, clamped at 0, overflowing rows rescaled by a power
of two), Krum scores, and the masks and means of selected rows. Every reduction over D goes
through a :class:`~draco_jax.aggregators.combiner._Slices`, so each kernel runs alike on whole
rows and on column slices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from draco_jax import contract
from draco_jax.aggregators.combiner import _WHOLE, _require, _Slices

_HIGHEST = jax.lax.Precision.HIGHEST


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
