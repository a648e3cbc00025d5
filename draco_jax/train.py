"""DRACO training: one pure jitted step for every code and aggregator, and a thin loop.

Run the offline default (digits, MLP, cyclic code, 2 of 15 workers reversing their gradients):

    python -m draco_jax.train

Shape legend: P workers, K = P partitions, R redundancy, D flattened parameters, B examples per
partition, H x W x C one example.

One step (:func:`make_train_step`):

1. The per-step key ``fold_in(base_key, step)`` is split into independent placement, straggler,
   attack and combine keys (docs/math.md §5.4); the attack never sees the combine key. The data are
   drawn on the host from (seed, step), so a resumed run reads the same batches.
2. Workers (``mesh.map_workers``: shard_map across devices, vmap within one): worker k computes
   the R partition gradients ``code.support[k]`` (labels flipped for a data attack), flattens
   them and sends ``Σ_t coef[k, t] · g[support[k, t]]``. Every device then holds all P messages
   (with ``combine_sharding="sharded"``: a D/N column slice of each, see :mod:`draco_jax.sharded`).
3. Server: the attack rewrites the adversarial rows, stragglers' rows become NaN, the combiner
   (the DRACO decoder or a baseline aggregator on the uncoded scheme) returns the mean gradient
   and a report, and optax updates the parameters unless ``report.ok`` is False.
4. Diagnostic: the clean mean of the K partition gradients, and the combined mean's relative
   deviation from it.

The command line tells the truth about a run (:func:`main`). Exit status: 0 trained; 1 refused
before any set-up (a bad configuration, a workdir that is not a writable directory or holds
another run's files, a dataset that is not prepared: one line each); 3 no step was applied
(every step refused); 130 interrupted (Ctrl-C saves a checkpoint of the last completed step
and prints the one command that resumes). More than ``max_refused_fraction`` refused steps
print a warning on stderr and at the top of the summary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from draco_jax import aggregators, attacks, coding, contract, data, decode, distributed, models
from draco_jax import mesh as mesh_lib
from draco_jax import sharded as sharded_lib
from draco_jax.config import (
  DATA_ATTACKS,
  TrainConfig,
  make_optimizer,
  validate,
)

__all__ = [
  "TrainConfig",
  "TrainState",
  "Batch",
  "StepKeys",
  "Trainer",
  "split_step_key",
  "make_trainer",
  "make_train_step",
  "train_step",
  "evaluate",
  "time_phases",
  "train_and_evaluate",
  "check_workdir",
  "RUN_FILES",
  "WorkdirError",
  "RunInterrupted",
  "EXIT_REFUSED",
  "EXIT_NO_STEP_APPLIED",
  "EXIT_INTERRUPTED",
  "main",
]

_EVAL_BATCH = 512
_EPS = 1e-30


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
  attack: jax.Array  # int32 []: index into Trainer.attacks (0 in an ordinary run)


class StepKeys(NamedTuple):
  placement: jax.Array
  straggler: jax.Array
  attack: jax.Array
  combine: jax.Array


def split_step_key(key: jax.Array) -> StepKeys:
  """Independent keys for one step; the attack never sees the combine key."""
  return StepKeys(*jax.random.split(key, len(StepKeys._fields)))


# ---------------------------------------------------------------------------------------------
# Pure pieces of the step.


def _loss(apply_fn: Callable, params, x_NxHxWxC: jax.Array, y_N: jax.Array):
  logits_NxC = apply_fn(params, x_NxHxWxC)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_NxC, y_N).mean()
  return loss, jnp.mean(jnp.argmax(logits_NxC, -1) == y_N)


def _flat_grad(apply_fn: Callable, params, x_BxHxWxC: jax.Array, y_B: jax.Array) -> jax.Array:
  grads = jax.grad(lambda p: _loss(apply_fn, p, x_BxHxWxC, y_B)[0])(params)
  return ravel_pytree(grads)[0]


def _worker_grads(apply_fn, num_classes, params, support_R, poison, x_KxBxHxWxC, y_KxB):
  """One worker's R partition gradients [R, D], on flipped labels if it poisons its data."""
  y_RxB = data.flip_labels(y_KxB[support_R], jnp.broadcast_to(poison, support_R.shape), num_classes)
  grad_fn = functools.partial(_flat_grad, apply_fn)
  return jax.vmap(grad_fn, (None, 0, 0))(params, x_KxBxHxWxC[support_R], y_RxB)


def _worker_encode(coef_R: jax.Array, grads_RxD: jax.Array) -> jax.Array:
  """One worker's message Σ_t coef[t] · grads[t]."""
  return coding.encode_rows(coef_R[None], grads_RxD[None])[0]


def _partition_stats(apply_fn, params, x_BxHxWxC, y_B):
  """(loss, accuracy, flattened gradient) of one partition on its true labels."""
  (loss, acc), grads = jax.value_and_grad(
    lambda p: _loss(apply_fn, p, x_BxHxWxC, y_B), has_aux=True
  )(params)
  return loss, acc, ravel_pytree(grads)[0]


def _stragglers(key: jax.Array, mask_P: jax.Array, num_stragglers: int) -> jax.Array:
  """bool [P]: ``num_stragglers`` workers drawn uniformly among the non-adversarial ones."""
  if num_stragglers == 0:
    return jnp.zeros_like(mask_P)
  score_P = jnp.where(mask_P, jnp.inf, jax.random.uniform(key, mask_P.shape))
  return jnp.zeros_like(mask_P).at[jnp.argsort(score_P)[:num_stragglers]].set(True)


def _corrupt(attack_fns, key, sent_PxD, mask_P, straggle_P, attack_index):
  """What the server receives: the chosen attack on masked rows, NaN rows for stragglers."""
  received_PxD = jax.lax.switch(attack_index, attack_fns, key, sent_PxD, mask_P)
  missing = jnp.asarray(jnp.nan, received_PxD.dtype)
  return jnp.where(straggle_P[:, None], missing, received_PxD)


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


