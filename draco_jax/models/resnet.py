"""ResNet-18, CIFAR variant (He et al., 2016), with GroupNorm instead of BatchNorm.

CIFAR variant: a 3x3 stride-1 stem and no max pool, then four stages of basic blocks
(``stage_sizes=(2, 2, 2, 2)``) with ``width * (1, 2, 4, 8)`` channels and strides 1, 2, 2, 2,
global average pooling and a linear head. The first block of a stage uses a 1x1 projection
shortcut when the shape changes.

Why GroupNorm (Wu & He, 2018) and not BatchNorm: the DRACO step computes the gradient of every
partition with ``vmap(grad(loss))`` and the ``2S+1`` honest replicas of a partition gradient
must be bit-identical so that the decoder can take a majority vote / solve the code exactly. That
holds only if the loss is a pure function of (params, partition data). BatchNorm breaks it in
two ways: (1) its running mean/variance are mutable state updated by every worker, an extra
state channel that DRACO neither encodes nor aggregates, so an adversary could corrupt it
unchecked and honest workers would drift apart; (2) in training mode its output depends on batch
statistics, coupling examples, and its state would have to be threaded through the step.
GroupNorm normalises each example on its own, has only ``nnx.Param`` state (scale and bias,
which are protected by the code like every other parameter), and behaves the same in training
and evaluation. The group count is ``gcd(channels, 32)`` so that tiny test widths stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from draco_jax.models._layers import check_input_shape, conv3x3, global_avg_pool, group_norm

__all__ = ["ResNet", "BasicBlock"]


class BasicBlock(nnx.Module):
  """conv3x3-GN-ReLU-conv3x3-GN plus (projected) shortcut, then ReLU."""

  def __init__(self, in_channels: int, out_channels: int, *, strides: int, rngs: nnx.Rngs):
    """Builds the block; a 1x1 projection shortcut is used when the shape changes."""
    self.conv1 = conv3x3(in_channels, out_channels, rngs, strides=strides)
    self.norm1 = group_norm(out_channels, rngs)
    self.conv2 = conv3x3(out_channels, out_channels, rngs)
    self.norm2 = group_norm(out_channels, rngs)
    self.project = strides != 1 or in_channels != out_channels
    if self.project:
      self.shortcut_conv = nnx.Conv(
        in_channels,
        out_channels,
        (1, 1),
        strides=strides,
        use_bias=False,
        kernel_init=nnx.initializers.he_normal(),
        rngs=rngs,
      )
      self.shortcut_norm = group_norm(out_channels, rngs)

  def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
    """Applies the block."""
    y = jax.nn.relu(self.norm1(self.conv1(x_NxHxWxC)))
    y = self.norm2(self.conv2(y))
    shortcut = x_NxHxWxC
    if self.project:
      shortcut = self.shortcut_norm(self.shortcut_conv(x_NxHxWxC))
    return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
  """CIFAR ResNet with basic blocks; the defaults give ResNet-18 (11.2M params on CIFAR-10)."""

  def __init__(
    self,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
    width: int = 64,
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
  ):
    """Builds the network.

    Args:
      num_classes: number of output logits.
      input_shape: per-example shape (H, W, C).
      rngs: initialisation keys.
      width: channels of the stem and first stage; stage i has ``width * 2**i``.
      stage_sizes: number of basic blocks per stage; ``(2, 2, 2, 2)`` is ResNet-18.
    """
    _, _, channels = check_input_shape(input_shape, "resnet18")
    if int(width) < 1 or not stage_sizes or min(stage_sizes) < 1:
      raise ValueError(
        f"resnet18: need width >= 1 and non-empty positive stage_sizes, got {width=}, "
        f"{stage_sizes=}"
      )
    width = int(width)
    self.stem_conv = conv3x3(channels, width, rngs)
    self.stem_norm = group_norm(width, rngs)
    blocks = []
    in_channels = width
    for stage, num_blocks in enumerate(stage_sizes):
      out_channels = width * 2**stage
      for block in range(int(num_blocks)):
        strides = 2 if stage > 0 and block == 0 else 1
        blocks.append(BasicBlock(in_channels, out_channels, strides=strides, rngs=rngs))
        in_channels = out_channels
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(in_channels, num_classes, rngs=rngs)

  def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
    """Returns float32 logits [N, num_classes]."""
    x = jax.nn.relu(self.stem_norm(self.stem_conv(x_NxHxWxC.astype(jnp.float32))))
    for block in self.blocks:
      x = block(x)
    return self.head(global_avg_pool(x))
