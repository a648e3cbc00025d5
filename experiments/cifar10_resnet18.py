r"""The paper's CIFAR-10 experiment with ResNet-18, 15 workers (GPU hosts).

Reproduces Chen et al. (ICML 2018), §5, CIFAR-10 with ResNet-18 (CIFAR variant, GroupNorm
instead of BatchNorm so that honest replicas of a partition gradient are bit-identical; see
``draco_jax/models/resnet.py``; D = 11,173,962): DRACO (repetition and cyclic codes) against the
undefended mean and the robust aggregators (geometric median, Krum, coordinate-wise median,
trimmed mean, Bulyan) under the reverse-gradient and constant attacks, S in {1, 2} of P = 15
workers, plus the adversary-free reference. The cluster is simulated on one host: time is
reported as measured wall time and as projected cluster time (``experiments/run.py``).

CIFAR-10 is downloaded on first use (170 MB, SHA-256 checked, kept as a ``.npz`` in the data
directory; no TensorFlow, no preparation; ``draco_jax/downloads.py``). ``--data_dir DIR``
(optional) chooses that directory. Command, on a networked machine:

    python -m experiments.run cifar10_resnet18 --out results/cifar10_resnet18
    python -m experiments.report results/cifar10_resnet18/results.jsonl \
      --out results/cifar10_resnet18

Expected result (not yet measured: no GPU host has run it): DRACO's curves equal the reference
(~0.7 test accuracy after 2000 steps of 120 images), the mean collapses, and at D ~ 1.1e7 the
geometric median's and Krum's aggregation costs dominate their steps, so DRACO reaches 60%
several times sooner in projected time. Runtime: several hours on one modern GPU for the 33
runs (an estimate). Tests run it under ``tfds.testing.mock_data`` with ``--tiny`` (width 4, one
residual stage, two methods, a few steps).
"""

from __future__ import annotations

from draco_jax.config import TrainConfig
from experiments.grid import Preset

__all__ = ["PRESET"]

PRESET = Preset(
  name="cifar10_resnet18",
  doc=__doc__,
  base=TrainConfig(
    dataset="cifar10",
    model="resnet18",
    optimizer="momentum",
    learning_rate=0.05,
    steps=2000,
    eval_every=100,
  ),
  tiny={
    "model_options": {"width": 4, "stage_sizes": (1,)},
    "batch_per_partition": 2,
    "steps": 2,
    "eval_every": 1,
    "num_devices": 1,
  },
  attacks=("reverse_gradient", "constant"),
  adversaries=(1, 2),
  target_accuracy=0.6,
  tiny_methods=("draco_cyclic", "geometric_median"),
)
