"""Tests for draco_jax.summary: what a run's summary says (host-side only, no training)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draco_jax import aggregators, summary
from draco_jax.config import TrainConfig

DRACO = TrainConfig()
BASELINE = dataclasses.replace(DRACO, code="uncoded", aggregator="mean", attack="nan")
RESULTS = {
  "test_accuracy": 0.9,
  "final_step": 10,
  "total_skipped_steps": 0,
  "steps_run": 10,
  "skipped_steps": 0,
  "flagged_fraction": 0.0,
  "honest_flagged_fraction": 0.0,
  "deviation_mean": 1e-7,
  "deviation_max": 2e-7,
  "wall_time_s": 1.0,
  "steps_per_second": 10.0,
  "timing_ms": {},
  "devices": 1,
  "processes": 1,
  "workdir": "/tmp/run",
  "warnings": [],
}


def _line(config, label, **results):
  text = summary.summary_text(config, {**RESULTS, **results})
  (line,) = [line for line in text.splitlines() if line.startswith(label)]
  return line[len(label) :].strip()


@pytest.mark.parametrize(
  "config, header",
  [
    (
      DRACO,
      "== DRACO run summary: cyclic code, DRACO decoder; P=15, S=2, t=2; attack "
      "reverse_gradient, random placement; mlp on digits ==",
    ),
    (
      dataclasses.replace(BASELINE, num_workers=5, num_adversaries=1, num_stragglers=1),
      "== Baseline run summary: mean aggregator, uncoded; P=5, S=1, t=1, e=1; attack nan, "
      "random placement; mlp on digits ==",
    ),
  ],
)
def test_the_summary_starts_with_what_was_run(config, header):
  assert summary.summary_text(config, RESULTS).splitlines()[0] == header


def test_a_baseline_is_not_titled_draco():
  assert "DRACO" not in summary.header(BASELINE)
  assert "DRACO" not in summary.header(dataclasses.replace(BASELINE, aggregator="krum"))


@pytest.mark.parametrize("aggregator", aggregators.FLAGS_ONLY_NON_FINITE)
def test_rules_that_cannot_flag_show_na(aggregator):
  config = dataclasses.replace(BASELINE, aggregator=aggregator, attack="reverse_gradient")
  assert _line(config, "adversarial rows flagged") == (
    f"n/a: {aggregator} flags only non-finite rows"
  )
  assert _line(config, "honest rows flagged").startswith("n/a")
  # NaN rows are flagged all the same: the fraction is shown, with what it counts.
  assert _line(config, "adversarial rows flagged", flagged_fraction=1.0).startswith("1.0000 (")


@pytest.mark.parametrize("config", [DRACO, dataclasses.replace(BASELINE, aggregator="krum")])
def test_rules_that_flag_show_their_fractions(config):
  assert _line(config, "adversarial rows flagged") == "0.0000"
  assert _line(config, "honest rows flagged", honest_flagged_fraction=0.25) == "0.2500"
  assert _line(dataclasses.replace(config, attack="none"), "adversarial rows flagged") == (
    "n/a: no adversary attacks"
  )


def test_an_empty_timing_line_is_not_printed():
  assert "phase timing" not in summary.summary_text(DRACO, RESULTS)
  timed = {**RESULTS, "timing_ms": {"gradients": 1.0, "step": 2.0}}
  assert _line(DRACO, "phase timing (ms)", **timed) == "gradients 1.00, step 2.00"


@pytest.mark.parametrize("name", aggregators.AGGREGATORS)
def test_only_the_selecting_rules_flag_finite_rows(name):
  """The contract behind n/a: FLAGS_ONLY_NON_FINITE rules never flag a finite row, even a far
  outlier; the other rules drop it."""
  x_PxD = jax.random.normal(jax.random.key(0), (11, 16)).at[0].mul(1e3)
  _, report = aggregators.make_aggregator(name, 11, 2)(x_PxD, jax.random.key(1))
  assert bool(report.flagged[0]) == (name not in aggregators.FLAGS_ONLY_NON_FINITE)
  nan_PxD = x_PxD.at[1].set(jnp.nan)
  _, report = aggregators.make_aggregator(name, 11, 2)(nan_PxD, jax.random.key(1))
  assert bool(report.flagged[1])
  assert np.all(np.asarray(report.flagged[2:]) <= (name not in aggregators.FLAGS_ONLY_NON_FINITE))
