"""LeNet-5 style convolutional network (LeCun et al., 1998), modernised.

conv5x5(6w) -> ReLU -> maxpool2 -> conv5x5(16w) -> ReLU -> maxpool2 -> FC(120w) -> FC(84w) -> FC.
Differences from the 1998 net: ReLU and max pooling instead of tanh/sigmoid and subsampling, and
SAME padding with ceil-mode pooling so small inputs (8x8 digits) fit; on 28x28 MNIST the flattened
feature map is 7x7x16. Like every model here it has only ``nnx.Param`` state and no dropout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from draco_jax.models._layers import check_input_shape, scale_channels

__all__ = ["LeNet"]


def _pool(x_NxHxWxC: jax.Array) -> jax.Array:
  return nnx.max_pool(x_NxHxWxC, (2, 2), strides=(2, 2), padding="SAME")


class LeNet(nnx.Module):
  """LeNet-5 style classifier with a width multiplier."""

  def __init__(
    self,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
    width: float = 1.0,
  ):
    """Builds the network.

    Args:
      num_classes: number of output logits.
      input_shape: per-example shape (H, W, C).
      rngs: initialisation keys.
      width: multiplier on every channel and hidden size (6, 16, 120, 84); 1.0 is LeNet-5.
    """
    height, width_px, channels = check_input_shape(input_shape, "lenet")
    c1, c2, f1, f2 = (scale_channels(c, width) for c in (6, 16, 120, 84))
    self.conv1 = nnx.Conv(channels, c1, (5, 5), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (5, 5), padding="SAME", rngs=rngs)
    pooled = math.ceil(math.ceil(height / 2) / 2) * math.ceil(math.ceil(width_px / 2) / 2)
    self.fc1 = nnx.Linear(pooled * c2, f1, rngs=rngs)
    self.fc2 = nnx.Linear(f1, f2, rngs=rngs)
    self.head = nnx.Linear(f2, num_classes, rngs=rngs)

  def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
    """Returns float32 logits [N, num_classes]."""
    x = _pool(jax.nn.relu(self.conv1(x_NxHxWxC.astype(jnp.float32))))
    x = _pool(jax.nn.relu(self.conv2(x)))
    x_NxF = jnp.reshape(x, (x.shape[0], -1))
    x_NxF = jax.nn.relu(self.fc1(x_NxF))
    x_NxF = jax.nn.relu(self.fc2(x_NxF))
    return self.head(x_NxF)