def _step_metrics(loss, acc, clean_D, mean_D, report, mask_P, straggle_P) -> dict:
  honest_P = ~mask_P & ~straggle_P
  deviation = jnp.linalg.norm(jnp.real(mean_D) - clean_D) / (jnp.linalg.norm(clean_D) + _EPS)
  adversaries = jnp.sum(mask_P.astype(jnp.int32))
  flagged_adversaries = jnp.sum((report.flagged & mask_P).astype(jnp.int32))
  return {
    "loss": loss,
    "accuracy": acc,
    "ok": report.ok,
    "flagged_fraction": flagged_adversaries / jnp.maximum(adversaries, 1),
    "adversaries": adversaries,
    "flagged_adversaries": flagged_adversaries,
    "honest": jnp.sum(honest_P.astype(jnp.int32)),
    "flagged_honest": jnp.sum((report.flagged & honest_P).astype(jnp.int32)),
    "deviation": deviation,
    "grad_norm": jnp.linalg.norm(clean_D),
    "iterations": report.iterations,
  }


# ---------------------------------------------------------------------------------------------
# The trainer: every host-side object of a run, built once.


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Trainer:
  """A run's code, mesh, data, model and jitted functions (see :func:`make_trainer`).

  Attributes:
    attacks: the attack names a step can select with ``Batch.attack``.
    update_fn: the jitted step ``update_fn(state, batch, key) -> (state, metrics)``.
    phases: separately jitted pieces of the step, for timing (see :func:`time_phases`).
    base_key: the run's key; step s uses ``fold_in(base_key, s)``.
  """

  config: TrainConfig
  code: coding.Code
  mesh: jax.sharding.Mesh
  attacks: tuple[str, ...]
  train_ds: Any
  test_ds: Any
  apply_fn: Callable
  init_params: Any
  tx: optax.GradientTransformation
  update_fn: Callable
  phases: dict[str, Callable]
  eval_fn: Callable
  base_key: jax.Array

  def init_state(self) -> TrainState:
    """The initial state, replicated on the mesh (of every process)."""
    state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=self.init_params,
      opt_state=self.tx.init(self.init_params),
      skipped=jnp.zeros((), jnp.int32),
    )
    return mesh_lib.put_replicated(state, self.mesh)

  def step_inputs(self, step: int, attack: int = 0) -> tuple[Batch, jax.Array]:
    """The batch and the key of step ``step`` (0-based), placed on the mesh.

    Every process draws the same batch from (seed, step) and passes all of it.
    """
    x, y = data.partition_batch(
      self.train_ds,
      num_partitions=self.config.num_workers,
      batch_per_partition=self.config.batch_per_partition,
      seed=self.config.seed,
      step=step,
    )
    batch = Batch(x, np.asarray(y, np.int32), np.asarray(attack, np.int32))
    key = jax.random.fold_in(self.base_key, step)
    return mesh_lib.put_replicated((batch, key), self.mesh)


def _with_options(kind: str, factory: Callable, *args, **options):
  """Calls a registry factory, reporting unknown options as a ValueError."""
  try:
    return factory(*args, **options)
  except TypeError as e:
    raise ValueError(f"bad {kind} options {options!r}: {e}") from None


def _make_combiner(config: TrainConfig, code: coding.Code) -> contract.Combiner:
  if config.is_coded:
    return _with_options("decoder", decode.make_decoder, code, **config.combiner_options)
  return _with_options(
    "aggregator",
    aggregators.make_aggregator,
    config.aggregator,
    config.num_workers,
    config.tolerance,
    **config.combiner_options,
  )


def _make_attack_fns(config: TrainConfig, code: coding.Code, names: Sequence[str]) -> tuple:
  """One message attack per name; data attacks send their (poisoned) messages unchanged."""
  return tuple(
    _with_options(
      "attack",
      attacks.make_attack,
      "none" if name in DATA_ATTACKS else name,
      code=code,
      **({} if name in DATA_ATTACKS else config.attack_options),
    )
    for name in names
  )


def _make_model(config: TrainConfig, train_ds: data.Dataset) -> tuple[Callable, Any]:
  """(apply_fn(params, x_NxHxWxC) -> logits, params); models hold only nnx.Param state."""
  model = _with_options(
    "model",
    models.make_model,
    config.model,
    num_classes=train_ds.num_classes,
    input_shape=train_ds.input_shape,
    rngs=nnx.Rngs(config.seed),
    **config.resolved_model_options,
  )
  graphdef, params = nnx.split(model, nnx.Param)
  return (lambda p, x_NxHxWxC: nnx.merge(graphdef, p)(x_NxHxWxC)), params


def _worker_functions(
  apply_fn: Callable, num_classes: int, mesh: jax.sharding.Mesh, gather: bool = True
):
  """The per-worker computations, mapped over all P workers of the mesh.

  Returns:
    gradients(params, support_PxR, poison_P, x, y) -> grads_PxRxD (sharded over workers);
    encode(coef_PxR, grads_PxRxD) -> sent_PxD (on every device, or sharded over workers
      when ``gather`` is False);
    messages(params, support_PxR, coef_PxR, poison_P, x, y) -> sent_PxD, both fused;
    stats(params, x_KxBxHxWxC, y_KxB) -> (loss_K, accuracy_K, grads_KxD), one per partition.
  """
  grad_one = functools.partial(_worker_grads, apply_fn, num_classes)
  gradients = mesh_lib.map_workers(
    grad_one, mesh, per_worker_args=(False, True, True, False, False)
  )
  encode = mesh_lib.map_workers(_worker_encode, mesh, per_worker_args=(True, True), gather=gather)
  messages = mesh_lib.map_workers(
    lambda p, s, c, poison, x, y: _worker_encode(c, grad_one(p, s, poison, x, y)),
    mesh,
    per_worker_args=(False, True, True, True, False, False),
    gather=gather,
  )
  stats = mesh_lib.map_workers(
    functools.partial(_partition_stats, apply_fn), mesh, per_worker_args=(False, True, True)
  )
  return gradients, encode, messages, stats


def _replicated_combine(config: TrainConfig, code: coding.Code, mesh, attack_fns) -> Callable:
  """combine(key, sent_PxD, mask_P, straggle_P, attack_index) on messages every device holds."""
  combiner = _make_combiner(config, code)

  def combine(key, sent_PxD, mask_P, straggle_P, attack_index):
    keys = split_step_key(key)
    received_PxD = _corrupt(attack_fns, keys.attack, sent_PxD, mask_P, straggle_P, attack_index)
    return combiner(received_PxD, keys.combine)

  return combine


