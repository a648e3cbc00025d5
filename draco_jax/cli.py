"""The command line of ``python -m draco_jax.train``: flags -> TrainConfig -> train_and_evaluate.

This is the only module that defines absl flags; nothing in the library imports it (only
``draco_jax/train.py``, when run as a program), so notebooks, experiments and benchmarks that
import the library register none.

Exit status: 0 trained; 1 refused before any set-up (a bad configuration, a workdir that is not
a writable directory or holds another run's files, a dataset that is not prepared: one line
each); 3 no step was applied (every step refused); 130 interrupted (Ctrl-C saves a checkpoint of
the last completed step and prints the one command that resumes). More than
``max_refused_fraction`` refused steps print a warning on stderr and at the top of the summary.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils

from draco_jax import aggregators, attacks, coding, data, distributed, models, placements, summary
from draco_jax.config import (
  ASSIGNMENTS,
  COMBINE_SHARDINGS,
  DATA_ATTACKS,
  DECODER,
  OPTIMIZERS,
  WORKER_COMPUTES,
  TrainConfig,
)
from draco_jax.loop import EXIT_INTERRUPTED, EXIT_NO_STEP_APPLIED, EXIT_REFUSED, fit, open_run
from draco_jax.trainer import Trainer
from draco_jax.workdir import RUN_FILES, RunInterrupted, Workdir, WorkdirError

__all__ = ["main", "run", "usage"]

_DEFAULT = TrainConfig()
_FLAGS = {
  "code": (flags.DEFINE_string, "Gradient code (valid names above); uncoded for a baseline."),
  "num_workers": (flags.DEFINE_integer, "P, workers (= partitions per step)."),
  "num_adversaries": (flags.DEFINE_integer, "t, adversarial workers per step."),
  "max_adversaries": (flags.DEFINE_integer, "S the scheme tolerates (-1: num_adversaries)."),
  "attack": (flags.DEFINE_string, "What the adversaries do (valid names above)."),
  "placement": (flags.DEFINE_string, "Which workers are adversarial at each step."),
  "aggregator": (flags.DEFINE_string, "'draco' for coded schemes; a baseline with uncoded."),
  "model": (flags.DEFINE_string, "Model (valid names above)."),
  "dataset": (flags.DEFINE_string, "Dataset (valid names above)."),
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
  "assignment": (
    flags.DEFINE_string,
    "random: each step a fresh secret assignment of code rows to workers, so adversaries on "
    "consecutive workers hold random rows of the code; fixed: worker k computes row k.",
  ),
  "worker_compute": (
    flags.DEFINE_string,
    "How the simulator computes the messages (the same either way). shared: each step "
    "evaluates the K partition gradients once and forms every worker's message from them "
    "(the clean-mean diagnostic reuses them); per_worker: every worker evaluates its own R "
    "gradients and the diagnostic the K again, K(R+1) per step, so that the 'gradients' "
    "timing measures what the P workers compute.",
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
  for :func:`draco_jax.loop.fit`); a second one raises KeyboardInterrupt at once. Every process
  stops at the same step: the requests are all-gathered before each step of a multi-process
  run."""

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


