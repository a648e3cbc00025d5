"""Float64 references for checking decoders: encoded messages, numpy attacks, outcomes.

What the decoder tests (``tests/decode_test.py`` and its siblings) and the certificate probe
(``benchmarks/certificate_probe.py``) share. Every trial encodes float32 gradients G_KxD in numpy
float64 (W @ G, rounded once to the message dtype), corrupts rows with a numpy attack
(docs/math.md §6) and compares the decoded mean with the float64 mean G.mean(0) of the honest
partition gradients. Shape legend: P workers, K = P partitions, D parameters.

The decoders and codes are cached per (code, P, S): compiling costs seconds, a call about a
millisecond, so new adversary sets and values go through the same executable.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import numpy as np

from draco_jax import coding, decode

__all__ = [
  "D",
  "ATTACKS",
  "PRECISION",
  "LOOSE",
  "CHANGED",
  "Setup",
  "Outcome",
  "cached_code",
  "cached_decoder",
  "setup",
  "mask",
  "attack",
  "changed",
  "relative_error",
  "decode_outcome",
  "exact",
  "describe",
  "contiguous",
  "random_rows",
]

D = 128
ATTACKS = ("rev_grad", "constant", "huge", "tiny", "nan", "inf", "gaussian", "collude")
PRECISION = 1e-5  # float32 messages, relative to the float64 mean (docs/math.md §7)
LOOSE = 1e-3  # the error a certified answer may never exceed, anywhere
CHANGED = 1e-3  # a bad row changed by more than this (relative) must be flagged


# --------------------------------------------------------------------------- set-up


@functools.cache
def cached_code(name, p, s):
  """The code, built once (the float32-envelope warning silenced)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # float32 envelope warning, see coding_test
    return coding.make_code(name, p, s)


@functools.cache
def cached_decoder(name, p, s, solver="auto"):
  """Its jitted decoder (``solver``: the route of its 64-bit steps), built once."""
  return decode.make_decoder(cached_code(name, p, s), solver=solver)


class Setup(NamedTuple):
  """A code, its decoder, gradients, the honest messages and their float64 mean."""

  code: coding.Code
  decoder: object
  grads_KxD: np.ndarray
  sent_PxD: np.ndarray
  truth_D: np.ndarray


def _message_dtype(code):
  return np.complex64 if np.iscomplexobj(code.matrix) else np.float32


def setup(name, p, s, seed, d=D, solver="auto"):
  """Fresh N(0, 1) float32 gradients from ``seed``, their messages and float64 mean; the
  decoder's 64-bit steps run by route ``solver`` (draco_jax.cyclic_solve)."""
  code = cached_code(name, p, s)
  grads_KxD = np.random.default_rng(seed).standard_normal((p, d)).astype(np.float32)
  sent_PxD = (code.matrix @ grads_KxD.astype(np.float64)).astype(_message_dtype(code))
  truth_D = grads_KxD.astype(np.float64).mean(0)
  return Setup(code, cached_decoder(name, p, s, solver), grads_KxD, sent_PxD, truth_D)


def mask(p, rows):
  """bool [P], True on ``rows``."""
  mask_P = np.zeros(p, bool)
  mask_P[list(rows)] = True
  return mask_P


def _noise(rng, shape, cplx):
  x = rng.standard_normal(shape)
  return x + 1j * rng.standard_normal(shape) if cplx else x


def attack(name, sent_PxD, mask_P, rng, tiny_scale=1e-3):
  """Numpy attacks of docs/math.md §6 on the masked rows (cyclic codes: z - 100z for rev_grad),
  plus ``scale`` (x(1 + 1e-3)) and ``mixed_noise`` (Gaussian rows of magnitudes 1e-3..1e3).

  ``tiny`` adds ``tiny_scale``·rms(row)·N(0, 1) to each bad row.
  """
  bad_NxD = sent_PxD[mask_P].astype(np.complex128 if np.iscomplexobj(sent_PxD) else np.float64)
  shape, cplx = bad_NxD.shape, np.iscomplexobj(sent_PxD)
  if name == "rev_grad":
    new = bad_NxD - 100 * bad_NxD
  elif name == "constant":
    new = np.full(shape, -100.0)
  elif name in ("huge", "large"):
    new = (1e30 if name == "huge" else 1e12) * _noise(rng, shape, cplx)
  elif name == "tiny":
    rms_N = np.sqrt(np.mean(np.abs(bad_NxD) ** 2, axis=1, keepdims=True))
    new = bad_NxD + tiny_scale * rms_N * _noise(rng, shape, cplx)
  elif name in ("nan", "inf"):
    new = bad_NxD.copy()
    new[rng.random(shape) < 0.1] = np.nan if name == "nan" else np.inf
  elif name == "gaussian":
    new = _noise(rng, shape, cplx)
  elif name == "collude":
    new = np.broadcast_to(_noise(rng, shape[1:], cplx), shape)
  elif name == "scale":  # x(1 + 1e-3): an error proportional to the honest message
    new = bad_NxD * (1 + 1e-3)
  elif name == "mixed_noise":  # noise rows from 1e-3 to 1e3 times a gradient's size
    new = 10.0 ** rng.uniform(-3, 3, size=(shape[0], 1)) * _noise(rng, shape, cplx)
  else:
    raise ValueError(name)
  received_PxD = sent_PxD.copy()
  received_PxD[mask_P] = new
  return received_PxD


def changed(sent_PxD, received_PxD):
  """bool [P]: rows that are non-finite or moved by more than CHANGED relative."""
  with np.errstate(invalid="ignore", over="ignore"):
    delta_P = np.linalg.norm(received_PxD.astype(np.complex128) - sent_PxD, axis=1)
    size_P = np.linalg.norm(sent_PxD.astype(np.complex128), axis=1)
    finite_P = np.all(np.isfinite(received_PxD), axis=1)
    return ~finite_P | (delta_P > CHANGED * size_P)


def relative_error(x_D, ref_D):
  """‖x − ref‖ / ‖ref‖ in float64."""
  return float(np.linalg.norm(np.asarray(x_D, np.float64) - ref_D) / np.linalg.norm(ref_D))


class Outcome(NamedTuple):
  """What one decode gave, against the float64 truth."""

  err: float
  ok: bool
  missed: list  # bad rows that changed but were not flagged
  mean_D: np.ndarray
  flagged_P: np.ndarray


def decode_outcome(setup, received_PxD, key, mask_P):
  """Decodes and compares with the float64 truth; ``missed``: changed bad rows not flagged."""
  mean_D, report = setup.decoder(received_PxD, key)
  mean_D, flagged_P = np.asarray(mean_D), np.asarray(report.flagged)
  missed = np.flatnonzero(mask_P & changed(setup.sent_PxD, received_PxD) & ~flagged_P)
  return Outcome(
    relative_error(mean_D, setup.truth_D), bool(report.ok), missed.tolist(), mean_D, flagged_P
  )


def exact(out, precision=PRECISION):
  """Certified, within ``precision`` and every changed bad row flagged."""
  return out.ok and out.err <= precision and not out.missed


def describe(attack, rows, out):
  """One line for a failure message."""
  return f"{attack} rows={list(rows)}: ok={out.ok} err={out.err:.2e} missed={out.missed}"


def contiguous(p, size, start):
  """``size`` consecutive rows from ``start`` (mod P)."""
  return tuple(int(k) for k in (start + np.arange(size)) % p)


def random_rows(rng, p, size):
  """``size`` distinct rows drawn by ``rng``, sorted."""
  return tuple(sorted(rng.choice(p, size, replace=False).tolist()))
