"""The cyclic decoder's P-sized steps (docs/math.md §4 steps 2-10, §8), in 64-bit arithmetic.

Between its two passes over the messages (the projection and the weighted sum of rows, in
:mod:`draco_jax.decode`), the cyclic decoder works on P-sized arrays: syndromes, locators,
fits, the certificate, peeling, the weights and the conditioning gates. They need 64-bit
arithmetic (in float32 they degrade from P = 16 and break from P = 31, §4), which not every
backend has: TPUs have no float64 or complex128. So they are written once, over an array
namespace (:class:`Ops`), and run by one of two routes (:data:`SOLVERS`):

* ``device``: in the jitted graph, with JAX's 64-bit types enabled only while they are traced
  (``jax.enable_x64``), so the user's arrays keep their dtypes. CPUs and GPUs.
* ``host``: NumPy/SciPy float64 on the host, called from the graph with ``jax.pure_callback``;
  the graph itself holds no 64-bit value (the callback takes the projection in the message
  dtype and returns the weights in it). Backends without 64-bit types (TPU, and any platform
  not known to have them). The data are a few P x C numbers, so the round trip costs
  microseconds next to the O(P·D) passes. It works inside ``jit``, inside ``shard_map``
  (sharded combining: every device calls it on the same psum'd projection and gets the same
  answer) and in multi-process runs (each process calls it for its own devices). NumPy, not
  JAX, inside the callback: JAX computations started from a callback can deadlock.

``auto`` (the default) picks ``device`` on CPU and GPU and ``host`` elsewhere
(:func:`resolve_solver`). Both routes run the same functions below; on CPU they agree to the
last bit in most cases and in every decision the tests check (tests/solver_test.py).

Shape legend: P workers, S adversaries, L = P - 2S, C projection columns, M = C - 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from draco_jax.coding import Code

__all__ = [
  "SOLVERS",
  "resolve_solver",
  "check_solver",
  "Tolerances",
  "Cyclic",
  "constants",
  "solve",
]

SOLVERS = ("auto", "device", "host")
# Platforms whose XLA backend has float64 and complex128 (``device`` is picked for them).
_X64_PLATFORMS = ("cpu", "gpu", "cuda", "rocm")


def check_solver(solver: str) -> None:
  """Raises ValueError unless ``solver`` is one of :data:`SOLVERS`."""
  if solver not in SOLVERS:
    raise ValueError(
      f"unknown decoder solver {solver!r}: the P-sized steps run on the 'device' (in the "
      "graph, 64-bit) or on the 'host' (NumPy float64 via jax.pure_callback); 'auto' picks "
      f"'device' on {', '.join(_X64_PLATFORMS[:2])} and 'host' elsewhere; "
      f"valid: {', '.join(SOLVERS)}"
    )


def resolve_solver(solver: str = "auto", platform: str | None = None) -> str:
  """``device`` or ``host``: the route ``solver`` means on ``platform`` (default backend).

  Raises:
    ValueError: an unknown solver, or ``device`` forced on a platform without 64-bit types.
  """
  check_solver(solver)
  platform = (platform or jax.default_backend()).lower()
  has_x64 = platform in _X64_PLATFORMS
  if solver == "auto":
    return "device" if has_x64 else "host"
  if solver == "device" and not has_x64:
    raise ValueError(
      f"decoder solver 'device' runs the P-sized steps in float64 in the graph, but the "
      f"{platform!r} backend has no 64-bit types; use solver='host' (or 'auto')"
    )
  return solver


# --------------------------------------------------------------------------- array namespace


class Ops(NamedTuple):
  """The array namespace and control flow the P-sized steps are written against."""

  xp: Any  # jax.numpy or numpy
  solve_triangular: Callable
  lstsq: Callable  # min-norm least squares: lstsq(a, b) -> x
  while_loop: Callable
  cond: Callable
  fori_loop: Callable
  argsort: Callable  # stable
  nonzero: Callable  # nonzero(mask, size, fill) -> first `size` indices, padded with `fill`
  take_rows: Callable  # take_rows(a, rows, fill): a[rows], rows out of range give fill
  set_rows: Callable  # set_rows(a, rows, values): a with a[rows] = values, out of range dropped


def _np_while(cond, body, carry):
  while cond(carry):
    carry = body(carry)
  return carry


def _np_fori(lo, hi, body, carry):
  for i in range(lo, hi):
    carry = body(i, carry)
  return carry


def _np_lstsq(a, b):
  try:
    return np.linalg.lstsq(a, b, rcond=None)[0]
  except np.linalg.LinAlgError:  # no convergence: JAX returns NaN, and the certificate refuses
    return np.full(a.shape[1:], np.nan, np.result_type(a, b))


def _np_solve_triangular(a, b, lower):
  try:
    return scipy.linalg.solve_triangular(a, b, lower=lower)
  except (
    np.linalg.LinAlgError
  ):  # an exact zero pivot: JAX gives Inf/NaN, and so the answer is refused
    return np.full(np.shape(b), np.nan, np.result_type(a, b))


def _np_nonzero(mask, size, fill):
  rows = np.flatnonzero(mask)[:size]
  return np.concatenate([rows, np.full(size - rows.size, fill, rows.dtype)])


def _np_take_rows(a, rows, fill):
  inside = rows < a.shape[0]
  return np.where(inside[:, None], a[np.where(inside, rows, 0)], fill)


def _np_set_rows(a, rows, values):
  inside = rows < a.shape[0]
  out = a.copy()
  out[rows[inside]] = values[inside]
  return out


DEVICE = Ops(
  xp=jnp,
  solve_triangular=jax.scipy.linalg.solve_triangular,
  lstsq=lambda a, b: jnp.linalg.lstsq(a, b)[0],
  while_loop=jax.lax.while_loop,
  cond=jax.lax.cond,
  fori_loop=jax.lax.fori_loop,
  argsort=lambda x: jnp.argsort(x, stable=True),
  nonzero=lambda mask, size, fill: jnp.nonzero(mask, size=size, fill_value=fill)[0],
  take_rows=lambda a, rows, fill: jnp.take(a, rows, axis=0, mode="fill", fill_value=fill),
  set_rows=lambda a, rows, values: a.at[rows].set(values, mode="drop"),
)
HOST = Ops(
  xp=np,
  solve_triangular=_np_solve_triangular,
  lstsq=_np_lstsq,
  while_loop=_np_while,
  cond=lambda pred, true_fn, false_fn: true_fn() if pred else false_fn(),
  fori_loop=_np_fori,
  argsort=lambda x: np.argsort(x, kind="stable"),
  nonzero=_np_nonzero,
  take_rows=_np_take_rows,
  set_rows=_np_set_rows,
)


# --------------------------------------------------------------------------- constants


class Cyclic(NamedTuple):
  """Host constants of the cyclic decoder (numpy, float64/complex128)."""

  p: int
  s: int
  basis: np.ndarray  # B [P, L], real for the centred code
  parity: np.ndarray  # H_par [2S, P]
  u: np.ndarray  # u_k = e^{2πik/P} [P]
  upow: np.ndarray  # u_k^m [P, S+1], exponents reduced mod P
  target: np.ndarray  # Bᵀℓ [L]: the weights b satisfy b^T B[agree] = ℓ^T B


def constants(code: Code) -> Cyclic:
  p, s = code.num_workers, code.num_adversaries
  k = np.arange(p)
  u = np.exp(2j * np.pi * k / p)
  upow = np.exp(2j * np.pi * ((k[:, None] * np.arange(s + 1)[None, :]) % p) / p)
  parity = code.parity_check() if s else np.zeros((0, p), complex)
  target = code.basis.T @ code.functional
  return Cyclic(p, s, code.basis, parity, u, upow, target)


class Tolerances(NamedTuple):
  """The certificate's and the gates' constants (set by decode._cyclic_parts).

  Attributes:
    noise: tol_noise, on each row's propagated rounding noise.
    common: tol_common, the cap on each row's threshold.
    resolution: what a row may hide under its threshold, for the resolution gate.
    fit: the fit's own 64-bit rounding, in units of each row's spread.
    eps: the messages' machine epsilon (the rounding gate).
    noise_limit: refuse when eps·rounding or the scaled resolution exceeds this, relative.
    resolution_limit: the resolution gate's own limit (scales the resolution to noise_limit).
    suspect: a certified decoding whose agreeing rows reach this fraction of their thresholds
      is decoded again with the worst of them erased (1: never).
    leak: a certified decoding whose largest |b_k|·hidden_k exceeds this fraction of the
      answer's norm is decoded again with row k erased, and replaced if that certifies with
      more agreeing rows (inf: never).
  """

  noise: float
  common: float
  resolution: float
  fit: float
  eps: float
  noise_limit: float
  resolution_limit: float
  suspect: float = 1.0
  leak: float = np.inf


# A row whose 1 − h_k is below this is all but unchecked by the fit (see the second look in
# solve): bad rows between two flagged honest ones measured 2.5e-8 to 1.3e-6 (P = 63, 64).
_UNCHECKED = 1e-5
# At most this many suspect rows are erased and decoded again (each costs a P-sized decode;
# the ambiguities measured needed one or two).
_SECOND_LOOKS = 4
# The stages of the second looks (see solve).
_DONE, _FIRST, _LOOK, _RETRY = -1, 0, 1, 2

# --------------------------------------------------------------------------- steps


def _erasure_locator(ops: Ops, c: Cyclic, erased_P):
  """Coefficients of Γ(x) = ∏_{k erased}(x − u_k), length 2S+1 (truncated when e > 2S)."""
  xp = ops.xp
  u = xp.asarray(c.u)

  def body(k, g):
    shifted = xp.concatenate([xp.zeros(1, g.dtype), g[:-1]])
    return xp.where(erased_P[k], shifted - u[k] * g, g)

  g0 = xp.asarray(np.eye(1, 2 * c.s + 1, dtype=np.complex128)[0])
  # Γ = 1 without erasures (the common case): skip the P sequential steps.
  return ops.cond(xp.any(erased_P), lambda: ops.fori_loop(0, c.p, body, g0), lambda: g0)


def _locate(ops: Ops, c: Cyclic, y_PxC, erased_P):
  """Steps 3-6 of §4: flag the t = ⌊(2S−e)/2⌋ non-erased rows with the smallest |Λ(u_k)|.

  Every projection column gives its own syndromes and Hankel system for the same error
  locator Λ (the error positions are shared, the values differ), so the systems are stacked
  and solved together: an error that one column happens to see only faintly is located from
  the others.
  """
  xp = ops.xp
  s2 = 2 * c.s
  e = xp.sum(erased_P)
  n = xp.maximum(s2 - e, 0)
  t = n // 2
  y_PxC = xp.where(erased_P[:, None], 0, y_PxC).astype(xp.complex128)
  sigma_JxC = xp.asarray(c.parity) @ y_PxC
  gamma = _erasure_locator(ops, c, erased_P)
  j, m = np.arange(s2)[:, None], np.arange(s2 + 1)[None, :]
  sigma_pad = xp.concatenate([sigma_JxC, xp.zeros((s2 + 1, sigma_JxC.shape[1]), sigma_JxC.dtype)])
  t_syn = xp.einsum("jmc,m->jc", sigma_pad[j + m], gamma)  # modified syndromes T_j per column
  t_pad = xp.concatenate([t_syn, xp.zeros((s2 + 1, t_syn.shape[1]), t_syn.dtype)])
  rows, cols = np.arange(s2)[:, None], np.arange(c.s)[None, :]
  row_ok = rows < n - t
  hankel_CxJxS = xp.where((row_ok & (cols < t))[None], t_pad[rows + cols].transpose(2, 0, 1), 0)
  rhs_CxJ = xp.where(row_ok[:, 0][None], -t_pad[np.arange(s2) + t].T, 0)
  lam = ops.lstsq(hankel_CxJxS.reshape(-1, c.s), rhs_CxJ.reshape(-1))
  deg = np.arange(c.s + 1)
  lam_full = xp.where(deg < t, xp.concatenate([lam, xp.zeros(1, lam.dtype)]), 0)
  lam_full = lam_full + (deg == t)
  score = xp.where(erased_P, xp.inf, xp.abs(xp.asarray(c.upow) @ lam_full))
  rank = ops.argsort(ops.argsort(score))
  return ~erased_P & (rank >= t)


def _masked_qr(ops: Ops, c: Cyclic, mask_P):
  """Q [P, L], R [L, L] of B with the unmasked rows zeroed, and whether R is invertible.

  Householder QR (no SVD: LAPACK's real SVD is pathologically slow at some sizes on CPU).
  With at least L masked rows B_m has full rank (every L rows of B are independent); with
  fewer, R is singular and every result built on it is discarded.
  """
  xp = ops.xp
  q, r = xp.linalg.qr(xp.where(mask_P[:, None], xp.asarray(c.basis), 0))
  diag = xp.abs(xp.diagonal(r))
  full_rank = xp.min(diag) > 1e-10 * xp.max(diag)
  r = xp.where(full_rank, r, xp.eye(r.shape[0], dtype=r.dtype))
  return q, r, full_rank


def _fit(ops: Ops, c: Cyclic, y_PxM, mask_P):
  """The least-squares codewords [P, M] through the masked rows (meaningless if rank-deficient)."""
  xp = ops.xp
  q, r, _ = _masked_qr(ops, c, mask_P)
  rhs = xp.conj(q).T @ xp.where(mask_P[:, None], y_PxM, 0).astype(q.dtype)
  return xp.asarray(c.basis) @ ops.solve_triangular(r, rhs, lower=False)


class _Fit(NamedTuple):
  """The least-squares fit of codewords through the masked rows (64-bit, P-sized)."""

  q: Any  # Q [P, L] of B with the unmasked rows zeroed
  r: Any  # R [L, L]
  full_rank: Any  # whether R is invertible (else everything here is meaningless)
  g: Any  # G [P, P]: G·y is the fitted codeword (zero columns off the mask)
  noise: Any  # noise_k = sqrt(Σ_j |(I − G)_kj|² n_j²) [P]
  unchecked: Any  # |1 − G_kk| [P]: 1 − h_k on the mask, h_k the leverage of row k
  spread: Any  # n_k + Σ_j |G_kj| n_j [P]: the scale of the fit's own 64-bit rounding


def _fit_on(ops: Ops, c: Cyclic, mask_P, norms_P) -> _Fit:
  """The fit through the masked rows, with each row's propagated noise (row norms norms_P).

  G = B·R⁻¹·Qᴴ. On the masked rows B_k·R⁻¹ = Q_k, so those rows of G are Q·Qᴴ and only the
  other rows (at most 2S while R is invertible) need a triangular solve. A solve with a
  P-column right-hand side would also cost more: OpenBLAS runs it multithreaded, and its
  threads keep spinning after the call, taking the cores from the O(P·D) passes of the next
  decode (measured: 2x on every pass at P = 64, 2 cores).
  """
  xp = ops.xp
  q, r, full_rank = _masked_qr(ops, c, mask_P)
  rows = ops.nonzero(~mask_P, 2 * c.s, c.p)
  basis_off = ops.take_rows(xp.asarray(c.basis), rows, 0)
  # B_off·R⁻¹ = (R⁻ᵀ·B_offᵀ)ᵀ (plain transposes: R⁻¹ itself, not its adjoint).
  solved_LxO = ops.solve_triangular(r.T, basis_off.T, lower=True)
  g_PxP = ops.set_rows(q @ xp.conj(q).T, rows, solved_LxO.T @ xp.conj(q).T)
  # Householder leaves ~1e-17 in Q's zeroed rows: times a finite gross row (1e30 in float64)
  # that would inflate every row's noise and spread, and so its threshold, to O(1).
  g_PxP = xp.where(mask_P[None, :], g_PxP, 0)
  m_PxP = xp.eye(c.p, dtype=g_PxP.dtype) - g_PxP
  noise = xp.sqrt(xp.abs(m_PxP) ** 2 @ (norms_P**2))
  spread = norms_P + xp.abs(g_PxP) @ norms_P
  return _Fit(q, r, full_rank, g_PxP, noise, xp.abs(xp.diagonal(m_PxP)), spread)


def _agreement(ops: Ops, yc_PxM, norms_P, scale, erased_P, mask_P, fit: _Fit, tol: Tolerances):
  """Rows whose residual from the codeword fitted on mask is within the rounding they can
  carry; ``fit`` is the fit on mask. Returns (agree, ratio): ratio = residual / threshold on the
  agreeing rows (<= 1), 0 elsewhere.

  The residual r = (I − G)·y of row k carries the rounding noise of every row the fit uses:
  noise_k = sqrt(Σ_j |(I − G)_kj|² n_j²), n_j being row j's norm (a kept row pulls the fit
  towards itself; the diagonal 1 − h_k accounts for it). Honest residuals are about
  u·noise_k, so tol.noise·noise_k separates what rounding can explain from what it cannot.
  It is capped by tol.common·max(n_k, scale)·sqrt(1 − h_k), scale the median row norm: where
  the fit extrapolates (wide contiguous gaps at large P) noise_k grows without bound, and the
  rows of the gap could absorb gross errors along the fit's nearly free directions. (The
  median alone refused honest rows 16x larger than it, in the middle of even-P codes.)
  Errors below the threshold are bounded afterwards by the resolution gate of :func:`solve`.
  A row cannot buy a looser threshold by growing its norm: the threshold grows by tol·‖δ‖,
  its residual by about |f·δ| ≫ tol·‖δ‖.
  """
  xp = ops.xp
  fitted_PxM = fit.g @ xp.where(mask_P[:, None], yc_PxM, 0).astype(fit.g.dtype)
  resid = xp.sqrt(xp.mean(xp.abs(yc_PxM - fitted_PxM) ** 2, axis=1))
  common = xp.maximum(norms_P, scale) * xp.sqrt(xp.clip(fit.unchecked, 1e-12, 1.0))
  threshold = xp.minimum(tol.noise * fit.noise, tol.common * common) + tol.fit * fit.spread
  agree = ~erased_P & (resid <= threshold) & fit.full_rank
  return agree, xp.where(agree, resid / threshold, 0)


def _empty_fit(ops: Ops, c: Cyclic) -> _Fit:
  """Zeros shaped like a :class:`_Fit` (a loop's state before its first fit)."""
  xp = ops.xp
  dtype, num_cols = c.basis.dtype, c.basis.shape[1]
  real = lambda: xp.zeros(c.p, xp.float64)  # noqa: E731
  return _Fit(
    xp.zeros((c.p, num_cols), dtype),
    xp.zeros((num_cols, num_cols), dtype),
    xp.asarray(False),
    xp.zeros((c.p, c.p), dtype),
    real(),
    real(),
    real(),
  )


def _certify(ops: Ops, c: Cyclic, yc_PxM, norms_P, scale, erased_P, keep_P, tol, max_refits=3):
  """Step 7 with the corrections of §8: refit on the agreeing rows until they stop changing.

  Returns (agree, ok, the fit on agree, each agreeing row's residual / threshold).

  One loop, its body (a fit and the rows agreeing with it) traced once: the first round fits
  keep, each later one the rows the round before found agreeing. After max_refits refits
  without settling, the last round measures the agreeing rows on their own fit and keeps them.
  """
  xp = ops.xp

  def check(carry):
    i, mask_P, _, _, _ = carry
    fit = _fit_on(ops, c, mask_P, norms_P)
    agree, ratio = _agreement(ops, yc_PxM, norms_P, scale, erased_P, mask_P, fit, tol)
    forced = i > max_refits
    settled = forced | xp.all(agree == mask_P)
    agree = xp.where(forced, mask_P, agree)
    ratio = xp.where(forced, xp.where(mask_P, ratio, 0), ratio)
    return i + 1, agree, ratio, fit, settled

  init = (0, keep_P, xp.zeros(c.p, xp.float64), _empty_fit(ops, c), xp.asarray(False))
  _, agree, ratio, fit, _ = ops.while_loop(lambda carry: ~carry[-1], check, init)
  e = xp.sum(erased_P)
  need = c.p - e - (2 * c.s - e) // 2
  ok = (xp.sum(agree) >= need) & ((e < 2 * c.s) | (e == 0)) & (e <= 2 * c.s)
  return agree, ok, fit, ratio


def _peel_suspect(ops: Ops, c: Cyclic, y_P, erased_P, keep_P):
  """The non-erased row farthest from the codeword fitted on the kept rows (flagged first)."""
  xp = ops.xp
  fit = _fit(ops, c, y_P[:, None], keep_P)
  resid = xp.abs(y_P - fit[:, 0])
  live = ~erased_P
  suspects = xp.where(xp.any(live & ~keep_P), live & ~keep_P, live)
  resid = xp.where(suspects, resid, -1.0)
  # Not argmax: its lowering builds a 32-bit initial value once x64 is off again.
  return xp.min(xp.where(resid == xp.max(resid), xp.arange(c.p), c.p))


def _weights(ops: Ops, c: Cyclic, agree_P, fit: _Fit):
  """Minimum-norm b with bᵀB[agree] = ℓᵀB (plain transpose), zero off the agreeing rows;
  ``fit`` is the fit on the agreeing rows.

  With B_m = QR: b = conj(Q)·R^{-T}·(Bᵀℓ); b lies in the row space, so it is the min-norm one.
  """
  xp = ops.xp
  target = xp.asarray(c.target, fit.r.dtype)
  coeffs = ops.solve_triangular(fit.r.T, target, lower=True)
  return xp.where(agree_P & fit.full_rank, xp.conj(fit.q) @ coeffs, 0)


def _combined_norm(ops: Ops, gram_PxP, erased_P, b_P):
  """‖Σ_k b_k Y_k‖ estimated as sqrt(conj(b)ᵀ·gram·b) (64-bit), erased rows left out.

  The estimate is the norm of the combination under a random block-diagonal quadratic form
  with mean I (see :func:`draco_jax.decode.project`): no cancellation between rows can fool
  it, and its spread (averaged over m1 >= 16 blocks and C columns) is far below the factor 100
  between the rounding gate and the 1e-3 a refused answer could otherwise carry.
  """
  xp = ops.xp
  live = ~erased_P[:, None] & ~erased_P[None, :]
  gram = gram_PxP.astype(b_P.dtype)
  gram = xp.where(live & xp.isfinite(gram), gram, 0)
  return xp.sqrt(xp.maximum(xp.real(xp.conj(b_P) @ gram @ b_P), 0))


def solve(ops: Ops, c: Cyclic, tol: Tolerances, y_PxC, sqnorm_P, gram_PxP):
  """Steps 2-10 of §4 in 64-bit: (agree [P], ok [], weights b/P [P], 64-bit).

  ``agree`` is what the report shows (flagged = not agree): the rows combined, and rows a
  second look left out that agree with the decoding made without them.

  ``y_PxC``, ``sqnorm_P`` and ``gram_PxP`` come from the projection (message dtype); rows
  with a non-finite projection or norm are erasures.
  """
  xp = ops.xp
  real = not np.iscomplexobj(c.basis)
  y_PxC = y_PxC.astype(xp.float64 if real else xp.complex128)
  erased = ~(xp.all(xp.isfinite(y_PxC), axis=1) & xp.isfinite(sqnorm_P))
  y_PxC = xp.where(erased[:, None], 0, y_PxC)
  y, yc = y_PxC[:, 0], y_PxC[:, 1:]
  # The rounding noise of a row scales with its norm; the median over the received rows is
  # an honest row's norm whenever honest rows are the majority (within the budget).
  norms = xp.sqrt(xp.where(erased, xp.inf, sqnorm_P.astype(xp.float64)))
  scale = xp.sort(norms)[xp.maximum(c.p - xp.sum(erased) - 1, 0) // 2]
  norms = xp.where(erased, 0, norms)
  zeros_P = xp.zeros(c.p, xp.float64)
  arange = xp.arange(c.p)

  def decode_from(erased_start):
    """Locate and certify with the rows of erased_start erased, peeling a flagged row into the
    locator's erasures while refused (the certificate keeps erased_start's count).

    A while loop, its body traced once (each trace of the locate-and-certify steps adds to
    every cyclic decoder's compile time), and not S rounds that each test ok: those copied
    the loop state (the fit's P x P matrices) every round even when the first candidate was
    certified (measured at P = 64, D = 2^16: 410 against 320-380 µs).
    """

    def candidate(carry):
      i, erased_cur, keep, *_ = carry
      # After the first candidate: the non-erased row farthest from the kept rows' fit.
      peeled = lambda: erased_cur | (arange == _peel_suspect(ops, c, y, erased_cur, keep))  # noqa: E731
      erased_cur = ops.cond(i > 0, peeled, lambda: erased_cur)
      keep = _locate(ops, c, y_PxC, erased_cur)
      return i + 1, erased_cur, keep, *_certify(ops, c, yc, norms, scale, erased_start, keep, tol)

    def refused(carry):
      i, erased_cur, _, _, ok, _, _ = carry
      return (i == 0) | (~ok & (xp.sum(erased_cur) < 2 * c.s) & (i <= c.s))

    no_rows = xp.zeros(c.p, bool)
    init = (0, erased_start, no_rows, no_rows, xp.asarray(False), _empty_fit(ops, c), zeros_P)
    _, _, _, agree, ok, fit, ratio = ops.while_loop(refused, candidate, init)
    return agree, ok, fit, ratio

  def cleared(rows_P, agree_P, fit_now):
    return rows_P & _agreement(ops, yc, norms, scale, erased, agree_P, fit_now, tol)[0]

  def bounds(agree_P, fit_now):
    """The weights, and what each row could hide under its threshold (hidden)."""
    # An error δ in row k leaves (1 − h_k)·δ in its own residual, so each row can hide up to
    # min(tol.noise·noise_k / (1 − h_k), tol.resolution·scale / sqrt(1 − h_k)): rows that no
    # other row checks (h_k → 1, at the edges of a wide contiguous gap) can hide anything
    # (measured at P = 64, S = 16, contiguous: a 1e-3 row error passed and moved the mean by
    # 3e-2).
    weights_P = _weights(ops, c, agree_P, fit_now)
    unchecked = xp.maximum(fit_now.unchecked, 1e-24)
    hidden_P = xp.minimum(
      tol.noise * fit_now.noise / unchecked, tol.resolution * scale / xp.sqrt(unchecked)
    )
    return weights_P, hidden_P + tol.fit * fit_now.spread / unchecked

  # Second looks at a certified decoding, each a decoding with one more row erased; one loop
  # whose body (decode_from) is traced once, in three stages:
  # _FIRST: rows = the non-finite ones.
  # _LOOK, a suspect: a certified decoding in which some agreeing row's residual is above
  #   tol.suspect of its threshold, where honest rows stay below (the noise tolerance is set
  #   4-6x above the largest honest residual: <= 0.19 measured at D = 512, P <= 64, up to ~0.25
  #   at large D). It marks the ambiguity of a bad row with a small error next to a located
  #   one: with the locator off by one row, the bad row passes (0.24-0.9 of its threshold
  #   measured) and the answer is off by 1-2e-4 (P = 63, 64, errors of 1e-3 of a row). Decode
  #   again with that row erased, while suspect and erasures remain (at most _SECOND_LOOKS
  #   times): erasing a row costs nothing in exactness while 2t + e <= 2S, and the new
  #   decoding has its own certificate, which replaces the last one.
  # _RETRY, a leak: the agreeing row the answer leans on most without checking it (largest
  #   |b_k|·hidden_k): a bad row can sit there between two flagged honest rows, with 1 − h_k
  #   near 0 (measured at P = 64, S = 8: t = 7 rows x(1 + 1e-3), 1 − h_k = 1.3e-6, the answer
  #   off by 1.3e-4). When no look is due and that row is all but unchecked (1 − h_k <
  #   _UNCHECKED), decode once more with it erased, and take that decoding if it certifies
  #   with more agreeing rows: fewer rows flagged is the minimum-distance choice, and an
  #   honest row erased never gives more.
  # A row erased by a look or a retry is reported (not flagged) if it agrees with the fit of
  # the decoding that left it out: an honest row near its threshold, dropped at no cost.
  def look(carry):
    stage, looks, rows_P, erased_cur, current, reported, _, _ = carry
    new = decode_from(rows_P)
    new_agree, new_ok, new_fit, _ = new
    retry = stage == _RETRY
    take = ~retry | (new_ok & (xp.sum(new_agree) > xp.sum(current[0])))
    pick = lambda a, b: xp.where(take, a, b)  # noqa: E731
    agree, ok, fit, ratio = jax.tree.map(pick, new, current)
    reported = pick(cleared(rows_P, new_agree, new_fit), reported)
    erased_cur = xp.where(retry, erased_cur, rows_P)
    looks = looks + (stage == _LOOK)
    weights, hidden = bounds(agree, fit)
    more = ~retry & ok & (xp.sum(erased_cur) < 2 * c.s)
    suspect = more & (xp.max(ratio) > tol.suspect) & (looks < _SECOND_LOOKS)
    worst_ratio = xp.min(xp.where(ratio == xp.max(ratio), arange, c.p))
    leaks = xp.abs(weights) * hidden
    worst_leak = xp.min(xp.where(leaks == xp.max(leaks), arange, c.p))
    norm = _combined_norm(ops, gram_PxP, erased, weights)
    unchecked = xp.sum(xp.where(arange == worst_leak, fit.unchecked, 0))
    leak = more & (xp.max(leaks) > tol.leak * norm) & (unchecked < _UNCHECKED)
    rows_P = erased_cur | (arange == xp.where(suspect, worst_ratio, worst_leak))
    stage = xp.where(suspect, _LOOK, xp.where(leak, _RETRY, _DONE)).astype(xp.int32)
    return stage, looks, rows_P, erased_cur, (agree, ok, fit, ratio), reported, weights, hidden

  no_rows = xp.zeros(c.p, bool)
  current = (no_rows, xp.asarray(False), _empty_fit(ops, c), zeros_P)
  weights = xp.zeros(c.p, c.basis.dtype)
  first = xp.asarray(_FIRST, xp.int32)
  init = (first, xp.asarray(0, xp.int32), erased, erased, current, no_rows, weights, zeros_P)
  final = ops.while_loop(lambda carry: carry[0] != _DONE, look, init)
  _, _, _, _, (agree, ok, _, _), reported, weights, hidden = final
  # Two error bounds on Σ_k b_k Y_k: rounding, Σ|b_k|·‖Y_k‖ (times eps); and resolution, the
  # error that rows passing the certificate just under their thresholds could cause.
  rounding = xp.sum(xp.abs(weights) * norms)
  resolution = xp.sum(xp.abs(weights) * hidden)
  # The gates: rounding·eps and resolution·(noise_limit / resolution_limit) against
  # noise_limit·‖Σ_k b_k Y_k‖, the norm estimated from the projection's Gram matrix (the
  # exact norm would be a third pass over D).
  gate = xp.maximum(rounding * tol.eps, resolution * (tol.noise_limit / tol.resolution_limit))
  ok = ok & (gate <= tol.noise_limit * _combined_norm(ops, gram_PxP, erased, weights))
  return agree | reported, ok, weights / c.p


def run(route: str, c: Cyclic, tol: Tolerances, y_PxC, sqnorm_P, gram_PxP, dtype):
  """:func:`solve` by ``route`` (``device`` or ``host``): (agree [P], ok [], weights [P] in
  ``dtype``), inside a traced computation."""
  shapes = (
    jax.ShapeDtypeStruct((c.p,), jnp.bool_),
    jax.ShapeDtypeStruct((), jnp.bool_),
    jax.ShapeDtypeStruct((c.p,), dtype),
  )
  if route == "device":
    with jax.enable_x64(True):
      agree, ok, weights = solve(DEVICE, c, tol, y_PxC, sqnorm_P, gram_PxP)
      return agree, ok, weights.astype(dtype)

  def host(y, sqnorm, gram):
    with np.errstate(all="ignore"):
      agree, ok, weights = solve(HOST, c, tol, np.asarray(y), np.asarray(sqnorm), np.asarray(gram))
    return np.asarray(agree, bool), np.asarray(ok, bool), np.asarray(weights).astype(dtype)

  return jax.pure_callback(host, shapes, y_PxC, sqnorm_P, gram_PxP, vmap_method="sequential")