def _set_up() -> tuple[Trainer, Workdir]:
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
    return open_run(config, FLAGS.workdir or _default_workdir())
  except WorkdirError as e:
    _fatal("Workdir", e)
  except data.DatasetNotPreparedError as e:
    _fatal("Dataset", e)
  except ValueError as e:  # a bad configuration: one clear line, no traceback
    _fatal("Configuration", e, "\nPass --help to see the flags and the valid names.")
  except KeyboardInterrupt:
    print("Interrupted during set-up, before any step ran: nothing was saved.", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def _print_summary(config: TrainConfig, results: dict[str, Any]) -> None:
  """The summary on stdout, any warning first (and on stderr too)."""
  for warning in results["warnings"]:
    print(f"WARNING: {warning}", file=sys.stderr)
  sys.stderr.flush()
  print(summary.summary_text(config, results))


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
      results = fit(trainer, workdir, stop)
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


# ---------------------------------------------------------------------------------------------
# --help: what the program does, the valid names, the flags.

_ABOUT = """\
Trains an image classifier with P simulated workers, some of which are adversaries that send
corrupted gradients, and reports how well training resisted them. The defence is either DRACO,
a gradient code (every worker computes the gradients of 2S+1 data partitions, and the server
recovers the exact gradient of the honest run whenever at most S workers lie), or a baseline
robust aggregator (Krum, median, ...) on uncoded gradients. Metrics, checkpoints and results go
to --workdir, and the run ends with a summary. Without flags it trains a small MLP on the
bundled digits dataset with 15 workers, 2 of which reverse their gradients, defended by the
cyclic code."""

_EXAMPLES = """\
usage: python -m draco_jax.train [--flag=value ...]
  python -m draco_jax.train --steps=100                    # the default run, shorter
  python -m draco_jax.train --code=uncoded --aggregator=krum --attack=alie
  python -m draco_jax.train --code=repetition --num_workers=9 --num_adversaries=1"""

_HELP_FLAGS = ("help", "helpshort", "helpfull", "h", "?")


def _names(registry: Sequence[str] | Mapping[str, Any], notes: Mapping[str, str] | None = None):
  """The names of a registry; a name bound to the same entry as an earlier one is an alias."""
  notes = notes or {}
  entries = registry if isinstance(registry, Mapping) else dict.fromkeys(registry)
  first: dict[int, str] = {}
  shown = []
  for name, entry in entries.items():
    original = first.setdefault(id(entry), name) if entry is not None else name
    note = notes.get(name) or (f"alias of {original}" if original != name else "")
    shown.append(f"{name} ({note})" if note else name)
  return ", ".join(shown)


def _valid_names() -> list[tuple[str, str]]:
  baselines = ", ".join(aggregators.AGGREGATORS)
  attack_notes = {name: "poisons the data" for name in DATA_ATTACKS}
  return [
    ("code", _names(coding.CODES, {"uncoded": "no code: a baseline --aggregator combines"})),
    ("aggregator", f"{DECODER} (the decoder of every code); with --code=uncoded: {baselines}"),
    ("attack", _names({**attacks.ATTACKS, **dict.fromkeys(DATA_ATTACKS)}, attack_notes)),
    ("placement", _names(placements.PLACEMENTS)),
    ("model", _names(models.MODELS)),
    ("dataset", _names(data.DATASETS)),
    ("optimizer", _names(OPTIMIZERS)),
    ("combine_sharding", _names(COMBINE_SHARDINGS)),
    ("assignment", _names(ASSIGNMENTS)),
    ("worker_compute", _names(WORKER_COMPUTES)),
  ]


def usage(full: bool = False) -> str:
  """The --help text: what the program does, how to call it, the valid names, the flags (with
  ``full``, absl's own flags too)."""
  names = [
    textwrap.fill(text, 100, initial_indent=f"  --{flag:<18}", subsequent_indent=" " * 22)
    for flag, text in _valid_names()
  ]
  if full:
    flag_help = FLAGS.get_help()
  else:  # this module's flags, without absl's "draco_jax.cli:" heading
    flag_help = "\n".join(FLAGS.module_help(__name__).strip().splitlines()[1:])
  return "\n".join(
    [
      _ABOUT,
      "",
      _EXAMPLES,
      "",
      "valid names:",
      *names,
      "",
      "flags:",
      flag_help,
      "",
      "exit status: 0 trained; 1 refused at start (configuration, workdir or dataset: one line);",
      "  3 no step applied (every step refused); 130 interrupted (the resume command is printed).",
    ]
  )


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, except that --help (-h, -?, --helpshort, --helpfull) prints :func:`usage`
  on stdout and exits with status 0."""
  for arg in argv[1:]:
    if arg == "--":
      break
    name = arg.lstrip("-")
    if arg.startswith("-") and name in _HELP_FLAGS:
      print(usage(full=name == "helpfull"))
      sys.exit(0)
  return app.parse_flags_with_usage(argv)


def run() -> None:
  """Runs the command line (``python -m draco_jax.train``)."""
  app.run(main, flags_parser=_parse_flags)
