"""VGG, CIFAR variant (Simonyan & Zisserman, 2015), with GroupNorm instead of BatchNorm.

Configurations A/B/D (``depth`` 11/13/16) of 3x3 SAME convolutions, each followed by GroupNorm
and ReLU, with 2x2 max pooling (SAME, so small inputs never shrink to zero). The CIFAR variant
replaces the three 4096-wide fully connected layers by global average pooling and one linear
head; on 32x32 inputs the last feature map is 1x1, so this equals the usual flatten + linear.

GroupNorm, not BatchNorm, for the reason given in :mod:`draco_jax.models.resnet`: the DRACO step
must be a pure function of params and partition data so that honest replicas of a partition
gradient are identical, and BatchNorm running statistics would be an extra state channel that
the code neither protects nor aggregates.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from draco_jax.models._layers import (
  check_input_shape,
  conv3x3,
  global_avg_pool,
  group_norm,
  scale_channels,
)

__all__ = ["VGG", "VGG_CONFIGS", "ConvNormRelu"]

# Channels of the 3x3 convolutions per stage; every stage ends with a 2x2 max pool.
VGG_CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
  11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
  13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
  16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}


class ConvNormRelu(nnx.Module):
  """3x3 conv -> GroupNorm -> ReLU."""

  def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
    """Builds the layer."""
    self.conv = conv3x3(in_channels, out_channels, rngs)
    self.norm = group_norm(out_channels, rngs)

  def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
    """Applies the layer."""
    return jax.nn.relu(self.norm(self.conv(x_NxHxWxC)))


class VGG(nnx.Module):
  """VGG-11/13/16 for small images, with a width multiplier."""

  def __init__(
    self,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
    depth: int = 16,
    width: float = 1.0,
  ):
    """Builds the network.

    Args:
      num_classes: number of output logits.
      input_shape: per-example shape (H, W, C).
      rngs: initialisation keys.
      depth: 11, 13 or 16 (VGG configurations A, B, D).
      width: multiplier on every channel count (64 ... 512).
    """
    if depth not in VGG_CONFIGS:
      raise ValueError(f"vgg: depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}")
    _, _, in_channels = check_input_shape(input_shape, "vgg")
    stages = []
    for stage_channels in VGG_CONFIGS[depth]:
      layers = []
      for channels in stage_channels:
        channels = scale_channels(channels, width)
        layers.append(ConvNormRelu(in_channels, channels, rngs=rngs))
        in_channels = channels
      stages.append(nnx.List(layers))
    self.stages = nnx.List(stages)
    self.head = nnx.Linear(in_channels, num_classes, rngs=rngs)

  def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
    """Returns float32 logits [N, num_classes]."""
    x = x_NxHxWxC.astype(jnp.float32)
    for stage in self.stages:
      for layer in stage:
        x = layer(x)
      x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return self.head(global_avg_pool(x))
