"""A run's directory: config.json, metrics.jsonl, TensorBoard, results.json and orbax checkpoints.

:func:`check_workdir` refuses a directory that cannot hold the run before anything expensive
is built; :class:`Workdir` writes the files. Only process 0 writes files; every process calls
the checkpoint manager (orbax coordinates multi-process saves itself and writes replicated
arrays from the primary host).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from draco_jax import mesh as mesh_lib
from draco_jax.config import TrainConfig
from draco_jax.metrics import STEP
from draco_jax.step import TrainState
from draco_jax.trainer import Trainer

__all__ = ["RUN_FILES", "WorkdirError", "RunInterrupted", "check_workdir", "Workdir"]

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
  :class:`Workdir`) or refused; nothing on disk changes here except creating the directory.

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


def _key_data(trainer: Trainer) -> np.ndarray:
  """The run's key as host data: the same value on every process, saved once by orbax."""
  return np.asarray(jax.random.key_data(trainer.base_key))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Workdir:
  """Metrics lines, TensorBoard, config.json, results.json and orbax checkpoints of one run."""

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
        if name != STEP:
          self.writer.add_scalar(name, value, record[STEP])

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
    return json.loads(line)[STEP]
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
