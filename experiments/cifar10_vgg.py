r"""The paper's CIFAR-10 experiment with VGG, 15 workers (GPU hosts).

The ResNet-18 experiment (``experiments/cifar10_resnet18.py``: same data, attacks, methods,
optimizer and schedule) with VGG-16 (CIFAR variant, GroupNorm, global-average-pool head;
``draco_jax/models/vgg.py``; D = 14,724,042). The paper used a deeper VGG; depth 16 is the
deepest configuration here. CIFAR-10 is downloaded on first use (as for ResNet-18). Command, on
a networked machine:

    python -m experiments.run cifar10_vgg --out results/cifar10_vgg
    python -m experiments.report results/cifar10_vgg/results.jsonl --out results/cifar10_vgg

Expected result (not yet measured: no GPU host has run it): as for ResNet-18; the larger D
widens the gap between DRACO's O(P D) decoder and the geometric median and Krum. Runtime:
several hours on one modern GPU (an estimate). Tests run it under ``tfds.testing.mock_data``
with ``--tiny`` (VGG-11 at 1/16 width, DRACO and the reference, a few steps).
"""

from __future__ import annotations

import dataclasses

from experiments import cifar10_resnet18

__all__ = ["PRESET"]

_RESNET = cifar10_resnet18.PRESET
PRESET = dataclasses.replace(
  _RESNET,
  name="cifar10_vgg",
  doc=__doc__,
  base=dataclasses.replace(_RESNET.base, model="vgg"),
  tiny={**_RESNET.tiny, "model_options": {"depth": 11, "width": 1 / 16}},
  # VGG compiles slowly on CPU; the ResNet test covers the baselines with a conv net.
  tiny_methods=("draco_cyclic",),
)
