"""The command line tells the truth: exit statuses, one-line refusals, Ctrl-C, over capacity.

Each test launches ``python -m draco_jax.train`` (JAX import and jit: ~2 s to refuse, ~5-15 s
to train a tiny config on 2 cores); the subprocesses inherit conftest's 8 simulated devices.
"""

import dataclasses
import json
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from draco_jax import aggregators, attacks, coding, data, models, placements, train
from draco_jax.config import DATA_ATTACKS, TrainConfig

TINY_FLAGS = (
  '--model_options={"hidden": [16]}',
  "--optimizer=sgd",
  "--learning_rate=0.1",
  "--batch_per_partition=4",
  "--timing=false",
)
TINY = TrainConfig(
  model_options={"hidden": (16,)},
  optimizer="sgd",
  learning_rate=0.1,
  batch_per_partition=4,
  timing=False,
)
COMMAND = (sys.executable, "-m", "draco_jax.train")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([*COMMAND, *flags], capture_output=True, text=True, timeout=timeout)


def _snapshot(path):
  return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _summary(stdout: str) -> list[str]:
  """The summary's lines after its header (``== ... run summary: ... ==``)."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if re.match(r"== \w+ run summary: ", line))
  return lines[start + 1 :]


@pytest.mark.parametrize(
  "flags, status, refused, warning",
  [
    (  # the undefended mean of NaN rows is never finite: every step refused, nothing trained
      ["--code=uncoded", "--aggregator=mean", "--num_workers=5", "--attack=nan"],
      train.EXIT_NO_STEP_APPLIED,
      "3 of 3 run",
      "no step was applied: all 3 steps run now were refused",
    ),
    (  # over capacity: S+1 reversed replicas outvote their group (forged steps are applied),
      # and with a straggler too one step is refused (rows fixed: a fresh row assignment would
      # spread the replicas over the groups)
      [
        "--assignment=fixed",
        "--code=repetition",
        "--num_workers=9",
        "--max_adversaries=1",
        "--num_adversaries=2",
        "--num_stragglers=1",
        "--attack=reverse_gradient",
        "--over_capacity",
      ],
      0,
      "1 of 3 run",
      "1 of 3 steps run now \\(33%\\) were refused",
    ),
  ],
)
def test_refused_steps_set_the_exit_status_and_warn(tmp_path, flags, status, refused, warning):
  """The exit status, and a warning on stderr and at the top of the summary, say how many steps
  were refused; the summary gives the deviation of the applied ones. --over_capacity runs
  2t + e > 2S from the command line."""
  common = [f"--workdir={tmp_path}", *TINY_FLAGS, "--steps=3", "--eval_every=3"]
  result = _train(*common, *flags)
  assert result.returncode == status, result.stderr[-2000:]
  assert re.search(f"WARNING: {warning}", result.stderr)
  summary = _summary(result.stdout)
  assert re.match(f"WARNING: {warning}", summary[0]), summary
  assert any(line.startswith(f"refused steps            {refused}") for line in summary)
  over = [line for line in summary if line.startswith("over capacity            2t + e = 5 > 2S")]
  assert len(over) == ("--over_capacity" in flags)
  deviation = next(line for line in summary if line.startswith("deviation from clean"))
  if status == 0:  # the applied steps are forged: the deviation is far from rounding
    mean, largest = map(float, re.findall(r"(?:mean|max) ([0-9.e+-]+)", deviation))
    assert 1.0 < mean <= largest, deviation
  else:
    assert "none: no step applied" in deviation
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["no_step_applied"] == (status != 0) and len(results["warnings"]) == 1


def _assert_one_line(result: subprocess.CompletedProcess, message: str) -> None:
  output = result.stdout + result.stderr
  assert result.returncode == train.EXIT_REFUSED, output
  assert "Traceback" not in output
  fatal = [line for line in output.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and re.search(message, fatal[0]), output
  assert len(output.splitlines()) <= 2, output  # tfds may log one warning line


@pytest.mark.parametrize(
  "case, message",
  [
    ("file", "FATAL Workdir error: workdir .*/afile exists and is not a directory"),
    ("under_file", "FATAL Workdir error: cannot create workdir .*/afile/sub: .*/afile is not a"),
    (
      "dataset",
      "FATAL Dataset error: dataset 'mnist' is not available: .*t10k-labels.*`tfds build",
    ),
  ],
)
def test_runtime_errors_are_one_line_before_set_up(tmp_path, case, message):
  """A workdir that cannot be written or an unprepared dataset: one line, exit status 1, and
  before the model is built (the model options below are refused only when it is)."""
  (tmp_path / "afile").write_text("")
  workdir = {"file": "afile", "under_file": "afile/sub"}.get(case, "run")
  flags = [f"--workdir={tmp_path / workdir}", '--model_options={"bogus": 1}']
  if case == "dataset":
    flags += ["--dataset=mnist", f"--data_dir={tmp_path / 'no_data'}"]
  start = time.perf_counter()
  result = _train(*flags, timeout=120)
  _assert_one_line(result, message)
  assert time.perf_counter() - start < 60  # imports only: ~2 s idle (was 5-15 s of set-up)
  if case == "dataset":
    assert not (tmp_path / "run").exists()  # refused before the workdir was created


def test_workdir_of_another_run_is_refused_unless_overwritten(tmp_path):
  """An early-interrupted run (config.json, metrics.jsonl, no checkpoint) is not overwritten by
  another config; --overwrite deletes the run's files, and nothing else, and starts afresh."""
  flags = [f"--workdir={tmp_path}", *TINY_FLAGS, "--num_workers=5", "--num_adversaries=1"]
  flags += ["--steps=2", "--eval_every=2"]
  (tmp_path / "config.json").write_text(TrainConfig().to_json())
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.3}\n')
  (tmp_path / "notes.txt").write_text("not the run's")
  before = _snapshot(tmp_path)
  refused = _train(*flags, timeout=120)
  _assert_one_line(refused, "already holds another run's files .*--resume.*--overwrite")
  assert _snapshot(tmp_path) == before
  overwritten = _train(*flags, "--overwrite")
  assert overwritten.returncode == 0, overwritten.stderr[-2000:]
  assert json.loads((tmp_path / "config.json").read_text())["num_workers"] == 5
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [2]
  assert (tmp_path / "notes.txt").read_text() == "not the run's"


