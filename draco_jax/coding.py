"""Gradient codes: which partitions each worker computes and how it combines them.

Specification: docs/math.md §2 (fractional repetition), §3 and §8 (cyclic).
Shape legend: P workers, K = P partitions, R = 2S+1 redundancy, S adversaries, D parameters,
L = P - 2S (cyclic code dimension).

A code is data. :func:`make_code` builds every matrix once on the host in float64 and returns
an immutable :class:`Code`; :func:`encode` is the same gather-and-weighted-sum for every code.

Codes:
  * ``"repetition"``: fractional repetition code (FRC). Needs R | P. Groups of R workers all
    send their group's gradient sum; decoded by a majority vote.
  * ``"cyclic"``: cyclic repetition code, centred construction (the default). Real messages for
    every P (odd P: docs/math.md §3(b); even P: the half-integer band of §8), rounding gain 1
    for odd P and <= 2.5 for even P <= 64.
  * ``"cyclic_paper"``: the original paper's complex construction (Chen et al. 2018), kept for
    fidelity experiments; its rounding gain grows like e^{0.3 P}, so it is built only inside
    its numerical envelope (:data:`PAPER_ENVELOPE`: P <= 16 for complex64 messages, P <= 28
    for complex128), where its certified answers are exact.
  * ``"uncoded"``: R = 1, worker k sends g_k. The input of the baseline aggregators.

Every code carries a ``functional`` ℓ with ℓ^T W = 1^T, so that with no adversary
Σ_k ℓ_k z_k = Σ_i g_i: the plain mean of the messages under the code's own weights.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "Code",
  "CODES",
  "PAPER_ENVELOPE",
  "make_code",
  "check_envelope",
  "encode",
  "encode_rows",
  "message_dtype",
  "plain_mean",
]

CODES = ("repetition", "cyclic", "cyclic_paper", "uncoded")

# Validated envelope of the centred code for float32 messages (docs/math.md §5.1); outside it
# the factory warns (its decoder still certifies exactly or refuses, but refuses more often).
_FLOAT32_ENVELOPE = 32
# The paper code's numerical envelope: the largest P, by message dtype, at which every certified
# answer was exact (within 1e-5 for complex64 messages, 1e-12 for complex128; `tiny` 1e-3·rms
# errors within 1e-3). Measured at every S, random and contiguous placements, x(-100), 1e30,
# constant, NaN, mixed and tiny, honest, D = 128: complex64 at P = 14-23 (4 trials per attack,
# placement kind and S), complex128 at P = 24-31 (3). complex64: up to 1.8e-6 at P <= 17; from
# P = 18 `tiny` was certified off by 4e-3 (P = 18), 1.5e-2 (19), 2e-2 (20), 3.8e-2 (23).
# complex128: up to 7.3e-13 at P <= 28; 2, 17 and 44 answers off by 1.0-2.5e-12 at P = 29, 30,
# 31. At P = 64, S = 8 (complex64) x(-100) was certified off by 4.6e8 in 20 of 20 trials.
PAPER_ENVELOPE = {"complex64": 16, "complex128": 28}


class Code(NamedTuple):
  """An immutable gradient code (host arrays, float64 / complex128).

  Attributes:
    name: one of :data:`CODES`.
    num_workers: P.
    num_adversaries: S, the largest number of adversarial workers tolerated.
    redundancy: R, partitions computed by each worker (2S+1; 1 for ``uncoded``).
    support: int [P, R]; partitions worker k computes.
    coef: [P, R]; worker k sends Σ_t coef[k, t] · g[support[k, t]].
    matrix: [P, K]; the encoding matrix W (zero off the support).
    functional: [P]; ℓ with ℓ^T W = 1^T (the fixed combination of honest rows).
    basis: [P, L] or None; a basis B of the code space (cyclic codes; real for the centred
      code, complex for the paper code).
    rotation: complex [P] or None; r_k such that the parity check of a codeword y is
      H_par y = 0 with H_par[j, k] = r_k · u_k^{first_parity + j}, u_k = e^{2πik/P}.
    first_parity: first parity frequency p0 (cyclic codes; 0 otherwise).
    amp: rounding gain max_i Σ_k |ℓ_k W[k,i]| / |Σ_k ℓ_k W[k,i]|.
  """

  name: str
  num_workers: int
  num_adversaries: int
  redundancy: int
  support: np.ndarray
  coef: np.ndarray
  matrix: np.ndarray
  functional: np.ndarray
  basis: np.ndarray | None = None
  rotation: np.ndarray | None = None
  first_parity: int = 0
  amp: float = 1.0

  @property
  def is_complex(self) -> bool:
    return bool(np.iscomplexobj(self.coef))

  @property
  def dimension(self) -> int:
    """L = P - 2S for cyclic codes."""
    return self.num_workers - 2 * self.num_adversaries

  def parity_check(self) -> np.ndarray:
    """H_par, complex [2S, P]: annihilates every codeword (cyclic codes only)."""
    p, s = self.num_workers, self.num_adversaries
    freqs = (self.first_parity + np.arange(2 * s)) % p
    return self.rotation[None, :] * _unit_powers(p, freqs[:, None] * np.arange(p)[None, :])


def _unit_powers(p: int, exponent: np.ndarray) -> np.ndarray:
  """e^{2πi·exponent/P}, with exponents reduced mod P first (docs/math.md §3, DFT entries)."""
  return np.exp(2j * np.pi * (np.asarray(exponent) % p) / p)


def _validate(name: str, p: int, s: int) -> None:
  if name not in CODES:
    raise ValueError(f"unknown code {name!r}; valid codes: {', '.join(CODES)}")
  if not isinstance(p, (int, np.integer)) or p < 1:
    raise ValueError(f"num_workers must be a positive integer; got P={p!r}")
  if not isinstance(s, (int, np.integer)) or s < 0:
    raise ValueError(f"num_adversaries must be an integer >= 0; got S={s!r}")
  if name == "uncoded":
    if s >= p:
      raise ValueError(f"uncoded needs S < P; got P={p}, S={s}")
    return
  r = 2 * s + 1
  if p < r:
    raise ValueError(
      f"{name} needs P >= R = 2S+1 (every partition on 2S+1 workers); got P={p}, S={s} (R={r})"
    )
  if name == "repetition" and p % r:
    valid = [v for v in range(1, (p - 1) // 2 + 1) if p % (2 * v + 1) == 0]
    raise ValueError(
      f"FRC needs 2S+1 to divide P; got P={p}, S={s} (R={r}); valid S for P={p}: "
      f"{', '.join(map(str, valid)) or 'none'}; use the cyclic code"
    )


def _repetition(p: int, s: int) -> Code:
  r = 2 * s + 1
  support = (r * (np.arange(p)[:, None] // r) + np.arange(r)[None, :]).astype(np.int32)
  matrix = np.zeros((p, p))
  np.put_along_axis(matrix, support, 1.0, axis=1)
  return Code("repetition", p, s, r, support, np.ones((p, r)), matrix, np.full(p, 1.0 / r))


def _uncoded(p: int, s: int) -> Code:
  support = np.arange(p, dtype=np.int32)[:, None]
  return Code("uncoded", p, s, 1, support, np.ones((p, 1)), np.eye(p), np.ones(p))


def _cyclic_support(p: int, r: int) -> np.ndarray:
  return ((np.arange(p)[:, None] + np.arange(r)[None, :]) % p).astype(np.int32)


def _non_holders(p: int, r: int, i: int) -> np.ndarray:
  """N(i) = {i+1, ..., i+L-1} mod P: the workers that do not hold partition i."""
  return (i + 1 + np.arange(p - r)) % p


def _sine_columns(p: int, r: int) -> np.ndarray:
  """F_i(k) = ∏_{j∈N(i)} sin(π(k−j)/P), k and j plain integers in 0..P-1 (§3(b), §8)."""
  k = np.arange(p)
  cols = np.empty((p, p))
  for i in range(p):
    nh = _non_holders(p, r, i)
    cols[:, i] = np.prod(np.sin(np.pi * (k[:, None] - nh[None, :]) / p), axis=1)
    cols[nh, i] = 0.0
  return cols


def _paper_columns(p: int, r: int) -> np.ndarray:
  """(1/√P) ∏_{j∈N(i)} (1 − ω^{k−j}) with ω = e^{−2πi/P} (Chen et al. 2018)."""
  k = np.arange(p)
  cols = np.empty((p, p), complex)
  for i in range(p):
    nh = _non_holders(p, r, i)
    cols[:, i] = np.prod(1.0 - _unit_powers(p, -(k[:, None] - nh[None, :])), axis=1)
    cols[nh, i] = 0.0
  return cols / np.sqrt(p)


def _centred_basis(p: int, l: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Real basis of the centred band, the parity rotation and the first parity frequency."""
  theta = 2 * np.pi * np.arange(p) / p
  if p % 2:  # band {-h..h}: [1, cos(mθ), sin(mθ)], m = 1..h
    h = (l - 1) // 2
    m = np.arange(1, h + 1)
    basis = np.concatenate(
      [np.ones((p, 1)), np.cos(theta[:, None] * m), np.sin(theta[:, None] * m)], axis=1
    )
    return basis, np.ones(p, complex), h + 1
  # Even P (§8): half-integer band {±1/2, ..., ±(L-1)/2}. Multiplying row k by
  # r_k = e^{-iθ_k/2} maps it onto the integer band {-L/2, ..., L/2-1}, whose parity
  # frequencies are {L/2+1, ..., P-L/2}.
  m = np.arange(l // 2) + 0.5
  basis = np.concatenate([np.cos(theta[:, None] * m), np.sin(theta[:, None] * m)], axis=1)
  return basis, np.exp(-0.5j * theta), l // 2 + 1


def _paper_basis(p: int, l: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Band {0..L-1} in powers of ω: B[k, q] = ω^{kq}; parity frequencies {L..P-1}."""
  k = np.arange(p)
  return _unit_powers(p, -(k[:, None] * np.arange(l)[None, :])), np.ones(p, complex), l


def _cyclic(name: str, p: int, s: int) -> Code:
  r, l = 2 * s + 1, p - 2 * s
  support = _cyclic_support(p, r)
  if name == "cyclic":
    cols = _sine_columns(p, r)
    functional = np.ones(p) if p % 2 else np.cos(np.pi * (np.arange(p) + 0.5) / p)
    basis, rotation, p0 = _centred_basis(p, l)
  else:
    cols = _paper_columns(p, r)
    functional = np.ones(p)
    basis, rotation, p0 = _paper_basis(p, l)
  weighted = functional[:, None] * cols
  matrix = cols / weighted.sum(axis=0, keepdims=True)
  amp = float(np.max(np.abs(weighted).sum(0) / np.abs(weighted.sum(0))))
  coef = np.take_along_axis(matrix, support, axis=1)
  return Code(name, p, s, r, support, coef, matrix, functional, basis, rotation, p0, amp)


def make_code(name: str, num_workers: int, num_adversaries: int) -> Code:
  """Builds a gradient code.

  Args:
    name: one of :data:`CODES`.
    num_workers: P, the number of workers (= partitions K).
    num_adversaries: S, the number of adversarial workers to tolerate.

  Returns:
    An immutable :class:`Code`.

  Raises:
    ValueError: unknown name, S < 0, P < 2S+1, (repetition) 2S+1 not dividing P, or
      (cyclic_paper) P beyond its envelope for every message dtype (:data:`PAPER_ENVELOPE`).
  """
  _validate(name, num_workers, num_adversaries)
  p, s = int(num_workers), int(num_adversaries)
  if name == "repetition":
    return _repetition(p, s)
  if name == "uncoded":
    return _uncoded(p, s)
  if name == "cyclic_paper" and p > max(PAPER_ENVELOPE.values()):
    raise ValueError(_outside_envelope(p))
  if name == "cyclic" and p > _FLOAT32_ENVELOPE and s > 2:
    warnings.warn(
      f"cyclic with P={p}, S={s} is outside the validated float32 envelope "
      f"(P <= {_FLOAT32_ENVELOPE}, docs/math.md §5.1); the decoder certifies or refuses, but "
      "may refuse more often",
      stacklevel=2,
    )
  return _cyclic(name, p, s)


def _outside_envelope(p: int, dtype_name: str | None = None) -> str:
  given = f" for {dtype_name} messages" if dtype_name else ""
  return (
    f"cyclic_paper with P={p} is outside its numerical envelope{given} "
    f"(P <= {PAPER_ENVELOPE['complex64']} for complex64 messages, from float32 gradients; "
    f"P <= {PAPER_ENVELOPE['complex128']} for complex128, from float64 gradients with "
    "jax_enable_x64): its rounding gain grows like e^(0.3P), and beyond the envelope its "
    "decoder cannot certify exact answers; use the default code 'cyclic' (the same "
    "allocation, rounding gain <= 26 at every P <= 64)"
  )


def check_envelope(code: Code, dtype) -> None:
  """Raises ValueError if ``code`` cannot be decoded exactly from messages of ``dtype``.

  Only the paper code has a P limit that depends on the message dtype
  (:data:`PAPER_ENVELOPE`); every other code passes.
  """
  if code.name != "cyclic_paper":
    return
  name = jnp.dtype(dtype).name
  if code.num_workers > PAPER_ENVELOPE.get(name, code.num_workers):
    raise ValueError(_outside_envelope(code.num_workers, name))


def message_dtype(code: Code, grad_dtype=jnp.float32):
  """The dtype workers send: the gradient dtype, made complex for complex codes."""
  real = jnp.dtype(grad_dtype)
  if not code.is_complex:
    return real
  return jnp.complex128 if real == jnp.float64 else jnp.complex64


def encode_rows(coef_PxR: jax.Array, grads_PxRxD: jax.Array) -> jax.Array:
  """Each worker's message Σ_t coef[k,t] · grads[k,t]: what a worker computes locally."""
  return jnp.einsum(
    "pr,prd->pd",
    coef_PxR,
    grads_PxRxD.astype(coef_PxR.dtype),
    precision=jax.lax.Precision.HIGHEST,
  )


def encode(code: Code, grads_KxD: jax.Array) -> jax.Array:
  """All P messages from the K partition gradients (jit-compatible).

  Args:
    code: a :class:`Code`.
    grads_KxD: the K = P partition gradients.

  Returns:
    sent_PxD in :func:`message_dtype` (float for real codes, complex for ``cyclic_paper``).
  """
  shape = jnp.shape(grads_KxD)
  if len(shape) != 2 or shape[0] != code.num_workers:
    raise ValueError(
      f"grads must have shape [K, D] with K = P = {code.num_workers}; got shape {shape}"
    )
  dtype = message_dtype(code, grads_KxD.dtype)
  coef_PxR = jnp.asarray(code.coef, dtype)
  return encode_rows(coef_PxR, jnp.asarray(grads_KxD)[jnp.asarray(code.support)])


def plain_mean(code: Code, sent_PxD: jax.Array) -> jax.Array:
  """Re(ℓ^T Y) / K: the decoder's answer when no row is corrupted (a reference, no defence)."""
  ell = jnp.asarray(code.functional, sent_PxD.dtype)
  total = jnp.matmul(ell, sent_PxD, precision=jax.lax.Precision.HIGHEST)
  return jnp.real(total) / code.num_workers
