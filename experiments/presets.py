"""The registry of experiment presets: name -> :class:`~experiments.grid.Preset` record.

Each preset's module (``experiments/offline.py`` and its siblings) is a config file in the
big_vision sense: it holds one ``PRESET``, and its docstring, kept as ``Preset.doc``, names what
it reproduces, the command, the expected result and the runtime.
"""

from __future__ import annotations

from experiments import cifar10_resnet18, cifar10_vgg, mnist_fc, offline
from experiments.grid import Preset

__all__ = ["Preset", "PRESETS", "get_preset"]


PRESETS: dict[str, Preset] = {
  p.name: p for p in (offline.PRESET, mnist_fc.PRESET, cifar10_resnet18.PRESET, cifar10_vgg.PRESET)
}


def get_preset(name: str) -> Preset:
  """The preset ``name``; a ValueError lists the valid names."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
  return PRESETS[name]
