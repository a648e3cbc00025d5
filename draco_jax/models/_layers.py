"""Small building blocks shared by the convolutional models."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["scale_channels", "group_norm", "conv3x3", "global_avg_pool", "check_input_shape"]

_MAX_GROUPS = 32


def scale_channels(channels: int, width: float) -> int:
  """Channels after a width multiplier: ``round(channels * width)``, at least 1."""
  return max(1, int(round(channels * width)))


def group_norm(channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm with ``gcd(channels, 32)`` groups, so tiny widths stay valid."""
  return nnx.GroupNorm(channels, num_groups=math.gcd(channels, _MAX_GROUPS), rngs=rngs)


def conv3x3(in_channels: int, out_channels: int, rngs: nnx.Rngs, *, strides: int = 1) -> nnx.Conv:
  """3x3 SAME convolution without bias (a normalization layer follows), He-initialised."""
  return nnx.Conv(
    in_channels,
    out_channels,
    (3, 3),
    strides=strides,
    padding="SAME",
    use_bias=False,
    kernel_init=nnx.initializers.he_normal(),
    rngs=rngs,
  )


def global_avg_pool(x_NxHxWxC: jax.Array) -> jax.Array:
  """Mean over the spatial axes: [N, H, W, C] -> [N, C]."""
  return jnp.mean(x_NxHxWxC, axis=(1, 2))


def check_input_shape(input_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
  """Validates a per-example ``(H, W, C)`` shape and returns it as a tuple of ints."""
  shape = tuple(int(d) for d in input_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(
      f"{name}: input_shape must be (H, W, C) with positive sizes, got {input_shape}"
    )
  return shape
