"""The eight baseline rules (docs/math.md §6): mean, coordinate median, trimmed mean, geometric
median, Krum, Multi-Krum, Bulyan and centered clipping. Each factory takes
``(num_workers, num_adversaries, **options)``, validates them at construction (ValueError) and
returns a rule ``(x_PxD, slices) -> (mean_D, flagged_P, iterations)``, which
:mod:`draco_jax.aggregators` wraps into a combiner.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from draco_jax import contract
from draco_jax.aggregators.combiner import _count, _counts, _positive, _require, _Rule
from draco_jax.aggregators.kernels import (
  _average_of_rows,
  _coordinate_median,
  _distances,
  _finite_mean,
  _finite_median,
  _krum_scores,
  _middle,
  _nan_to_inf,
  _neighbour_scores,
  _norm,
  _pairwise_sq_distances,
  _selection_mask,
  _sort_rows,
)


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
