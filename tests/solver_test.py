"""The decoder's two routes for its P-sized 64-bit steps (draco_jax.cyclic_solve).

``device`` runs them in the graph with 64-bit types enabled while traced; ``host`` runs the
same functions in NumPy float64 through ``jax.pure_callback``, for backends without 64-bit
types (TPU). On CPU both exist, so every test here decodes the same received messages with the
same key by both routes and asks for the same decisions (ok, flagged rows) and the same mean
(within float32 rounding), over every placement at small P and the large-P region, with the
float64 references of draco_jax.testing; and checks that the host route's graph holds no
64-bit value at all, and that it works under vmap, shard_map and x64.
"""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draco_jax import cyclic_solve, decode, mesh, sharded, testing

# Both routes weight the same rows; the weights agree to float64 rounding and are cast to the
# message dtype, so the means differ by float32 rounding at most (measured: bit-identical in
# every case below).
MEAN_RTOL = 1e-6
ALL_ATTACKS = (*testing.ATTACKS, "scale", "mixed_noise")


@functools.cache
def _decoders(name, p, s):
  code = testing.cached_code(name, p, s)
  return {route: decode.make_decoder(code, solver=route) for route in ("device", "host")}


def _compare(name, p, s, cases, seed):
  """Decodes every (rows, attack) case by both routes; returns (count, mismatches, host outs)."""
  setup = testing.setup(name, p, s, seed=seed)
  decoders = _decoders(name, p, s)
  rng = np.random.default_rng(seed)
  keys = jax.random.split(jax.random.key(seed), len(cases))
  mismatches, outs = [], []
  for (rows, attack), key in zip(cases, keys):
    mask_P = testing.mask(p, rows)
    received_PxD = testing.attack(attack, setup.sent_PxD, mask_P, rng)
    got = {}
    for route, decoder in decoders.items():
      got[route] = testing.decode_outcome(
        setup._replace(decoder=decoder), received_PxD, key, mask_P
      )
    dev, host = got["device"], got["host"]
    scale = max(np.linalg.norm(dev.mean_D), 1e-30)
    same = (
      dev.ok == host.ok
      and np.array_equal(dev.flagged_P, host.flagged_P)
      and np.linalg.norm(dev.mean_D - host.mean_D) <= MEAN_RTOL * scale
    )
    if not same:
      mismatches.append(
        f"{attack} rows={list(rows)}: device ok={dev.ok} flagged={np.flatnonzero(dev.flagged_P)}"
        f" host ok={host.ok} flagged={np.flatnonzero(host.flagged_P)}"
      )
    outs.append((attack, rows, host))
  return len(cases), mismatches, outs


def _assert_sound(outs, exact_expected):
  """The host route's own answers: exact where expected, never accepted off by > LOOSE."""
  bad = [
    testing.describe(attack, rows, out)
    for attack, rows, out in outs
    if (not testing.exact(out) if exact_expected else out.ok and out.err > testing.LOOSE)
  ]
  assert not bad, f"{len(bad)} of {len(outs)}: " + "; ".join(bad[:5])


# --------------------------------------------------------------------------- route choice


@pytest.mark.parametrize(
  "platform, route",
  [
    ("cpu", "device"),
    ("gpu", "device"),
    ("cuda", "device"),
    ("rocm", "device"),
    ("tpu", "host"),
    ("METAL", "host"),
    ("neuron", "host"),
  ],
)
def test_auto_picks_device_only_where_64_bit_types_exist(platform, route):
  assert cyclic_solve.resolve_solver("auto", platform) == route
  assert cyclic_solve.resolve_solver("host", platform) == "host"


def test_auto_is_the_default_and_follows_the_backend():
  assert cyclic_solve.resolve_solver() == "device"  # conftest: JAX_PLATFORMS=cpu


def test_device_route_on_a_backend_without_64_bit_is_refused_by_name():
  with pytest.raises(ValueError, match=r"'tpu' backend has no 64-bit types; use solver='host'"):
    cyclic_solve.resolve_solver("device", "tpu")


@pytest.mark.parametrize("name", ["cyclic", "cyclic_paper", "repetition"])
def test_unknown_solver_names_the_value_and_the_valid_ones(name):
  code = testing.cached_code(name, 9, 1)
  with pytest.raises(ValueError, match=r"unknown decoder solver 'fast'.*valid: auto, device, host"):
    decode.make_decoder(code, solver="fast")


# --------------------------------------------------------------------------- no 64-bit in the graph

