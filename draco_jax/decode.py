"""DRACO decoders: the exact mean of the honest partition gradients from coded messages.

Specification: shared/docs/draco-math.md §2 (repetition vote), §4 and §8 (cyclic decoder).
Shape legend: P workers, K = P partitions, S adversaries, L = P - 2S, D parameters,
C random projection columns.

``make_decoder(code)`` returns a combiner with the contract of :mod:`draco_jax.contract`::

    mean_D, report = decoder(received_PxD, key)

Both decoders read the messages only twice (one random projection, one weighted sum of rows),
so they cost about as much as a plain sum; everything else works on P-sized arrays.

Randomness. The projection must be fresh and secret (§5.4): ``key`` is the combiner's own key.
Drawing a dense D x C Gaussian matrix costs more than the whole decode on CPU, so the projection
is Kronecker-structured: D = m1·m2, m2 = n1·n2 and f = a ⊗ c1 ⊗ c2 with independent N(0, I)
factors. For a fixed nonzero error e (an m1 x n1 x n2 tensor E), f·e = Σ a_i c1_j c2_l E_ijl is
a nonzero multilinear polynomial of the Gaussian factors, so it vanishes with probability 0 and
the locate/certify arguments of §4 carry over.

Precision. The O(P·D) passes run in the message dtype at matmul precision HIGHEST. The
P-sized steps (syndromes, locators, fits, weights) run in float64/complex128 by enabling 64-bit
types only while those steps are traced (``jax.enable_x64``): the user's arrays keep their dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from draco_jax import contract
from draco_jax.coding import Code

__all__ = [
  "make_decoder",
  "decoder_parts",
  "DecoderParts",
  "project",
  "combine_rows",
  "DECODERS",
]

_HIGHEST = jax.lax.Precision.HIGHEST

# Relative agreement tolerances by message precision. Repetition copies are bit-identical in
# simulation, so 1e-6 (float32) leaves room for reduction-order jitter on accelerators.
_FRC_TOL = {4: 1e-6, 8: 1e-13}
# Cyclic rows are different combinations of R gradients, each rounded on its own. Measured on
# honest float32 messages (N(0,1) gradients, the worst case for cancellation, D = 128..4096,
# P <= 32): residual/row norm <= 17·u·sqrt(R)·amp. The base tolerance keeps a ~5x margin and
# is multiplied by sqrt(R)·max(1, amp).
_CYCLIC_TOL = {4: 5e-6, 8: 1e-14}
# Projection columns: one locates, three certify (the repetition vote uses all four). A single
# certificate column lets a bad row through with probability ~ tolerance / its error.
_COLUMNS = 4
# Refuse answers whose estimated rounding error exceeds this, relative (see _cyclic_parts).
_NOISE_LIMIT = 1e-4
# Refuse answers that errors just below the certificate's tolerance could move by more than
# this, relative (see _decode_small). Within the exact region of the tests it stays below 1e-3.
_RESOLUTION_LIMIT = 1e-2


# --------------------------------------------------------------------------- projection


def _kron_factors(d: int) -> tuple[int, int, int]:
  """(m1, m2, padded D): D (padded if needed) = m1·m2, m2 <= 2048 a large divisor.

  m2 <= D/16 keeps m1 >= 16 blocks, so that the row-norm estimate Σ_i a_i² t_i² averages
  over at least 16 terms (with m1 = 1 it is one product of Gaussians per column, and the
  tolerances built on it wobble by factors of several from key to key).
  """
  top = min(2048, max(d // 16, 1))
  for m2 in range(top, max(top // 16, 1) - 1, -1):
    if d % m2 == 0:
      return d // m2, m2, d
  unit = min(1024, max(-(-d // 16), 1))
  padded = -(-d // unit) * unit
  return padded // unit, unit, padded


def _split_inner(m2: int) -> tuple[int, int]:
  """(n1, n2) with n1·n2 = m2 and n1 the largest divisor <= sqrt(m2); (1, m2) below 256.

  Small factors weaken the projection (a product of few Gaussians is small more often than
  one Gaussian), so c is drawn densely when it is short anyway.
  """
  if m2 < 256:
    return 1, m2
  n1 = max(q for q in range(1, int(np.sqrt(m2)) + 1) if m2 % q == 0)
  return n1, m2 // n1


def _gaussian_factors(key, m1_total: int, m2: int, num_columns: int, dtype):
  """a [m1_total, C] and c [m2, C] with c = c1 ⊗ c2 column by column, from ONE draw.

  Drawing the D·C entries of a dense F costs more than the whole decode on CPU (threefry, about
  30 ns a number), so F = a ⊗ c1 ⊗ c2 needs only (m1 + n1 + n2)·C numbers. E[c cᵀ] = I still
  holds, so t = Y_block·c keeps the variance ‖Y_block‖² that sets the noise scale.
  """
  n1, n2 = _split_inner(m2)
  z = jax.random.normal(key, (m1_total + (n1 > 1) * n1 + n2, num_columns), dtype)
  # Without the barrier XLA fuses the generator into its consumers and re-runs threefry for
  # each of the m2·C entries of c (measured: 175 µs instead of 45 µs at D = 2^16 on CPU).
  z = jax.lax.optimization_barrier(z)
  a_M1xC, c_M2xC = z[:m1_total], z[m1_total:]
  if n1 > 1:
    c1_N1xC, c2_N2xC = c_M2xC[:n1], c_M2xC[n1:]
    c_M2xC = (c1_N1xC[:, None, :] * c2_N2xC[None, :, :]).reshape(m2, num_columns)
  return a_M1xC, c_M2xC


def project(
  received_PxD: jax.Array,
  key: jax.Array,
  num_columns: int,
  *,
  shard_index: jax.Array | int = 0,
  num_shards: int = 1,
) -> jax.Array:
  """Y·F for a fresh Kronecker-structured Gaussian F [D, C], in one pass over Y.

  Rows with a non-finite entry get a non-finite projection (NaN and Inf propagate through
  every product and sum), so erasures are found without a separate screening pass.

  Args:
    received_PxD: the messages, or this shard's column slice of them.
    key: the combiner's key (the same on every shard).
    num_columns: C.
    shard_index: which of ``num_shards`` equal column slices ``received_PxD`` is; the slices'
      projections sum to the projection of the whole (a is drawn for all slices, then cut).
    num_shards: the number of column slices.

  Returns:
    (y_PxC in the message dtype, sqnorm_PxC): the projections and an estimate of each
    row's projected variance in each column (float32). The first stage computes
    t[k, i, c] = Y_k[i-th block]·c_c, so y[k, c] = Σ_i a_ic t[k, i, c], and Σ_i a_ic² t²
    (≈ ‖Y_k‖² for large m1) sets the scale of its rounding noise.
  """
  p, d = received_PxD.shape
  m1, m2, padded = _kron_factors(d)
  real = jnp.finfo(received_PxD.dtype).dtype
  a_M1xC, c_M2xC = _gaussian_factors(key, num_shards * m1, m2, num_columns, real)
  a_M1xC = jax.lax.dynamic_slice_in_dim(a_M1xC, shard_index * m1, m1)
  y = received_PxD if padded == d else jnp.pad(received_PxD, ((0, 0), (0, padded - d)))
  t_PxM1xC = jnp.matmul(y.reshape(p * m1, m2), c_M2xC.astype(y.dtype), precision=_HIGHEST)
  t_PxM1xC = t_PxM1xC.reshape(p, m1, num_columns)
  y_PxC = jnp.einsum("pic,ic->pc", t_PxM1xC, a_M1xC.astype(y.dtype), precision=_HIGHEST)
  # Σ_i a_i² t_i² is the variance of y given a: the scale of y's honest rounding noise.
  weighted = jnp.abs(t_PxM1xC) ** 2 * (a_M1xC**2)[None].astype(real)
  sqnorm_PxC = jnp.sum(weighted, axis=1).astype(real)
  return y_PxC, sqnorm_PxC


def combine_rows(w_P: jax.Array, received_PxD: jax.Array, erased_P: jax.Array) -> jax.Array:
  """Σ_k w_k Y_k with w_k = 0 on erased rows; non-finite rows are zeroed (0·Inf = NaN)."""
  w_P = w_P.astype(received_PxD.dtype)
  return jax.lax.cond(
    jnp.any(erased_P),
    lambda: contract.rows_dot(w_P, jnp.where(erased_P[:, None], 0, received_PxD)),
    lambda: contract.rows_dot(w_P, received_PxD),
  )


def _tolerance(table, dtype, tol) -> float:
  return table[jnp.finfo(dtype).bits // 8] if tol is None else float(tol)


class DecoderParts(NamedTuple):
  """A decoder split at its two passes over the messages, so that they can be sharded.

  decode(Y, key) = Re(Σ_k w_k Y_k) / K with (w, erased, report, noise) =
  solve(*project(Y, key, C), dtype), refused when noise > 1e-4·‖Σ_k w_k Y_k‖.

  Attributes:
    num_columns: C, the projection columns ``solve`` needs.
    solve: ``solve(y_PxC, sqnorm_PxC, message_dtype) -> (weights_P, erased_P, report, noise)``;
      pure, P-sized; the weights are zero on every row that is not combined; ``noise`` bounds
      the rounding error of Σ_k w_k Y_k.
    num_selected: if set, at most this many weights are nonzero (the repetition vote picks one
      row per group), so the combination reads only those rows.
  """

  num_columns: int
  solve: Callable
  num_selected: int | None = None


# --------------------------------------------------------------------------- repetition


def _lower_median_rows(v_GxR: jax.Array, erased_GxR: jax.Array) -> jax.Array:
  """Index in each group of the row whose value is the lower median of its received rows."""
  order_GxR = jnp.argsort(jnp.where(erased_GxR, jnp.inf, v_GxR), axis=1, stable=True)
  received_G = jnp.sum(~erased_GxR, axis=1)
  pick_G = jnp.maximum(received_G - 1, 0) // 2
  return jnp.take_along_axis(order_GxR, pick_G[:, None], axis=1)[:, 0]


def _repetition_parts(code: Code, tol=None) -> DecoderParts:
  """Majority vote of the fractional repetition code (draco-math §2).

  Fingerprints v = Y·f choose, in each group, the row at the lower median of the group's
  fingerprints; a row agrees with it iff its fingerprint in each of the C secret directions
  is within tol times the chosen row's projected scale in that direction (one scale for all
  columns lets a column that happens to be large refuse honest copies 1e-7 apart). A group is
  ok iff its agreeing rows are a strict majority of its received rows. Exact (the output is an
  honest copy) whenever 2·t_j + e_j <= 2S in every group.
  """
  p, r = code.num_workers, code.redundancy
  groups = p // r

  def solve(v_PxC, sqnorm_PxC, dtype):
    tau = _tolerance(_FRC_TOL, dtype, tol)
    erased_P = ~jnp.all(jnp.isfinite(v_PxC) & jnp.isfinite(sqnorm_PxC), axis=1)
    v_GxRxC = jnp.where(erased_P[:, None], 0, v_PxC).reshape(groups, r, -1)
    erased_GxR = erased_P.reshape(groups, r)
    chosen_G = _lower_median_rows(v_GxRxC[:, :, 0], erased_GxR)
    ref_GxC = jnp.take_along_axis(v_GxRxC, chosen_G[:, None, None], axis=1)[:, 0]
    sqnorm_GxRxC = jnp.where(erased_P[:, None], 0, sqnorm_PxC).reshape(groups, r, -1)
    scale_GxC = jnp.sqrt(jnp.take_along_axis(sqnorm_GxRxC, chosen_G[:, None, None], axis=1)[:, 0])
    gap_GxRxC = jnp.abs(v_GxRxC - ref_GxC[:, None, :])
    agree_GxR = ~erased_GxR & jnp.all(gap_GxRxC <= tau * scale_GxC[:, None, :], axis=2)
    ok = jnp.all(2 * jnp.sum(agree_GxR, axis=1) > jnp.sum(~erased_GxR, axis=1))
    rows_G = chosen_G + r * jnp.arange(groups)
    weights_P = jnp.zeros(p, dtype).at[rows_G].set(1.0)
    report = contract.make_report(~agree_GxR.reshape(p), ok)
    return weights_P, erased_P, report, jnp.zeros((), jnp.float32)

  return DecoderParts(_COLUMNS, solve, num_selected=groups)


# --------------------------------------------------------------------------- cyclic


class _Cyclic(NamedTuple):
  """Host constants of the cyclic decoder (numpy, float64/complex128)."""

  p: int
  s: int
  basis: np.ndarray  # B [P, L], real for the centred code
  parity: np.ndarray  # H_par [2S, P]
  u: np.ndarray  # u_k = e^{2πik/P} [P]
  upow: np.ndarray  # u_k^m [P, S+1], exponents reduced mod P
  target: np.ndarray  # Bᵀℓ [L]: the weights b satisfy b^T B[agree] = ℓ^T B


def _cyclic_constants(code: Code) -> _Cyclic:
  p, s = code.num_workers, code.num_adversaries
  k = np.arange(p)
  u = np.exp(2j * np.pi * k / p)
  upow = np.exp(2j * np.pi * ((k[:, None] * np.arange(s + 1)[None, :]) % p) / p)
  parity = code.parity_check() if s else np.zeros((0, p), complex)
  target = code.basis.T @ code.functional
  return _Cyclic(p, s, code.basis, parity, u, upow, target)


def _erasure_locator(c: _Cyclic, erased_P):
  """Coefficients of Γ(x) = ∏_{k erased}(x − u_k), length 2S+1 (truncated when e > 2S)."""
  u = jnp.asarray(c.u)

  def body(k, g):
    shifted = jnp.concatenate([jnp.zeros(1, g.dtype), g[:-1]])
    return jnp.where(erased_P[k], shifted - u[k] * g, g)

  g0 = jnp.zeros(2 * c.s + 1, jnp.complex128).at[0].set(1.0)
  return jax.lax.fori_loop(0, c.p, body, g0)


def _locate(c: _Cyclic, y_P, erased_P):
  """Steps 3-6 of §4: flag the t = ⌊(2S−e)/2⌋ non-erased rows with the smallest |Λ(u_k)|."""
  s2 = 2 * c.s
  e = jnp.sum(erased_P)
  n = jnp.maximum(s2 - e, 0)
  t = n // 2
  sigma = jnp.asarray(c.parity) @ jnp.where(erased_P, 0, y_P).astype(jnp.complex128)
  gamma = _erasure_locator(c, erased_P)
  j, m = np.arange(s2)[:, None], np.arange(s2 + 1)[None, :]
  sigma_pad = jnp.concatenate([sigma, jnp.zeros(s2 + 1, sigma.dtype)])
  t_syn = jnp.sum(sigma_pad[j + m] * gamma[None, :], axis=1)  # modified syndromes T_j
  t_pad = jnp.concatenate([t_syn, jnp.zeros(s2 + 1, t_syn.dtype)])
  rows, cols = np.arange(s2)[:, None], np.arange(c.s)[None, :]
  row_ok = rows < n - t
  hankel = jnp.where(row_ok & (cols < t), t_pad[rows + cols], 0)
  rhs = jnp.where(row_ok[:, 0], -t_pad[np.arange(s2) + t], 0)
  lam = jnp.linalg.lstsq(hankel, rhs)[0]
  deg = np.arange(c.s + 1)
  lam_full = jnp.where(deg < t, jnp.concatenate([lam, jnp.zeros(1, lam.dtype)]), 0)
  lam_full = lam_full + (deg == t)
  score = jnp.where(erased_P, jnp.inf, jnp.abs(jnp.asarray(c.upow) @ lam_full))
  rank = jnp.argsort(jnp.argsort(score, stable=True), stable=True)
  return ~erased_P & (rank >= t)


def _masked_qr(c: _Cyclic, mask_P):
  """Q [P, L], R [L, L] of B with the unmasked rows zeroed, and whether R is invertible.

  Householder QR (no SVD: LAPACK's real SVD is pathologically slow at some sizes on CPU).
  With at least L masked rows B_m has full rank (every L rows of B are independent); with
  fewer, R is singular and every result built on it is discarded.
  """
  q, r = jnp.linalg.qr(jnp.where(mask_P[:, None], jnp.asarray(c.basis), 0))
  diag = jnp.abs(jnp.diagonal(r))
  full_rank = jnp.min(diag) > 1e-10 * jnp.max(diag)
  r = jnp.where(full_rank, r, jnp.eye(r.shape[0], dtype=r.dtype))
  return q, r, full_rank


def _fit(c: _Cyclic, y_PxM, mask_P):
  """The least-squares codewords [P, M] through the masked rows (meaningless if rank-deficient)."""
  q, r, _ = _masked_qr(c, mask_P)
  rhs = jnp.conj(q).T @ jnp.where(mask_P[:, None], y_PxM, 0).astype(q.dtype)
  return jnp.asarray(c.basis) @ jax.scipy.linalg.solve_triangular(r, rhs, lower=False)


def _fit_operator(c: _Cyclic, mask_P):
  """G [P, P] with G·y = the least-squares codeword through the masked rows of y (zero
  columns off the mask), and whether the fit has full rank."""
  q, r, full_rank = _masked_qr(c, mask_P)
  solved_LxP = jax.scipy.linalg.solve_triangular(r, jnp.conj(q).T, lower=False)
  return jnp.asarray(c.basis) @ solved_LxP, full_rank


def _agreement(c: _Cyclic, yc_PxM, norms_P, scale, erased_P, mask_P, tau):
  """Rows whose residual from the codeword fitted on mask is within tau of its noise.

  The residual r = (I − G)·y of row k carries the rounding noise of every row the fit uses:
  noise_k = sqrt(Σ_j |(I − G)_kj|² n_j²), n_j being row j's norm (a kept row pulls the fit
  towards itself; the diagonal 1 − h_k accounts for it). The threshold is
  tau·min(noise_k, scale·sqrt(1 − h_k)) with scale the median row norm: the common scale
  alone lets rows much smaller than the median (even-P codes) hide errors of 1e-3 of their
  norm, and noise_k alone grows without bound where the fit extrapolates (wide contiguous
  gaps at large P), so each bounds the other. A row cannot buy a looser threshold by growing
  its norm: the threshold grows by tol·‖δ‖, its residual by about |f·δ| ≫ tol·‖δ‖.
  """
  g_PxP, full_rank = _fit_operator(c, mask_P)
  resid_PxM = yc_PxM - g_PxP @ jnp.where(mask_P[:, None], yc_PxM, 0).astype(g_PxP.dtype)
  resid = jnp.sqrt(jnp.mean(jnp.abs(resid_PxM) ** 2, axis=1))
  m_PxP = jnp.eye(c.p, dtype=g_PxP.dtype) - g_PxP
  noise = jnp.sqrt(jnp.abs(m_PxP) ** 2 @ (norms_P**2))
  common = scale * jnp.sqrt(jnp.clip(jnp.abs(jnp.diagonal(m_PxP)), 1e-12, 1.0))
  return ~erased_P & (resid <= tau * jnp.minimum(noise, common)) & full_rank


def _certify(c: _Cyclic, yc_PxM, norms_P, scale, erased_P, keep_P, tau, max_refits=3):
  """Step 7 with the corrections of §8: refit on the agreeing rows until they stop changing."""
  agree = _agreement(c, yc_PxM, norms_P, scale, erased_P, keep_P, tau)

  def refit(carry):
    prev, _, i = carry
    return prev, _agreement(c, yc_PxM, norms_P, scale, erased_P, prev, tau), i + 1

  def changing(carry):
    prev, cur, i = carry
    return jnp.any(prev != cur) & (i < max_refits)

  _, agree, _ = jax.lax.while_loop(changing, refit, (keep_P, agree, 0))
  e = jnp.sum(erased_P)
  need = c.p - e - (2 * c.s - e) // 2
  ok = (jnp.sum(agree) >= need) & ((e < 2 * c.s) | (e == 0)) & (e <= 2 * c.s)
  return agree, ok


def _peel_suspect(c: _Cyclic, y_P, erased_P, keep_P):
  """The non-erased row farthest from the codeword fitted on the kept rows (flagged first)."""
  fit = _fit(c, y_P[:, None], keep_P)
  resid = jnp.abs(y_P - fit[:, 0])
  live = ~erased_P
  suspects = jnp.where(jnp.any(live & ~keep_P), live & ~keep_P, live)
  resid = jnp.where(suspects, resid, -1.0)
  # Not jnp.argmax: its lowering builds a 32-bit initial value once x64 is off again.
  return jnp.min(jnp.where(resid == jnp.max(resid), jnp.arange(c.p), c.p))


def _weights(c: _Cyclic, agree_P):
  """Minimum-norm b with bᵀB[agree] = ℓᵀB (plain transpose), zero off the agreeing rows,
  and the rows' leverages h_k = ‖Q_k‖² in the fit on the agreeing rows.

  With B_m = QR: b = conj(Q)·R^{-T}·(Bᵀℓ); b lies in the row space, so it is the min-norm one.
  """
  q, r, full_rank = _masked_qr(c, agree_P)
  coeffs = jax.scipy.linalg.solve_triangular(r.T, jnp.asarray(c.target, r.dtype), lower=True)
  leverage = jnp.sum(jnp.abs(q) ** 2, axis=1)
  return jnp.where(agree_P & full_rank, jnp.conj(q) @ coeffs, 0), leverage


def _decode_small(c: _Cyclic, y_PxC, sqnorm_P, tau, tau_resolution):
  """All P-sized steps of §4 in 64-bit: (agree [P], ok [], weights b [P])."""
  real = not np.iscomplexobj(c.basis)
  y_PxC = y_PxC.astype(jnp.float64 if real else jnp.complex128)
  erased = ~(jnp.all(jnp.isfinite(y_PxC), axis=1) & jnp.isfinite(sqnorm_P))
  y_PxC = jnp.where(erased[:, None], 0, y_PxC)
  y, yc = y_PxC[:, 0], y_PxC[:, 1:]
  # The rounding noise of a row scales with its norm; the median over the received rows is
  # an honest row's norm whenever honest rows are the majority (within the budget).
  norms = jnp.sqrt(jnp.where(erased, jnp.inf, sqnorm_P.astype(jnp.float64)))
  scale = jnp.sort(norms)[jnp.maximum(c.p - jnp.sum(erased) - 1, 0) // 2]

  def candidate(erased_cur):
    keep = _locate(c, y, erased_cur)
    agree, ok = _certify(c, yc, jnp.where(erased, 0, norms), scale, erased, keep, tau)
    return keep, agree, ok

  def peel(_, carry):
    erased_cur, keep, agree, ok = carry

    def step():
      worst = _peel_suspect(c, y, erased_cur, keep)
      nxt = erased_cur.at[worst].set(True)
      return (nxt, *candidate(nxt))

    return jax.lax.cond(ok | (jnp.sum(erased_cur) >= 2 * c.s), lambda: carry, step)

  carry = jax.lax.fori_loop(0, c.s, peel, (erased, *candidate(erased)))
  _, _, agree, ok = carry
  weights, leverage = _weights(c, agree)
  mass = jnp.abs(weights) * jnp.where(erased, 0, norms)
  # Two error bounds: rounding, Σ|b_k|·‖Y_k‖ (times u, by the caller); and resolution, the
  # output error that errors just below the certificate's tolerance could cause: a row with
  # leverage h_k passes with an error up to tau·scale/sqrt(1 − h_k), so rows that no other row
  # checks (h_k → 1, at the edges of a wide contiguous gap) can hide anything (measured at
  # P = 64, S = 16, contiguous: a 1e-3 row error passed and moved the mean by 3e-2).
  unchecked = jnp.abs(weights) / jnp.sqrt(jnp.maximum(1.0 - leverage, 1e-24))
  resolution = tau_resolution * scale * jnp.sum(jnp.where(erased, 0, unchecked))
  return agree, ok, weights, jnp.sum(mass), resolution


def _cyclic_parts(code: Code, tol=None) -> DecoderParts:
  """Certified decoder of the cyclic repetition code (draco-math §4, corrections §8).

  1. Project Y on two fresh secret directions (locator y, certificate y_c) and estimate each
     row's norm in the same pass; rows with a non-finite projection are erasures.
  2. Syndromes of y on the 2S parity frequencies, erasure locator Γ, modified syndromes,
     error locator Λ from a masked Hankel system (min-norm least squares), and the
     t non-erased rows with the smallest |Λ(u_k)| flagged (scale-free, no threshold).
  3. Certificate on y_c: fit a codeword to the kept rows; a row agrees iff its (leave-one-out
     for kept rows) residual is <= tol·(median row norm); refit on the agreeing rows until
     stable; ok iff at least P − e − ⌊(2S−e)/2⌋ rows agree and e < 2S.
  4. If not ok: peeling — move the worst flagged row to the erasures and redo 2-3, at most S
     rounds.
  5. Weights b: minimum-norm b with bᵀB[agree] = ℓᵀB, zero on dropped rows; the mean is
     Re(bᵀY)/K in the message dtype. A certified answer is the unique decoding (§4).
  6. Conditioning gates: the rounding error of the combination is at most about
     u·Σ_k |b_k|·‖Y_k‖; when that exceeds 1e-4·‖Σ_k b_k Y_k‖ (contiguous adversaries at large
     P force weights that extrapolate across the gap, §5.1) the answer is refused. Likewise
     when tol·Σ_k |b_k|·‖Y_k‖/sqrt(1 − h_k) (h_k: leverage of row k in the final fit), the
     error that rows passing the certificate just under its tolerance could cause, exceeds
     1e-2·‖Σ_k b_k Y_k‖.

  Reference: Chen, Wang, Charles, Papailiopoulos, "DRACO", ICML 2018, with the certified,
  well-conditioned variant specified in shared/docs/draco-math.md.
  """
  consts = _cyclic_constants(code)
  scaled = tol is None

  def solve(y_PxC, sqnorm_PxC, dtype):
    sqnorm_P = jnp.mean(sqnorm_PxC, axis=1)
    gain = np.sqrt(code.redundancy) * max(1.0, code.amp) if scaled else 1.0
    tau = _tolerance(_CYCLIC_TOL, dtype, tol) * gain
    with jax.enable_x64(True):
      # The paper code's rounding gain already inflates its weights b: not counted twice.
      agree, ok, weights, rounding, resolution = _decode_small(
        consts, y_PxC, sqnorm_P, tau, tau / max(1.0, code.amp)
      )
      weights = weights.astype(dtype)
      # One number for the gate noise <= _NOISE_LIMIT·‖output‖: rounding against 1e-4,
      # resolution against _RESOLUTION_LIMIT.
      noise = jnp.maximum(
        rounding * float(jnp.finfo(dtype).eps), resolution * (_NOISE_LIMIT / _RESOLUTION_LIMIT)
      ).astype(jnp.float32)
    erased = ~(jnp.all(jnp.isfinite(y_PxC), axis=1) & jnp.isfinite(sqnorm_P))
    return weights, erased, contract.make_report(~agree, ok), noise

  return DecoderParts(_COLUMNS, solve)


DECODERS = {
  "repetition": _repetition_parts,
  "cyclic": _cyclic_parts,
  "cyclic_paper": _cyclic_parts,
}


def decoder_parts(code: Code, **options) -> DecoderParts:
  """The decoder of ``code`` split at its two passes over the messages (see DecoderParts)."""
  if code.name not in DECODERS:
    raise ValueError(
      f"no DRACO decoder for code {code.name!r}; decoders exist for {', '.join(DECODERS)}; "
      "uncoded messages are combined with draco_jax.aggregators.make_aggregator"
    )
  unknown = set(options) - {"tol"}
  if unknown:
    raise ValueError(f"unknown decoder options {sorted(unknown)}; valid options: ['tol']")
  return DECODERS[code.name](code, **options)


def _sum_selected(w_P: jax.Array, received_PxD: jax.Array, num_selected: int) -> jax.Array:
  """Σ_k w_k Y_k when at most ``num_selected`` weights are nonzero, reading only those rows.

  One dynamic row slice per selected row, summed in one fusion: a gather of the rows would
  be copied first, and a dot over all P rows reads R times more than needed.
  """
  rows_G = jnp.nonzero(w_P, size=num_selected, fill_value=0)[0]
  w_G = w_P[rows_G].astype(received_PxD.dtype)
  total_D = jnp.zeros(received_PxD.shape[1], received_PxD.dtype)
  for g in range(num_selected):
    total_D = total_D + w_G[g] * jax.lax.dynamic_index_in_dim(received_PxD, rows_G[g], 0, False)
  return total_D


def make_decoder(code: Code, **options):
  """The DRACO decoder of ``code``: ``decoder(received_PxD, key) -> (mean_D, report)``.

  Args:
    code: a :class:`draco_jax.coding.Code` (repetition, cyclic or cyclic_paper).
    **options: ``tol``, the relative agreement tolerance (repetition: 1e-6 for 32-bit
      messages, 1e-13 for 64-bit; cyclic: 5e-6 / 1e-14 times sqrt(R)·max(1, rounding gain)).
      A given ``tol`` is used as is.

  Returns:
    A jitted combiner. ``mean_D`` is the mean of the K partition gradients (real, in the real
    dtype of the messages), all zeros when ``report.ok`` is False.
  """
  parts = decoder_parts(code, **options)
  p = code.num_workers

  def decode(received_PxD, key):
    contract.check_received(received_PxD, p)
    y_PxC, sqnorm_PxC = project(received_PxD, key, parts.num_columns)
    weights_P, erased_P, report, noise = parts.solve(y_PxC, sqnorm_PxC, received_PxD.dtype)
    if parts.num_selected is None:
      total_D = jnp.real(combine_rows(weights_P, received_PxD, erased_P))
    else:  # read only the selected rows (a fully erased group is refused by the vote)
      total_D = _sum_selected(weights_P, received_PxD, parts.num_selected)
    report = report._replace(ok=report.ok & (noise <= _NOISE_LIMIT * jnp.linalg.norm(total_D)))
    return contract.zero_if_not_ok(total_D / p, report.ok), report

  return jax.jit(decode)