def _sharded_combine(config: TrainConfig, code: coding.Code, mesh, attack_fns) -> Callable:
  """combine(...) on messages sharded over workers, the server's work spread over the devices.

  Each device turns its workers' messages into a [P, D/N] column slice of all P messages
  (all_to_all, :mod:`draco_jax.sharded`); the attack and the stragglers then rewrite each
  device's slice, with the attack key folded with the device's index: coordinate-wise attacks
  (reverse_gradient, constant, sign_flip, alie, ipm) send exactly what they send in a
  replicated step, while random payloads (gaussian, nan, huge, ...) are other draws and
  ``small`` scales its noise by each slice's rms. Padding columns are zeroed again, the sliced
  combiner runs, and the mean is all-gathered; the Report is the same on every device.
  """
  n = mesh.shape[mesh_lib.WORKER_AXIS]
  kind, aggregator = ("decoder", None) if config.is_coded else ("aggregator", config.aggregator)
  combine_slices = _with_options(
    kind,
    sharded_lib.make_slice_combiner,
    code,
    n,
    aggregator=aggregator,
    **config.combiner_options,
  )

  def local(key, rows_pxD, mask_P, straggle_P, attack_index):
    keys = split_step_key(key)
    slice_PxW = sharded_lib.to_slices(rows_pxD, n)
    attack_key = jax.random.fold_in(keys.attack, jax.lax.axis_index(mesh_lib.WORKER_AXIS))
    received_PxW = _corrupt(attack_fns, attack_key, slice_PxW, mask_P, straggle_P, attack_index)
    received_PxW = sharded_lib.clear_padding(received_PxW, rows_pxD.shape[1])
    mean_W, report = combine_slices(received_PxW, keys.combine)
    return sharded_lib.gather_slices(mean_W, rows_pxD.shape[1]), report

  spec, whole = jax.sharding.PartitionSpec(mesh_lib.WORKER_AXIS), jax.sharding.PartitionSpec()
  return jax.shard_map(
    local, mesh=mesh, in_specs=(whole, spec, whole, whole, whole), out_specs=(whole, whole)
  )


def _server_combine(config: TrainConfig, code: coding.Code, mesh) -> Callable:
  """combine(key, received_PxD) -> (mean_D, report): the server's work alone, for timing.

  The same combiner as the step's, replicated or sharded (an all_to_all of the received rows,
  the sliced combiner, an all-gather of the mean), on messages the attack already rewrote.
  """
  if config.combine_sharding == "sharded":
    aggregator = None if config.is_coded else config.aggregator
    combiner = _with_options(
      "combiner",
      sharded_lib.make_mesh_combiner,
      code,
      mesh,
      aggregator=aggregator,
      **config.combiner_options,
    )
  else:
    combiner = _make_combiner(config, code)
  return lambda key, received_PxD: combiner(received_PxD, split_step_key(key).combine)


def make_train_step(
  config: TrainConfig,
  code: coding.Code,
  mesh: jax.sharding.Mesh,
  apply_fn: Callable,
  params,
  tx: optax.GradientTransformation,
  *,
  num_classes: int,
  attack_names: Sequence[str] | None = None,
) -> tuple[Callable, dict[str, Callable]]:
  """Builds the pure step ``update_fn(state, batch, key) -> (state, metrics)``.

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

  Returns:
    (update_fn, phases): the step (not jitted) and its pieces, each a function to jit and time
    on its own: ``gradients``, ``encode``, ``attack`` (the adversaries' rewrite),
    ``combine`` (the server's decode or aggregation alone), ``update`` and the ``clean``
    diagnostic.
  """
  names = tuple(attack_names or (config.attack,))
  attack_fns = _make_attack_fns(config, code, names)
  is_data_attack = jnp.asarray([name in DATA_ATTACKS for name in names])
  sharded = config.combine_sharding == "sharded"
  combine = (_sharded_combine if sharded else _replicated_combine)(config, code, mesh, attack_fns)
  placement = attacks.make_placement(config.placement, code.num_workers, config.num_adversaries)
  unravel = ravel_pytree(params)[1]
  support_PxR = jnp.asarray(code.support)
  coef_PxR = jnp.asarray(code.coef, coding.message_dtype(code, jnp.float32))

  gradients, encode, messages, stats = _worker_functions(
    apply_fn, num_classes, mesh, gather=not sharded
  )

  def clean(params, x_KxBxHxWxC, y_KxB):
    """Loss, accuracy and the mean gradient over the K partitions, on the true labels."""
    loss_K, acc_K, grads_KxD = stats(params, x_KxBxHxWxC, y_KxB)
    w_K = jnp.full(loss_K.shape, 1.0 / code.num_workers)
    return w_K @ loss_K, w_K @ acc_K, contract.rows_dot(w_K, grads_KxD)

  def masks(key, step, attack_index):
    keys = split_step_key(key)
    mask_P = placement(keys.placement, step)
    straggle_P = _stragglers(keys.straggler, mask_P, config.num_stragglers)
    return mask_P, straggle_P, mask_P & is_data_attack[attack_index]

  def update_fn(state: TrainState, batch: Batch, key: jax.Array):
    mask_P, straggle_P, poison_P = masks(key, state.step, batch.attack)
    sent_PxD = messages(state.params, support_PxR, coef_PxR, poison_P, batch.x, batch.y)
    mean_D, report = combine(key, sent_PxD, mask_P, straggle_P, batch.attack)
    loss, acc, clean_D = clean(state.params, batch.x, batch.y)
    new_state = _apply_update(tx, unravel, state, mean_D, report.ok)
    return new_state, _step_metrics(loss, acc, clean_D, mean_D, report, mask_P, straggle_P)

  def attack(key, sent_PxD, mask_P, straggle_P, attack_index):
    """What the server receives (timing only: the adversaries' work, not the server's)."""
    keys = split_step_key(key)
    return _corrupt(attack_fns, keys.attack, sent_PxD, mask_P, straggle_P, attack_index)

  phases = {
    "masks": masks,
    "gradients": lambda params, poison_P, x, y: gradients(params, support_PxR, poison_P, x, y),
    "encode": lambda grads_PxRxD: encode(coef_PxR, grads_PxRxD),
    "attack": attack,
    "combine": _server_combine(config, code, mesh),
    "update": lambda state, mean_D, ok: _apply_update(tx, unravel, state, mean_D, ok),
    "clean": clean,
  }
  return update_fn, phases


