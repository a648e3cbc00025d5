"""The training configuration: one frozen dataclass, validated before anything is built.

Library code takes a :class:`TrainConfig`; only ``draco_jax.cli`` (the command line) reads flags.
Shape legend: P workers, S adversaries tolerated, t adversaries attacking, e stragglers.

Every name is checked against its registry (``coding.CODES``, ``attacks.ATTACKS``,
``placements.PLACEMENTS``, ``aggregators.AGGREGATORS``, ``models.MODELS``, ``data.DATASETS``,
:data:`OPTIMIZERS`) and every impossible combination raises ``ValueError`` naming the bad value
and the rule, so that a bad command line fails at start-up instead of deep inside JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import optax

from draco_jax import aggregators, attacks, coding, data, models, placements

__all__ = [
  "TrainConfig",
  "OPTIMIZERS",
  "DATA_ATTACKS",
  "DECODER",
  "COMBINE_SHARDINGS",
  "ASSIGNMENTS",
  "WORKER_COMPUTES",
  "DEFAULT_MODEL_OPTIONS",
  "TRAINING_GRADIENT_DTYPE",
  "make_optimizer",
  "validate",
]

# The dtype of the gradients training computes (and so of the messages of real codes).
TRAINING_GRADIENT_DTYPE = "float32"
# The combiner name that selects the DRACO decoder of a coded scheme.
DECODER = "draco"
# Attacks that poison the adversarial workers' data instead of their messages.
DATA_ATTACKS = ("label_flip",)
# Where the server's work runs: every device combines all gathered messages ("replicated"), or
# the messages stay sharded and each device combines a column slice ("sharded", see
# draco_jax/sharded.py).
COMBINE_SHARDINGS = ("replicated", "sharded")
# How code rows are assigned to workers each step (docs/math.md §5.6): a fresh secret
# permutation, or worker k always computing row k.
ASSIGNMENTS = ("random", "fixed")
# How the simulator produces the workers' messages (draco_jax/compute.py): the K partition
# gradients evaluated once and shared by every message, or every worker evaluating its own R.
WORKER_COMPUTES = ("shared", "per_worker")

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
  "sgd": optax.sgd,
  "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
  "adam": optax.adam,
}

# Small defaults so the offline default run is quick on 2 CPU cores.
DEFAULT_MODEL_OPTIONS: dict[str, dict[str, Any]] = {"mlp": {"hidden": (64,)}}

# Fields that may change when a run is resumed: they schedule the loop or say where things are,
# not what is computed (other device counts change only the rounding).
_RESUMABLE_FIELDS = (
  "steps",
  "eval_every",
  "log_every",
  "checkpoint_every",
  "timing",
  "resume",
  "num_devices",
  "data_dir",
  "overwrite",
  "over_capacity",
  "max_refused_fraction",
  "worker_compute",  # the same messages, computed another way
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. Defaults: the offline default job (digits, MLP, cyclic code, attacked).

  Attributes:
    code: a name in ``coding.CODES``; ``"uncoded"`` runs a baseline aggregator.
    num_workers: P (= K partitions per step).
    num_adversaries: t, adversarial workers per step.
    max_adversaries: S, the adversaries the code or aggregator is built to tolerate
      (-1: S = num_adversaries).
    attack: a name in ``attacks.ATTACKS`` or in :data:`DATA_ATTACKS`.
    placement: a kind in ``placements.PLACEMENTS``: which workers are adversarial each step.
    aggregator: :data:`DECODER` for coded schemes, a name in ``aggregators.AGGREGATORS`` for
      ``code="uncoded"``.
    model: a name in ``models.MODELS``.
    dataset: a name in ``data.DATASETS``.
    data_dir: where prepared datasets live (None: the data module's default).
    optimizer: a name in :data:`OPTIMIZERS`.
    learning_rate: the optimizer's learning rate.
    batch_per_partition: B, examples per partition (a step reads K·B examples).
    steps: total optimizer steps (skipped steps included).
    eval_every: steps between test-set evaluations (and phase timings).
    log_every: steps between metrics lines.
    checkpoint_every: steps between checkpoints (the last step is always saved).
    timing: time each phase of the step (separately jitted) at every evaluation.
    seed: seeds the parameters, the data order and every per-step key.
    resume: continue the run in the workdir: from its latest checkpoint, or from step 0 with
      the same config when it holds a config.json but no checkpoint yet.
    overwrite: delete the files of the run in the workdir (config.json, metrics.jsonl,
      results.json, checkpoints/, tensorboard/; nothing else) and start afresh. Without it (or
      ``resume``) a workdir holding another run's files is refused.
    over_capacity: allow more adversaries and stragglers than the code tolerates
      (2t + e > 2S), to study what the decoder does there (refused steps, forgeries); refused
      otherwise.
    max_refused_fraction: the run warns (stderr and top of the summary) when more than this
      fraction of its steps was refused (report.ok False, update skipped).
    num_stragglers: e, non-adversarial workers whose message is missing each step.
    num_devices: devices on the worker mesh (0 = all, or the most that divide P).
    combine_sharding: a value in :data:`COMBINE_SHARDINGS`: gather all P messages onto every
      device and combine them there, or keep them sharded and spread the combiner over the
      devices (each holds a D/N column slice of every message; ``draco_jax.sharded``).
    assignment: a value in :data:`ASSIGNMENTS`. ``random`` (coded schemes): each step the
      server draws a fresh secret permutation and worker k computes code row ``rows_P[k]``,
      so whichever workers are adversarial (a compromised rack: consecutive ids) hold
      uniformly random rows of the code; ``fixed``: worker k computes row k, to study
      worst-case placements. Uncoded baselines ignore it (their rows are interchangeable).
    worker_compute: a value in :data:`WORKER_COMPUTES`: how the simulator computes the
      messages, which are the same either way. ``shared``: each step evaluates the K
      partition gradients once, sharded over the devices, and forms every worker's message
      from them (a data poisoner's R gradients are evaluated again on its flipped labels);
      the clean-mean diagnostic reuses them. ``per_worker``: every worker evaluates its own R
      gradients and the diagnostic the K again, K·(R+1) per step, so that the ``gradients``
      phase measures what the P workers of a cluster compute (for timing one worker).
    model_options: keyword options of the model factory (None: :data:`DEFAULT_MODEL_OPTIONS`).
    attack_options: keyword options of the attack factory.
    combiner_options: keyword options of the decoder or aggregator factory.
  """

  code: str = "cyclic"
  num_workers: int = 15
  num_adversaries: int = 2
  max_adversaries: int = -1
  attack: str = "reverse_gradient"
  placement: str = "random"
  aggregator: str = DECODER
  model: str = "mlp"
  dataset: str = "digits"
  data_dir: str | None = None
  optimizer: str = "adam"
  learning_rate: float = 3e-3
  batch_per_partition: int = 8
  steps: int = 300
  eval_every: int = 100
  log_every: int = 10
  checkpoint_every: int = 100
  timing: bool = True
  seed: int = 0
  resume: bool = False
  overwrite: bool = False
  over_capacity: bool = False
  max_refused_fraction: float = 0.1
  num_stragglers: int = 0
  num_devices: int = 0
  combine_sharding: str = "replicated"
  assignment: str = "random"
  worker_compute: str = "shared"
  model_options: dict[str, Any] | None = None
  attack_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  combiner_options: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def tolerance(self) -> int:
    """S: the adversaries the code or aggregator is built for."""
    return self.num_adversaries if self.max_adversaries < 0 else self.max_adversaries

  @property
  def active_adversaries(self) -> int:
    """t: adversaries that actually attack (0 without an attack or a placement)."""
    return 0 if "none" in (self.attack, self.placement) else self.num_adversaries

  @property
  def is_coded(self) -> bool:
    return self.code != "uncoded"

  @property
  def beyond_capacity(self) -> bool:
    """A coded scheme facing more than it decodes: 2t + e > 2S (needs ``over_capacity``)."""
    budget = 2 * self.active_adversaries + self.num_stragglers
    return self.is_coded and budget > 2 * self.tolerance

  @property
  def resolved_model_options(self) -> dict[str, Any]:
    if self.model_options is None:
      return dict(DEFAULT_MODEL_OPTIONS.get(self.model, {}))
    return dict(self.model_options)

  def to_json(self) -> str:
    """The resolved configuration (model options filled in), as written to config.json."""
    fields = dataclasses.asdict(self)
    fields["model_options"] = self.resolved_model_options
    return json.dumps(fields, indent=2, sort_keys=True)

  def differences(self, other_json: str) -> list[str]:
    """Fields (other than loop scheduling) that differ from a saved ``to_json`` string."""
    mine, theirs = json.loads(self.to_json()), json.loads(other_json)
    return [
      f"{name}: saved {theirs.get(name)!r}, now {mine[name]!r}"
      for name in sorted(mine)
      if name not in _RESUMABLE_FIELDS and theirs.get(name) != mine[name]
    ]


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """The optax transformation named by ``config.optimizer``."""
  return OPTIMIZERS[config.optimizer](config.learning_rate)


