"""Tests for draco_jax.compute: the shared worker-compute mode sends the per-worker messages.

conftest.py simulates 8 CPU devices. Each partition gradient is the same vmapped function of
the same inputs in both modes. Repetition and uncoded messages are compared bit for bit (the
worker's own arithmetic, ``coding.encode_rows``). Cyclic messages come from one dense product
per device, which adds a row's R terms in another order: they must agree to within the bound of
a reordered sum, 2(R − 1)·u·Σ_r |coef_r·g_r| per entry (u = 2^-24); measured, 1 ulp.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from draco_jax import coding, compute, testing, train
from draco_jax.config import TrainConfig, validate

# D = 4,810: two whole blocks of the shared encoding's columns and a remainder.
TINY = TrainConfig(
  model_options={"hidden": (64,)},
  optimizer="sgd",
  learning_rate=0.1,
  batch_per_partition=4,
  placement="random",
  timing=False,
)
ATTACKS = ("reverse_gradient", "label_flip")
# (code, P, S, devices): cyclic halos from two successors; a repetition group straddling two
# devices; the halo as large as an all-gather (so an all-gather); complex messages; uncoded.
MESSAGE_CASES = [
  ("cyclic", 8, 2, 4),
  ("repetition", 6, 1, 3),
  ("cyclic", 8, 3, 2),
  ("cyclic_paper", 7, 1, 1),
  ("uncoded", 8, 2, 2),
]
STEPS = 20


@functools.cache
def _trainer(code, p, s, devices, compute_mode, combine_sharding="replicated"):
  config = dataclasses.replace(
    TINY,
    code=code,
    aggregator="draco" if code != "uncoded" else "mean",
    num_workers=p,
    num_adversaries=s,
    num_devices=devices,
    worker_compute=compute_mode,
    combine_sharding=combine_sharding,
  )
  return train.make_trainer(config, attack_names=ATTACKS)


def _messages(trainer, step: int, attack: int):
  """(poison_P, sent, (loss, accuracy, clean_D), grads) of one step, phase by phase."""
  phases, state = trainer.phases, trainer.init_state()
  batch, key = trainer.step_inputs(step, attack)
  _, _, poison_P = phases.masks(key, state.step, batch.attack)
  grads = phases.gradients(state.params, poison_P, batch.x, batch.y)
  clean = phases.clean(state.params, batch.x, batch.y, grads)
  return jax.device_get((poison_P, phases.encode(grads), clean, grads))


def _reordered_sum_bound(code, grads_KxD):
  """2(R − 1)·u·Σ_r |coef[k, r]·g[support[k, r]]| [P, D]: how far two orders of a row's sum
  may differ in float32."""
  terms_PxD = np.einsum(
    "pr,prd->pd", np.abs(code.coef), np.abs(np.asarray(grads_KxD, np.float64))[code.support]
  )
  return 2 * (code.redundancy - 1) * 2.0**-24 * terms_PxD


@pytest.mark.parametrize("code, p, s, devices", MESSAGE_CASES)
def test_shared_messages_equal_per_worker_ones(code, p, s, devices):
  """Honest and label-flipping workers alike; the diagnostic bit for bit."""
  shared = _trainer(code, p, s, devices, "shared")
  per_worker = _trainer(code, p, s, devices, "per_worker")
  for attack, name in enumerate(ATTACKS):
    poison_P, got, got_clean, grads = _messages(shared, 1, attack)
    _, want, want_clean, _ = _messages(per_worker, 1, attack)
    assert int(poison_P.sum()) == (s if name == "label_flip" else 0)
    assert got.dtype == coding.message_dtype(shared.code, np.float32)
    if code in ("repetition", "uncoded"):
      np.testing.assert_array_equal(got, want, err_msg=name)
    else:
      bound_PxD = _reordered_sum_bound(shared.code, grads.grads_KxD)
      honest_P = ~np.asarray(poison_P, bool)
      assert np.all(np.abs(got - want)[honest_P] <= bound_PxD[honest_P]), name
      np.testing.assert_array_equal(got[~honest_P], want[~honest_P], err_msg=name)
    for g, w in zip(got_clean, want_clean):
      np.testing.assert_array_equal(g, w, err_msg=name)


def test_reordered_sum_bound_can_fail():
  """The cyclic comparison above is not vacuous: messages moved by 1e-5 relative (a 1e-3 error
  in one term of 100) fall outside it in most entries."""
  trainer = _trainer("cyclic", 8, 3, 2, "shared")
  _, sent, _, grads = _messages(trainer, 1, 0)
  bound_PxD = _reordered_sum_bound(trainer.code, grads.grads_KxD)
  assert np.mean(np.abs(sent) * 1e-5 > bound_PxD) > 0.5


def test_poisoned_rows_send_flipped_gradients():
  """The label-flipped rows differ from the honest messages of the same step, no other row."""
  trainer = _trainer("cyclic", 8, 2, 4, "shared")
  poison_P, flipped, _, _ = _messages(trainer, 1, ATTACKS.index("label_flip"))
  _, honest, _, _ = _messages(trainer, 1, ATTACKS.index("reverse_gradient"))
  changed_P = np.any(flipped != honest, axis=1)
  np.testing.assert_array_equal(changed_P, poison_P)


def _train(trainer):
  state = trainer.init_state()
  for step in range(STEPS):
    state, metrics = train.train_step(trainer, state, step, step % len(ATTACKS))
    assert metrics["ok"] == 1.0 and metrics["flagged_adversaries"] == metrics["adversaries"]
  assert trainer.update_fn._cache_size() == 1  # one program for both attacks and every mask
  return np.asarray(ravel_pytree(state.params)[0])


@pytest.mark.parametrize(
  "devices, combine_sharding",
  [(1, "replicated"), (4, "replicated"), pytest.param(4, "sharded", marks=pytest.mark.slow)],
)
def test_training_is_the_same_in_both_modes(devices, combine_sharding):
  """20 steps (reversed gradients and label flipping in turn) end at the same parameters."""
  args = ("cyclic", 8, 2, devices)
  shared = _train(_trainer(*args, "shared", combine_sharding))
  per_worker = _train(_trainer(*args, "per_worker", combine_sharding))
  assert np.max(np.abs(shared - per_worker)) <= 1e-6


def _tables(exchange: compute._Exchange, support_PxR: np.ndarray, n: int) -> list[np.ndarray]:
  """Each device's table of partition ids, built the way the shard_map builds it."""
  p = support_PxR.shape[0] // n
  own = [np.arange(d * p, (d + 1) * p) for d in range(n)]
  if exchange.gather_all:
    return [np.arange(n * p)] * n
  tables = [list(rows) for rows in own]
  for shift, send in zip(exchange.shifts, exchange.sends):
    send_Nxh = send.reshape(n, -1)
    for source in range(n):
      tables[(source - shift) % n] += list(own[source][send_Nxh[source]])
  return [np.asarray(t) for t in tables]