def make_trainer(config: TrainConfig, *, attack_names: Sequence[str] | None = None) -> Trainer:
  """Builds everything a run needs; raises ValueError for an impossible configuration.

  Args:
    config: the run's configuration (validated here).
    attack_names: the attacks the step can select (default: ``(config.attack,)``).
  """
  validate(config)
  devices = mesh_lib.select_devices(config.num_devices, config.num_workers)
  mesh = mesh_lib.make_worker_mesh(config.num_workers, devices)
  code = coding.make_code(config.code, config.num_workers, config.tolerance)
  train_ds = data.load_dataset(config.dataset, "train", data_dir=config.data_dir)
  test_ds = data.load_dataset(config.dataset, "test", data_dir=config.data_dir)
  apply_fn, params = _make_model(config, train_ds)
  tx = make_optimizer(config)
  update_fn, phases = make_train_step(
    config,
    code,
    mesh,
    apply_fn,
    params,
    tx,
    num_classes=train_ds.num_classes,
    attack_names=attack_names,
  )

  def eval_fn(params, x_NxHxWxC, y_N, mask_N):
    return jnp.sum(mask_N & (jnp.argmax(apply_fn(params, x_NxHxWxC), -1) == y_N))

  return Trainer(
    config=config,
    code=code,
    mesh=mesh,
    attacks=tuple(attack_names or (config.attack,)),
    train_ds=train_ds,
    test_ds=test_ds,
    apply_fn=apply_fn,
    init_params=params,
    tx=tx,
    update_fn=jax.jit(update_fn),
    phases={name: jax.jit(fn) for name, fn in phases.items()},
    eval_fn=jax.jit(eval_fn),
    base_key=jax.random.key(config.seed),
  )


# ---------------------------------------------------------------------------------------------
# Host-side helpers: one step, evaluation, timing.


def train_step(
  trainer: Trainer, state: TrainState, step: int, attack: int = 0
) -> tuple[TrainState, dict[str, float]]:
  """Runs step ``step`` and waits for it (on CPU, collective steps dispatched without blocking
  deadlock after a few dozen); returns the new state and the metrics as floats."""
  batch, key = trainer.step_inputs(step, attack)
  state, metrics = trainer.update_fn(state, batch, key)
  return state, {name: float(value) for name, value in jax.device_get(metrics).items()}


def evaluate(trainer: Trainer, params) -> float:
  """Test-set accuracy."""
  correct = 0
  for x, y, mask in data.eval_batches(trainer.test_ds, _EVAL_BATCH):
    batch = mesh_lib.put_replicated((x, y, mask), trainer.mesh)
    correct += int(trainer.eval_fn(params, *batch))
  return correct / trainer.test_ds.num_examples


def _timed(fn: Callable, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, 1e3 * (time.perf_counter() - start)


def time_phases(trainer: Trainer, state: TrainState, step: int, repeats: int = 2) -> dict:
  """Milliseconds per phase of step ``step``, each phase jitted on its own and waited for.

  The state is not changed. The last of ``repeats`` rounds is reported (the first compiles).
  """
  ph = trainer.phases
  batch, key = trainer.step_inputs(step)
  for _ in range(repeats):
    ms = {}
    (mask_P, straggle_P, poison_P), _ = _timed(ph["masks"], key, state.step, batch.attack)
    grads_PxRxD, ms["gradients"] = _timed(ph["gradients"], state.params, poison_P, batch.x, batch.y)
    sent_PxD, ms["encode"] = _timed(ph["encode"], grads_PxRxD)
    received_PxD, ms["attack"] = _timed(
      ph["attack"], key, sent_PxD, mask_P, straggle_P, batch.attack
    )
    (mean_D, report), ms["combine"] = _timed(ph["combine"], key, received_PxD)
    _, ms["update"] = _timed(ph["update"], state, mean_D, report.ok)
    _, ms["clean"] = _timed(ph["clean"], state.params, batch.x, batch.y)
    _, ms["step"] = _timed(trainer.update_fn, state, batch, key)
  return ms


# ---------------------------------------------------------------------------------------------
# The workdir: metrics, TensorBoard, config and checkpoints.

# Everything a run writes in its workdir; ``overwrite`` deletes these and nothing else.
RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "checkpoints", "tensorboard")


class WorkdirError(ValueError):
  """The workdir cannot hold this run: not a writable directory, or another run's files."""


class RunInterrupted(KeyboardInterrupt):
  """Training stopped by an interrupt; the last completed step is checkpointed in ``workdir``."""

  def __init__(self, step: int, workdir: str):
    super().__init__(
      f"interrupted after step {step}; its checkpoint is in {workdir}; continue with "
      "resume=True (--resume)"
    )
    self.step, self.workdir = step, workdir


def _latest_checkpoint(path: str) -> int | None:
  """The highest finished checkpoint step in ``path``/checkpoints, read without orbax."""
  try:
    steps = [int(name) for name in os.listdir(os.path.join(path, "checkpoints")) if name.isdigit()]
  except OSError:
    return None
  return max(steps, default=None)


def _run_files(path: str) -> list[str]:
  """The :data:`RUN_FILES` present in ``path`` (an empty directory does not count)."""
  found = []
  for name in RUN_FILES:
    full = os.path.join(path, name)
    if os.path.isdir(full) and not os.path.islink(full) and not os.listdir(full):
      continue
    if os.path.lexists(full):
      latest = _latest_checkpoint(path) if name == "checkpoints" else None
      found.append(name if latest is None else f"{name} (latest step {latest})")
  return found


