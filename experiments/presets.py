"""The registry of experiment presets: name -> config module (see the package docstring)."""

from __future__ import annotations

from types import ModuleType

from experiments import cifar10_resnet18, cifar10_vgg, mnist_fc, offline

__all__ = ["PRESETS", "get_preset"]

PRESETS: dict[str, ModuleType] = {
  "offline": offline,
  "mnist_fc": mnist_fc,
  "cifar10_resnet18": cifar10_resnet18,
  "cifar10_vgg": cifar10_vgg,
}


def get_preset(name: str) -> ModuleType:
  """The preset module ``name``; a ValueError lists the valid names."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
  return PRESETS[name]
