r"""The paper's MNIST experiment: the 784-800-500-10 fully connected net, 15 workers (GPU hosts).

Reproduces Chen et al. (ICML 2018), §5, MNIST with the fully connected network (two hidden
layers of 800 and 500 ReLU units, D = 1,033,510 parameters): DRACO (repetition and cyclic codes)
against the undefended mean and the robust aggregators (geometric median, Krum,
coordinate-wise median, trimmed mean, Bulyan) under the reverse-gradient and constant attacks,
S in {1, 2} of P = 15 workers, plus the adversary-free reference. Deviation from the paper: the
cluster is simulated on one host, so time is reported twice (measured wall time and the
projected cluster time, see ``experiments/run.py``).

MNIST is downloaded on first use (12 MB, SHA-256 checked, kept as a ``.npz`` in the data
directory; no TensorFlow, no preparation; ``draco_jax/downloads.py``). ``--data_dir DIR``
(optional) chooses that directory, and is also where a tfds-prepared copy is looked for first.
Command, on a networked machine:

    python -m experiments.run mnist_fc --out results/mnist_fc
    python -m experiments.report results/mnist_fc/results.jsonl --out results/mnist_fc

Expected result (not yet measured: no GPU host has run it): DRACO's curves equal the reference
(~0.97-0.98 test accuracy after 1000 steps of 240 examples), the mean collapses to chance, and
the geometric median's aggregation over D ~ 1e6 dominates its step, so DRACO reaches 95% several
times sooner in projected time. Runtime: roughly 30-60 minutes on one modern GPU for the 33
runs (an estimate; the sort-based rules dominate). Tests run it under ``tfds.testing.mock_data``
with ``--tiny`` (a 16-unit net, two methods, a few steps).
"""

from __future__ import annotations

from draco_jax.config import TrainConfig
from experiments.grid import Preset

__all__ = ["PRESET"]

PRESET = Preset(
  name="mnist_fc",
  doc=__doc__,
  base=TrainConfig(
    dataset="mnist",
    model_options={"hidden": (800, 500)},
    learning_rate=1e-3,
    batch_per_partition=16,
    steps=1000,
    eval_every=50,
  ),
  tiny={
    "model_options": {"hidden": (16,)},
    "batch_per_partition": 2,
    "steps": 4,
    "eval_every": 2,
    "num_devices": 1,
  },
  attacks=("reverse_gradient", "constant"),
  adversaries=(1, 2),
  target_accuracy=0.95,
  tiny_methods=("draco_cyclic", "geometric_median"),
)
