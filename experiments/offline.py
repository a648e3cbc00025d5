r"""Offline comparison: DRACO vs robust aggregators on sklearn digits, 15 simulated workers.

Reproduces, at laptop scale, the paper's end-to-end comparison (Chen et al., ICML 2018, §5):
DRACO trains the model that adversary-free training trains, while the undefended mean
collapses and median-type rules pay a per-step aggregation cost that grows with P and D.
P = 15 workers, S in {1, 2} adversaries drawn at random each step, sending ``reverse_gradient``
(-100 x their message) or ``constant`` (-100 everywhere). Methods: DRACO repetition (R = 3 for
S = 1, R = 5 for S = 2; both divide 15) and cyclic codes; mean (no defence), geometric median,
Krum, coordinate-wise median, trimmed mean and Bulyan (P >= 4S+3 holds for both S); plus the
adversary-free reference run. The model is the paper's two-hidden-layer MLP scaled to 8x8
inputs: 64-256-256-10, D = 85,002 parameters (large enough for aggregation cost to show).

Command:

    python -m experiments.run offline --out results/offline
    python -m experiments.report results/offline/results.jsonl --out results/offline

Expected result (the measured figures are the README's headline table, "Results: DRACO vs
robust aggregation", and ``docs/offline_report.md``): both DRACO curves equal the
adversary-free curve at every evaluation, the undefended mean stays at chance, Krum does not
reach 95%, and DRACO's combine costs a fraction of the robust rules' (``combine_timing.png``
shows the gap growing with P and D). DRACO reaches 95% several times sooner than the geometric
median in projected cluster time; in wall time on one host, where the simulator computes the
workers' gradients, the two are closer.

Runtime: 3-8 minutes in all on 2 CPU cores (33 runs in 2.5-5.5 minutes, the report and its
combiner timing sweep in 1-2 minutes), depending on what else the machine runs.
"""

from __future__ import annotations

from draco_jax.config import TrainConfig
from experiments.grid import Preset

__all__ = ["PRESET"]

PRESET = Preset(
  name="offline",
  doc=__doc__,
  base=TrainConfig(model_options={"hidden": (256, 256)}, steps=100, eval_every=5),
  # Tests: a tiny model, a few steps on one device, one panel (every method still runs).
  tiny={"model_options": {"hidden": (16,)}, "steps": 6, "eval_every": 3, "num_devices": 1},
  attacks=("reverse_gradient", "constant"),
  adversaries=(1, 2),
  target_accuracy=0.95,
)
