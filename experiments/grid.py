"""The methods a comparison preset runs, and the grid of (method, TrainConfig) it is made of.

A preset is one :class:`Preset` record: the base config (overriding only what differs from
the default), what tests shrink, the attacks and adversary counts it sweeps and the target
accuracy of its time-to-accuracy table; ``Preset.grid(tiny)`` is its list of runs.

Every method under every (attack, S) is one run; the adversary-free reference (plain mean, no
attack) is one more run shared by every panel: DRACO's accuracy curve must equal it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from draco_jax import aggregators
from draco_jax.config import DECODER, TrainConfig, validate

__all__ = [
  "METHODS",
  "DRACO_METHODS",
  "REFERENCE",
  "BASELINE",
  "Run",
  "method_config",
  "reference_config",
  "infeasible",
  "comparison_grid",
  "Preset",
]

# How each method is built: the code and its combiner (DRACO decoders need a real code).
METHODS: dict[str, dict[str, str]] = {
  "draco_repetition": {"code": "repetition", "aggregator": DECODER},
  "draco_cyclic": {"code": "cyclic", "aggregator": DECODER},
  "mean": {"code": "uncoded", "aggregator": "mean"},
  "geometric_median": {"code": "uncoded", "aggregator": "geometric_median"},
  "krum": {"code": "uncoded", "aggregator": "krum"},
  "coordinate_median": {"code": "uncoded", "aggregator": "coordinate_median"},
  "trimmed_mean": {"code": "uncoded", "aggregator": "trimmed_mean"},
  "bulyan": {"code": "uncoded", "aggregator": "bulyan"},
}
DRACO_METHODS = tuple(m for m, spec in METHODS.items() if spec["aggregator"] == DECODER)
# The adversary-free run: plain mean of the uncoded gradients, nobody attacks.
REFERENCE = "reference"
# Speedups are measured against the geometric median, the paper's baseline.
BASELINE = "geometric_median"


class Run(NamedTuple):
  """One training run of a grid."""

  method: str  # a key of METHODS, or REFERENCE
  config: TrainConfig


def method_config(base: TrainConfig, method: str, attack: str, num_adversaries: int):
  """``base`` running ``method`` against ``num_adversaries`` = S workers sending ``attack``."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
  return dataclasses.replace(
    base, **METHODS[method], attack=attack, num_adversaries=num_adversaries
  )


def reference_config(base: TrainConfig) -> TrainConfig:
  """``base`` with no adversary: the plain mean of the uncoded partition gradients."""
  return dataclasses.replace(
    base, **METHODS["mean"], attack="none", num_adversaries=0, max_adversaries=-1
  )


def infeasible(config: TrainConfig) -> str | None:
  """Why ``config`` cannot run (e.g. R does not divide P, Bulyan needs P >= 4S+3), or None."""
  try:
    validate(config)
    if not config.is_coded:
      aggregators.make_aggregator(config.aggregator, config.num_workers, config.tolerance)
  except ValueError as err:
    return str(err)
  return None


def _with_accounting(base: TrainConfig) -> TrainConfig:
  """Every run logs every step (the runner sums per-step times) and checkpoints only at the end."""
  return dataclasses.replace(base, log_every=1, checkpoint_every=base.steps)


def comparison_grid(
  base: TrainConfig,
  *,
  methods: Iterable[str] = METHODS,
  attacks: Sequence[str],
  adversaries: Sequence[int],
) -> list[Run]:
  """The reference run, then every feasible method for each S in ``adversaries`` and attack.

  A method that the number of workers does not allow (the repetition code when 2S+1 does not
  divide P, Bulyan when P < 4S+3, ...) is left out of that panel.
  """
  base = _with_accounting(base)
  runs = [Run(REFERENCE, reference_config(base))]
  for s in adversaries:
    for attack in attacks:
      for method in methods:
        config = method_config(base, method, attack, s)
        if infeasible(config) is None:
          runs.append(Run(method, config))
  return runs


@dataclasses.dataclass(frozen=True)
class Preset:
  """One comparison experiment.

  Attributes:
    name: the registry key (``python -m experiments.run NAME``).
    doc: what it reproduces, the command, the expected result and runtime.
    base: the :class:`TrainConfig`, overriding only what differs from the default.
    tiny: what tests shrink on top of ``base`` (a few steps of a tiny model).
    attacks: the attacks it sweeps.
    adversaries: the adversary counts S it sweeps.
    target_accuracy: the test accuracy of the time-to-accuracy table.
    tiny_methods: the methods of the tiny grid (the full grid runs every method).
  """

  name: str
  doc: str
  base: TrainConfig
  tiny: Mapping
  attacks: tuple[str, ...]
  adversaries: tuple[int, ...]
  target_accuracy: float
  tiny_methods: tuple[str, ...] = tuple(METHODS)

  def grid(self, tiny: bool = False) -> list[Run]:
    """The runs (reference first): the full comparison, or (``tiny``) ``tiny_methods`` on the
    first panel of ``base`` shrunk by ``tiny``."""
    if not tiny:
      return comparison_grid(self.base, attacks=self.attacks, adversaries=self.adversaries)
    return comparison_grid(
      dataclasses.replace(self.base, **self.tiny),
      methods=self.tiny_methods,
      attacks=self.attacks[:1],
      adversaries=self.adversaries[:1],
    )
