"""One pure training step, written once as the composition of its phases.

Shape legend: P workers, K = P partitions, R redundancy, D flattened parameters, B examples per
partition, H x W x C one example.

:func:`make_phases` builds the step's functions (:class:`StepPhases`) and :func:`compose` chains
them into ``update_fn(state, batch, key) -> (state, metrics)``; nothing else computes a step.
Timing a phase (``draco_jax.trainer.time_phases``) therefore times exactly what the step runs.

1. ``masks``: the adversarial workers (the placement), the stragglers and the data poisoners
   from the per-step key ``fold_in(base_key, step)`` (docs/math.md §5.4).
2. ``gradients``: the partition gradients, flattened (sharded over the devices, vmapped within
   one): the K partitions once (``config.worker_compute="shared"``, plus the data poisoners'
   R on flipped labels), or every worker's R (``"per_worker"``): :mod:`draco_jax.compute`.
3. ``encode``: worker k's message ``Σ_t coef[k, t] · g[support[k, t]]``, delivered to the
   server (all-gathered, or as column slices: :mod:`draco_jax.server`).
4. ``attack``: the adversaries rewrite their rows; the stragglers' rows become NaN.
5. ``combine``: the DRACO decoder or a baseline aggregator returns the mean gradient and a
   report.
6. ``update``: optax updates the parameters, unless ``report.ok`` is False.
7. ``clean`` and ``metrics``: the diagnostic clean mean of the K partition gradients (the shared
   ones, or a second pass in per-worker mode), and the step's metrics
   (:mod:`draco_jax.metrics`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from draco_jax import coding, compute, metrics
from draco_jax import server as server_lib
from draco_jax.config import TrainConfig

__all__ = ["TrainState", "Batch", "StepPhases", "make_phases", "compose", "make_train_step"]


class TrainState(NamedTuple):
  """Everything a step changes; checkpointed with the base key."""

  step: jax.Array  # int32 []: updates attempted so far (skipped ones included)
  params: Any  # nnx.State of the model's nnx.Param variables
  opt_state: Any
  skipped: jax.Array  # int32 []: steps whose combiner reported ok = False


class Batch(NamedTuple):
  """One step's inputs besides the key."""

  x: jax.Array  # x_KxBxHxWxC
  y: jax.Array  # y_KxB
  attack: jax.Array  # int32 []: index into the trainer's attacks (0 in an ordinary run)


class StepPhases(NamedTuple):
  """The step's functions, in the order it runs them (see the module docstring).

  Attributes:
    masks: ``(key, step, attack_index) -> (mask_P, straggle_P, poison_P)``.
    gradients: ``(params, poison_P, x, y) -> grads``, the partition gradients of the run's
      ``worker_compute`` mode (``draco_jax.compute``), sharded over the workers.
    encode: ``grads -> sent``, the messages as the server holds them.
    attack: ``(key, sent, mask_P, straggle_P, attack_index) -> received``, for masks as
      ``masks`` draws them (at most t adversaries and e stragglers: only that many rows are
      written over ``sent``).
    combine: ``(key, received) -> (mean_D, report)``.
    update: ``(state, mean_D, ok) -> state``.
    clean: ``(params, x, y, grads) -> (loss, accuracy, clean_D)``.
    metrics: ``(loss, accuracy, clean_D, mean_D, report, mask_P, straggle_P) -> metrics``.
  """

  masks: Callable
  gradients: Callable
  encode: Callable
  attack: Callable
  combine: Callable
  update: Callable
  clean: Callable
  metrics: Callable


def compose(phases: StepPhases) -> Callable:
  """The step ``update_fn(state, batch, key) -> (state, metrics)``: the phases, chained."""

  def update_fn(state: TrainState, batch: Batch, key: jax.Array):
    mask_P, straggle_P, poison_P = phases.masks(key, state.step, batch.attack)
    grads = phases.gradients(state.params, poison_P, batch.x, batch.y)
    sent = phases.encode(grads)
    received = phases.attack(key, sent, mask_P, straggle_P, batch.attack)
    mean_D, report = phases.combine(key, received)
    new_state = phases.update(state, mean_D, report.ok)
    loss, acc, clean_D = phases.clean(state.params, batch.x, batch.y, grads)
    return new_state, phases.metrics(loss, acc, clean_D, mean_D, report, mask_P, straggle_P)

  return update_fn


def _apply_update(tx, unravel, state: TrainState, mean_D: jax.Array, ok: jax.Array) -> TrainState:
  """The optax update, or no change at all (optimizer state included) when ok is False."""
  grads = unravel(jnp.real(mean_D))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jnp.where(ok, new, old)
  return TrainState(
    step=state.step + 1,
    params=jax.tree.map(keep, params, state.params),
    opt_state=jax.tree.map(keep, opt_state, state.opt_state),
    skipped=state.skipped + jnp.logical_not(ok).astype(jnp.int32),
  )


def make_phases(
  config: TrainConfig,
  code: coding.Code,
  mesh: jax.sharding.Mesh,
  apply_fn: Callable,
  params,
  tx: optax.GradientTransformation,
  *,
  num_classes: int,
  attack_names: Sequence[str] | None = None,
) -> StepPhases:
  """The step's functions (not jitted); :func:`compose` chains them into the step.

  Args:
    config: a validated configuration.
    code: the gradient code (``uncoded`` for the baselines).
    mesh: the worker mesh.
    apply_fn: ``apply_fn(params, x_NxHxWxC) -> logits``.
    params: the parameters (only their structure is used).
    tx: the optax transformation.
    num_classes: for label flipping.
    attack_names: the attacks ``Batch.attack`` chooses from (default: ``(config.attack,)``).
      Several attacks compile into one program (``lax.switch``), so a test can run them all
      with one compilation.

  Raises:
    ValueError: an unknown attack, placement, decoder or aggregator option.
  """
  names = tuple(attack_names or (config.attack,))
  flat, unravel = ravel_pytree(params)
  server = server_lib.make_server(config, code, mesh, names, flat.shape[0])
  gradients, encode, clean = compute.make_worker_phases(
    config,
    code,
    mesh,
    apply_fn,
    num_classes=num_classes,
    deliver=server.deliver,
    attack_names=names,
  )
  return StepPhases(
    masks=server.masks,
    gradients=gradients,
    encode=encode,
    attack=server.attack,
    combine=server.combine,
    update=functools.partial(_apply_update, tx, unravel),
    clean=clean,
    metrics=metrics.step_metrics,
  )


def make_train_step(*args, **kwargs) -> tuple[Callable, StepPhases]:
  """``(update_fn, phases)``: the pure step (not jitted) and its phases; the arguments are
  :func:`make_phases`'s."""
  phases = make_phases(*args, **kwargs)
  return compose(phases), phases
