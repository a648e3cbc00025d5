"""The DRACO paper's fully connected MNIST network (784-800-500-10 with ReLU).

Chen et al. (ICML 2018), Section 5: a fully connected net with two hidden layers of 800 and 500
units. The input is flattened, so any (H, W, C) works (e.g. 8x8x1 sklearn digits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from draco_jax.models._layers import check_input_shape

__all__ = ["MLP"]


class MLP(nnx.Module):
  """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear logits."""

  def __init__(
    self,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
    hidden: Sequence[int] = (800, 500),
  ):
    """Builds the network.

    Args:
      num_classes: number of output logits.
      input_shape: per-example shape (H, W, C); only its product matters.
      rngs: initialisation keys.
      hidden: hidden layer sizes; ``(800, 500)`` is the paper's net.
    """
    sizes = (math.prod(check_input_shape(input_shape, "mlp")), *(int(h) for h in hidden))
    self.hidden = nnx.List(
      [nnx.Linear(n_in, n_out, rngs=rngs) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    )
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
    """Returns float32 logits [N, num_classes]."""
    x_NxF = jnp.reshape(x_NxHxWxC.astype(jnp.float32), (x_NxHxWxC.shape[0], -1))
    for layer in self.hidden:
      x_NxF = jax.nn.relu(layer(x_NxF))
    return self.head(x_NxF)
