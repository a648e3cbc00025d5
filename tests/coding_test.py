"""Tests for draco_jax.coding against float64 numpy references (docs/math.md §2, §3, §7, §8).

Shape legend: P workers, K = P partitions, R = 2S+1 redundancy, S adversaries, L = P - 2S,
D parameters. Structural oracles run on the host only (no jit), for every S of every P below.
"""

import itertools
import re
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from draco_jax import coding

ALL_P = [*range(2, 34), 63, 64, 65]
SMALL_P = list(range(2, 34))  # the paper code's W grows like e^{0.3P}; checked up to 33 only


def _make(name, p, s):
  if name == "cyclic_paper" and p > max(coding.PAPER_ENVELOPE.values()):
    # make_code refuses it there (its decoder cannot certify exact answers, trust_test); the
    # matrices themselves still obey every oracle below.
    return coding._cyclic(name, p, s)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # float32 envelope, tested below
    return coding.make_code(name, p, s)


def _codes(name, p):
  """Every valid (S, code) for P; repetition only where 2S+1 divides P."""
  for s in range((p - 1) // 2 + 1):
    if name != "repetition" or p % (2 * s + 1) == 0:
      yield s, _make(name, p, s)


def _code_params():
  return [("cyclic", p) for p in ALL_P] + [("cyclic_paper", p) for p in SMALL_P]


# --------------------------------------------------------------------------- references


def _allocation(name, p, s):
  """bool [P, K]: worker k computes partition i (docs/math.md §2, §3)."""
  r = 2 * s + 1
  k, i = np.arange(p)[:, None], np.arange(p)[None, :]
  if name == "repetition":
    return k // r == i // r
  return (i - k) % p < r


def _band(name, p, s):
  """complex [P, L]: the DFT frequencies every codeword is built from (§3(a), §3(b), §8)."""
  l = p - 2 * s
  theta = 2 * np.pi * np.arange(p) / p
  if name == "cyclic_paper":
    freqs = -np.arange(l)  # B[k, q] = ω^{kq}, ω = e^{-2πi/P}
  elif p % 2:
    freqs = np.arange(l) - (l - 1) // 2
  else:
    freqs = np.arange(l) - (l - 1) / 2  # half-integers ±1/2, ..., ±(L-1)/2
  return np.exp(1j * theta[:, None] * freqs[None, :])


def _complex_centred(p, s):
  """§3(b): F_i(k) = ω^{-hk} ∏_{j∈N(i)} (ω^k − ω^j), columns divided by their sums."""
  l = p - 2 * s
  h = (l - 1) // 2
  k = np.arange(p)
  w = lambda e: np.exp(-2j * np.pi * (np.asarray(e) % p) / p)
  cols = np.zeros((p, p), complex)
  for i in range(p):
    non_holders = (i + 1 + np.arange(l - 1)) % p
    f = w(-h * k) * np.prod(w(k[:, None]) - w(non_holders[None, :]), axis=1)
    f[non_holders] = 0
    cols[:, i] = f / f.sum()
  return cols


def _sine_centred(p, s, functional_P):
  """§3(b), §8: ∏_{j∈N(i)} sin(π(k−j)/P) on the holders, normalised so that ℓᵀW = 1."""
  l = p - 2 * s
  k = np.arange(p)
  cols = np.zeros((p, p))
  for i in range(p):
    non_holders = (i + 1 + np.arange(l - 1)) % p
    f = np.prod(np.sin(np.pi * (k[:, None] - non_holders[None, :]) / p), axis=1)
    f[non_holders] = 0
    cols[:, i] = f / (functional_P @ f)
  return cols


def _vandermonde_solve(p, s):
  """§3(a) as the authors compute it: W[:, i] = C1·q_i with q_i[0] = 1 and W = 0 on N(i).

  C1[k, m] = ω^{km}, m < L. The L−1 conditions Σ_{m≥1} ω^{jm} q_i[m] = −1 (j ∈ N(i)) are an
  (L−1)×(L−1) Vandermonde system. The columns then sum to P·q_i[0] = P.
  """
  l = p - 2 * s
  c1 = np.exp(-2j * np.pi * ((np.arange(p)[:, None] * np.arange(l)[None, :]) % p) / p)
  w = np.zeros((p, p), complex)
  for i in range(p):
    non_holders = (i + 1 + np.arange(l - 1)) % p
    q = np.ones(l, complex)
    if l > 1:
      q[1:] = np.linalg.solve(c1[non_holders, 1:], -np.ones(l - 1))
    w[:, i] = c1 @ q
  return w / p


def _functional(name, p):
  if name == "cyclic" and p % 2 == 0:
    return np.cos(np.pi * (np.arange(p) + 0.5) / p)
  return np.ones(p)


def _amp(functional_P, w_PxK):
  weighted = functional_P[:, None] * w_PxK
  return np.max(np.abs(weighted).sum(0) / np.abs(weighted.sum(0)))


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
  "name, p",
  [("repetition", p) for p in ALL_P] + _code_params() + [("uncoded", p) for p in (2, 9, 64)],
)
def test_support_is_the_allocation(name, p):
  for s, code in _codes(name, p) if name != "uncoded" else [(0, _make(name, p, 1))]:
    alloc_PxK = np.eye(p, dtype=bool) if name == "uncoded" else _allocation(name, p, s)
    # Exactly zero off the allocation, nonzero on it (edge coefficients reach 1e-17).
    np.testing.assert_array_equal(code.matrix != 0, alloc_PxK, err_msg=f"S={s}")
    held_PxK = np.zeros((p, p), bool)
    np.put_along_axis(held_PxK, code.support, True, axis=1)
    np.testing.assert_array_equal(held_PxK, alloc_PxK, err_msg=f"S={s}")
    np.testing.assert_array_equal(
      code.coef, np.take_along_axis(code.matrix, code.support, axis=1), err_msg=f"S={s}"
    )
    assert code.redundancy == code.support.shape[1] == (1 if name == "uncoded" else 2 * s + 1)


