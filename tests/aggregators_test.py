"""Baseline aggregators against independent float64 numpy references (docs/math.md §6, §7)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from draco_jax import aggregators
from draco_jax.aggregators import AGGREGATORS, make_aggregator

P, S, D = 11, 2, 16  # P >= 4S + 3, so every rule accepts (P, S).
KEY = jax.random.key(0)


@functools.cache
def _jitted(name, p=P, s=S, **options):
  return jax.jit(make_aggregator(name, p, s, **options))


def _run(name, x, p=P, s=S, **options):
  mean_D, report = _jitted(name, p, s, **options)(jnp.asarray(x, jnp.float32), KEY)
  return np.asarray(mean_D, np.float64), report


def _honest(seed, p=P, d=D, offset=3.0):
  rng = np.random.default_rng(seed)
  return (offset + rng.standard_normal((p, d))).astype(np.float32)


def _with_bad_rows(x, payload, rows=(1, 6)):
  x = x.copy()
  x[list(rows)] = payload
  return x


def _finite_rows(x):
  return np.all(np.isfinite(x), axis=1)


# ---------------------------------------------------------------------------- numpy references


def _np_sq_distances(x):
  x = x.astype(np.float64)
  finite = _finite_rows(x)
  p = len(x)
  d2 = np.full((p, p), np.inf)
  for i in range(p):
    for j in range(p):
      if i != j and finite[i] and finite[j]:
        d2[i, j] = np.sum((x[i] - x[j]) ** 2)
  return d2


def _np_krum_scores(x, f, rows=None):
  d2 = _np_sq_distances(x)
  rows = list(range(len(x))) if rows is None else rows
  k = max(len(rows) - f - 2, 1)
  return np.array([np.sum(np.sort([d2[i, j] for j in rows if j != i])[:k]) for i in rows])


def _np_bulyan(x, f):
  remaining, selected = list(range(len(x))), []
  for _ in range(len(x) - 2 * f):
    winner = remaining[int(np.argmin(_np_krum_scores(x, f, remaining)))]
    selected.append(winner)
    remaining.remove(winner)
  chosen = x[selected].astype(np.float64)
  beta = len(chosen) - 2 * f
  idx = np.argsort(np.abs(chosen - np.median(chosen, axis=0)), axis=0, kind="stable")[:beta]
  return np.take_along_axis(chosen, idx, axis=0).mean(axis=0), sorted(selected)


def _np_geometric_median(x, iters=100_000, tol=1e-13, eps=1e-8):
  """hdmedians-style Weiszfeld with the Vardi-Zhang correction, float64, tight tolerance."""
  x = x[_finite_rows(x)].astype(np.float64)
  y = x.mean(axis=0)
  for _ in range(iters):
    d = np.linalg.norm(x - y, axis=1)
    far = d > eps
    w = 1.0 / d[far]
    t = (w[:, None] * x[far]).sum(axis=0) / w.sum()
    eta = len(x) - far.sum()
    if eta == len(x):
      return y
    if eta == 0:
      y_next = t
    else:
      r = np.linalg.norm((t - y) * w.sum())
      ratio = 0.0 if r <= eps else eta / r
      y_next = max(0.0, 1.0 - ratio) * t + min(1.0, ratio) * y
    if np.linalg.norm(y_next - y) <= tol * max(1.0, np.linalg.norm(y)):
      return y_next
    y = y_next
  return y


def _objective(x, y):
  x = x[_finite_rows(x)].astype(np.float64)
  return np.sum(np.linalg.norm(x - y, axis=1))


def _np_centered_clipping(x, tau=10.0, iters=3):
  x = x.astype(np.float64)
  finite = _finite_rows(x)
  v = np.median(np.where(np.isnan(x), np.inf, x), axis=0)
  for _ in range(iters):
    diff = x[finite] - v
    norms = np.linalg.norm(diff, axis=1)
    scale = np.minimum(1.0, tau / np.where(norms > 0, norms, np.inf))
    scale = np.where(norms > 0, scale, 1.0)
    v = v + (scale[:, None] * diff).sum(axis=0) / len(x)
  return v


# ---------------------------------------------------------------------------- rules vs references


@pytest.mark.parametrize("p", [8, 9])
@pytest.mark.parametrize("payload", [None, np.nan, np.inf, -np.inf, 1e30])
def test_coordinate_median_matches_numpy(p, payload):
  x = _honest(p, p=p)
  if payload is not None:
    x = _with_bad_rows(x, payload, rows=(0, 5))
  x[2, 3] = np.nan  # a partly non-finite row: NaN counts as +Inf.
  got, report = _run("coordinate_median", x, p=p)
  want = np.median(np.where(np.isnan(x), np.inf, x).astype(np.float64), axis=0)
  assert bool(report.ok)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(report.flagged, ~_finite_rows(x))


@pytest.mark.parametrize("p", [1, 2, 3, 5, 8, 13, 33])
def test_sorting_network_matches_numpy_sort(p):
  rng = np.random.default_rng(p)
  x = rng.integers(-3, 4, (p, 40)).astype(np.float32)  # many ties
  x[rng.random((p, 40)) < 0.1] = np.inf
  x[rng.random((p, 40)) < 0.1] = -np.inf
  np.testing.assert_array_equal(jax.jit(aggregators.kernels._sort_rows)(x), np.sort(x, axis=0))


@pytest.mark.parametrize("s", [0, 1, 3])
def test_trimmed_mean_matches_scipy(s):
  x = _with_bad_rows(_honest(s), np.inf, rows=(4,)) if s else _honest(s)
  got, report = _run("trimmed_mean", x, s=s)
  want = scipy.stats.trim_mean(x.astype(np.float64), s / P + 1e-9, axis=0)
  assert bool(report.ok)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_trimmed_mean_with_no_trimming_is_the_mean():
  x = _honest(7)
  np.testing.assert_allclose(_run("trimmed_mean", x, s=0)[0], x.mean(0, dtype=np.float64), 1e-6)


@pytest.mark.parametrize("payload", [None, np.nan, 50.0])
def test_krum_scores_match_brute_force(payload):
  x = _honest(1) if payload is None else _with_bad_rows(_honest(1), payload)
  got = np.asarray(jax.jit(aggregators.krum_scores, static_argnums=1)(x, S))
  want = _np_krum_scores(x, S)
  finite = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), finite)
  np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5)
  mean_D, report = _run("krum", x)
  winner = int(np.argmin(want))
  np.testing.assert_array_equal(mean_D, x[winner])
  np.testing.assert_array_equal(report.flagged, np.arange(P) != winner)


@pytest.mark.parametrize("m", [None, 1, 4])
def test_multi_krum_matches_numpy(m):
  x = _with_bad_rows(_honest(2), 40.0)
  options = {} if m is None else {"m": m}
  got, report = _run("multi_krum", x, **options)
  chosen = np.argsort(_np_krum_scores(x, S), kind="stable")[: P - S if m is None else m]
  np.testing.assert_allclose(got, x[chosen].mean(0, dtype=np.float64), rtol=1e-5)
  np.testing.assert_array_equal(~np.asarray(report.flagged), np.isin(np.arange(P), chosen))


@pytest.mark.parametrize("payload", [None, np.nan, -30.0, 1e30])
def test_bulyan_matches_numpy(payload):
  x = _honest(3) if payload is None else _with_bad_rows(_honest(3), payload)
  got, report = _run("bulyan", x)
  want, selected = _np_bulyan(x, S)
  assert bool(report.ok)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.flatnonzero(~np.asarray(report.flagged)), selected)


@pytest.mark.parametrize("init", ["mean", "median"])
@pytest.mark.parametrize("payload", [None, np.nan, 25.0, 1e30])
def test_geometric_median_objective_matches_float64_weiszfeld(init, payload):
  x = _honest(4) if payload is None else _with_bad_rows(_honest(4), payload)
  got, report = _run("geometric_median", x, init=init)
  want = _np_geometric_median(x)
  assert bool(report.ok)
  assert 0 < int(report.iterations) < 1000
  assert _objective(x, got) <= _objective(x, want) * (1 + 1e-6)
  np.testing.assert_array_equal(report.flagged, ~_finite_rows(x))


def test_geometric_median_reports_iterations_and_respects_max_iters():
  x = _with_bad_rows(_honest(5), 1e3)
  assert int(_run("geometric_median", x, max_iters=2)[1].iterations) == 2
  assert int(_run("geometric_median", x, tol=1e-3)[1].iterations) < int(
    _run("geometric_median", x)[1].iterations
  )


def test_geometric_median_of_identical_points_is_the_point():
  x = np.tile(_honest(6)[:1], (P, 1))
  got, report = _run("geometric_median", x)
  np.testing.assert_allclose(got, x[0], rtol=1e-6)
  assert bool(report.ok)


def test_geometric_median_with_a_majority_at_one_point():
  """The Vardi-Zhang branch: the median is a data point held by most rows."""
  x = _honest(7)
  x[: P // 2 + 1] = x[0]
  got, _ = _run("geometric_median", x)
  np.testing.assert_allclose(got, x[0], atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"tau": 1.0, "iters": 5}])
@pytest.mark.parametrize("payload", [None, np.nan, 40.0])
def test_centered_clipping_matches_numpy(options, payload):
  x = _honest(8) if payload is None else _with_bad_rows(_honest(8), payload)
  got, report = _run("centered_clipping", x, **options)
  np.testing.assert_allclose(got, _np_centered_clipping(x, **options), rtol=1e-5, atol=1e-5)
  assert int(report.iterations) == options.get("iters", 3)


# ---------------------------------------------------------------------------- §7 oracles


def test_median_of_odd_p_is_the_middle_value():
  x = np.random.default_rng(9).permutation(np.arange(P, dtype=np.float32))[:, None]
  x = np.tile(x, (1, 3))
  np.testing.assert_array_equal(_run("coordinate_median", x, s=0)[0], np.full(3, P // 2))


@pytest.mark.parametrize("name", ["krum", "multi_krum", "bulyan"])
def test_selection_rules_with_equal_rows_return_the_row(name):
  x = np.tile(_honest(10)[:1], (P, 1))
  got, report = _run(name, x)
  np.testing.assert_allclose(got, x[0], rtol=1e-6)
  assert bool(report.ok)


@pytest.mark.parametrize(
  "name, p, s",
  [
    ("krum", 6, 2),
    ("multi_krum", 4, 1),
    ("bulyan", 10, 2),
    ("bulyan", 6, 1),
    ("trimmed_mean", 4, 2),
    ("mean", 4, -1),
    ("coordinate_median", 0, 0),
  ],
)
def test_rules_raise_below_their_bounds(name, p, s):
  with pytest.raises(ValueError, match=rf"{name}.*P={p}, S={s}|{name}.*>="):
    make_aggregator(name, p, s)


@pytest.mark.parametrize(
  "name, options, match",
  [
    ("median", {}, "valid aggregators: mean, coordinate_median"),
    ("krum", {"m": 3}, r"unknown options \['m'\]; valid options: none"),
    ("geometric_median", {"tolerance": 1e-3}, "valid options: init, tol, max_iters, eps"),
    ("geometric_median", {"init": "zero"}, "init must be"),
    ("geometric_median", {"max_iters": 0}, "max_iters must be >= 1"),
    ("multi_krum", {"m": P + 1}, "m must be <= P"),
    ("centered_clipping", {"tau": -1.0}, "tau must be a positive number"),
  ],
)
def test_bad_names_and_options_raise(name, options, match):
  with pytest.raises(ValueError, match=match):
    make_aggregator(name, P, S, **options)


def test_inputs_are_checked():
  agg = make_aggregator("mean", P, S)
  with pytest.raises(ValueError, match="shape"):
    agg(jnp.zeros((P + 1, D)), KEY)
  with pytest.raises(ValueError, match="dtype int32 are not supported; supported dtypes: float32"):
    agg(jnp.zeros((P, D), jnp.int32), KEY)


# ---------------------------------------------------------------------------- robustness, contract


def test_mean_has_no_defence():
  got, report = _run("mean", _with_bad_rows(_honest(11), np.nan))
  assert not bool(report.ok)
  np.testing.assert_array_equal(got, 0.0)
  x = _honest(11)
  got, report = _run("mean", x)
  np.testing.assert_allclose(got, x.mean(0, dtype=np.float64), rtol=1e-6)
  assert bool(report.ok) and not np.any(report.flagged)


ROBUST = [name for name in AGGREGATORS if name != "mean"]


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("payload", [np.nan, np.inf, -np.inf, 1e30, "mixed"])
def test_non_finite_and_huge_rows_never_poison_robust_rules(name, payload):
  x = _honest(12, offset=5.0)
  if payload == "mixed":
    x[1], x[6, ::2] = np.nan, np.inf
  else:
    x = _with_bad_rows(x, payload)
  got, report = _run(name, x)
  assert bool(report.ok)
  assert np.all(np.isfinite(got))
  honest = np.delete(x, [1, 6], axis=0).astype(np.float64)
  assert np.sqrt(np.mean((got - honest.mean(0)) ** 2)) < 2.0
  if payload != 1e30:  # Identical huge rows are close to each other: Bulyan may pick one.
    assert np.asarray(report.flagged)[[1, 6]].all()


# Report shapes, dtypes and no recompilation: tests/contract_test.py, for every combiner.


def test_all_rows_non_finite_gives_zeros_not_ok():
  x = np.full((P, D), np.nan, np.float32)
  for name in AGGREGATORS:
    got, report = _run(name, x)
    assert not bool(report.ok), name
    np.testing.assert_array_equal(got, 0.0)


@pytest.mark.parametrize("name", ["geometric_median", "bulyan", "centered_clipping"])
def test_float64_inputs_keep_their_precision(name):
  x = _with_bad_rows(_honest(13).astype(np.float64) + 1e-9 * np.arange(D), np.nan)
  with jax.enable_x64(True):
    mean_D, report = jax.jit(make_aggregator(name, P, S))(jnp.asarray(x), KEY)
    assert mean_D.dtype == jnp.float64 and bool(report.ok)
    got = np.asarray(mean_D)
  if name == "geometric_median":
    assert _objective(x, got) <= _objective(x, _np_geometric_median(x)) * (1 + 1e-12)
  elif name == "bulyan":
    np.testing.assert_allclose(got, _np_bulyan(x, S)[0], rtol=1e-13)
  else:
    np.testing.assert_allclose(got, _np_centered_clipping(x), rtol=1e-13)
