"""A run's objects, built once (:func:`make_trainer`), and what the host does with them: one
step (:func:`train_step`), an evaluation (:func:`evaluate`), a phase timing
(:func:`time_phases`).

Shape legend: K partitions, B examples per partition, N evaluation examples, H x W x C one
example.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from draco_jax import coding, data, metrics, models
from draco_jax import mesh as mesh_lib
from draco_jax import step as step_lib
from draco_jax.config import TrainConfig, make_optimizer, validate
from draco_jax.step import Batch, StepPhases, TrainState

__all__ = ["Trainer", "make_trainer", "train_step", "evaluate", "time_phases"]

_EVAL_BATCH = 512


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Trainer:
  """A run's code, mesh, data, model and jitted functions (see :func:`make_trainer`).

  Attributes:
    attacks: the attack names a step can select with ``Batch.attack``.
    phases: the step's functions, each jitted (:class:`draco_jax.step.StepPhases`).
    update_fn: the jitted step ``update_fn(state, batch, key) -> (state, metrics)``, the
      composition of ``phases`` (:func:`draco_jax.step.compose`).
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
  phases: StepPhases
  update_fn: Callable
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


def _make_model(config: TrainConfig, train_ds: data.Dataset) -> tuple[Callable, Any]:
  """(apply_fn(params, x_NxHxWxC) -> logits, params); models hold only nnx.Param state."""
  model = models.make_model(
    config.model,
    num_classes=train_ds.num_classes,
    input_shape=train_ds.input_shape,
    rngs=nnx.Rngs(config.seed),
    **config.resolved_model_options,
  )
  graphdef, params = nnx.split(model, nnx.Param)
  return (lambda p, x_NxHxWxC: nnx.merge(graphdef, p)(x_NxHxWxC)), params


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
  names = tuple(attack_names or (config.attack,))
  phases = step_lib.make_phases(
    config, code, mesh, apply_fn, params, tx, num_classes=train_ds.num_classes, attack_names=names
  )
  phases = StepPhases(*map(jax.jit, phases))

  def eval_fn(params, x_NxHxWxC, y_N, mask_N):
    return jnp.sum(mask_N & (jnp.argmax(apply_fn(params, x_NxHxWxC), -1) == y_N))

  return Trainer(
    config=config,
    code=code,
    mesh=mesh,
    attacks=names,
    train_ds=train_ds,
    test_ds=test_ds,
    apply_fn=apply_fn,
    init_params=params,
    tx=tx,
    phases=phases,
    update_fn=jax.jit(step_lib.compose(phases)),
    eval_fn=jax.jit(eval_fn),
    base_key=jax.random.key(config.seed),
  )


def train_step(
  trainer: Trainer, state: TrainState, step: int, attack: int = 0
) -> tuple[TrainState, dict[str, float]]:
  """Runs step ``step`` and waits for it (on CPU, collective steps dispatched without blocking
  deadlock after a few dozen); returns the new state and the metrics as floats."""
  batch, key = trainer.step_inputs(step, attack)
  state, step_metrics = trainer.update_fn(state, batch, key)
  return state, {name: float(value) for name, value in jax.device_get(step_metrics).items()}


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


def _timing(phases: StepPhases, ms: dict[str, float]) -> StepPhases:
  """The same phases, each one waited for and its milliseconds recorded in ``ms``."""

  def timed(name: str, fn: Callable) -> Callable:
    def run(*args):
      out, ms[name] = _timed(fn, *args)
      return out

    return run

  return StepPhases(*(timed(name, fn) for name, fn in phases._asdict().items()))


def time_phases(trainer: Trainer, state: TrainState, step: int, repeats: int = 2) -> dict:
  """Milliseconds per phase of step ``step`` (:data:`draco_jax.metrics.PHASES`) and of the
  whole jitted step (``metrics.WHOLE_STEP``).

  The step is run phase by phase: :func:`draco_jax.step.compose` of the trainer's own jitted
  phases, each waited for. The state is not changed. The last of ``repeats`` rounds is
  reported (the first compiles).
  """
  batch, key = trainer.step_inputs(step)
  for _ in range(repeats):
    ms = {}
    step_lib.compose(_timing(trainer.phases, ms))(state, batch, key)
    _, ms[metrics.WHOLE_STEP] = _timed(trainer.update_fn, state, batch, key)
  return {name: ms[name] for name in (*metrics.PHASES, metrics.WHOLE_STEP)}