@pytest.mark.parametrize("name, p", _code_params())
def test_parity_check_annihilates_code_and_band(name, p):
  for s, code in _codes(name, p):
    if s == 0:
      continue
    h_par = code.parity_check()
    assert h_par.shape == (2 * s, p)
    gain = code.amp if name == "cyclic_paper" else 1.0
    w_norm = np.linalg.norm(code.matrix)
    assert np.linalg.norm(h_par @ code.matrix) <= 1e-12 * gain * w_norm, f"S={s}"
    # Measured ≤ 1.6e-14 (mod-P exponents). Rank 2S: the null space is exactly the band.
    band = _band(name, p, s)
    assert np.linalg.norm(h_par @ code.basis) <= 1e-13 * np.linalg.norm(code.basis), f"S={s}"
    assert np.linalg.norm(h_par @ band) <= 1e-13 * np.linalg.norm(band), f"S={s}"
    assert np.linalg.matrix_rank(h_par) == 2 * s, f"S={s}"


@pytest.mark.parametrize("name, p", _code_params())
def test_basis_and_columns_span_the_band(name, p):
  for s, code in _codes(name, p):
    band = _band(name, p, s)
    assert code.basis.shape == (p, p - 2 * s)
    assert np.linalg.matrix_rank(code.basis) == p - 2 * s, f"S={s}"
    q_band = np.linalg.qr(band)[0]
    for target, tol in ((code.basis, 1e-12), (code.matrix, 1e-12 * code.amp)):
      residual = np.linalg.norm(target - q_band @ (q_band.conj().T @ target))
      assert residual <= tol * np.linalg.norm(target), f"S={s}: residual {residual:.2e}"


@pytest.mark.parametrize("name, p", _code_params())
def test_functional_recovers_the_sum(name, p):
  """ℓᵀW = 1 (measured ≤ 8.4e-15 centred); the paper code's error scales with amp."""
  for s, code in _codes(name, p):
    np.testing.assert_allclose(code.functional, _functional(name, p), rtol=0, atol=1e-15)
    gain = code.amp if name == "cyclic_paper" else 1.0
    residual = np.max(np.abs(code.functional @ code.matrix - 1))
    assert residual <= 1e-13 * gain, f"S={s}: {residual:.2e}"
    np.testing.assert_allclose(code.amp, _amp(code.functional, code.matrix), rtol=1e-12)