def _final_checkpoint(workdir, step: int):
  """Every leaf of the checkpoint (state and key), restored as saved."""
  with ocp.CheckpointManager(workdir / "checkpoints") as manager:
    return jax.tree.leaves(manager.restore(step, args=ocp.args.StandardRestore()))


def test_ctrl_c_checkpoints_and_the_printed_command_resumes_bit_for_bit(tmp_path):
  """SIGINT mid-run: exit status 130, one line with the resume command, no traceback; that
  command ends with the checkpoint (params, optimizer state, counters) of an uninterrupted run."""
  steps = 600
  config = dataclasses.replace(
    TINY, num_workers=5, num_adversaries=1, steps=steps, eval_every=steps, log_every=1
  )
  flags = [*TINY_FLAGS, "--num_workers=5", "--num_adversaries=1", f"--steps={steps}"]
  flags += [f"--eval_every={steps}", "--log_every=1"]
  workdir = tmp_path / "run"
  process = subprocess.Popen(
    [*COMMAND, *flags, "--workdir", str(workdir)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + 240
  while not (metrics.exists() and metrics.stat().st_size) and process.poll() is None:
    assert time.monotonic() < deadline, "no step within 240 s"
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)  # after the first step, before the last (1 ms each)
  stdout, stderr = process.communicate(timeout=120)
  output = stdout + stderr
  assert process.returncode == train.EXIT_INTERRUPTED, output[-2000:]
  assert "Traceback" not in output
  (line,) = [line for line in output.splitlines() if "Interrupted" in line]
  interrupted = int(re.search(r"step (\d+) is checkpointed", line).group(1))
  assert 0 < interrupted < steps
  command = shlex.split(line.split("resume with: ", 1)[1])
  assert command == [*COMMAND, *flags, "--resume", f"--workdir={workdir}"]
  assert (workdir / "checkpoints" / str(interrupted)).is_dir()

  resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"0 of {steps - interrupted} run (0 of {steps} in all" in resumed.stdout
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  got, want = _final_checkpoint(workdir, steps), _final_checkpoint(tmp_path / "whole", steps)
  assert len(got) == len(want) and all(map(np.array_equal, got, want))
  lines = metrics.read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))


# Flags of the command line that no library import may register.
TRAINING_FLAGS = ("num_workers", "code", "workdir", "attack", "aggregator", "steps", "resume")
_REGISTERED_FLAGS = """
import importlib, pathlib, sys
from absl import flags
root = pathlib.Path.cwd()
names = sorted(
  ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
  for package in ("draco_jax", "experiments", "benchmarks")
  for path in (root / package).rglob("*.py")
)
for name in names:
  if name != sys.argv[1]:
    importlib.import_module(name)
print(len(names), *sorted(set(sys.argv[2:]) & set(flags.FLAGS)))
"""


@pytest.mark.parametrize("skipped, registered", [("draco_jax.cli", ()), ("", TRAINING_FLAGS)])
def test_library_imports_register_no_flag(skipped, registered):
  """Importing every module of draco_jax, experiments and benchmarks but the command line
  (draco_jax.cli) registers none of its flags; importing draco_jax.cli registers them all."""
  result = subprocess.run(
    [sys.executable, "-c", _REGISTERED_FLAGS, skipped, *TRAINING_FLAGS],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  count, *found = result.stdout.split()
  assert int(count) > 20 and found == sorted(registered), result.stdout


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_says_what_the_program_does_and_lists_the_names(flag):
  result = _train(flag, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  paragraph = result.stdout.split("\n\n")[0]
  assert paragraph.startswith("Trains an image classifier") and "DRACO" in paragraph
  names = result.stdout.split("valid names:")[1].split("flags:")[0]
  for registry in (coding.CODES, aggregators.AGGREGATORS, placements.PLACEMENTS, models.MODELS):
    assert all(re.search(rf"\b{name}\b", names) for name in registry), registry
  for registry in (attacks.ATTACKS, data.DATASETS, DATA_ATTACKS):
    assert all(re.search(rf"\b{name}\b", names) for name in registry), registry
  assert "rev_grad (alias of reverse_gradient)" in " ".join(names.split())
  assert "--num_workers" in result.stdout and "--combine_sharding" in result.stdout
