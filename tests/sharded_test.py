"""Sharded and replicated combining give the same answer (draco_jax.sharded).

conftest.py simulates 8 CPU devices. Every attack of ``attacks.ATTACKS`` is applied once, on the
host side, to the whole [P, D] array; the same received array then goes to the replicated
combiner (``decode.make_decoder`` / ``aggregators.make_aggregator``) and to the sharded one
(``sharded.make_mesh_combiner``), which must agree to 1e-6 relative with equal flagged rows, ok
and iteration counts. Each combiner compiles once per case; the attacks loop inside one test.
D is never a multiple of the device count, so the zero padding of the slices is exercised.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from draco_jax import aggregators, attacks, coding, decode, sharded, train
from draco_jax import mesh as mesh_lib
from draco_jax.config import TrainConfig, validate

RTOL = 1e-6
KEY = jax.random.key(0)
# The attacks of docs/math.md §6, plus whole NaN rows (missing stragglers' messages).
ATTACK_CASES = [(name, {}) for name in attacks.ATTACKS] + [("nan", {"fraction": 1.0})]
# (code, P, S, devices, D): P = 8 and 16 on all 8 devices, odd P on 5 devices, the repetition
# code's P = 24 = 8 groups of 3, and the paper's code (complex messages).
DECODER_CASES = [
  ("cyclic", 8, 2, 8, 1001),
  ("cyclic", 16, 3, 8, 2050),
  ("cyclic", 15, 2, 5, 333),
  ("repetition", 24, 1, 8, 300),
  ("cyclic_paper", 8, 1, 8, 77),
]
AGGREGATOR_CASES = [(16, 3, 1001), pytest.param(8, 1, 203, marks=pytest.mark.slow)]


@functools.cache
def _code(name, p, s):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # float32 envelope warnings (coding_test)
    return coding.make_code(name, p, s)


@functools.cache
def _decoder(name, p, s):
  return decode.make_decoder(_code(name, p, s))


def _mesh(p, num_devices):
  return mesh_lib.make_worker_mesh(p, jax.devices()[:num_devices])


def _sent(code, d, seed):
  grads_KxD = np.random.default_rng(seed).standard_normal((code.num_workers, d))
  return np.asarray(coding.encode(code, jnp.asarray(grads_KxD, jnp.float32)))


def _received_cases(code, d):
  """(label, received_PxD) for every attack on S random rows, and the clean messages."""
  rng = np.random.default_rng(code.num_workers * d)
  sent_PxD = jnp.asarray(_sent(code, d, seed=d))
  fns = [attacks.make_attack(name, code=code, **options) for name, options in ATTACK_CASES]
  # One program for all attacks: compiling them one by one costs twice as long.
  attack = jax.jit(lambda i, key, x, mask: jax.lax.switch(i, fns, key, x, mask))
  out = []
  for i, (name, options) in enumerate(ATTACK_CASES):
    mask_P = np.zeros(code.num_workers, bool)
    mask_P[rng.choice(code.num_workers, code.num_adversaries, replace=False)] = True
    out.append((f"{name}{options or ''}", attack(i, jax.random.key(i), sent_PxD, mask_P)))
  return out


def _assert_same(label, replicated, sharded_out, compare_iterations=True):
  (want_D, want), (got_D, got) = replicated, sharded_out
  want_D, got_D = np.asarray(want_D, np.float64), np.asarray(got_D, np.float64)
  assert got_D.shape == want_D.shape, label
  assert np.all(np.isfinite(got_D)), label
  scale = max(np.linalg.norm(want_D), 1e-30)
  assert np.linalg.norm(got_D - want_D) <= RTOL * scale, (label, np.linalg.norm(got_D - want_D))
  np.testing.assert_array_equal(got.flagged, want.flagged, err_msg=label)
  assert bool(got.ok) == bool(want.ok), label
  if compare_iterations:
    assert int(got.iterations) == int(want.iterations), label


@pytest.mark.parametrize("name, p, s, num_devices, d", DECODER_CASES)
def test_sharded_decoder_matches_replicated_for_every_attack(name, p, s, num_devices, d):
  code = _code(name, p, s)
  replicated = _decoder(name, p, s)
  combiner = sharded.make_mesh_combiner(code, _mesh(p, num_devices))
  oks = []
  for label, received_PxD in _received_cases(code, d):
    want = replicated(received_PxD, KEY)
    _assert_same(label, want, combiner(received_PxD, KEY))
    oks.append(bool(want[1].ok))
  assert all(oks)  # f = S is within budget: the comparison is between real answers.


@pytest.mark.parametrize("p, s, d", AGGREGATOR_CASES)
def test_sharded_aggregators_match_replicated_for_every_attack(p, s, d):
  code = _code("uncoded", p, s)
  mesh = _mesh(p, 8)
  cases = _received_cases(code, d)
  for name in aggregators.AGGREGATORS:
    replicated = jax.jit(aggregators.make_aggregator(name, p, s))
    combiner = sharded.make_mesh_combiner(code, mesh, aggregator=name)
    for label, received_PxD in cases:
      # Weiszfeld's relative stop test may fire one iteration apart on rounding differences.
      _assert_same(
        f"{name}/{label}",
        replicated(received_PxD, KEY),
        combiner(received_PxD, KEY),
        compare_iterations=name != "geometric_median",
      )


def test_slice_projections_sum_to_the_whole_projection():
  """With D = 16·2048·N the slices' Kronecker projections tile the replicated one exactly
  (slices and whole then share the inner factor m2 = 2048)."""
  n, c = 8, 4
  x_PxD = jnp.asarray(np.random.default_rng(1).standard_normal((8, 16 * 2048 * n)), jnp.float32)
  whole = decode.project(x_PxD, KEY, c)
  mesh = _mesh(8, n)

  def local(rows_pxD, key):
    slice_PxW = sharded.to_slices(rows_pxD, n)
    index = jax.lax.axis_index(mesh_lib.WORKER_AXIS)
    partial = decode.project(slice_PxW, key, c, shard_index=index, num_shards=n)
    return jax.lax.psum(partial, mesh_lib.WORKER_AXIS)

  spec = jax.P(mesh_lib.WORKER_AXIS)
  parts = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, jax.P()), out_specs=jax.P()))
  for got, want in zip(parts(x_PxD, KEY), whole):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_slices_round_trip_and_padding():
  """to_slices / gather_slices invert each other; clear_padding zeroes only the padding."""
  p, n, d = 8, 8, 13  # W = 2: the last slice holds 1 real column and 1 padding column.
  x_PxD = jnp.arange(p * d, dtype=jnp.float32).reshape(p, d) + 1
  spec = jax.P(mesh_lib.WORKER_AXIS)

  def local(rows_pxD):
    slice_PxW = sharded.to_slices(rows_pxD, n)
    dirty_PxW = sharded.clear_padding(slice_PxW + 7.0, d)
    return (
      sharded.gather_slices(slice_PxW[0], d),
      jax.lax.all_gather(dirty_PxW, mesh_lib.WORKER_AXIS, axis=1, tiled=True, to="invarying"),
    )

  fn = jax.jit(jax.shard_map(local, mesh=_mesh(p, n), in_specs=spec, out_specs=jax.P()))
  row0_D, dirty_PxN = fn(x_PxD)
  np.testing.assert_array_equal(row0_D, x_PxD[0])
  assert sharded.slice_width(d, n) == 2 and dirty_PxN.shape == (p, 16)
  np.testing.assert_array_equal(dirty_PxN[:, :d], x_PxD + 7.0)
  np.testing.assert_array_equal(dirty_PxN[:, d:], 0.0)


def test_unsharded_mean_stays_sharded_without_gather():
  p, s, n, d = 8, 2, 8, 1001
  code = _code("cyclic", p, s)
  local = sharded.make_sharded_combiner(code, n, gather=False)
  spec = jax.P(mesh_lib.WORKER_AXIS)
  specs = dict(in_specs=(spec, jax.P()), out_specs=(spec, jax.P()))
  fn = jax.jit(jax.shard_map(local, mesh=_mesh(p, n), **specs))
  received_PxD = jnp.asarray(_sent(code, d, seed=3))
  mean_W, report = fn(received_PxD, KEY)
  want_D, want = _decoder("cyclic", p, s)(received_PxD, KEY)
  assert mean_W.shape == (n * sharded.slice_width(d, n),)
  np.testing.assert_allclose(
    mean_W[:d], want_D, rtol=RTOL, atol=RTOL * float(jnp.abs(want_D).max())
  )
  np.testing.assert_array_equal(mean_W[d:], 0.0)
  np.testing.assert_array_equal(report.flagged, want.flagged)
  assert bool(report.ok) and bool(want.ok)


@pytest.mark.parametrize(
  "build, match",
  [
    (lambda: sharded.make_sharded_combiner(_code("cyclic", 8, 2), 3), "num_shards=3 for P=8"),
    (lambda: sharded.make_sharded_combiner(_code("cyclic", 8, 2), 0), "positive divisor"),
    (
      lambda: sharded.make_sharded_combiner(_code("uncoded", 8, 1), 8, aggregator="median"),
      "valid aggregators",
    ),
    (lambda: sharded.make_sharded_combiner(_code("uncoded", 8, 1), 8), "no DRACO decoder"),
    (lambda: sharded.make_sharded_combiner(_code("cyclic", 8, 2), 8, tol=1e-6, x=1), "unknown"),
  ],
)
def test_bad_construction_raises(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_bad_shapes_raise():
  code = _code("cyclic", 8, 2)
  local = sharded.make_sharded_combiner(code, 8)
  with pytest.raises(ValueError, match=r"P/N = 1 rows.*got shape \(2, 5\)"):
    local(jnp.zeros((2, 5), jnp.complex64), KEY)
  combiner = sharded.make_mesh_combiner(code, _mesh(8, 8))
  with pytest.raises(ValueError, match="num_workers = 8"):
    combiner(jnp.zeros((16, 5), jnp.complex64), KEY)


# ---------------------------------------------------------------------------- training


@functools.cache
def _trainer(code, aggregator, num_adversaries, attack_names, combine_sharding):
  config = TrainConfig(
    code=code,
    aggregator=aggregator,
    num_workers=8,
    num_adversaries=num_adversaries,
    placement="random",
    model_options={"hidden": (16,)},
    optimizer="sgd",
    learning_rate=0.1,
    batch_per_partition=4,
    timing=False,
    num_devices=8,
    combine_sharding=combine_sharding,
  )
  return train.make_trainer(config, attack_names=attack_names)


def _train(trainer, steps):
  """Final flat parameters and per-step metrics; step i runs attack i mod (number of attacks)."""
  state, history = trainer.init_state(), []
  hlo = trainer.update_fn.lower(state, *trainer.step_inputs(0)).as_text()
  assert ("all_to_all" in hlo) == (trainer.config.combine_sharding == "sharded")
  for step in range(steps):
    state, metrics = train.train_step(trainer, state, step, step % len(trainer.attacks))
    history.append(metrics)
  return np.asarray(ravel_pytree(state.params)[0]), history


@pytest.mark.parametrize(
  "code, aggregator, num_adversaries, attack_names",
  [
    # Random payloads are other draws per slice; the decoding removes them all the same.
    ("cyclic", "draco", 2, ("gaussian", "collude", "nan", "mixed", "alie")),
    # Baselines see exactly the replicated payloads for coordinate-wise attacks.
    ("uncoded", "coordinate_median", 2, ("reverse_gradient", "alie", "ipm", "constant")),
  ],
)
def test_sharded_training_steps_equal_replicated_ones(
  code, aggregator, num_adversaries, attack_names
):
  args = code, aggregator, num_adversaries, attack_names
  steps = len(attack_names)
  want, want_history = _train(_trainer(*args, "replicated"), steps)
  got, got_history = _train(_trainer(*args, "sharded"), steps)
  assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
  for g, w in zip(got_history, want_history):
    assert g["ok"] == w["ok"] == 1.0
    assert g["flagged_adversaries"] == w["flagged_adversaries"]
    assert g["flagged_honest"] == w["flagged_honest"]
    assert abs(g["deviation"] - w["deviation"]) <= 1e-5


def test_combine_sharding_is_validated():
  with pytest.raises(ValueError, match="combine_sharding must be one of replicated, sharded"):
    validate(TrainConfig(combine_sharding="scattered"))