def _make_writable_dir(path: str) -> None:
  """Creates ``path`` if needed; WorkdirError unless it is then a writable directory."""
  if os.path.lexists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {path} exists and is not a directory; pass a directory path")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    parent = os.path.dirname(path)
    while parent != os.path.dirname(parent) and not os.path.lexists(parent):
      parent = os.path.dirname(parent)
    why = f"{parent} is not a directory" if not os.path.isdir(parent) else e.strerror
    raise WorkdirError(f"cannot create workdir {path}: {why}") from None
  if not os.access(path, os.W_OK | os.X_OK):  # also False on a read-only filesystem
    raise WorkdirError(f"workdir {path} is not writable")


def _check_same_config(config: TrainConfig, path: str) -> None:
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    return
  with open(config_path) as f:
    text = f.read()
  try:
    diffs = config.differences(text)
  except json.JSONDecodeError as e:
    raise WorkdirError(f"cannot resume {path}: its config.json is not valid JSON ({e})") from None
  if diffs:
    raise WorkdirError(f"cannot resume {path} with a different config: {'; '.join(diffs)}")


def check_workdir(config: TrainConfig, workdir: str) -> str:
  """Checks (and creates) the run directory before anything expensive; returns its path.

  A workdir holding another run's files (:data:`RUN_FILES`, with or without checkpoints) is
  continued (``config.resume``, with the same config), cleared later (``config.overwrite``, see
  :class:`_Workdir`) or refused; nothing on disk changes here except creating the directory.

  Raises:
    WorkdirError: naming the path and the rule it breaks.
  """
  path = os.path.abspath(workdir)
  _make_writable_dir(path)
  found = _run_files(path)
  if config.resume and not found:
    raise WorkdirError(
      f"nothing to resume in workdir {path}: it holds no run's files ({', '.join(RUN_FILES)}); "
      "drop --resume to start a run there"
    )
  if config.resume:
    _check_same_config(config, path)
  elif found and not config.overwrite:
    raise WorkdirError(
      f"workdir {path} already holds another run's files ({', '.join(found)}); pass --resume "
      "to continue that run, --overwrite to delete them and start afresh, or choose another "
      "--workdir"
    )
  return path


def _clear_run_files(path: str) -> None:
  """Deletes the :data:`RUN_FILES` in ``path`` (never anything else)."""
  for name in RUN_FILES:
    full = os.path.join(path, name)
    if os.path.isdir(full) and not os.path.islink(full):
      shutil.rmtree(full)
    elif os.path.lexists(full):
      os.remove(full)


class _Summary:
  """Running totals over the steps of one invocation."""

  def __init__(self):
    self.steps = self.skipped = 0
    self.adversaries = self.flagged_adversaries = self.honest = self.flagged_honest = 0
    self.deviations: list[float] = []

  def add(self, m: dict[str, float]) -> None:
    self.steps += 1
    self.skipped += int(not m["ok"])
    self.adversaries += int(m["adversaries"])
    self.flagged_adversaries += int(m["flagged_adversaries"])
    self.honest += int(m["honest"])
    self.flagged_honest += int(m["flagged_honest"])
    if m["ok"]:
      self.deviations.append(m["deviation"])

  def results(self) -> dict[str, float]:
    dev = np.asarray(self.deviations or [np.nan])
    return {
      "steps_run": self.steps,
      "skipped_steps": self.skipped,
      "flagged_fraction": self.flagged_adversaries / max(self.adversaries, 1),
      "honest_flagged_fraction": self.flagged_honest / max(self.honest, 1),
      "deviation_mean": float(np.mean(dev)),
      "deviation_max": float(np.max(dev)),
    }


def _refusals(results: dict[str, Any], max_fraction: float) -> tuple[bool, list[str]]:
  """(no step applied, warnings) over this invocation's steps (the whole run's if none ran)."""
  run, refused, scope = results["steps_run"], results["skipped_steps"], "run now"
  if run == 0:
    run, refused, scope = results["final_step"], results["total_skipped_steps"], "in all"
  why = "the combiner's report.ok was False, so the update was skipped"
  if refused == run:
    return True, [
      f"no step was applied: all {run} steps {scope} were refused ({why}); the parameters did "
      "not move"
    ]
  if refused > max_fraction * run:
    return False, [
      f"{refused} of {run} steps {scope} ({refused / run:.0%}) were refused ({why}), more than "
      f"max_refused_fraction = {max_fraction}"
    ]
  return False, []