@pytest.mark.parametrize(
  "code, p, s, n, received",
  [
    ("cyclic", 45, 5, 5, 10),  # R - 1 partitions of the successors, not (N - 1)·p = 36
    ("cyclic", 45, 10, 5, 20),
    ("cyclic", 8, 3, 2, 4),  # R - 1 = 6 > P - p = 4: everything, so one all-gather
    ("repetition", 45, 2, 5, 8),
    ("repetition", 15, 2, 3, 0),  # groups of 5 within devices of 5: nothing to exchange
    ("uncoded", 8, 0, 4, 0),
    ("cyclic", 15, 2, 1, 0),
  ],
)
def test_exchange_gives_every_device_its_rows_partitions(code, p, s, n, received):
  c = coding.make_code(code, p, s) if p <= 32 or code != "cyclic" else None
  support_PxR = np.asarray(c.support) if c else coding._cyclic_support(p, 2 * s + 1)
  exchange = compute._exchange_plan(support_PxR, n)
  assert exchange.received == received
  assert exchange.gather_all == (code == "cyclic" and (p, s, n) == (8, 3, 2))
  tables = _tables(exchange, support_PxR, n)
  rows = p // n
  for k in range(p):
    np.testing.assert_array_equal(tables[k // rows][exchange.index_PxR[k]], support_PxR[k])


@pytest.mark.parametrize(
  "code, p, s, n, distinct",
  [
    ("cyclic", 15, 2, 1, 15),  # every row its own, in place: no gather after the product
    ("cyclic", 45, 5, 5, 9),
    ("cyclic_paper", 9, 2, 3, 3),
    ("repetition", 15, 2, 1, 3),  # one encoding per group of R = 5 rows
    ("repetition", 15, 2, 3, 1),
    ("repetition", 45, 2, 5, 3),  # groups straddle devices: rows 9-17 hold parts of 3 groups
  ],
)
def test_distinct_rows_are_encoded_once_and_picked_back(code, p, s, n, distinct):
  c = testing.cached_code(code, p, s)  # P = 45: the float32-envelope warning silenced
  exchange = compute._exchange_plan(np.asarray(c.support), n)
  coef_PxR = np.asarray(c.coef, coding.message_dtype(c, np.float32))
  rows = compute._distinct_rows(exchange, coef_PxR, n)
  u = rows.dense_NuxE.shape[0] // n
  assert u == distinct
  assert rows.all_distinct == (u == p // n)
  for k in range(p):  # row k's pick on its device has row k's coefficients
    d = k // (p // n)
    picked = d * u + rows.pick_P[k]
    np.testing.assert_array_equal(rows.coef_NuxR[picked], coef_PxR[k])
    np.testing.assert_array_equal(rows.index_NuxR[picked], exchange.index_PxR[k])


@pytest.mark.parametrize("code", ["cyclic", "repetition"])
def test_shared_step_holds_two_message_sized_buffers(code):
  """One device, P = 15: the step's temporaries are about two [P, D] float32 arrays (the
  gradients and the messages, the attack writing over the messages in place); they were
  three (the attack's select into a second [P, D], the one-device all-gather's copy), which on
  XLA:CPU pushed the P = 45 MLP step over glibc's 32 MiB mmap threshold (docs/benchmarks.md)."""
  config = dataclasses.replace(
    TINY, model_options={"hidden": (128,)}, code=code, aggregator="draco", num_workers=15,
    num_adversaries=2, num_devices=1, attack="reverse_gradient",
  )  # fmt: skip
  trainer = train.make_trainer(config)
  state = trainer.init_state()
  batch, key = trainer.step_inputs(0)
  memory = trainer.update_fn.lower(state, batch, key).compile().memory_analysis()
  d = ravel_pytree(state.params)[0].size
  assert memory.temp_size_in_bytes < 2.6 * 15 * d * 4  # measured 2.14 (cyclic), 2.34; was 3.1


def test_worker_compute_is_validated():
  with pytest.raises(ValueError, match="worker_compute must be one of shared, per_worker"):
    validate(TrainConfig(worker_compute="pooled"))
