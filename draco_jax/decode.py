"""DRACO decoders: the exact mean of the honest partition gradients from coded messages.

Specification: docs/math.md §2 (repetition vote), §4 and §8 (cyclic decoder).
Shape legend: P workers, K = P partitions, S adversaries, L = P - 2S, D parameters,
C random projection columns.

``make_decoder(code)`` returns a combiner with the contract of :mod:`draco_jax.contract`::

    mean_D, report = decoder(received_PxD, key)

Both decoders read the messages only twice (one random projection, one weighted sum of rows,
skipped when the answer is refused); everything else works on P-sized arrays. The norm of the
answer, which the rounding gates need, is estimated from the projection (``Projection.gram_PxP``)
rather than read from the answer: an exact norm would be a third pass over D.

Randomness. The projection must be fresh and secret (§5.4): ``key`` is the combiner's own key.
Drawing a dense D x C Gaussian matrix costs more than the whole decode on CPU, so the projection
is Kronecker-structured: D = m1·m2, m2 = n1·n2 and f = a ⊗ c1 ⊗ c2 with independent N(0, I)
factors (Box-Muller on XLA's bit generator keyed by ``key``, see _standard_normal). For a fixed
nonzero error e (an m1 x n1 x n2 tensor E), f·e = Σ a_i c1_j c2_l E_ijl is a nonzero
multilinear polynomial of the Gaussian factors, so it vanishes with probability 0 and the
locate/certify arguments of §4 carry over.

Precision. The O(P·D) passes run in the message dtype at matmul precision HIGHEST. The
P-sized steps (syndromes, locators, fits, weights) run in float64/complex128
(:mod:`draco_jax.cyclic_solve`): in the graph, with 64-bit types enabled only while those steps
are traced (``jax.enable_x64``, so the user's arrays keep their dtypes), or, on backends without
64-bit types (TPU), in NumPy on the host through ``jax.pure_callback`` (option ``solver``).
Messages are float32 or float64 (complex64 or complex128 for the paper code), with x64 on or
off; every tolerance is keyed by the messages' real dtype. With float64 messages the fit's own
float64 rounding is as large as the messages', so the certificate allows for both (_FIT_TOL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from draco_jax import coding, contract, cyclic_solve
from draco_jax.coding import Code

__all__ = [
  "make_decoder",
  "decoder_parts",
  "message_dtypes",
  "check_messages",
  "DecoderParts",
  "project",
  "Projection",
  "combine",
  "combine_rows",
  "DECODERS",
]

_HIGHEST = jax.lax.Precision.HIGHEST

# Relative agreement tolerances by the messages' real dtype (complex64 messages use the float32
# entries). Repetition copies are bit-identical in simulation, so 1e-6 (float32, ~17u) and
# 1e-13 (float64, ~900u) leave room for reduction-order jitter on accelerators; with x64 on,
# float64 copies 1e-15 apart agree (trust_test) and a 1e-3·rms error escapes all four columns
# with ~1e-40.
_FRC_TOL = {"float32": 1e-6, "float64": 1e-13}
# Cyclic certificate tolerance, relative to each row's propagated rounding noise (see
# _agreement), by message precision, at D <= 2^12. The honest residual is dominated by the
# rounding of the float32 projection, which grows slowly with D: measured on honest messages
# (float32-encoded, N(0,1) gradients, 8 keys, P = 8..32, every S class), the largest
# residual/noise was 5u at D = 2^7, 8u at 2^12, 18u at 2^16, 25u at 2^20 and 34u at 2^22
# (u = 2^-24), about u·D^(1/4), and independent of R and of the code's rounding gain. The
# tolerance is 4u·D^(1/4) (32u at least), a margin of 4-6x over that maximum. float64 messages
# get the same multiple of their u = 2^-53 (their projection rounds alike); their fit rounds
# as much as they do, which _FIT_TOL covers. Together, on honest float64 messages (x64 on,
# N(0,1) gradients, 8 keys, D = 2^7 and 2^16, every S at P = 8..32, S = 1..31 at P = 63, 64),
# the largest residual was 0.13 of its threshold at P <= 32 and 0.24 at P = 64 (float32
# messages, same measure, fit on all rows: 0.20 and 0.23): a margin of 4x or more.
_CYCLIC_TOL = {"float32": 32 * 2.0**-24, "float64": 32 * 2.0**-53}
# A cap on each row's threshold: tol·max(row norm, median row norm)·sqrt(1 − h_k), tol = 5e-6
# (float32, 84u) or 1e-14 (float64, 90u) times sqrt(R)·max(1, amp). It holds honest rows with
# a margin of ~5x (residual/row norm <= 17·u·sqrt(R)·amp measured, N(0,1) gradients,
# D = 128..4096, P <= 32) and keeps rows the fit barely checks (h_k → 1) from absorbing gross
# errors: at a wide contiguous gap (P = 64, S = 16) the fit extrapolates, and the noise
# threshold alone let 5 rows of N(0,1) noise pass with a 7x error in the mean.
_COMMON_TOL = {"float32": 5e-6, "float64": 1e-14}
# The fit's own rounding (it runs in float64 for every message dtype), added to every row's
# threshold in units of the row's spread n_k + Σ_j |G_kj| n_j (_Fit.spread). Negligible next
# to float32 noise, it dominates with float64 messages: where the fit extrapolates or a row's
# leverage nears 1, the residual of an honest row is the fit's rounding, not the messages'
# (the same residuals refitted in 80-bit arithmetic were 5-15u). Without it the certificate
# refused honest float64 messages at P = 9-64 (14 of 20 at P = 15, S = 1; all at P = 31,
# S = 1). Measured on honest float64 messages (N(0,1) gradients, D = 128, 8 keys, fits on
# the locator's kept rows and on all rows, P = 15..64): residual/spread <= 13u up to P = 32
# and <= 39u at P = 63, 64 (u = 2^-53), while residual/noise reached 1.5e7u. 256u is 6.5x.
_FIT_TOL = 256 * 2.0**-53
# Projection columns. An error r times above what a row can hide under its threshold escapes
# one Gaussian column with probability ~1/r, all m certificate columns with ~r^-m. Cyclic: all
# eight locate (stacked), columns 1..7 certify. With four (three certifying) the `tiny` attack
# (1e-3·rms) at P = 32, S = 8, contiguous, was accepted off by 2-7e-3 in 9 of 7000 fresh
# trials, a bad row at the gap's edge (1 − h ≈ 4e-3) projecting 16x below its norm on all
# three; with eight, 0 of 4000, the largest accepted error 2.4e-5. On the projection's cost,
# 8 columns add 0.15-0.7x a plain sum to 4 (XLA CPU). The repetition vote uses four columns:
# its tolerance (1e-6 of the row's scale) lets a 1e-3·rms error escape all four with ~1e-12.
_CYCLIC_COLUMNS = 8
_VOTE_COLUMNS = 4
# Refuse answers whose estimated rounding error exceeds this, relative (see _cyclic_parts).
_NOISE_LIMIT = 1e-4
# Refuse answers that errors just below the certificate's tolerance could move by more than
# this, relative (see cyclic_solve.solve). Within the exact region of the tests it stays below 1e-3.
_RESOLUTION_LIMIT = 1e-2
# Decode again, with the row erased, when a certified decoding has an agreeing row above this
# fraction of its threshold (see cyclic_solve.solve). Honest rows: <= 0.19 of their threshold
# over 600 fresh trials each at P = 24-64, D = 512 (median 0.07-0.09); the noise tolerance
# lets them reach ~0.25 at large D (at 0.25 honest rows at P = 32, S = 15, D = 2^16 were
# flagged). Bad rows that a locator off by one row let through: 0.24-0.9, 15 of 18 above 0.3
# (P = 63, 64, `scale` and `tiny` attacks).
_SUSPECT = 0.3
# Decode again, with the row erased, when a certified answer could lean on one agreeing row by
# more than this (|b_k|·hidden_k over its norm), and keep the decoding with more agreeing rows
# (see cyclic_solve.solve): the precision a certified answer promises.
_LEAK = 1e-5


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


def _standard_normal(key, n: int) -> jax.Array:
  """n N(0, 1) float32 numbers from ``key``: Box-Muller on XLA's bit generator.

  jax.random.normal on the default threefry key costs 50-100 µs on CPU for a few hundred
  numbers (a rolled loop of rounds, then erfinv); the "rbg" generator (XLA's RngBitGenerator,
  keyed by ``key``'s data) and Box-Muller cost about a third of that. The stream is still a
  deterministic function of ``key``, fresh for every key.
  """
  data = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  if data.shape[0] < 4:  # threefry keys have 2 words, rbg keys 4
    data = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])
  rbg_key = jax.random.wrap_key_data(data[:4], impl="rbg")
  # uint32 explicitly: with x64 on the default is uint64, and the uniforms below leave (0, 1).
  bits = jax.random.bits(rbg_key, (2, -(-n // 2)), jnp.uint32)
  # 23-bit uniforms strictly inside (0, 1): the logarithm is finite.
  u = ((bits >> 9).astype(jnp.float32) + 0.5) * 2.0**-23
  radius, angle = jnp.sqrt(-2.0 * jnp.log(u[0])), (2.0 * np.pi) * u[1]
  return jnp.concatenate([radius * jnp.cos(angle), radius * jnp.sin(angle)])[:n]


def _gaussian_factors(key, m1_total: int, m2: int, num_columns: int, dtype):
  """a [m1_total, C] and c [m2, C] with c = c1 ⊗ c2 column by column, from ONE draw.

  Drawing the D·C entries of a dense F costs more than the whole decode on CPU, so
  F = a ⊗ c1 ⊗ c2 needs only (m1 + n1 + n2)·C numbers. E[c cᵀ] = I still holds, so
  t = Y_block·c keeps the variance ‖Y_block‖² that sets the noise scale.
  """
  n1, n2 = _split_inner(m2)
  rows = m1_total + (n1 > 1) * n1 + n2
  z = _standard_normal(key, rows * num_columns).reshape(rows, num_columns).astype(dtype)
  # Without the barrier XLA fuses the generator into its consumers and re-runs it for each of
  # the m2·C entries of c (measured: 175 µs instead of 45 µs at D = 2^16 on CPU).
  z = jax.lax.optimization_barrier(z)
  a_M1xC, c_M2xC = z[:m1_total], z[m1_total:]
  if n1 > 1:
    c1_N1xC, c2_N2xC = c_M2xC[:n1], c_M2xC[n1:]
    c_M2xC = (c1_N1xC[:, None, :] * c2_N2xC[None, :, :]).reshape(m2, num_columns)
  return a_M1xC, c_M2xC


class Projection(NamedTuple):
  """What the decoders read from the messages in their first pass (see :func:`project`).

  Attributes:
    y_PxC: Y·F, the projections (message dtype).
    sqnorm_PxC: each row's projected variance in each column (≈ ‖Y_k‖², real).
    gram_PxP: a random estimate of the Gram matrix conj(Y)·Yᵀ (message dtype), so that
      ‖Σ_k w_k Y_k‖² ≈ conj(w)ᵀ·gram·w is known before the combination is computed.
  """

  y_PxC: jax.Array
  sqnorm_PxC: jax.Array
  gram_PxP: jax.Array


def project(
  received_PxD: jax.Array,
  key: jax.Array,
  num_columns: int,
  *,
  shard_index: jax.Array | int = 0,
  num_shards: int = 1,
) -> Projection:
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
    A :class:`Projection`; every field is a sum over column blocks, so the slices' fields
    sum to the whole's. The first stage computes t[k, i, c] = Y_k[i-th block]·c_c, so
    y[k, c] = Σ_i a_ic t[k, i, c]; Σ_i a_ic² t² (≈ ‖Y_k‖² for large m1) sets the scale of
    its rounding noise, and gram[k, l] = Σ_ic a_ic²·conj(t[k, i, c])·t[l, i, c] / C is the
    quadratic form conj(Y_k)·M·Y_l of a random block-diagonal M with E[M] = I.
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
  scaled_PxN = (t_PxM1xC * jnp.abs(a_M1xC)[None].astype(y.dtype)).reshape(p, -1)
  gram = jnp.matmul(jnp.conj(scaled_PxN), scaled_PxN.T, precision=_HIGHEST)
  return Projection(y_PxC, sqnorm_PxC, gram / num_columns)


def combine_rows(w_P: jax.Array, received_PxD: jax.Array, erased_P: jax.Array) -> jax.Array:
  """Σ_k w_k Y_k with w_k = 0 on erased rows; non-finite rows are zeroed (0·Inf = NaN)."""
  w_P = w_P.astype(received_PxD.dtype)
  return jax.lax.cond(
    jnp.any(erased_P),
    lambda: contract.rows_dot(w_P, jnp.where(erased_P[:, None], 0, received_PxD)),
    lambda: contract.rows_dot(w_P, received_PxD),
  )


def _precision(dtype) -> str:
  """The real dtype of the messages, which keys every tolerance table: float32 or float64."""
  return jnp.finfo(dtype).dtype.name


def _tolerance(table, dtype, tol) -> float:
  return table[_precision(dtype)] if tol is None else float(tol)


class DecoderParts(NamedTuple):
  """A decoder split at its two passes over the messages, so that they can be sharded.

  decode(Y, key) = combine(parts, weights, erased, report.ok, Y) with
  (weights, erased, report) = solve(project(Y, key, C), dtype, D).

  Attributes:
    num_columns: C, the projection columns ``solve`` needs.
    solve: ``solve(projection, message_dtype, num_features) -> (weights_P, erased_P,
      report)``; pure, P-sized (num_features, the D the projection summed over, sets the
      tolerance for its rounding). The weights include the 1/K of the mean and are zero on
      every row that is not combined; ``report.ok`` includes every gate, so that nothing is
      combined when it is False.
    num_selected: if set, at most this many weights are nonzero (the repetition vote picks one
      row per group), so the combination reads only those rows.
  """

  num_columns: int
  solve: Callable
  num_selected: int | None = None


def combine(
  parts: DecoderParts, weights_P: jax.Array, erased_P: jax.Array, ok: jax.Array, received_PxD
) -> jax.Array:
  """The decoded mean Re(Σ_k w_k Y_k) [D]; zeros, without reading the messages, if not ok."""

  def rows():
    if parts.num_selected is None:
      return jnp.real(combine_rows(weights_P, received_PxD, erased_P))
    # Only the selected rows (a fully erased group is refused by the vote).
    return _sum_selected(weights_P, received_PxD, parts.num_selected)

  real = jnp.finfo(received_PxD.dtype).dtype
  # zeros_like keeps the row's type inside shard_map (varying over the mesh axis).
  return jax.lax.cond(ok, rows, lambda: jnp.zeros_like(received_PxD[0], dtype=real))


# --------------------------------------------------------------------------- repetition


def _lower_median_rows(v_GxR: jax.Array, erased_GxR: jax.Array) -> jax.Array:
  """Index in each group of the row whose value is the lower median of its received rows."""
  order_GxR = jnp.argsort(jnp.where(erased_GxR, jnp.inf, v_GxR), axis=1, stable=True)
  received_G = jnp.sum(~erased_GxR, axis=1)
  pick_G = jnp.maximum(received_G - 1, 0) // 2
  return jnp.take_along_axis(order_GxR, pick_G[:, None], axis=1)[:, 0]


def _repetition_parts(code: Code, *, tol=None, solver: str = "auto") -> DecoderParts:
  """Majority vote of the fractional repetition code (docs/math.md §2).

  Fingerprints v = Y·f choose, in each group, the row at the lower median of the group's
  fingerprints; a row agrees with it iff its fingerprint in each of the C secret directions
  is within tol times the chosen row's projected scale in that direction (one scale for all
  columns lets a column that happens to be large refuse honest copies 1e-7 apart). A group is
  ok iff its agreeing rows are a strict majority of its received rows. Exact (the output is an
  honest copy) whenever 2·t_j + e_j <= 2S in every group.

  The vote has no 64-bit step (it compares fingerprints in the message dtype), so it runs the
  same on every backend; ``solver`` is checked and accepted for a uniform option set.
  """
  cyclic_solve.check_solver(solver)
  p, r = code.num_workers, code.redundancy
  groups = p // r

  def solve(projection: Projection, dtype, num_features):
    del num_features  # the vote's tolerance does not depend on D
    v_PxC, sqnorm_PxC = projection.y_PxC, projection.sqnorm_PxC
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
    weights_P = jnp.zeros(p, dtype).at[rows_G].set(1.0 / p)
    return weights_P, erased_P, contract.make_report(~agree_GxR.reshape(p), ok)

  return DecoderParts(_VOTE_COLUMNS, solve, num_selected=groups)


# --------------------------------------------------------------------------- cyclic


def _unprotected_solve(code: Code):
  """S = 0: no redundancy to check, the mean is ℓᵀY/K; refused if any row is missing."""

  def solve(projection: Projection, dtype, num_features):
    del num_features
    y_PxC, sqnorm_PxC = projection.y_PxC, projection.sqnorm_PxC
    erased_P = ~(jnp.all(jnp.isfinite(y_PxC), axis=1) & jnp.all(jnp.isfinite(sqnorm_PxC), axis=1))
    weights_P = jnp.asarray(code.functional / code.num_workers, dtype)
    return weights_P, erased_P, contract.make_report(erased_P, ~jnp.any(erased_P))

  return solve


def _cyclic_parts(code: Code, *, tol=None, solver: str = "auto") -> DecoderParts:
  """Certified decoder of the cyclic repetition code (docs/math.md §4, corrections §8).

  1. Project Y on C = 8 fresh secret directions and estimate each row's norm in the same
     pass; rows with a non-finite projection are erasures.
  2. Syndromes of every column on the 2S parity frequencies, erasure locator Γ, modified
     syndromes, and the error locator Λ from the columns' masked Hankel systems stacked
     (min-norm least squares); the t non-erased rows with the smallest |Λ(u_k)| are flagged
     (scale-free, no threshold).
  3. Certificate on columns 1..C-1: fit a codeword to the kept rows; a row agrees iff its
     residual is within tol_noise times its propagated rounding noise, capped by
     tol_common·max(‖Y_k‖, median)·sqrt(1 − h_k), plus the fit's own float64 rounding
     (_FIT_TOL, see _agreement); refit on the agreeing rows until stable; ok iff at least
     P − e − ⌊(2S−e)/2⌋ rows agree and e < 2S.
  4. If not ok: peeling — move the worst flagged row to the erasures and redo 2-3, at most S
     rounds.
  5. Weights b: minimum-norm b with bᵀB[agree] = ℓᵀB, zero on dropped rows; the mean is
     Re(bᵀY)/K in the message dtype. A certified answer is the unique decoding (§4).
  6. Conditioning gates: the rounding error of the combination is at most about
     u·Σ_k |b_k|·‖Y_k‖; when that exceeds 1e-4·‖Σ_k b_k Y_k‖ (contiguous adversaries at large
     P force weights that extrapolate across the gap, §5.1) the answer is refused. Likewise
     when Σ_k |b_k|·(the error row k could hide under its threshold), exceeds
     1e-2·‖Σ_k b_k Y_k‖. The norm is estimated from the projection
     (cyclic_solve._combined_norm), so a refused answer is never computed.

  Tolerances (defaults): tol_noise = 32u·max(1, D/4096)^(1/4) with u the unit roundoff of
  the messages; tol_common = 5e-6 (float32) or 1e-14 (float64) times sqrt(R)·max(1, amp).
  The paper code uses tol_common for both. A given ``tol`` is used for both, as is; the fit's
  rounding allowance (256·2^-53 of each row's spread) is added either way.

  Steps 2-6 run in 64-bit arithmetic by the route ``solver`` names
  (:data:`draco_jax.cyclic_solve.SOLVERS`): ``device`` (in the graph), ``host`` (NumPy via
  ``jax.pure_callback``, for backends without 64-bit types) or ``auto`` (the default:
  ``device`` on CPU and GPU, ``host`` elsewhere).

  Reference: Chen, Wang, Charles, Papailiopoulos, "DRACO", ICML 2018, with the certified,
  well-conditioned variant specified in docs/math.md.
  """
  cyclic_solve.check_solver(solver)
  consts = cyclic_solve.constants(code)
  if code.num_adversaries == 0:
    return DecoderParts(_CYCLIC_COLUMNS, _unprotected_solve(code))

  def solve(projection: Projection, dtype, num_features):
    if tol is None:
      common = _COMMON_TOL[_precision(dtype)] * np.sqrt(code.redundancy) * max(1.0, code.amp)
      # The paper code's messages cancel by up to its rounding gain: its noise tolerance is
      # the common one. Centred codes: the projection's rounding grows like D^(1/4) (above).
      growth = max(1.0, num_features / 4096) ** 0.25
      noise = common if code.name == "cyclic_paper" else _CYCLIC_TOL[_precision(dtype)] * growth
    else:
      noise = common = float(tol)
    tolerances = cyclic_solve.Tolerances(
      noise=noise,
      common=common,
      # The paper code's rounding gain already inflates its weights b: not counted twice.
      resolution=common / max(1.0, code.amp),
      fit=_FIT_TOL,
      eps=float(jnp.finfo(dtype).eps),
      noise_limit=_NOISE_LIMIT,
      resolution_limit=_RESOLUTION_LIMIT,
      suspect=_SUSPECT,
      leak=_LEAK,
    )
    y_PxC = projection.y_PxC
    sqnorm_P = jnp.mean(projection.sqnorm_PxC, axis=1)
    erased = ~(jnp.all(jnp.isfinite(y_PxC), axis=1) & jnp.isfinite(sqnorm_P))
    route = cyclic_solve.resolve_solver(solver)
    agree, ok, weights = cyclic_solve.run(
      route, consts, tolerances, y_PxC, sqnorm_P, projection.gram_PxP, dtype
    )
    return weights, erased, contract.make_report(~agree, ok)

  return DecoderParts(_CYCLIC_COLUMNS, solve)


DECODERS = {
  "repetition": _repetition_parts,
  "cyclic": _cyclic_parts,
  "cyclic_paper": _cyclic_parts,
}


def message_dtypes(code: Code) -> tuple[str, ...]:
  """The message dtypes the decoder of ``code`` accepts: those its encoder emits."""
  return contract.COMPLEX_DTYPES if code.is_complex else contract.REAL_DTYPES


def check_messages(code: Code, dtype) -> None:
  """Raises ValueError unless the decoder of ``code`` decodes ``dtype`` messages exactly: a
  dtype its encoder emits (never half precision or integers) and, for the paper code, one
  inside its numerical envelope (:func:`draco_jax.coding.check_envelope`)."""
  contract.check_dtype(dtype, message_dtypes(code), f"{code.name} decoder")
  coding.check_envelope(code, dtype)


def decoder_parts(code: Code, **options) -> DecoderParts:
  """The decoder of ``code`` split at its two passes over the messages (see DecoderParts).

  ``solve`` raises ValueError (at trace time) for message dtypes :func:`check_messages`
  refuses.
  """
  if code.name not in DECODERS:
    raise ValueError(
      f"no DRACO decoder for code {code.name!r}; decoders exist for {', '.join(DECODERS)}; "
      "uncoded messages are combined with draco_jax.aggregators.make_aggregator"
    )
  contract.check_options(f"decoder {code.name!r}", DECODERS[code.name], options)
  parts = DECODERS[code.name](code, **options)

  def solve(projection: Projection, dtype, num_features):
    check_messages(code, dtype)
    return parts.solve(projection, dtype, num_features)

  return parts._replace(solve=solve)


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
    **options: ``solver``, where the cyclic decoder's P-sized 64-bit steps run: ``"auto"``
      (default), ``"device"`` or ``"host"`` (:mod:`draco_jax.cyclic_solve`); ``tol``, the
      relative agreement tolerance (repetition: 1e-6 for 32-bit
      messages, 1e-13 for 64-bit; cyclic: see :func:`_cyclic_parts`, 32u·max(1, D/4096)^(1/4)
      on each row's propagated rounding noise, capped by 5e-6 / 1e-14 times
      sqrt(R)·max(1, rounding gain) of max(row norm, median row norm)). A given ``tol`` is used
      as is.

  Returns:
    A jitted combiner. ``mean_D`` is the mean of the K partition gradients (real, in the real
    dtype of the messages), all zeros when ``report.ok`` is False. It decodes the message
    dtypes the code's encoder emits (:func:`message_dtypes`: float32 and float64, or
    complex64 and complex128 for ``cyclic_paper``) with jax_enable_x64 on or off; float64 and
    complex128 messages with x64 off are combined in 32 bits, with a warning.

  Raises:
    ValueError: when called (traced) on other dtypes (half precision, integers, complex
      messages of a real code), on a wrong shape, or on complex64 messages of a paper code
      beyond its complex64 envelope (:func:`check_messages`).
  """
  parts = decoder_parts(code, **options)
  p = code.num_workers

  def decode(received_PxD, key):
    contract.check_received(received_PxD, p, message_dtypes(code), f"{code.name} decoder")
    projection = project(received_PxD, key, parts.num_columns)
    weights_P, erased_P, report = parts.solve(projection, received_PxD.dtype, received_PxD.shape[1])
    return combine(parts, weights_P, erased_P, report.ok, received_PxD), report

  return contract.jit_combiner(decode, f"{code.name} decoder")