def _check_name(kind: str, name: str, valid) -> None:
  if name not in valid:
    raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")


def _check_at_least(config: TrainConfig, minimum: int, *names: str) -> None:
  for name in names:
    value = getattr(config, name)
    if not isinstance(value, int) or value < minimum:
      raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_names(config: TrainConfig) -> None:
  _check_name("code", config.code, coding.CODES)
  _check_name("attack", config.attack, (*attacks.ATTACKS, *DATA_ATTACKS))
  _check_name("placement", config.placement, placements.PLACEMENTS)
  _check_name("model", config.model, models.MODELS)
  _check_name("dataset", config.dataset, data.DATASETS)
  _check_name("optimizer", config.optimizer, OPTIMIZERS)
  if config.assignment not in ASSIGNMENTS:
    raise ValueError(
      f"assignment must be one of {', '.join(ASSIGNMENTS)}; got {config.assignment!r}"
    )
  if config.worker_compute not in WORKER_COMPUTES:
    raise ValueError(
      f"worker_compute must be one of {', '.join(WORKER_COMPUTES)}; got {config.worker_compute!r}"
    )
  if config.combine_sharding not in COMBINE_SHARDINGS:
    raise ValueError(
      f"combine_sharding must be one of {', '.join(COMBINE_SHARDINGS)}; "
      f"got {config.combine_sharding!r}"
    )
  if config.is_coded and config.aggregator != DECODER:
    raise ValueError(
      f"code {config.code!r} is decoded by {DECODER!r}; got aggregator {config.aggregator!r} "
      f"(baseline aggregators need code='uncoded')"
    )
  if not config.is_coded and config.aggregator not in aggregators.AGGREGATORS:
    raise ValueError(
      f"code 'uncoded' is combined by a baseline aggregator; got aggregator "
      f"{config.aggregator!r}; valid aggregators: {', '.join(sorted(aggregators.AGGREGATORS))}"
    )


