r"""The paper's CIFAR-10 experiment with VGG, 15 workers (GPU hosts).

The ResNet-18 experiment (``experiments/cifar10_resnet18.py``: same data, attacks, methods,
optimizer and schedule) with VGG-16 (CIFAR variant, GroupNorm, global-average-pool head;
``draco_jax/models/vgg.py``; D = 14,724,042). The paper used a deeper VGG; depth 16 is the
deepest configuration here. Command:

    python -m experiments.run cifar10_vgg --out results/cifar10_vgg --data_dir DIR
    python -m experiments.report results/cifar10_vgg/results.jsonl --out results/cifar10_vgg

Expected result (not yet measured: no GPU host has run it): as for ResNet-18; the larger D
widens the gap between DRACO's O(P D) decoder and the geometric median and Krum. Runtime:
several hours on one modern GPU (an estimate). Tests run it under ``tfds.testing.mock_data``
with ``--tiny`` (VGG-11 at 1/16 width, DRACO and the reference, a few steps).
"""

from __future__ import annotations

import dataclasses

from experiments import cifar10_resnet18, grid

__all__ = ["BASE", "TINY", "ATTACKS", "ADVERSARIES", "TARGET_ACCURACY", "get_grid"]

BASE = dataclasses.replace(cifar10_resnet18.BASE, model="vgg")
TINY = {**cifar10_resnet18.TINY, "model_options": {"depth": 11, "width": 1 / 16}}
# VGG compiles slowly on CPU; the ResNet test covers the baselines with a conv net.
TINY_METHODS = ("draco_cyclic",)
ATTACKS = cifar10_resnet18.ATTACKS
ADVERSARIES = cifar10_resnet18.ADVERSARIES
TARGET_ACCURACY = cifar10_resnet18.TARGET_ACCURACY


def get_grid(tiny: bool = False) -> list[grid.Run]:
  """The runs of this experiment (reference first); ``tiny`` shrinks it for tests."""
  return grid.preset_grid(
    BASE,
    tiny=tiny,
    tiny_overrides=TINY,
    attacks=ATTACKS,
    adversaries=ADVERSARIES,
    tiny_methods=TINY_METHODS,
  )
