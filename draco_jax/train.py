"""DRACO training: the library's public training API, and the program ``python -m draco_jax.train``.

Run the offline default (digits, MLP, cyclic code, 2 of 15 workers reversing their gradients):

    python -m draco_jax.train          # --help: what it does, the valid names, the flags

Importing this module registers no command-line flag (they live in :mod:`draco_jax.cli`, which
only running it as a program imports), so notebooks and scripts use it freely:

    from draco_jax.train import TrainConfig, train_and_evaluate
    results = train_and_evaluate(TrainConfig(steps=50), "/tmp/run")

Where things are (docs/design.md has the module map and one step's dataflow):

* :mod:`draco_jax.step`: the pure step, ``compose(phases)``, and its state types;
* :mod:`draco_jax.server`: adversaries, stragglers and the combiner (decoder or aggregator,
  replicated or sharded);
* :mod:`draco_jax.trainer`: building a run, one step, evaluation, phase timing;
* :mod:`draco_jax.workdir`, :mod:`draco_jax.metrics`, :mod:`draco_jax.summary`: a run's files,
  the names of what it measures, what it reports;
* :mod:`draco_jax.loop`: :func:`train_and_evaluate`;
* :mod:`draco_jax.cli`: the flags and ``main``.
"""

from __future__ import annotations

from draco_jax.config import TrainConfig
from draco_jax.loop import (
  EXIT_INTERRUPTED,
  EXIT_NO_STEP_APPLIED,
  EXIT_REFUSED,
  train_and_evaluate,
)
from draco_jax.server import StepKeys, split_step_key
from draco_jax.step import Batch, StepPhases, TrainState, compose, make_phases, make_train_step
from draco_jax.trainer import Trainer, evaluate, make_trainer, time_phases, train_step
from draco_jax.workdir import RUN_FILES, RunInterrupted, WorkdirError, check_workdir

__all__ = [
  "TrainConfig",
  "TrainState",
  "Batch",
  "StepKeys",
  "StepPhases",
  "Trainer",
  "split_step_key",
  "make_trainer",
  "make_phases",
  "make_train_step",
  "compose",
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
]


def _run_program() -> None:
  from draco_jax import cli  # defines the flags: only the program imports it

  cli.run()


if __name__ == "__main__":
  _run_program()
