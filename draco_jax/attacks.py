"""Adversaries: what the bad workers send, and which workers are bad.

Specification: docs/math.md §6 (attack table) and §5.2 (forged codewords).
Shape legend: P workers, K = P partitions, S adversaries tolerated by the code, f = number of
masked rows (traced), D parameters, L = P - 2S (cyclic code dimension).

An attack is built by :func:`make_attack` and called as

    received_PxD = attack(key, sent_PxD, mask_P)

It is pure and jit-compatible; only rows where the boolean ``mask_P`` is True change
(``jnp.where(mask[:, None], bad, sent)``), so new adversary sets never recompile. Attacks draw
their randomness from their own ``key`` and never see the combiner's key. μ and σ are the
coordinate-wise mean and population standard deviation (ddof = 0) of the unmasked rows.
Statistical attacks act on the real and imaginary parts of complex messages separately.

Which workers are adversarial at a step is a placement (:mod:`draco_jax.placements`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.scipy.stats
import numpy as np
from jax.typing import ArrayLike

from draco_jax import contract
from draco_jax.coding import Code

__all__ = [
  "ATTACKS",
  "Attack",
  "make_attack",
  "alie_z",
]

Attack = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# What the masked rows receive: bad(key, sent_PxD, mask_P) -> bad_PxD (only masked rows kept).
_Bad = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------
# Validation.


def _number(what: str, value, *, positive: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
    raise ValueError(f"{what} must be a finite number; got {value!r}")
  if positive and value <= 0:
    raise ValueError(f"{what} must be > 0; got {value!r}")
  return float(value)


def _is_cyclic(code: Code | None) -> bool:
  return code is not None and code.name.startswith("cyclic")


# ----------------------------------------------------------------------------------------------
# Shared kernels.


def _real_dtype(dtype) -> jnp.dtype:
  return jnp.finfo(dtype).dtype


def _normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """N(0, 1) entries; complex dtypes get independent N(0, 1) real and imaginary parts."""
  real = _real_dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.complexfloating):
    return jax.random.normal(key, shape, real)
  key_re, key_im = jax.random.split(key)
  parts = jax.random.normal(key_re, shape, real), jax.random.normal(key_im, shape, real)
  return jax.lax.complex(*parts)


def _by_part(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """Applies a statistic to a real array, or to the real and imaginary parts separately."""
  if not jnp.iscomplexobj(x):
    return fn(x)
  return jax.lax.complex(fn(jnp.real(x)), fn(jnp.imag(x)))


def _honest_mean(sent_PxD: jax.Array, mask_P: jax.Array) -> jax.Array:
  """μ: the coordinate-wise mean of the unmasked rows (0 when every row is masked)."""
  honest_P = ~mask_P
  weights_P = honest_P / jnp.maximum(jnp.sum(honest_P), 1)
  return contract.rows_dot(weights_P, jnp.where(mask_P[:, None], 0, sent_PxD))


def _honest_std(sent_PxD: jax.Array, mask_P: jax.Array) -> jax.Array:
  """σ: population (ddof = 0) standard deviation of the unmasked rows, per part if complex."""

  def std(x_PxD):
    centred_PxD = jnp.where(mask_P[:, None], 0, x_PxD - _honest_mean(x_PxD, mask_P)[None, :])
    return jnp.sqrt(_honest_mean(jnp.square(centred_PxD), mask_P))

  return _by_part(std, sent_PxD)


def _row_rms(x_PxD: jax.Array) -> jax.Array:
  """rms(z_k) over D, per row (per part if complex), shaped [P, 1]."""
  return _by_part(lambda x: jnp.sqrt(jnp.mean(jnp.square(x), axis=1, keepdims=True)), x_PxD)


def _first_masked(mask_P: jax.Array) -> jax.Array:
  return jnp.argmax(mask_P)


# ----------------------------------------------------------------------------------------------
# Attacks. Each factory takes (code, **options) and returns the masked rows' payload.


def _none(code: Code | None) -> _Bad:
  """Identity: no attack."""
  return lambda key, sent_PxD, mask_P: sent_PxD


def _reverse_gradient(
  code: Code | None, *, scale: float = -100.0, additive: bool | None = None
) -> _Bad:
  """scale·z_k, or z_k + scale·z_k when ``additive`` (default: True for cyclic codes).

  The original DRACO code's ``rev_grad`` (multiplier −100): −100·z_k for baselines and FRC,
  z_k − 100·z_k for cyclic codes (docs/math.md §6).
  """
  scale = _number("reverse_gradient: scale", scale)
  additive = _is_cyclic(code) if additive is None else bool(additive)
  if additive:
    return lambda key, sent_PxD, mask_P: sent_PxD + scale * sent_PxD
  return lambda key, sent_PxD, mask_P: scale * sent_PxD


def _constant(code: Code | None, *, value: float = -100.0, additive: bool | None = None) -> _Bad:
  """Every entry ``value``, or z_k + value (real part) when ``additive`` (default: cyclic)."""
  value = _number("constant: value", value)
  additive = _is_cyclic(code) if additive is None else bool(additive)
  if additive:
    return lambda key, sent_PxD, mask_P: sent_PxD + value
  return lambda key, sent_PxD, mask_P: jnp.full_like(sent_PxD, value)


def _gaussian(code: Code | None, *, sigma: float = 1.0) -> _Bad:
  """I.i.d. N(0, σ²) entries (each part for complex messages), independent of the data."""
  sigma = _number("gaussian: sigma", sigma, positive=True)
  return lambda key, sent_PxD, mask_P: sigma * _normal(key, sent_PxD.shape, sent_PxD.dtype)


def _sign_flip(code: Code | None) -> _Bad:
  """−z_k: the worker negates its own message."""
  return lambda key, sent_PxD, mask_P: -sent_PxD


def alie_z(num_workers: int, num_masked: ArrayLike) -> jax.Array:
  """The z of "A Little Is Enough" (Baruch, Baruch & Goldberg, NeurIPS 2019).

  z = Φ⁻¹((P − s)/P) with s = ⌊P/2⌋ + 1 − f (docs/math.md §6). Examples: (P, f) = (20, 8) gives
  1.0364, (15, 2) gives 0.2533, (31, 5) gives 0.3723. The probability is clipped to
  [1/(2P), 1 − 1/(2P)] so that z stays finite when f >= ⌊P/2⌋ + 1 (outside the formula's range).

  Args:
    num_workers: P.
    num_masked: f, the number of adversaries (may be traced).

  Returns:
    float32 scalar z.
  """
  p = num_workers
  s = p // 2 + 1 - jnp.asarray(num_masked, jnp.int32)
  prob = jnp.clip((p - s) / p, 0.5 / p, 1 - 0.5 / p).astype(jnp.float32)
  return jax.scipy.stats.norm.ppf(prob)


def _alie(code: Code | None, *, z: float | None = None) -> _Bad:
  """μ − z·σ, the same row for every adversary (Baruch et al. 2019).

  Options:
    z: fixed z; None (default) computes :func:`alie_z` from P and f = mask.sum() inside jit.
  """
  z_fixed = None if z is None else _number("alie: z", z)

  def bad(key, sent_PxD, mask_P):
    p = sent_PxD.shape[0]
    z_value = alie_z(p, jnp.sum(mask_P)) if z_fixed is None else z_fixed
    # z is real, so for complex messages this is μ − zσ on each part separately.
    row_D = _honest_mean(sent_PxD, mask_P) - z_value * _honest_std(sent_PxD, mask_P)
    return jnp.broadcast_to(row_D[None, :], sent_PxD.shape)

  return bad


def _ipm(code: Code | None, *, epsilon: float = 0.1) -> _Bad:
  """−ε·μ: inner-product manipulation (Xie, Koyejo & Gupta, UAI 2019); ε = 10 is the strong one."""
  epsilon = _number("ipm: epsilon", epsilon)

  def bad(key, sent_PxD, mask_P):
    return jnp.broadcast_to(-epsilon * _honest_mean(sent_PxD, mask_P)[None, :], sent_PxD.shape)

  return bad


def _corrupt_entries(value: float, name: str) -> Callable[..., _Bad]:
  """Factory for ``nan``/``inf``: z_k with a random ``fraction`` of entries set to ``value``."""

  def factory(code: Code | None, *, fraction: float = 0.1) -> _Bad:
    fraction = _number(f"{name}: fraction", fraction, positive=True)
    if fraction > 1:
      raise ValueError(f"{name}: fraction must be in (0, 1]; got {fraction!r}")

    def bad(key, sent_PxD, mask_P):
      p, d = sent_PxD.shape
      key_entries, key_column = jax.random.split(key)
      hit_PxD = jax.random.uniform(key_entries, (p, d)) < fraction
      # One forced entry per row, so a corrupted row is always non-finite, even for tiny D.
      column_P = jax.random.randint(key_column, (p,), 0, d)
      hit_PxD = hit_PxD | (jnp.arange(d)[None, :] == column_P[:, None])
      return jnp.where(hit_PxD, jnp.asarray(value, sent_PxD.dtype), sent_PxD)

    return bad

  factory.__doc__ = (
    f"z_k with entries set to {value}: each entry with probability ``fraction`` (default 0.1)"
    " plus one random entry per row; ``fraction=1.0`` corrupts the whole row."
  )
  return factory


def _huge(code: Code | None, *, scale: float = 1e30) -> _Bad:
  """scale·N(0, 1) entries (1e12 and 1e30 in docs/math.md §5.1)."""
  scale = _number("huge: scale", scale, positive=True)
  return lambda key, sent_PxD, mask_P: scale * _normal(key, sent_PxD.shape, sent_PxD.dtype)


def _small(code: Code | None, *, scale: float = 1e-3) -> _Bad:
  """z_k + scale·rms(z_k)·N(0, 1): an error below most noise floors (§5.4)."""
  scale = _number("small: scale", scale, positive=True)

  def bad(key, sent_PxD, mask_P):
    noise_PxD = _normal(key, sent_PxD.shape, sent_PxD.dtype)
    rms_Px1 = _row_rms(sent_PxD)
    if jnp.iscomplexobj(sent_PxD):
      noise_PxD = jax.lax.complex(
        jnp.real(rms_Px1) * jnp.real(noise_PxD), jnp.imag(rms_Px1) * jnp.imag(noise_PxD)
      )
      return sent_PxD + scale * noise_PxD
    return sent_PxD + scale * rms_Px1 * noise_PxD

  return bad


def _mixed(code: Code | None, *, huge_scale: float = 1e30, scale: float = -100.0) -> _Bad:
  """The first masked row sends huge_scale·N(0, 1), the others scale·z_k (§5.1)."""
  huge_scale = _number("mixed: huge_scale", huge_scale, positive=True)
  scale = _number("mixed: scale", scale)

  def bad(key, sent_PxD, mask_P):
    p = sent_PxD.shape[0]
    first_P = jnp.arange(p) == _first_masked(mask_P)
    huge_PxD = huge_scale * _normal(key, sent_PxD.shape, sent_PxD.dtype)
    return jnp.where(first_P[:, None], huge_PxD, scale * sent_PxD)

  return bad


def _forging_tables(code: Code) -> tuple[np.ndarray, np.ndarray]:
  """Host tables (float64) for codewords that vanish on a chosen set of L − 1 rows.

  A codeword of a cyclic code vanishing on Z (|Z| = L − 1) is unique up to scale (MDS), and it is
  the product form the code's columns are built from (docs/math.md §3, §8):
  δ_k = ∏_{j∈Z} sin(π(k−j)/P) (centred code, k and j plain integers) or ∏_{j∈Z} (1 − ω^{k−j})
  (paper code). Returns log|factor[k, j]| and arg(factor[k, j]) as [P, P] tables.
  """
  p = code.num_workers
  delta = np.arange(p)[:, None] - np.arange(p)[None, :]
  if code.name == "cyclic":
    factor = np.sin(np.pi * delta / p).astype(complex)
  elif code.name == "cyclic_paper":
    factor = 1.0 - np.exp(-2j * np.pi * (delta % p) / p)
  else:
    raise ValueError(f"collude: no codeword forging for code {code.name!r}")
  factor[np.arange(p), np.arange(p)] = 0.0  # exact zeros: δ vanishes on Z exactly.
  with np.errstate(divide="ignore"):
    return np.log(np.abs(factor)), np.angle(factor)


def _forging_support(mask_P: jax.Array, support_size: int) -> jax.Array:
  """A ∪ Bh: the masked rows, then the honest rows following the first masked one cyclically.

  Masked rows come first (all of them when f <= 2S+1); the remaining places go to the unmasked
  rows in cyclic order after the first masked row (the S honest rows Bh when f = S + 1).
  """
  p = mask_P.shape[0]
  offset_P = (jnp.arange(p) - _first_masked(mask_P)) % p
  order_P = jnp.argsort(jnp.where(mask_P, offset_P, p + offset_P))
  return jnp.zeros(p, bool).at[order_P[:support_size]].set(True)


def _forged_codeword(code: Code, mask_P: jax.Array, dtype) -> jax.Array:
  """δ_P: the codeword supported on A ∪ Bh (|A ∪ Bh| = 2S+1), max |δ_k| = 1 (docs/math.md §5.2)."""
  log_abs_PxP, angle_PxP = _forging_tables(code)
  zero_P = ~_forging_support(mask_P, 2 * code.num_adversaries + 1)
  real = _real_dtype(dtype)
  log_abs_P = jnp.sum(jnp.where(zero_P[None, :], jnp.asarray(log_abs_PxP, real), 0), axis=1)
  magnitude_P = jnp.exp(log_abs_P - jnp.max(log_abs_P))  # exp(-Inf) = 0 on Z.
  if code.name == "cyclic":  # Real: the sign is the parity of negative factors.
    negative_P = jnp.sum(zero_P[None, :] & (angle_PxP != 0), axis=1)
    return (jnp.where(negative_P % 2 == 1, -magnitude_P, magnitude_P)).astype(dtype)
  phase_P = jnp.sum(jnp.where(zero_P[None, :], jnp.asarray(angle_PxP, real), 0), axis=1)
  return (magnitude_P * jnp.exp(1j * phase_P)).astype(dtype)


def _collude(code: Code | None, *, scale: float = 1.0) -> _Bad:
  """Code-aware colluding errors (docs/math.md §6 and §5.2).

  * f <= S (or any f for non-cyclic codes): z_k + (W·Δ)_k for one random Δ_KxD ~ scale·N(0, 1),
    a structured error that a decoder must still remove. For FRC every bad row of a group sends
    the same forged group sum, so a bloc of S + 1 in one group wins its vote.
  * f > S for cyclic codes: the forged codeword: z_k + δ_k·v on the masked rows, with v_D ~
    scale·N(0, 1) and δ the codeword supported on A ∪ Bh (A = masked rows, Bh = the S unmasked
    rows following the first masked row cyclically when f = S + 1; fewer when f > S + 1, and
    masked rows beyond 2S + 1 send z_k). The received word is then a codeword with errors on
    Bh only, which no decoder can detect: S is a hard limit.

  δ comes from the code's product form in closed form (exact zeros off A ∪ Bh, relative
  accuracy ~L·ulp), rather than an SVD null vector, which loses accuracy for contiguous sets.
  """
  if code is None:
    raise ValueError("collude needs the code: make_attack('collude', code=...)")
  scale = _number("collude: scale", scale, positive=True)
  p, s = code.num_workers, code.num_adversaries
  can_forge = code.basis is not None and code.name in ("cyclic", "cyclic_paper")

  def bad(key, sent_PxD, mask_P):
    if sent_PxD.shape[0] != p:
      raise ValueError(f"collude: sent has {sent_PxD.shape[0]} rows; the code has P = {p}")
    if code.is_complex and not jnp.iscomplexobj(sent_PxD):
      raise ValueError(f"collude: code {code.name!r} is complex but sent is {sent_PxD.dtype}")
    dtype, d = sent_PxD.dtype, sent_PxD.shape[1]

    def structured():
      w_PxK = jnp.asarray(code.matrix, dtype)
      delta_KxD = scale * _normal(key, (p, d), _real_dtype(dtype))
      return sent_PxD + jnp.matmul(w_PxK, delta_KxD.astype(dtype), precision="highest")

    def forged():
      v_D = scale * _normal(key, (d,), _real_dtype(dtype))
      return sent_PxD + _forged_codeword(code, mask_P, dtype)[:, None] * v_D[None, :]

    if not can_forge:
      return structured()
    return jax.lax.cond(jnp.sum(mask_P) > s, forged, structured)

  return bad


ATTACKS: dict[str, Callable[..., _Bad]] = {
  "none": _none,
  "reverse_gradient": _reverse_gradient,
  "rev_grad": _reverse_gradient,
  "constant": _constant,
  "gaussian": _gaussian,
  "sign_flip": _sign_flip,
  "alie": _alie,
  "ipm": _ipm,
  "nan": _corrupt_entries(float("nan"), "nan"),
  "inf": _corrupt_entries(float("inf"), "inf"),
  "huge": _huge,
  "small": _small,
  "mixed": _mixed,
  "collude": _collude,
}


def _checked_call(name: str, code: Code | None, sent_PxD, mask_P) -> tuple[jax.Array, jax.Array]:
  sent_PxD = jnp.asarray(sent_PxD)
  mask_P = jnp.asarray(mask_P)
  if sent_PxD.ndim != 2:
    raise ValueError(f"attack {name!r}: sent must have shape [P, D]; got {sent_PxD.shape}")
  if mask_P.shape != sent_PxD.shape[:1]:
    raise ValueError(
      f"attack {name!r}: mask must have shape [P] = ({sent_PxD.shape[0]},); got {mask_P.shape}"
    )
  if code is not None and sent_PxD.shape[0] != code.num_workers:
    raise ValueError(
      f"attack {name!r}: sent has {sent_PxD.shape[0]} rows; code has P = {code.num_workers}"
    )
  return sent_PxD, mask_P.astype(bool)


def make_attack(name: str, code: Code | None = None, **options) -> Attack:
  """Builds an attack ``(key, sent_PxD, mask_P) -> received_PxD`` (docs/math.md §6).

  Args:
    name: one of :data:`ATTACKS`: ``none``, ``reverse_gradient`` (alias ``rev_grad``; scale,
      additive), ``constant`` (value, additive), ``gaussian`` (sigma), ``sign_flip``, ``alie``
      (z), ``ipm`` (epsilon), ``nan`` and ``inf`` (fraction), ``huge`` (scale), ``small``
      (scale), ``mixed`` (huge_scale, scale), ``collude`` (scale; needs ``code``).
    code: the gradient code the messages were encoded with, or None for baselines. It sets the
      ``additive`` default of ``reverse_gradient``/``constant`` (True for cyclic codes) and is
      required by ``collude``.
    **options: the attack's options, listed above.

  Returns:
    A pure, jit-compatible attack. Only rows where ``mask_P`` is True change; the mask is a
    traced bool array, so changing it never recompiles.

  Raises:
    ValueError: unknown name or option, a bad option value, or ``collude`` without a code.
  """
  if name not in ATTACKS:
    raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
  factory = ATTACKS[name]
  contract.check_options(f"attack {name!r}", factory, options)
  bad = factory(code, **options)

  def attack(key: jax.Array, sent_PxD: ArrayLike, mask_P: ArrayLike) -> jax.Array:
    sent_PxD, mask_P = _checked_call(name, code, sent_PxD, mask_P)
    bad_PxD = jnp.asarray(bad(key, sent_PxD, mask_P), sent_PxD.dtype)
    return jnp.where(mask_P[:, None], bad_PxD, sent_PxD)

  attack.__name__ = attack.__qualname__ = f"attack_{name}"
  return attack
