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

Expected result (measured on 2 shared CPU cores on 2026-12-01; ``report.md`` has every
number): both DRACO curves equal the adversary-free curve at every evaluation (max |difference|
0.000; 0.978 test accuracy at step 100), the undefended mean stays at chance (0.08-0.10), and
Krum never reaches 95%. DRACO's combine (the server's decode of the received messages; the
attack is timed apart) takes 1.0-1.8 ms: 2-3x below Krum's 2.9-3.5 ms, 3-6x below the
sort-based rules' 5.3-9.4 ms and 15-25x below the geometric median's 23-32 ms (P = 15,
D = 85k; ``combine_timing.png`` shows the gap growing with P and D). Time to 95% test
accuracy: DRACO is 9.0-16.6x faster than the geometric median in projected cluster time, and
1.0-1.7x in measured wall time on this host, which computes all R x P partition gradients of
the simulated workers.

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
