"""Attacks and placements (docs/math.md §5.2, §6): only masked rows change, formulas, structure."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from draco_jax import coding
from draco_jax.attacks import ATTACKS, alie_z, make_attack
from draco_jax.placements import PLACEMENTS, make_placement

P, S, D = 7, 2, 12
KEY = jax.random.key(3)


@functools.cache
def _code(name, p=P, s=S):
  return coding.make_code(name, p, s)


@functools.cache
def _jitted(name, code_name=None, **options):
  code = None if code_name is None else _code(code_name)
  return jax.jit(make_attack(name, code, **options))


def _sent(code_name="uncoded", seed=0, p=P, s=S, d=D):
  """Encoded messages W·G (numpy, to avoid compiling eager ops per shape)."""
  code = _code(code_name, p, s)
  grads = np.random.default_rng(seed).standard_normal((p, d))
  return (code.matrix @ grads).astype(np.complex64 if code.is_complex else np.float32)


def _mask(*rows, p=P):
  mask = np.zeros(p, bool)
  mask[list(rows)] = True
  return mask


def _attack(name, sent, mask, code_name=None, key=KEY, **options):
  return np.asarray(_jitted(name, code_name, **options)(key, jnp.asarray(sent), jnp.asarray(mask)))


MASKS = [_mask(1, 4), _mask(0, 5, 6)]  # f = S and f = S + 1.


# ---------------------------------------------------------------------------- generic properties


@pytest.mark.parametrize("code_name", ["uncoded", "cyclic", "cyclic_paper"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_only_masked_rows_change_and_the_mask_never_recompiles(name, code_name):
  attack = _jitted(name, code_name if name == "collude" or code_name != "uncoded" else None)
  for seed, mask in enumerate(MASKS):
    sent = _sent(code_name, seed)
    got = np.asarray(attack(jax.random.key(seed), jnp.asarray(sent), jnp.asarray(mask)))
    assert got.dtype == sent.dtype and got.shape == sent.shape
    np.testing.assert_array_equal(got[~mask], sent[~mask])
    changed = ~np.all(got == sent, axis=1)
    np.testing.assert_array_equal(changed, mask if name != "none" else False)
  assert attack._cache_size() == 1


def test_the_attack_key_decides_the_randomness():
  sent, mask = _sent(), MASKS[0]
  first = _attack("gaussian", sent, mask, key=jax.random.key(0))
  np.testing.assert_array_equal(first, _attack("gaussian", sent, mask, key=jax.random.key(0)))
  assert not np.array_equal(first, _attack("gaussian", sent, mask, key=jax.random.key(1)))


@pytest.mark.parametrize("name", ["gaussian", "huge", "small", "alie"])
def test_statistical_attacks_act_on_both_parts_of_complex_messages(name):
  sent, mask = _sent("cyclic_paper"), MASKS[0]
  diff = _attack(name, sent, mask, "cyclic_paper")[mask] - sent[mask]
  assert np.all(np.abs(diff.real) > 0) and np.all(np.abs(diff.imag) > 0)


# ---------------------------------------------------------------------------- formulas


@pytest.mark.parametrize(
  "name, code_name, options, expected",
  [
    ("rev_grad", None, {}, lambda z: -100 * z),
    ("reverse_gradient", "repetition", {}, lambda z: -100 * z),
    ("reverse_gradient", "cyclic", {}, lambda z: z - 100 * z),
    ("reverse_gradient", "cyclic", {"additive": False, "scale": -3.0}, lambda z: -3 * z),
    ("constant", None, {}, lambda z: np.full_like(z, -100)),
    ("constant", "cyclic", {}, lambda z: z - 100),
    ("constant", None, {"value": 5.0, "additive": True}, lambda z: z + 5),
    ("sign_flip", None, {}, lambda z: -z),
  ],
)
def test_deterministic_attacks(name, code_name, options, expected):
  sent, mask = _sent(), MASKS[1]
  if code_name == "repetition":
    sent, mask = _sent("repetition", p=6, s=1), _mask(0, 4, p=6)
    attack = jax.jit(make_attack(name, coding.make_code("repetition", 6, 1), **options))
    got = np.asarray(attack(KEY, sent, mask))
  else:
    got = _attack(name, sent, mask, code_name, **options)
  np.testing.assert_allclose(got[mask], expected(sent[mask]), rtol=1e-6)


@pytest.mark.parametrize("p, f, z", [(20, 8, 1.0364), (15, 2, 0.2533), (31, 5, 0.3723)])
def test_alie_z_matches_the_documented_examples(p, f, z):
  np.testing.assert_allclose(float(alie_z(p, f)), z, atol=1e-4)
  np.testing.assert_allclose(float(jax.jit(alie_z, static_argnums=0)(p, f)), z, atol=1e-4)


@pytest.mark.parametrize("code_name", ["uncoded", "cyclic_paper"])
@pytest.mark.parametrize("mask", MASKS)
def test_alie_sends_mu_minus_z_sigma_from_the_unmasked_rows(code_name, mask):
  sent = _sent(code_name, 4)
  got = _attack("alie", sent, mask, code_name)
  honest = sent[~mask].astype(np.complex128 if np.iscomplexobj(sent) else np.float64)
  z = scipy.stats.norm.ppf((P - (P // 2 + 1 - mask.sum())) / P)
  want = honest.real.mean(0) - z * honest.real.std(0)
  if np.iscomplexobj(sent):
    want = want + 1j * (honest.imag.mean(0) - z * honest.imag.std(0))
  np.testing.assert_allclose(got[mask], np.broadcast_to(want, got[mask].shape), atol=1e-5)
  np.testing.assert_allclose(
    _attack("alie", sent, mask, code_name, z=1.5)[mask][0].real,
    honest.real.mean(0) - 1.5 * honest.real.std(0),
    atol=1e-5,
  )


@pytest.mark.parametrize("epsilon", [0.1, 10.0])
def test_ipm_sends_minus_epsilon_mu(epsilon):
  sent, mask = _sent(seed=5), MASKS[1]
  got = _attack("ipm", sent, mask, epsilon=epsilon)
  want = -epsilon * sent[~mask].astype(np.float64).mean(0)
  np.testing.assert_allclose(got[mask], np.broadcast_to(want, got[mask].shape), rtol=1e-5)


@pytest.mark.parametrize("name, value", [("nan", np.nan), ("inf", np.inf)])
def test_nan_and_inf_corrupt_a_fraction_of_entries_or_whole_rows(name, value):
  mask = MASKS[0]
  whole = _attack(name, _sent(d=8), mask, fraction=1.0)
  np.testing.assert_array_equal(whole[mask], np.full((2, 8), value))
  sent = _sent(d=2000)
  got = _attack(name, sent, mask)
  hit = ~np.isfinite(got[mask])
  assert np.all(np.abs(hit.mean(1) - 0.1) < 0.03)
  np.testing.assert_array_equal(got[mask][~hit], sent[mask][~hit])
  assert np.all(~np.all(np.isfinite(_attack(name, _sent(d=2), mask, fraction=0.01)[mask]), 1))


def test_huge_small_and_mixed_magnitudes():
  sent, mask = _sent(d=500), MASKS[1]
  huge = _attack("huge", sent, mask)[mask]
  np.testing.assert_allclose(np.sqrt(np.mean(huge.astype(np.float64) ** 2, 1)), 1e30, rtol=0.2)
  small = _attack("small", sent, mask)[mask] - sent[mask]
  rms = np.sqrt(np.mean(sent[mask].astype(np.float64) ** 2, 1))
  np.testing.assert_allclose(np.sqrt(np.mean(small.astype(np.float64) ** 2, 1)), 1e-3 * rms, 0.2)
  mixed = _attack("mixed", sent, mask)
  assert np.all(np.abs(mixed[0]) > 1e26)  # Row 0 is the first masked row.
  np.testing.assert_allclose(mixed[[5, 6]], -100 * sent[[5, 6]], rtol=1e-6)


# ---------------------------------------------------------------------------- collusion


def test_collude_needs_a_code():
  with pytest.raises(ValueError, match="collude needs the code"):
    make_attack("collude")


def test_collude_in_frc_sends_one_forged_vector_per_group():
  code = coding.make_code("repetition", 9, 1)
  sent = _sent("repetition", p=9, s=1)
  mask = _mask(0, 1, 5, p=9)  # A bloc of S + 1 = 2 in group 0, one bad row in group 1.
  got = np.asarray(jax.jit(make_attack("collude", code))(KEY, sent, mask))
  np.testing.assert_array_equal(got[0], got[1])
  assert not np.allclose(got[0], sent[0]) and not np.allclose(got[5], sent[5])


def _honest_followers(mask, count):
  """The ``count`` unmasked rows following the first masked row cyclically (Bh of §5.2)."""
  first = int(np.argmax(mask))
  order = [(first + i) % len(mask) for i in range(1, len(mask))]
  return [k for k in order if not mask[k]][:count]


@pytest.mark.parametrize(
  "code_name, p, s, rows",
  [
    ("cyclic", 7, 2, (1, 2, 5)),
    ("cyclic", 8, 2, (0, 3, 7)),
    ("cyclic", 15, 3, (4, 5, 6, 7)),
    ("cyclic", 16, 3, (1, 6, 9, 15)),
    ("cyclic_paper", 7, 2, (0, 3, 4)),
  ],
)
def test_collude_over_capacity_forges_a_codeword(code_name, p, s, rows):
  """f = S + 1: the error on A extends to a codeword that vanishes off A ∪ Bh (§5.2)."""
  code = coding.make_code(code_name, p, s)
  sent = _sent(code_name, 6, p=p, s=s)
  mask = _mask(*rows, p=p)
  got = np.asarray(jax.jit(make_attack("collude", code))(KEY, sent, mask))
  error = (got - sent).astype(np.complex128)
  np.testing.assert_array_equal(error[~mask], 0)
  assert np.all(np.abs(error[mask]) > 0)
  support = mask.copy()
  support[_honest_followers(mask, s)] = True
  # Fit a codeword to the error on A and zeros on Z = not (A ∪ Bh): L + S equations, L unknowns.
  fit_rows = mask | ~support
  basis = code.basis.astype(np.complex128)
  coeffs, *_ = np.linalg.lstsq(basis[fit_rows], error[fit_rows], rcond=None)
  residual = np.linalg.norm(basis[fit_rows] @ coeffs - error[fit_rows])
  assert residual <= 1e-5 * np.linalg.norm(error)
  # The forged codeword is nonzero on Bh: the decoder will see those honest rows as the errors.
  assert np.all(np.linalg.norm(basis[support & ~mask] @ coeffs, axis=1) > 1e-3)


def test_collude_within_capacity_is_a_structured_error():
  sent, mask = _sent("cyclic", 7), MASKS[0]
  got = _attack("collude", sent, mask, "cyclic")
  np.testing.assert_array_equal(got[~mask], sent[~mask])
  assert np.all(np.linalg.norm((got - sent)[mask], axis=1) > 0.1)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
  "name, options, match",
  [
    ("revgrad", {}, "valid attacks: none, reverse_gradient, rev_grad"),
    ("gaussian", {"std": 1.0}, r"unknown options \['std'\]; valid options: sigma"),
    ("sign_flip", {"scale": 2.0}, "valid options: none"),
    ("gaussian", {"sigma": -1.0}, "sigma must be > 0"),
    ("nan", {"fraction": 1.5}, "fraction must be in"),
    ("alie", {"z": "big"}, "z must be a finite number"),
  ],
)
def test_bad_attack_names_and_options_raise(name, options, match):
  with pytest.raises(ValueError, match=match):
    make_attack(name, **options)


def test_attack_inputs_are_checked():
  attack = make_attack("sign_flip")
  with pytest.raises(ValueError, match="mask must have shape"):
    attack(KEY, jnp.zeros((P, D)), jnp.zeros(P + 1, bool))
  with pytest.raises(ValueError, match="code has P = 7"):
    make_attack("collude", _code("cyclic"))(KEY, jnp.zeros((P + 1, D)), jnp.zeros(P + 1, bool))


# ---------------------------------------------------------------------------- placements


def _masks(placement, steps=6, key=KEY):
  fn = jax.jit(placement)
  masks = [np.asarray(fn(key, step)) for step in range(steps)]
  assert fn._cache_size() == 1
  return masks


def _is_cyclic_run(mask, s):
  return mask.sum() == s and any(np.all(np.roll(mask, -t)[:s]) for t in range(len(mask)))


def test_fixed_placement():
  (mask,) = _masks(make_placement("fixed", P, S), steps=1)
  np.testing.assert_array_equal(mask, _mask(0, 1))
  (mask,) = _masks(make_placement("fixed", P, S, workers=[6, 3]), steps=1)
  np.testing.assert_array_equal(mask, _mask(3, 6))


@pytest.mark.parametrize("workers", [[1, 1], [0, 7], [0], [0, "a"]])
def test_fixed_placement_rejects_bad_workers(workers):
  with pytest.raises(ValueError, match="fixed placement"):
    make_placement("fixed", P, S, workers=workers)


@pytest.mark.parametrize("s", [0, 3, P])
def test_random_placement_draws_exactly_s_fresh_each_step(s):
  masks = _masks(make_placement("random", P, s), steps=8)
  assert all(m.sum() == s for m in masks)
  if 0 < s < P:
    assert len({m.tobytes() for m in masks}) > 1
  np.testing.assert_array_equal(masks[3], _masks(make_placement("random", P, s), steps=4)[3])


@pytest.mark.parametrize("start, expected", [(0, (0, 1, 2)), (5, (5, 6, 0))])
def test_contiguous_placement_with_a_fixed_start(start, expected):
  masks = _masks(make_placement("contiguous", P, 3, start=start), steps=2)
  for mask in masks:
    np.testing.assert_array_equal(mask, _mask(*expected))


def test_contiguous_placement_with_a_random_start():
  masks = _masks(make_placement("contiguous", P, 3, start="random"), steps=10)
  assert all(m.sum() == 3 and _is_cyclic_run(m, 3) for m in masks)
  assert len({m.tobytes() for m in masks}) > 1


def test_none_placement():
  assert not np.any(_masks(make_placement("none", P, S), steps=2))


@pytest.mark.parametrize(
  "kind, p, s, options, match",
  [
    ("cluster", P, S, {}, "valid placements: none, fixed, random, contiguous"),
    ("random", P, S, {"seed": 1}, r"unknown options \['seed'\]; valid options: none"),
    ("contiguous", P, S, {"start": P}, "start"),
    ("contiguous", P, S, {"start": "middle"}, "start"),
    ("random", P, P + 1, {}, "num_adversaries"),
    ("fixed", 0, 0, {}, "num_workers"),
  ],
)
def test_bad_placements_raise(kind, p, s, options, match):
  with pytest.raises(ValueError, match=match):
    make_placement(kind, p, s, **options)


def test_registries_list_the_documented_names():
  assert {"rev_grad", "reverse_gradient", "alie", "ipm", "collude", "none"} <= set(ATTACKS)
  assert set(PLACEMENTS) == {"none", "fixed", "random", "contiguous"}
