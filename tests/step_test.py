"""Tests for draco_jax.step and draco_jax.trainer.time_phases: the step is its phases, chained.

conftest.py simulates 8 CPU devices; each trainer compiles its step once and each phase once.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from draco_jax import metrics, train
from draco_jax.config import TrainConfig

CONFIG = TrainConfig(
  num_workers=8,
  num_adversaries=2,
  num_devices=8,
  model_options={"hidden": (16,)},
  optimizer="sgd",
  learning_rate=0.1,
  batch_per_partition=4,
  timing=False,
)
# A coordinate-wise attack, a random payload (drawn per column slice when sharded) and a data
# attack, on the DRACO decoder and on a baseline that selects rows.
ATTACKS = ("reverse_gradient", "gaussian", "label_flip")
STEPS = 3
# Metrics that count or decide, and metrics that measure (the deviation is a ratio of rounding
# errors, which differ between the fused and the phase-by-phase programs).
EXACT = (
  metrics.OK,
  metrics.ADVERSARIES,
  metrics.FLAGGED_ADVERSARIES,
  metrics.HONEST,
  metrics.FLAGGED_HONEST,
  metrics.ITERATIONS,
)
CLOSE = (metrics.LOSS, metrics.ACCURACY, metrics.GRAD_NORM)


def _flat(state):
  return np.asarray(ravel_pytree(state.params)[0])


@functools.cache
def _trainer(combine_sharding: str, aggregator: str):
  code = "cyclic" if aggregator == "draco" else "uncoded"
  config = dataclasses.replace(
    CONFIG, code=code, aggregator=aggregator, combine_sharding=combine_sharding
  )
  return train.make_trainer(config, attack_names=ATTACKS)


def _by_hand(phases: train.StepPhases, state, batch, key):
  """The step written out phase by phase, each phase its own jitted program."""
  mask_P, straggle_P, poison_P = phases.masks(key, state.step, batch.attack)
  grads = phases.gradients(state.params, poison_P, batch.x, batch.y)
  sent = phases.encode(grads)
  received = phases.attack(key, sent, mask_P, straggle_P, batch.attack)
  mean_D, report = phases.combine(key, received)
  new_state = phases.update(state, mean_D, report.ok)
  loss, acc, clean_D = phases.clean(state.params, batch.x, batch.y, grads)
  return new_state, phases.metrics(loss, acc, clean_D, mean_D, report, mask_P, straggle_P)


@pytest.mark.parametrize(
  "combine_sharding, aggregator",
  [("replicated", "draco"), ("sharded", "draco"), ("sharded", "krum")],
)
def test_the_timed_phases_are_the_step(combine_sharding, aggregator):
  """Chaining the trainer's jitted phases by hand gives the jitted step's state and metrics:
  timing a phase times what the step runs, replicated and sharded."""
  trainer = _trainer(combine_sharding, aggregator)
  jitted = by_hand = trainer.init_state()
  for step in range(STEPS):
    batch, key = trainer.step_inputs(step, step % len(ATTACKS))
    jitted, want = trainer.update_fn(jitted, batch, key)
    by_hand, got = _by_hand(trainer.phases, by_hand, batch, key)
    # Equal up to float32 rounding: XLA fuses across the phases of the one-program step.
    assert int(by_hand.step) == int(jitted.step) and int(by_hand.skipped) == int(jitted.skipped)
    np.testing.assert_allclose(_flat(by_hand), _flat(jitted), rtol=1e-6, atol=1e-7)
    got, want = jax.device_get(got), jax.device_get(want)
    assert {k: got[k] for k in EXACT} == {k: want[k] for k in EXACT}, step
    np.testing.assert_allclose([got[k] for k in CLOSE], [want[k] for k in CLOSE], rtol=1e-5)
    assert bool(want[metrics.OK])
    assert aggregator != "draco" or int(want[metrics.FLAGGED_ADVERSARIES]) == 2


def test_time_phases_times_every_phase_and_changes_nothing():
  trainer = _trainer("sharded", "draco")
  state = trainer.init_state()
  timing = train.time_phases(trainer, state, 0, repeats=1)
  assert list(timing) == [*metrics.PHASES, metrics.WHOLE_STEP]
  assert all(ms > 0 for ms in timing.values())
  assert int(state.step) == 0
  assert set(metrics.PHASES) < set(train.StepPhases._fields)
