"""One contract, every combiner: each DRACO decoder and each baseline aggregator, same checks.

The combiner contract (draco_jax/contract.py, docs/math.md §1): ``combiner(received_PxD, key) ->
(mean_D, Report(flagged, ok, iterations))``, jit-compiled, the MEAN over partitions, all zeros
when ok is False, never non-finite, and no recompilation when the adversarial rows or their
values change. Every registered combiner runs through the same table of attacks here:

* decoders (on coded messages) must return the honest mean within 1e-5 (``small``: 1e-2,
  docs/math.md §5.4), report ok and flag every row the attack changed;
* robust baselines (on uncoded messages) must stay within :data:`ROBUST_RADIUS` honest radii
  of the honest mean and report ok;
* the undefended mean has no tolerance: it only has to keep the contract.

Honest partition gradients are clustered, g_k = μ + 0.1·N(0, 1), so that "within a few honest
radii" is a real bound (the attacks below move the plain mean by 10 to 1e30 radii).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draco_jax import aggregators, attacks, coding, decode

P, S, D = 15, 2, 256  # (2S+1) | P for the repetition code, and P >= 4S+3 for Bulyan.
BAD_ROWS = (3, 9)
DECODER_PRECISION = {"small": 1e-2}  # else 1e-5 (float32 messages, docs/math.md §7)
ROBUST_RADIUS = 3.0
# Every registry entry is a combiner: (kind, name) with kind "decoder" (the name is a code) or
# "aggregator".
COMBINERS = [("decoder", name) for name in decode.DECODERS] + [
  ("aggregator", name) for name in aggregators.AGGREGATORS
]
ATTACKS = [name for name in attacks.ATTACKS if name not in ("none", "rev_grad")]


def _id(combiner):
  return f"{combiner[0]}-{combiner[1]}"


@functools.cache
def _case(kind, name):
  """(code, jitted combiner, traces list) for one registry entry."""
  code = coding.make_code(name if kind == "decoder" else "uncoded", P, S)
  inner = (
    decode.make_decoder(code) if kind == "decoder" else aggregators.make_aggregator(name, P, S)
  )
  traces = []

  def traced(received_PxD, key):
    traces.append(1)
    return inner(received_PxD, key)

  return code, jax.jit(traced), traces


@functools.cache
def _honest(seed=0):
  """Partition gradients G [K, D] (float64 numpy) and their mean."""
  rng = np.random.default_rng(seed)
  grads_KxD = 3.0 + 0.1 * rng.standard_normal((P, D))
  return grads_KxD.astype(np.float32), grads_KxD.astype(np.float32).astype(np.float64).mean(0)


def _sent(code):
  grads_KxD, _ = _honest()
  return coding.encode(code, jnp.asarray(grads_KxD))


def _mask(rows=BAD_ROWS):
  return jnp.zeros(P, bool).at[jnp.asarray(rows)].set(True)


def _attacked(code, attack, seed=0):
  fn = attacks.make_attack(attack, code=code)
  return fn(jax.random.key(100 + seed), _sent(code), _mask())


def _check_contract(mean_D, report):
  assert mean_D.shape == (D,) and mean_D.dtype == jnp.float32
  assert report.flagged.shape == (P,) and report.flagged.dtype == jnp.bool_
  assert report.ok.shape == () and report.ok.dtype == jnp.bool_
  assert report.iterations.shape == () and report.iterations.dtype == jnp.int32
  assert np.all(np.isfinite(mean_D)), "the output must always be finite"
  assert bool(report.ok) or not np.any(mean_D), "not ok must come with an all-zero output"


def _relative_error(mean_D):
  _, truth_D = _honest()
  return np.linalg.norm(np.asarray(mean_D, np.float64) - truth_D) / np.linalg.norm(truth_D)


def _honest_radius():
  grads_KxD, truth_D = _honest()
  return np.max(np.linalg.norm(grads_KxD.astype(np.float64) - truth_D, axis=1))


@pytest.mark.parametrize("combiner", COMBINERS, ids=_id)
def test_no_adversary_gives_the_arithmetic_mean(combiner):
  code, fn, _ = _case(*combiner)
  mean_D, report = fn(_sent(code), jax.random.key(0))
  _check_contract(mean_D, report)
  assert bool(report.ok)
  if combiner[0] == "decoder" or combiner[1] == "mean":
    assert _relative_error(mean_D) <= 1e-6
    assert not np.any(report.flagged)


@pytest.mark.parametrize("combiner", COMBINERS, ids=_id)
def test_every_attack_keeps_the_contract_and_the_tolerance(combiner):
  kind, name = combiner
  code, fn, _ = _case(kind, name)
  failures, beyond = [], 0
  for seed, attack in enumerate(ATTACKS):
    received_PxD = _attacked(code, attack, seed)
    mean_D, report = fn(received_PxD, jax.random.key(seed))
    _check_contract(mean_D, report)
    err = _relative_error(mean_D)
    within_radius = err * np.linalg.norm(_honest()[1]) <= ROBUST_RADIUS * _honest_radius()
    beyond += not within_radius
    if kind == "decoder":
      changed = np.any(np.asarray(received_PxD) != np.asarray(_sent(code)), axis=1)
      good = (
        bool(report.ok)
        and err <= DECODER_PRECISION.get(attack, 1e-5)
        and (attack == "small" or np.all(np.asarray(report.flagged)[changed]))
      )
    elif name == "mean":
      good = True  # no defence: the contract above is all it promises
    else:
      good = bool(report.ok) and within_radius
    if not good:
      failures.append(f"{attack}: ok={bool(report.ok)} err={err:.2e}")
  assert not failures, f"{_id(combiner)}: " + "; ".join(failures)
  if name == "mean":  # the bound is a real one: most attacks push the plain mean beyond it
    assert beyond >= len(ATTACKS) // 2, f"only {beyond} attacks moved the mean beyond the bound"


@pytest.mark.parametrize("combiner", COMBINERS, ids=_id)
def test_new_adversaries_and_values_never_recompile(combiner):
  code, fn, traces = _case(*combiner)
  fn(_sent(code), jax.random.key(0))
  compiled, traced = fn._cache_size(), len(traces)
  rng = np.random.default_rng(1)
  for trial, attack in enumerate(("reverse_gradient", "nan", "huge", "gaussian")):
    rows = tuple(rng.choice(P, 1 + trial % S, replace=False))
    received_PxD = attacks.make_attack(attack, code=code)(
      jax.random.key(trial), _sent(code), _mask(rows)
    )
    jax.block_until_ready(fn(received_PxD, jax.random.key(trial)))
  assert fn._cache_size() == compiled and len(traces) == traced


def test_the_table_covers_every_registry_entry():
  assert {n for k, n in COMBINERS if k == "decoder"} == set(decode.DECODERS)
  assert {n for k, n in COMBINERS if k == "aggregator"} == set(aggregators.AGGREGATORS)
  assert set(ATTACKS) | {"none", "rev_grad"} == set(attacks.ATTACKS)