def _check_numbers(config: TrainConfig) -> None:
  _check_at_least(config, 1, "num_workers", "batch_per_partition", "steps")
  _check_at_least(config, 1, "eval_every", "log_every", "checkpoint_every")
  _check_at_least(config, 0, "num_adversaries", "num_stragglers", "num_devices", "seed")
  _check_at_least(config, -1, "max_adversaries")
  if not (isinstance(config.learning_rate, (int, float)) and config.learning_rate > 0):
    raise ValueError(f"learning_rate must be > 0; got {config.learning_rate!r}")
  fraction = config.max_refused_fraction
  if not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
    raise ValueError(f"max_refused_fraction must be in [0, 1]; got {fraction!r}")
  if config.resume and config.overwrite:
    raise ValueError(
      "resume (continue the run in the workdir) and overwrite (delete it) exclude each other"
    )
  if config.num_adversaries > config.num_workers:
    raise ValueError(
      f"num_adversaries must be <= num_workers; got {config.num_adversaries} > {config.num_workers}"
    )


def _check_budget(config: TrainConfig) -> None:
  """Stragglers are drawn among honest workers; coded schemes decode iff 2t + e <= 2S (unless
  ``over_capacity`` asks to study what happens beyond)."""
  p, s, t, e = (
    config.num_workers,
    config.tolerance,
    config.active_adversaries,
    config.num_stragglers,
  )
  if t + e > p:
    raise ValueError(
      f"num_adversaries + num_stragglers must be <= num_workers; got t={t} + e={e} > P={p}"
    )
  if config.is_coded and 2 * t + e > 2 * s and not config.over_capacity:
    raise ValueError(
      f"code {config.code!r} built for S={s} decodes only when 2t + e <= 2S; got t={t} "
      f"adversaries and e={e} stragglers (2t + e = {2 * t + e} > {2 * s}); raise "
      f"--max_adversaries to at least {math.ceil((2 * t + e) / 2)} or lower t or e, or pass "
      "--over_capacity to study a code beyond its capacity (steps refused or forged)"
    )


def validate(config: TrainConfig) -> TrainConfig:
  """Checks every name and combination of ``config``; returns it unchanged.

  Raises:
    ValueError: naming the bad value and the rule it breaks.
  """
  _check_names(config)
  _check_numbers(config)
  code = coding.make_code(config.code, config.num_workers, config.tolerance)  # bad (P, S)
  # Training computes float32 gradients, so a complex code sends complex64 messages: the paper
  # code's complex64 envelope applies (its decoder would refuse them only at the first step).
  coding.check_envelope(code, coding.message_dtype(code, TRAINING_GRADIENT_DTYPE))
  _check_budget(config)
  return config
