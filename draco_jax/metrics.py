"""What a run measures, under which names: one step's metrics, a metrics.jsonl line, the timed
phases.

Every reader of a run's files (the summary, ``experiments/run.py``) takes these names from here.
Shape legend: P workers, D flattened parameters.
"""

from __future__ import annotations

import jax.numpy as jnp

from draco_jax import contract

__all__ = [
  "LOSS",
  "ACCURACY",
  "OK",
  "FLAGGED_FRACTION",
  "ADVERSARIES",
  "FLAGGED_ADVERSARIES",
  "HONEST",
  "FLAGGED_HONEST",
  "DEVIATION",
  "GRAD_NORM",
  "ITERATIONS",
  "STEP_METRICS",
  "STEP",
  "TEST_ACCURACY",
  "TIMING",
  "WALL_TIME",
  "MS_PER_STEP",
  "GRADIENTS",
  "ENCODE",
  "ATTACK",
  "COMBINE",
  "UPDATE",
  "CLEAN",
  "PHASES",
  "WHOLE_STEP",
  "step_metrics",
]

# One step's metrics: train_step's dict and the fields of every metrics.jsonl line.
LOSS = "loss"  # mean training loss over the K partitions, on their true labels
ACCURACY = "accuracy"  # mean training-batch accuracy, likewise
OK = "ok"  # 1.0: the combiner's report.ok held and the update was applied
FLAGGED_FRACTION = "flagged_fraction"  # FLAGGED_ADVERSARIES / max(ADVERSARIES, 1)
ADVERSARIES = "adversaries"  # adversarial rows this step
FLAGGED_ADVERSARIES = "flagged_adversaries"  # ... of them flagged by the combiner
HONEST = "honest"  # rows neither adversarial nor missing (stragglers)
FLAGGED_HONEST = "flagged_honest"  # ... of them flagged by the combiner
DEVIATION = "deviation"  # ‖combined − clean mean‖ / ‖clean mean‖
GRAD_NORM = "grad_norm"  # ‖clean mean‖
ITERATIONS = "iterations"  # the combiner's report.iterations
STEP_METRICS = (
  LOSS,
  ACCURACY,
  OK,
  FLAGGED_FRACTION,
  ADVERSARIES,
  FLAGGED_ADVERSARIES,
  HONEST,
  FLAGGED_HONEST,
  DEVIATION,
  GRAD_NORM,
  ITERATIONS,
)

# What a metrics.jsonl line adds to them.
STEP = "step"  # steps done (1-based)
TEST_ACCURACY = "test_accuracy"  # at evaluation steps
TIMING = "timing_ms"  # at evaluation steps: {phase: ms}, empty unless config.timing
WALL_TIME = "wall_time"  # s since the loop started (evaluations and timings included)
MS_PER_STEP = "ms_per_step"  # mean ms of the steps since the previous line

# The timed phases of a step (keys of TIMING, in the order the step runs them), each one of
# the step's own functions (draco_jax.step.StepPhases), and the whole jitted step.
# The partition gradients (draco_jax.compute): worker_compute="shared": the K partitions once
# (and their losses), plus the data poisoners' R each; "per_worker": every worker's R.
GRADIENTS = "gradients"
# Every worker's message (shared: from the exchanged partition gradients), delivered to the
# server (all-gather or all_to_all).
ENCODE = "encode"
ATTACK = "attack"  # the adversaries' rewrite and the stragglers' missing rows
COMBINE = "combine"  # the server's decoder or aggregator
UPDATE = "update"  # the optax update
# The diagnostic clean mean gradient, loss and accuracy (shared: the means of the K gradients
# already evaluated; per_worker: a second pass over the K partitions).
CLEAN = "clean"
PHASES = (GRADIENTS, ENCODE, ATTACK, COMBINE, UPDATE, CLEAN)
WHOLE_STEP = "step"

_EPS = 1e-30


def step_metrics(loss, acc, clean_D, mean_D, report: contract.Report, mask_P, straggle_P) -> dict:
  """The step's metrics (device scalars) from its diagnostic, its mean and its report."""
  honest_P = ~mask_P & ~straggle_P
  deviation = jnp.linalg.norm(jnp.real(mean_D) - clean_D) / (jnp.linalg.norm(clean_D) + _EPS)
  adversaries = jnp.sum(mask_P.astype(jnp.int32))
  flagged_adversaries = jnp.sum((report.flagged & mask_P).astype(jnp.int32))
  return {
    LOSS: loss,
    ACCURACY: acc,
    OK: report.ok,
    FLAGGED_FRACTION: flagged_adversaries / jnp.maximum(adversaries, 1),
    ADVERSARIES: adversaries,
    FLAGGED_ADVERSARIES: flagged_adversaries,
    HONEST: jnp.sum(honest_P.astype(jnp.int32)),
    FLAGGED_HONEST: jnp.sum((report.flagged & honest_P).astype(jnp.int32)),
    DEVIATION: deviation,
    GRAD_NORM: jnp.linalg.norm(clean_D),
    ITERATIONS: report.iterations,
  }
