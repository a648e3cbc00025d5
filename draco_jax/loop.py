"""The training loop, :func:`train_and_evaluate`: a thin loop around the jitted step that logs,
evaluates, times and checkpoints; and the exit status the command line gives each outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
from tqdm.auto import tqdm

from draco_jax import data, metrics, summary
from draco_jax.config import TrainConfig, validate
from draco_jax.step import TrainState
from draco_jax.trainer import Trainer, evaluate, make_trainer, time_phases, train_step
from draco_jax.workdir import Workdir, check_workdir

__all__ = [
  "train_and_evaluate",
  "open_run",
  "fit",
  "EXIT_REFUSED",
  "EXIT_NO_STEP_APPLIED",
  "EXIT_INTERRUPTED",
]

# Exit statuses of the command line: 1 refused at start (as absl's usage errors): a bad
# configuration, workdir or dataset; 3 no step was applied (``results["no_step_applied"]``);
# 130 interrupted (``RunInterrupted``), 128 + SIGINT as a shell reports a Ctrl-C'd process.
EXIT_REFUSED = 1
EXIT_NO_STEP_APPLIED = 3
EXIT_INTERRUPTED = 130


class _Progress:
  """What the loop has reached: the state, the totals, the last evaluation and timing."""

  def __init__(self, state: TrainState):
    self.state, self.totals = state, summary.Totals()
    self.accuracy: float | None = None
    self.timing: dict[str, float] = {}


def _is_due(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


def _bar(workdir: Workdir, step: int, total: int):
  """The progress bar, started after the first step so that compiling it skews no ETA."""
  return tqdm(total=total, initial=step, disable=not workdir.is_writer)


def _loop(trainer, workdir, progress: _Progress, start: int, stop: Callable[[], bool]) -> bool:
  """Steps from ``start`` to ``config.steps``: log, evaluate and time, checkpoint.

  Returns True when ``stop()`` asked to stop (checked before each step, on every process).
  """
  config = trainer.config
  started, step_seconds, steps_since_log, bar = time.perf_counter(), 0.0, 0, None
  try:
    for index in range(start, config.steps):
      if stop():
        return True
      tick = time.perf_counter()
      progress.state, step_metrics = train_step(trainer, progress.state, index)
      step_seconds, steps_since_log = step_seconds + time.perf_counter() - tick, steps_since_log + 1
      progress.totals.add(step_metrics)
      step = index + 1
      if bar is None:
        bar = _bar(workdir, step, config.steps)
      else:
        bar.update()
      record = {metrics.STEP: step, **step_metrics}
      if _is_due(step, config.eval_every, config.steps):
        progress.accuracy = evaluate(trainer, progress.state.params)
        progress.timing = time_phases(trainer, progress.state, step) if config.timing else {}
        record.update({metrics.TEST_ACCURACY: progress.accuracy, metrics.TIMING: progress.timing})
        loss = step_metrics[metrics.LOSS]
        bar.set_postfix(loss=f"{loss:.3f}", test_acc=f"{progress.accuracy:.3f}")
      if _is_due(step, config.log_every, config.steps) or metrics.TEST_ACCURACY in record:
        record[metrics.WALL_TIME] = time.perf_counter() - started
        record[metrics.MS_PER_STEP] = 1e3 * step_seconds / steps_since_log
        step_seconds, steps_since_log = 0.0, 0
        workdir.log(record)
      if _is_due(step, config.checkpoint_every, config.steps):
        workdir.save(trainer, progress.state, step)
  finally:
    if bar is not None:
      bar.close()
  return False


def _never() -> bool:
  return False


def fit(trainer: Trainer, workdir: Workdir, stop: Callable[[], bool] = _never) -> dict[str, Any]:
  """The loop around the step; returns the results.

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
  results = summary.make_results(
    config,
    progress.totals,
    accuracy=progress.accuracy,
    state=progress.state,
    wall=wall,
    timing_ms=progress.timing,
    devices=trainer.mesh.size,
    processes=jax.process_count(),
    workdir=workdir.path,
  )
  workdir.close(results)
  return {**results, "state": progress.state}


def open_run(config: TrainConfig, workdir: str) -> tuple[Trainer, Workdir]:
  """Everything that can refuse a run, cheapest first, before any step runs.

  The configuration, then the dataset (opened, not read) and the workdir, and only then the
  expensive set-up (data loading, model, jit); an ``overwrite`` clears the old run last.
  """
  validate(config)
  data.check_available(config.dataset, data_dir=config.data_dir)
  path = check_workdir(config, workdir)
  trainer = make_trainer(config)
  return trainer, Workdir(config, path)


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
  return fit(*open_run(config, workdir))