# Floating 64-bit types, which TPUs lack. (64-bit integers do appear: the bit generator's state
# in the projection, ui64 in rng_bit_generator, is the "rbg" generator TPUs run natively.)
_WIDE = re.compile(r"(?<![a-z0-9])(?:[0-9]+x)*(f64|c128)\b")


def _lowered_text(decoder, code, d=300):
  dtype = jnp.complex64 if code.is_complex else jnp.float32
  received = jax.ShapeDtypeStruct((code.num_workers, d), dtype)
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.jit(lambda y, k: decoder(y, k)).lower(received, key).as_text()


@pytest.mark.parametrize(
  "name, p, s", [("cyclic", 9, 2), ("cyclic_paper", 9, 2), ("cyclic", 32, 8)]
)
def test_host_route_graph_holds_no_64_bit_value(name, p, s):
  code = testing.cached_code(name, p, s)
  host = _lowered_text(decode.make_decoder(code, solver="host"), code)
  assert not _WIDE.findall(host), sorted(set(_WIDE.findall(host)))[:5]
  assert "callback" in host
  # The check can fail: the device route's graph is full of them.
  assert _WIDE.findall(_lowered_text(decode.make_decoder(code, solver="device"), code))


# --------------------------------------------------------------------------- same decisions


# Run by default; every other (code, P, S) below runs under -m slow (each costs 2-5 s).
_SMALL_DEFAULT = {("cyclic", 5, 2), ("cyclic", 8, 3), ("cyclic", 9, 4), ("cyclic_paper", 7, 3)}


