"""Flax nnx models for draco-jax, chosen by name.

Every model is built as ``cls(*, num_classes, input_shape, rngs, **options)`` and called as
``logits_NxC = model(x_NxHxWxC)`` (float32, deterministic: no dropout, no batch statistics).
Models hold only ``nnx.Param`` state, so the functional pattern used by the training step works:

    graphdef, params = nnx.split(model, nnx.Param)
    logits_NxC = nnx.merge(graphdef, params)(x_NxHxWxC)

including under ``jax.jit`` and ``jax.vmap(jax.grad(loss))`` over partitions.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from flax import nnx

from draco_jax import contract
from draco_jax.models.lenet import LeNet
from draco_jax.models.mlp import MLP
from draco_jax.models.resnet import ResNet
from draco_jax.models.vgg import VGG

__all__ = ["MODELS", "make_model", "model_options", "MLP", "LeNet", "ResNet", "VGG"]

MODELS: dict[str, type[nnx.Module]] = {
  "mlp": MLP,
  "lenet": LeNet,
  "resnet18": ResNet,
  "vgg": VGG,
}

_REQUIRED = ("num_classes", "input_shape", "rngs")


def model_options(name: str) -> dict[str, Any]:
  """The options a model accepts, with their defaults.

  Args:
    name: a key of :data:`MODELS`.

  Returns:
    ``{option: default}`` for every keyword besides ``num_classes``, ``input_shape``, ``rngs``.

  Raises:
    ValueError: ``name`` is not a registered model.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)}")
  params = inspect.signature(MODELS[name].__init__).parameters
  return {k: p.default for k, p in params.items() if k != "self" and k not in _REQUIRED}


def make_model(
  name: str, *, num_classes: int, input_shape: Sequence[int], rngs: nnx.Rngs, **options: Any
) -> nnx.Module:
  """Builds a registered model.

  Args:
    name: a key of :data:`MODELS` ("mlp", "lenet", "resnet18", "vgg").
    num_classes: number of output logits.
    input_shape: per-example image shape (H, W, C), without the batch axis.
    rngs: initialisation keys, e.g. ``nnx.Rngs(0)``.
    **options: model-specific options (see :func:`model_options`), e.g. ``width``.

  Returns:
    The model; ``model(x_NxHxWxC)`` returns float32 logits [N, num_classes].

  Raises:
    ValueError: unknown model name or option, or a non-positive ``num_classes``.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)}")
  contract.check_options(f"model {name!r}", MODELS[name].__init__, options)
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  return MODELS[name](
    num_classes=int(num_classes), input_shape=tuple(input_shape), rngs=rngs, **options
  )