@pytest.mark.parametrize("p", [p for p in ALL_P if p % 2])
def test_odd_centred_code_is_real_positive_and_matches_the_complex_form(p):
  for s, code in _codes("cyclic", p):
    assert not np.iscomplexobj(code.matrix) and not np.iscomplexobj(code.basis)
    assert np.all(code.matrix[_allocation("cyclic", p, s)] > 0), f"S={s}"
    assert code.amp == 1.0, f"S={s}"
    reference = _complex_centred(p, s)
    assert np.max(np.abs(reference.imag)) <= 1e-13, f"S={s}"
    assert np.max(np.abs(reference - code.matrix)) <= 1e-13, f"S={s}"


@pytest.mark.parametrize("p", [p for p in ALL_P if p % 2 == 0])
def test_even_centred_code_is_the_real_half_integer_code(p):
  for s, code in _codes("cyclic", p):
    assert not np.iscomplexobj(code.matrix), f"S={s}"
    reference = _sine_centred(p, s, _functional("cyclic", p))
    scale = np.max(np.abs(reference), axis=0)
    assert np.max(np.abs(reference - code.matrix) / scale) <= 1e-13, f"S={s}"


@pytest.mark.parametrize("p", range(2, 16))
def test_paper_closed_form_matches_the_vandermonde_solve(p):
  """Measured ≤ 1.7e-12 relative at P = 15."""
  for s, code in _codes("cyclic_paper", p):
    reference = _vandermonde_solve(p, s)
    err = np.max(np.abs(reference - code.matrix)) / np.max(np.abs(reference))
    assert err <= 1e-11, f"S={s}: {err:.2e}"


# Worst cond over every L-row subset of the basis, which is always a contiguous block
# (docs/math.md §5.1). Measured maximum over S: 122 at P = 12, S = 3, for all three codes.
MDS_COND_LIMIT = 2e2


@pytest.mark.parametrize(
  "name, p", [(n, p) for n in ("cyclic", "cyclic_paper") for p in range(3, 13)]
)
def test_every_l_rows_of_the_basis_are_independent(name, p):
  for s, code in _codes(name, p):
    l = p - 2 * s
    conds = [np.linalg.cond(code.basis[list(rows)]) for rows in itertools.combinations(range(p), l)]
    blocks = [np.linalg.cond(code.basis[(a + np.arange(l)) % p]) for a in range(p)]
    assert max(conds) <= MDS_COND_LIMIT, f"S={s}: cond {max(conds):.3g}"
    assert max(conds) <= max(blocks) * (1 + 1e-9), f"S={s}: a non-contiguous subset is worse"


# Rounding gain max_i Σ_k|ℓ_k W[k,i]| / |ℓᵀW[:,i]| of the even-P real code, worst S (= the
# largest, L = 2). Measured; it grows like 0.405·P, so §8's "<= 2.5" holds only for small S.
EVEN_AMP = {4: 1.707, 8: 3.284, 16: 6.505, 32: 12.98, 64: 25.94}
EVEN_AMP_LIMIT = 30.0  # every even P <= 64
# Paper code, worst S (docs/math.md §3 table).
PAPER_AMP = {7: 2.8, 9: 4.4, 15: 24, 16: 31, 31: 3.1e3, 32: 4.1e3}


def test_rounding_gain():
  for p in range(2, 65):
    amps = [code.amp for _, code in _codes("cyclic", p)]
    if p % 2:
      assert amps == [1.0] * len(amps), p
    else:
      assert max(amps) <= EVEN_AMP_LIMIT, p
      assert amps[0] == 1.0
  for p, amp in EVEN_AMP.items():
    np.testing.assert_allclose(max(c.amp for _, c in _codes("cyclic", p)), amp, rtol=1e-3)
  for p, amp in PAPER_AMP.items():
    np.testing.assert_allclose(max(c.amp for _, c in _codes("cyclic_paper", p)), amp, rtol=0.05)


# --------------------------------------------------------------------------- encode