def _small_params():
  out = []
  for p in (5, 7, 8, 9):
    for s in range(1, (p - 1) // 2 + 1):
      for case in [("cyclic", p, s)] + [("cyclic_paper", p, s)] * (p in (5, 7)):
        out.append(pytest.param(*case, marks=() if case in _SMALL_DEFAULT else pytest.mark.slow))
  return out


@pytest.mark.parametrize("name, p, s", _small_params())
def test_routes_agree_on_every_placement_at_small_p(name, p, s):
  subsets = [c for t in range(1, s + 1) for c in itertools.combinations(range(p), t)]
  cases = [(rows, ALL_ATTACKS[i % len(ALL_ATTACKS)]) for i, rows in enumerate(subsets)]
  cases += [(rows, "tiny") for rows in subsets]
  count, mismatches, outs = _compare(name, p, s, cases, seed=p * 10 + s)
  assert not mismatches, f"{len(mismatches)} of {count}: " + "; ".join(mismatches[:5])
  _assert_sound(outs, exact_expected=True)


@pytest.mark.parametrize(
  "p, s",
  [(32, 8), (64, 16)]
  + [pytest.param(*ps, marks=pytest.mark.slow) for ps in ((31, 15), (48, 6), (63, 31), (64, 2))],
)
def test_routes_agree_at_large_p(p, s):
  rng = np.random.default_rng(p + s)
  placements = [testing.random_rows(rng, p, s) for _ in range(2)]
  placements += [testing.contiguous(p, s, 0), testing.contiguous(p, s, p // 3)]
  placements += [testing.random_rows(rng, p, max(1, s // 2))]
  cases = list(itertools.product(placements, ALL_ATTACKS))
  count, mismatches, outs = _compare("cyclic", p, s, cases, seed=p * 100 + s)
  assert not mismatches, f"{len(mismatches)} of {count}: " + "; ".join(mismatches[:5])
  _assert_sound(outs, exact_expected=False)


def test_stragglers_and_over_capacity_decide_alike():
  """Erasures (whole NaN rows) and more bad rows than the code tolerates: the peeling and
  refusal paths of both routes."""
  p, s = 15, 3
  cases = [((0, 1, 2, 3, 4, 5, 6), "gaussian"), ((2, 9, 11, 14), "rev_grad"), ((4, 5), "nan")]
  cases += [((0, 5, 10, 12), "scale"), ((1, 2, 3, 4, 5, 6), "constant")]
  count, mismatches, _ = _compare("cyclic", p, s, cases, seed=3)
  assert not mismatches, f"{len(mismatches)} of {count}: " + "; ".join(mismatches[:5])


# --------------------------------------------------------------------------- transformations


def test_host_route_under_shard_map_matches_the_replicated_device_route():
  p, s, d = 16, 3, 1001
  setup = testing.setup("cyclic", p, s, seed=1, d=d)
  code = setup.code
  combiner = sharded.make_mesh_combiner(
    code, mesh.make_worker_mesh(p, jax.devices()[:8]), solver="host"
  )
  rng = np.random.default_rng(0)
  for i, attack in enumerate(("rev_grad", "nan", "tiny")):
    mask_P = testing.mask(p, testing.random_rows(rng, p, s))
    received_PxD = testing.attack(attack, setup.sent_PxD, mask_P, rng)
    key = jax.random.key(i)
    want_D, want = _decoders("cyclic", p, s)["device"](received_PxD, key)
    got_D, got = combiner(received_PxD, key)
    assert bool(got.ok) == bool(want.ok) is True
    np.testing.assert_array_equal(got.flagged, want.flagged)
    np.testing.assert_allclose(got_D, want_D, rtol=1e-5, atol=1e-6)


def test_host_route_under_vmap_equals_one_call_at_a_time():
  p, s = 9, 2
  setup = testing.setup("cyclic", p, s, seed=2)
  rng = np.random.default_rng(1)
  batch = np.stack(
    [
      testing.attack(a, setup.sent_PxD, testing.mask(p, rows), rng)
      for a, rows in (("rev_grad", (0, 1)), ("huge", (3,)), ("gaussian", (2, 7, 8)))
    ]
  )
  host = _decoders("cyclic", p, s)["host"]
  key = jax.random.key(5)
  means, reports = jax.vmap(host, in_axes=(0, None))(batch, key)
  for i in range(3):
    mean_D, report = host(batch[i], key)
    np.testing.assert_array_equal(means[i], mean_D)
    assert bool(reports.ok[i]) == bool(report.ok)
    np.testing.assert_array_equal(reports.flagged[i], report.flagged)
  assert [bool(x) for x in reports.ok] == [True, True, False]  # 3 bad rows > S = 2: refused


def test_routes_agree_on_float64_messages_with_x64():
  p, s = 15, 4
  code = testing.cached_code("cyclic", p, s)
  grads_KxD = np.random.default_rng(0).standard_normal((p, 64))
  sent_PxD = code.matrix @ grads_KxD
  received_PxD = sent_PxD.copy()
  received_PxD[[3, 4, 10]] = 1e3
  received_PxD[12] += 1e-9 * np.linalg.norm(sent_PxD[12])
  with jax.enable_x64(True):
    outs = {
      route: decode.make_decoder(code, solver=route)(jnp.asarray(received_PxD), jax.random.key(0))
      for route in ("device", "host")
    }
    for mean_D, report in outs.values():
      assert mean_D.dtype == jnp.float64 and bool(report.ok)
      assert np.flatnonzero(report.flagged).tolist() == [3, 4, 10, 12]
      np.testing.assert_allclose(mean_D, grads_KxD.mean(0), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the namespace


def test_host_and_device_ops_agree_on_their_helpers():
  """The few operations numpy spells differently (fill and drop semantics, stable sorts)."""
  rng = np.random.default_rng(0)
  a_PxQ = rng.standard_normal((6, 3)).astype(np.float32)  # x64 is off for the jnp side
  mask_P = np.array([True, False, False, True, False, True])
  rows = np.array([4, 6, 1, 9])  # 6 and 9 are out of range: filled, or dropped
  values = rng.standard_normal((4, 3)).astype(np.float32)
  x = np.array([3.0, 1.0, 3.0, 0.5, 1.0])
  dev, host = cyclic_solve.DEVICE, cyclic_solve.HOST
  for size in (2, 3, 5):
    np.testing.assert_array_equal(dev.nonzero(mask_P, size, 6), host.nonzero(mask_P, size, 6))
  np.testing.assert_array_equal(dev.take_rows(a_PxQ, rows, 0.0), host.take_rows(a_PxQ, rows, 0.0))
  np.testing.assert_array_equal(
    dev.set_rows(jnp.asarray(a_PxQ), rows, values), host.set_rows(a_PxQ, rows, values)
  )
  np.testing.assert_array_equal(dev.argsort(x), host.argsort(x))
  counted = host.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2), (0, 1))
  assert counted == (3, 8) and host.fori_loop(0, 4, lambda i, v: v + i, 0) == 6
  assert host.cond(np.bool_(False), lambda: 1, lambda: 2) == 2


def test_host_linear_algebra_returns_nan_instead_of_raising():
  """A zero pivot or a non-converging SVD (numpy raises) must give NaN, as in the graph, so the
  certificate refuses instead of the step crashing."""
  host = cyclic_solve.HOST
  assert np.all(np.isnan(host.solve_triangular(np.zeros((2, 2)), np.ones(2), lower=True)))
  assert np.all(np.isnan(host.lstsq(np.full((3, 2), np.nan), np.ones(3))))