def _key_data(trainer: Trainer) -> np.ndarray:
  """The run's key as host data: the same value on every process, saved once by orbax."""
  return np.asarray(jax.random.key_data(trainer.base_key))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class _Workdir:
  """Metrics lines, TensorBoard, config.json and orbax checkpoints of one run directory.

  Only process 0 writes files; every process calls the checkpoint manager (orbax coordinates
  multi-process saves itself and writes replicated arrays from the primary host).
  """

  def __init__(self, config: TrainConfig, path: str):
    """``path`` has passed :func:`check_workdir`; ``overwrite`` clears the old run only now,
    once everything else that can refuse the run has accepted it."""
    self.path = path
    self.is_writer = jax.process_index() == 0
    if config.overwrite and self.is_writer:
      _clear_run_files(path)
    _barrier("draco_workdir_checked")  # no process writes before every process has checked
    self.checkpoints = ocp.CheckpointManager(
      os.path.join(self.path, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )
    self.metrics_file = self.writer = None

  def open(self, config: TrainConfig, start_step: int) -> None:
    """Writes config.json and opens the metrics (dropping lines past a resumed step)."""
    if not self.is_writer:
      return
    with open(os.path.join(self.path, "config.json"), "w") as f:
      f.write(config.to_json())
    metrics_path = os.path.join(self.path, "metrics.jsonl")
    kept = []
    if os.path.exists(metrics_path):
      with open(metrics_path) as f:
        kept = [line for line in f if _logged_step(line) <= start_step]
    self.metrics_file = open(metrics_path, "w")
    self.metrics_file.writelines(kept)
    self.writer = _summary_writer(os.path.join(self.path, "tensorboard"))

  def restore(self, trainer: Trainer) -> tuple[TrainState, int]:
    """The latest checkpoint (or the initial state) and the step to start from."""
    state = trainer.init_state()
    latest = self.checkpoints.latest_step()
    if latest is None:
      return state, 0
    target = {"state": state._asdict(), "rng": _key_data(trainer)}
    restored = self.checkpoints.restore(latest, args=ocp.args.StandardRestore(target))
    if not np.array_equal(restored["rng"], target["rng"]):
      raise ValueError(f"checkpoint in {self.path} was made with another seed")
    state = jax.device_put(TrainState(**restored["state"]), mesh_lib.replicated(trainer.mesh))
    logging.info("resumed from step %d in %s", latest, self.path)
    return state, latest

  def save(self, trainer: Trainer, state: TrainState, step: int) -> None:
    tree = {"state": state._asdict(), "rng": _key_data(trainer)}
    self.checkpoints.save(step, args=ocp.args.StandardSave(tree), force=True)

  def log(self, record: dict[str, Any]) -> None:
    if not self.is_writer:
      return
    self.metrics_file.write(json.dumps(record) + "\n")
    self.metrics_file.flush()
    if self.writer is not None:
      for name, value in _flatten(record).items():
        if name != "step":
          self.writer.add_scalar(name, value, record["step"])

  def interrupt(self, trainer: Trainer, state: TrainState) -> RunInterrupted:
    """Checkpoints the last completed step (unless saved already), waits, closes the files."""
    step = int(state.step)
    if self.checkpoints.latest_step() != step:
      self.save(trainer, state, step)
    self.close(None)
    return RunInterrupted(step, self.path)

  def close(self, results: dict[str, Any] | None) -> None:
    """Waits for orbax, writes results.json (unless interrupted: None) and closes the files."""
    self.checkpoints.wait_until_finished()
    self.checkpoints.close()
    if not self.is_writer:
      return
    if results is not None:
      with open(os.path.join(self.path, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if self.metrics_file is not None:
      self.metrics_file.close()
    if self.writer is not None:
      self.writer.close()


def _logged_step(line: str) -> float:
  """The step of a metrics line; a torn line (a run killed while writing it) sorts last."""
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return np.inf


def _summary_writer(path: str):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # TensorBoard summaries are optional
    logging.warning("tensorboardX is not installed; no TensorBoard summaries")
    return None
  return SummaryWriter(path)


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
  flat = {}
  for name, value in record.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{name}/"))
    else:
      flat[prefix + name] = float(value)
  return flat


# ---------------------------------------------------------------------------------------------
# The loop.


class _Progress:
  """What the loop has reached: the state, the totals, the last evaluation and timing."""

  def __init__(self, state: TrainState):
    self.state, self.summary = state, _Summary()
    self.accuracy: float | None = None
    self.timing: dict[str, float] = {}


def _is_due(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


def _loop(trainer, workdir, progress: _Progress, start: int, stop: Callable[[], bool]) -> bool:
  """Steps from ``start`` to ``config.steps``: log, evaluate and time, checkpoint.

  Returns True when ``stop()`` asked to stop (checked before each step, on every process).
  """
  config = trainer.config
  started, step_seconds, steps_since_log = time.perf_counter(), 0.0, 0
  bar = tqdm(
    range(start, config.steps), initial=start, total=config.steps, disable=not workdir.is_writer
  )
  with bar:
    for index in bar:
      if stop():
        return True
      tick = time.perf_counter()
      progress.state, metrics = train_step(trainer, progress.state, index)
      step_seconds, steps_since_log = step_seconds + time.perf_counter() - tick, steps_since_log + 1
      progress.summary.add(metrics)
      step = index + 1
      record = {"step": step, **metrics}
      if _is_due(step, config.eval_every, config.steps):
        progress.accuracy = evaluate(trainer, progress.state.params)
        progress.timing = time_phases(trainer, progress.state, step) if config.timing else {}
        record.update(test_accuracy=progress.accuracy, timing_ms=progress.timing)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", test_acc=f"{progress.accuracy:.3f}")
      if _is_due(step, config.log_every, config.steps) or "test_accuracy" in record:
        seconds_per_step = step_seconds / steps_since_log
        record.update(wall_time=time.perf_counter() - started, ms_per_step=1e3 * seconds_per_step)
        step_seconds, steps_since_log = 0.0, 0
        workdir.log(record)
      if _is_due(step, config.checkpoint_every, config.steps):
        workdir.save(trainer, progress.state, step)
  return False


def _never() -> bool:
  return False


def _fit(trainer: Trainer, workdir: _Workdir, stop: Callable[[], bool] = _never) -> dict[str, Any]:
  """The thin loop around the step; returns the results.

  Raises:
    RunInterrupted: ``stop()`` returned True before a step, or (one process only) a
      KeyboardInterrupt arrived during one; the last completed step is checkpointed first.
  """
  config = trainer.config
  state, start = workdir.restore(trainer)
  workdir.open(config, start)
  progress, started = _Progress(state), time.perf_counter()
  try:
    stopped = _loop(trainer, workdir, progress, start, stop)
  except KeyboardInterrupt:
    if jax.process_count() > 1:  # saving is collective: only an agreed stop() may save
      raise
    stopped = True
  if stopped:
    raise workdir.interrupt(trainer, progress.state)
  wall = time.perf_counter() - started
  if progress.accuracy is None:  # nothing left to run: evaluate the restored state
    progress.accuracy = evaluate(trainer, progress.state.params)
  summary = progress.summary
  results = {
    "test_accuracy": progress.accuracy,
    "final_step": int(progress.state.step),
    "total_skipped_steps": int(progress.state.skipped),
    **summary.results(),
    "wall_time_s": wall,
    "steps_per_second": summary.steps / max(wall, 1e-9),
    "timing_ms": progress.timing,
    "devices": trainer.mesh.size,
    "processes": jax.process_count(),
    "workdir": workdir.path,
  }
  results["no_step_applied"], results["warnings"] = _refusals(results, config.max_refused_fraction)
  workdir.close(results)
  return {**results, "state": progress.state}


def _open(config: TrainConfig, workdir: str) -> tuple[Trainer, _Workdir]:
  """Everything that can refuse a run, cheapest first, before any step runs.

  The configuration, then the dataset (opened, not read) and the workdir, and only then the
  expensive set-up (data loading, model, jit); an ``overwrite`` clears the old run last.
  """
  validate(config)
  data.check_available(config.dataset, data_dir=config.data_dir)
  path = check_workdir(config, workdir)
  trainer = make_trainer(config)
  return trainer, _Workdir(config, path)


def train_and_evaluate(config: TrainConfig, workdir: str) -> dict[str, Any]:
  """Trains, evaluates and checkpoints one run in ``workdir``.

  Returns:
    A results dict: ``test_accuracy``, ``flagged_fraction`` (adversarial rows flagged / all
    adversarial rows), ``honest_flagged_fraction``, ``deviation_mean`` / ``deviation_max``
    (relative ‖combined − clean mean‖ over steps that were applied), ``skipped_steps``
    (refused: report.ok False), ``no_step_applied`` and ``warnings`` (more than
    ``config.max_refused_fraction`` of the steps refused), timings, and ``state`` (the final
    :class:`TrainState`).

  Raises:
    ValueError: the configuration is impossible (before any step runs); its subclass
      :class:`WorkdirError`: the workdir is not a writable directory, or holds another run's
      files without ``resume`` or ``overwrite``.
    draco_jax.data.DatasetNotPreparedError: the dataset is not prepared.
    RunInterrupted: a KeyboardInterrupt stopped training; the last completed step is
      checkpointed, and ``resume=True`` continues it bit for bit.
  """
  return _fit(*_open(config, workdir))


def _summary_lines(config: TrainConfig, results: dict[str, Any]) -> list[str]:
  timing = ", ".join(f"{k} {v:.2f}" for k, v in results["timing_ms"].items()) or "not measured"
  applied = results["steps_run"] - results["skipped_steps"]
  deviation = (
    f"mean {results['deviation_mean']:.2e}, max {results['deviation_max']:.2e} "
    f"over the {applied} applied steps"
    if applied
    else "none: no step applied"
  )
  lines = [
    f"test accuracy            {results['test_accuracy']:.4f}",
    f"refused steps            {results['skipped_steps']} of {results['steps_run']} run "
    f"({results['total_skipped_steps']} of {results['final_step']} in all; refused = "
    "report.ok False, update skipped)",
    f"deviation from clean     {deviation}",
    f"adversarial rows flagged {results['flagged_fraction']:.4f}",
    f"honest rows flagged      {results['honest_flagged_fraction']:.4f}",
  ]
  if config.beyond_capacity:
    t, e, s = config.active_adversaries, config.num_stragglers, config.tolerance
    lines.append(
      f"over capacity            2t + e = {2 * t + e} > 2S = {2 * s} (t={t}, e={e}, S={s}): "
      "steps are refused, or applied with the deviation above"
    )
  return lines + [
    f"wall time                {results['wall_time_s']:.1f} s "
    f"({results['steps_per_second']:.1f} steps/s)",
    f"phase timing (ms)        {timing}",
    f"devices                  {results['devices']} in {results['processes']} process(es)",
    f"workdir                  {results['workdir']}",
  ]


def _print_summary(config: TrainConfig, results: dict[str, Any]) -> None:
  """The summary on stdout, any warning first (and on stderr too)."""
  warnings = [f"WARNING: {w}" for w in results["warnings"]]
  for warning in warnings:
    print(warning, file=sys.stderr)
  sys.stderr.flush()
  print("\n".join(["== DRACO run summary ==", *warnings, *_summary_lines(config, results)]))


# ---------------------------------------------------------------------------------------------
# Command line.

_DEFAULT = TrainConfig()
_FLAGS = {
  "code": (flags.DEFINE_string, f"Gradient code: one of {', '.join(coding.CODES)}."),
  "num_workers": (flags.DEFINE_integer, "P, workers (= partitions per step)."),
  "num_adversaries": (flags.DEFINE_integer, "t, adversarial workers per step."),
  "max_adversaries": (flags.DEFINE_integer, "S the scheme tolerates (-1: num_adversaries)."),
  "attack": (flags.DEFINE_string, "Attack name, or label_flip (a data attack), or none."),
  "placement": (flags.DEFINE_string, "Adversary placement: fixed, random, contiguous or none."),
  "aggregator": (flags.DEFINE_string, "'draco' for coded schemes; a baseline with uncoded."),
  "model": (flags.DEFINE_string, "Model name."),
  "dataset": (flags.DEFINE_string, "Dataset name."),
  "data_dir": (flags.DEFINE_string, "Prepared datasets directory."),
  "optimizer": (flags.DEFINE_string, "sgd, momentum or adam."),
  "learning_rate": (flags.DEFINE_float, "Learning rate."),
  "batch_per_partition": (flags.DEFINE_integer, "B, examples per partition."),
  "steps": (flags.DEFINE_integer, "Total optimizer steps."),
  "eval_every": (flags.DEFINE_integer, "Steps between evaluations and phase timings."),
  "log_every": (flags.DEFINE_integer, "Steps between metrics lines."),
  "checkpoint_every": (flags.DEFINE_integer, "Steps between checkpoints."),
  "timing": (flags.DEFINE_bool, "Time each phase of the step at every evaluation."),
  "seed": (flags.DEFINE_integer, "Seed of parameters, data and per-step keys."),
  "resume": (
    flags.DEFINE_bool,
    "Continue the run in --workdir, with the same config: from its latest checkpoint, or from "
    "step 0 if it has none yet. Ctrl-C checkpoints the last completed step, prints the command "
    "that resumes and exits with status 130.",
  ),
  "overwrite": (
    flags.DEFINE_bool,
    f"Delete the run files in --workdir ({', '.join(RUN_FILES)}; nothing else) and start "
    "afresh. Without --overwrite or --resume a workdir holding a run's files is refused.",
  ),
  "over_capacity": (
    flags.DEFINE_bool,
    "Allow 2t + e > 2S (more adversaries and stragglers than the code decodes), to study a code "
    "beyond its capacity: steps are refused, or applied with a deviation from the clean mean; "
    "the summary reports both. Without it such a configuration is refused.",
  ),
  "max_refused_fraction": (
    flags.DEFINE_float,
    "Warn (stderr and top of the summary) when more than this fraction of the steps was "
    "refused (report.ok False, update skipped). Exit status: 0 trained; 1 refused at start "
    "(configuration, workdir or dataset); 3 no step applied (all refused); 130 interrupted.",
  ),
  "num_stragglers": (flags.DEFINE_integer, "e, missing honest messages per step."),
  "num_devices": (
    flags.DEFINE_integer,
    "Devices on the mesh (0 = all, or the most that divide P).",
  ),
  "combine_sharding": (
    flags.DEFINE_string,
    "replicated: gather all messages onto every device; sharded: each device combines a "
    "D/N column slice of every message (bytes received per device: ~P·D/N + D, not ~P·D).",
  ),
}
for _name, (_define, _help) in _FLAGS.items():
  _define(_name, getattr(_DEFAULT, _name), _help)
_OPTION_FLAGS = {
  "model_options": 'Model options, JSON (default for mlp: {"hidden": [64]}).',
  "attack_options": 'Attack options, JSON, e.g. {"scale": 10}.',
  "combiner_options": "Decoder or aggregator options, JSON.",
}
for _name, _help in _OPTION_FLAGS.items():
  flags.DEFINE_string(_name, None, _help)
flags.DEFINE_string(
  "workdir",
  None,
  "Run directory (default: ./workdir/run-<date>-<time>); one holding another run's files is "
  "refused unless --resume or --overwrite.",
)
_ENV = distributed.ENV_VARS
flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-process runs: host:port of process 0's coordinator "
  f"(default: ${_ENV['coordinator_address']}).",
)
flags.DEFINE_integer(
  "num_processes",
  None,
  f"Processes in the run (default: ${_ENV['num_processes']}, else 1); {distributed.AUTO} detects "
  "the unset settings from the cluster (SLURM, Open MPI, Cloud TPU, Kubernetes).",
)
flags.DEFINE_integer(
  "process_id", None, f"This process, 0..num_processes-1 (default: ${_ENV['process_id']})."
)
flags.DEFINE_string(
  "local_device_ids",
  None,
  f"Comma-separated local devices this process uses (default: ${_ENV['local_device_ids']}, "
  "else all, or one per process under SLURM / Open MPI detection).",
)
FLAGS = flags.FLAGS


def _parse_options(name: str) -> dict[str, Any] | None:
  text = getattr(FLAGS, name)
  if text is None:
    return None
  try:
    options = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"--{name} must be a JSON object; got {text!r} ({e})") from None
  if not isinstance(options, dict):
    raise ValueError(f"--{name} must be a JSON object; got {text!r}")
  return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _config_from_flags() -> TrainConfig:
  values = {name: getattr(FLAGS, name) for name in _FLAGS}
  for name in _OPTION_FLAGS:
    options = _parse_options(name)
    if options is not None:
      values[name] = options
  return TrainConfig(**values)


def _default_workdir() -> str:
  stamp = int(time.time())
  if jax.process_count() > 1:  # every process must name the same directory
    stamp = int(multihost_utils.broadcast_one_to_all(np.int32(stamp)))
  return os.path.join("workdir", time.strftime("run-%Y%m%d-%H%M%S", time.localtime(stamp)))


# Exit statuses of the command line (1: refused at start, as absl's usage errors).
EXIT_REFUSED = 1
EXIT_NO_STEP_APPLIED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process killed by Ctrl-C
_RUN_CONTROL_FLAGS = ("workdir", "resume", "noresume", "overwrite", "nooverwrite")


def _resume_command(argv: Sequence[str], workdir: str) -> str:
  """The command line that continues ``workdir``: ``argv`` without its run-control flags, plus
  ``--resume --workdir=...``."""
  args, skip_value = [], False
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if skip_value or (arg.startswith("-") and name in _RUN_CONTROL_FLAGS):
      skip_value = not skip_value and name == "workdir" and "=" not in arg  # --workdir PATH
      continue
    args.append(arg)
  program = [sys.executable, "-m", "draco_jax.train"]
  return shlex.join([*program, *args, "--resume", f"--workdir={workdir}"])


class _StopOnSigint:
  """While entered, the first SIGINT asks the loop to stop before its next step (a callable
  for :func:`_fit`); a second one raises KeyboardInterrupt at once. Every process stops at the
  same step: the requests are all-gathered before each step of a multi-process run."""

  def __init__(self):
    self.requested = False

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __enter__(self) -> _StopOnSigint:
    self.previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    signal.signal(signal.SIGINT, self.previous)

  def __call__(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def _fatal(kind: str, error: Exception, hint: str = "") -> None:
  print(f"FATAL {kind} error: {error}{hint}", file=sys.stderr)
  sys.exit(EXIT_REFUSED)


def _set_up() -> tuple[Trainer, _Workdir]:
  """Flags to trainer and workdir; a refusal is one line and exit status 1, before set-up."""
  try:
    distributed.initialize(  # before anything touches a device
      distributed.resolve_settings(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.local_device_ids
      )
    )
    config = _config_from_flags()
    if config.resume and not FLAGS.workdir:
      raise ValueError("--resume needs the --workdir of the run to continue")
    return _open(config, FLAGS.workdir or _default_workdir())
  except WorkdirError as e:
    _fatal("Workdir", e)
  except data.DatasetNotPreparedError as e:
    _fatal("Dataset", e)
  except ValueError as e:  # a bad configuration: one clear line, no traceback
    _fatal("Configuration", e, "\nPass --helpshort or --helpfull to see help on flags.")
  except KeyboardInterrupt:
    print("Interrupted during set-up, before any step ran: nothing was saved.", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def main(argv: Sequence[str]) -> None:
  """Trains; exit status 0 trained, 1 refused at start, 3 no step applied, 130 interrupted."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  trainer, workdir = _set_up()
  resume = _resume_command(sys.argv, workdir.path)
  try:
    with _StopOnSigint() as stop:
      results = _fit(trainer, workdir, stop)
  except RunInterrupted as e:
    if workdir.is_writer:
      print(f"Interrupted: step {e.step} is checkpointed; resume with: {resume}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except KeyboardInterrupt:  # a second Ctrl-C while the checkpoint was being written
    if workdir.is_writer:
      print(f"Interrupted again: resume from the last checkpoint: {resume}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  if workdir.is_writer:
    _print_summary(trainer.config, results)
  sys.stdout.flush()
  sys.exit(EXIT_NO_STEP_APPLIED if results["no_step_applied"] else 0)


if __name__ == "__main__":
  app.run(main)