ENCODE_CASES = [
  ("cyclic", 9, 2),
  ("cyclic", 16, 7),
  ("cyclic", 64, 20),
  ("cyclic_paper", 7, 3),
  ("cyclic_paper", 16, 3),
  ("repetition", 9, 1),
  ("repetition", 15, 2),
  ("uncoded", 8, 3),
]


@pytest.mark.parametrize("name, p, s", ENCODE_CASES)
def test_encode_is_w_times_g(name, p, s):
  code = _make(name, p, s)
  grads_KxD = np.random.default_rng(p + s).standard_normal((p, 96)).astype(np.float32)
  sent_PxD = np.asarray(coding.encode(code, jnp.asarray(grads_KxD)))
  expected_dtype = np.complex64 if name == "cyclic_paper" else np.float32
  assert sent_PxD.dtype == expected_dtype
  assert coding.message_dtype(code) == expected_dtype
  reference_PxD = code.matrix @ grads_KxD.astype(np.float64)
  # R products of rounded coefficients, summed in float32: (R + 2)·u·Σ|w||g| per entry.
  bound_PxD = (code.redundancy + 2) * 2.0**-24 * (np.abs(code.matrix) @ np.abs(grads_KxD))
  assert np.all(np.abs(sent_PxD - reference_PxD) <= bound_PxD)


@pytest.mark.parametrize("name, p, s", ENCODE_CASES)
def test_plain_mean_of_messages_is_the_gradient_mean(name, p, s):
  """Measured ≤ 4.6e-7 relative for the centred code over every S at P ≤ 64 (float32)."""
  code = _make(name, p, s)
  grads_KxD = np.random.default_rng(s).standard_normal((p, 256)).astype(np.float32)
  mean_D = np.asarray(coding.plain_mean(code, coding.encode(code, jnp.asarray(grads_KxD))))
  truth_D = grads_KxD.astype(np.float64).mean(0)
  assert np.linalg.norm(mean_D - truth_D) <= 1e-6 * np.linalg.norm(truth_D)


@pytest.mark.parametrize("shape", [(8, 16), (10, 16), (9,), (9, 4, 4)])
def test_encode_rejects_wrong_shapes(shape):
  code = _make("cyclic", 9, 2)
  with pytest.raises(ValueError, match=re.escape(f"K = P = 9; got shape {shape}")):
    coding.encode(code, jnp.zeros(shape))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
  "name, p, s, message",
  [
    (
      "cyclic",
      4,
      2,
      "cyclic needs P >= R = 2S+1 (every partition on 2S+1 workers); got P=4, S=2 (R=5)",
    ),
    ("cyclic_paper", 6, 3, "got P=6, S=3 (R=7)"),
    ("repetition", 2, 1, "got P=2, S=1 (R=3)"),
    ("cyclic", 9, -1, "num_adversaries must be an integer >= 0; got S=-1"),
    ("repetition", 9, -1, "num_adversaries must be an integer >= 0; got S=-1"),
    ("cyclic", 9, 1.5, "got S=1.5"),
    ("cyclic", 0, 0, "got P=0"),
    (
      "repetition",
      8,
      2,
      "FRC needs 2S+1 to divide P; got P=8, S=2 (R=5); valid S for P=8: none; use the cyclic code",
    ),
    (
      "repetition",
      45,
      3,
      "FRC needs 2S+1 to divide P; got P=45, S=3 (R=7); valid S for P=45: 1, 2, 4, 7, 22; "
      "use the cyclic code",
    ),
    (
      "fountain",
      9,
      1,
      "unknown code 'fountain'; valid codes: repetition, cyclic, cyclic_paper, uncoded",
    ),
  ],
)
def test_make_code_rejects(name, p, s, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    coding.make_code(name, p, s)


@pytest.mark.parametrize(
  "name, p, s, warns",
  [
    ("cyclic", 64, 8, True),
    ("cyclic", 64, 2, False),
    ("cyclic", 32, 15, False),
    # The paper code does not warn: outside its complex64 envelope its decoder refuses
    # complex64 messages when traced (trust_test).
    ("cyclic_paper", 17, 3, False),
  ],
)
def test_make_code_warns_outside_the_float32_envelope(name, p, s, warns):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    coding.make_code(name, p, s)
  assert any("envelope" in str(w.message) for w in caught) == warns
