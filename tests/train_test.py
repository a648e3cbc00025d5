"""Tests for the training API (draco_jax.train) and draco_jax.config: the DRACO guarantee end
to end.

conftest.py simulates 8 CPU devices. Each trainer compiles its step once; the attacks a test
needs are compiled into that one step (``attack_names``) and chosen per run by ``Batch.attack``.
Runs use SGD on a tiny MLP so that float32 rounding in the decoders stays far below 1e-5.
"""

import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from draco_jax import cli, data, server, summary, train
from draco_jax import step as step_lib
from draco_jax.config import TrainConfig, validate

STEPS = 20
RTOL = 1e-5
TINY = TrainConfig(
  model_options={"hidden": (16,)},
  optimizer="sgd",
  learning_rate=0.1,
  batch_per_partition=4,
  placement="random",
  steps=STEPS,
  timing=False,
)
# Every message attack of docs/math.md §6 that a decoder must remove exactly at f <= S
# ("small" is excluded: it hides below float32 rounding, §5.4), plus the label-flip data attack.
GUARANTEE_ATTACKS = (
  "reverse_gradient",
  "constant",
  "gaussian",
  "sign_flip",
  "alie",
  "ipm",
  "nan",
  "inf",
  "huge",
  "mixed",
  "collude",
  "label_flip",
)
# (code, P, S, devices): odd P on 1 device, FRC on 3 devices, even P on 8 devices, and (slow:
# each case costs one ~10 s compilation) the paper's complex code on 7 devices.
GUARANTEE_CASES = [
  ("cyclic", 15, 2, 1),
  ("repetition", 9, 1, 3),
  ("cyclic", 8, 2, 8),
  ("cyclic", 16, 2, 8),
  pytest.param("cyclic_paper", 7, 1, 7, marks=pytest.mark.slow),
]
BASELINE_ATTACKS = ("none", "reverse_gradient", "nan")


@functools.cache
def _coded_trainer(code, num_workers, num_adversaries, num_devices, num_stragglers=0):
  config = dataclasses.replace(
    TINY,
    code=code,
    num_workers=num_workers,
    num_adversaries=num_adversaries,
    max_adversaries=num_adversaries + (num_stragglers + 1) // 2,
    num_stragglers=num_stragglers,
    num_devices=num_devices,
  )
  return train.make_trainer(config, attack_names=("none", *GUARANTEE_ATTACKS))


@functools.cache
def _mean_trainer(num_workers, num_adversaries, num_devices):
  """Plain uncoded mean-SGD (no defence) with the same data, init and adversary masks."""
  config = dataclasses.replace(
    TINY,
    code="uncoded",
    aggregator="mean",
    num_workers=num_workers,
    num_adversaries=num_adversaries,
    num_devices=num_devices,
  )
  return train.make_trainer(config, attack_names=BASELINE_ATTACKS)


@functools.cache
def _run(trainer, attack, steps=STEPS):
  """(final state, per-step metrics) of ``steps`` steps under ``trainer.attacks[attack]``."""
  state = trainer.init_state()
  history = []
  for step in range(steps):
    state, metrics = train.train_step(trainer, state, step, attack)
    history.append(metrics)
  return state, history


@functools.cache
def _plain_sgd(trainer, steps=STEPS):
  """Independent reference: single-device SGD on the mean loss of the same K partitions."""
  config = trainer.config

  def loss(params, x_KxBxHxWxC, y_KxB):
    logits = trainer.apply_fn(params, x_KxBxHxWxC.reshape(-1, *x_KxBxHxWxC.shape[2:]))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y_KxB.reshape(-1)).mean()

  @jax.jit
  def sgd_step(params, x, y):
    grads = jax.grad(loss)(params, x, y)
    return jax.tree.map(lambda p, g: p - config.learning_rate * g, params, grads)

  params = jax.device_put(trainer.init_params, jax.devices()[0])
  for step in range(steps):
    x, y = data.partition_batch(
      trainer.train_ds,
      num_partitions=config.num_workers,
      batch_per_partition=config.batch_per_partition,
      seed=config.seed,
      step=step,
    )
    params = sgd_step(params, x, y)
  return np.asarray(ravel_pytree(params)[0])


def _flat(state):
  return np.asarray(ravel_pytree(state.params)[0])


def _relative(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("code, num_workers, num_adversaries, num_devices", GUARANTEE_CASES)
def test_draco_guarantee(code, num_workers, num_adversaries, num_devices):
  """S adversaries change nothing: every attack ends at the adversary-free parameters, which
  equal plain uncoded mean-SGD on the same data."""
  trainer = _coded_trainer(code, num_workers, num_adversaries, num_devices)
  reference = _mean_trainer(num_workers, num_adversaries, num_devices)
  clean_state, clean_history = _run(trainer, 0)
  clean = _flat(clean_state)
  assert all(m["ok"] for m in clean_history)
  assert _relative(clean, _flat(_run(reference, 0)[0])) <= RTOL
  assert _relative(clean, _plain_sgd(trainer)) <= RTOL
  assert _relative(clean, _flat(trainer.init_state())) > 1e-2  # training moved

  failures = []
  for index, attack in enumerate(trainer.attacks[1:], start=1):
    state, history = _run(trainer, index)
    attacked = _flat(state)
    if code == "repetition" and not np.array_equal(attacked, clean):
      failures.append(f"{attack}: not bit-identical ({_relative(attacked, clean):.2e})")
    if _relative(attacked, clean) > RTOL:
      failures.append(f"{attack}: params differ by {_relative(attacked, clean):.2e}")
    if not all(m["ok"] for m in history):
      failures.append(f"{attack}: {sum(not m['ok'] for m in history)} steps not ok")
    if any(m["flagged_adversaries"] != m["adversaries"] for m in history):
      failures.append(f"{attack}: an adversarial row was not flagged")
  assert not failures, failures
  assert trainer.update_fn._cache_size() == 1  # one compilation for every attack and mask


def test_guarantee_with_stragglers():
  """t adversaries and e missing messages with 2t + e <= 2S still decode exactly."""
  trainer = _coded_trainer("cyclic", 15, 1, 1, num_stragglers=2)
  assert trainer.code.num_adversaries == 2
  reference = _flat(_run(_mean_trainer(15, 2, 1), 0)[0])
  for index in range(len(trainer.attacks)):
    state, history = _run(trainer, index)
    assert all(m["ok"] for m in history), trainer.attacks[index]
    assert all(m["honest"] == 15 - 1 - 2 for m in history)
    assert _relative(_flat(state), reference) <= RTOL, trainer.attacks[index]


def test_mean_baseline_is_broken_by_the_attacks():
  """Without a defence the same attack derails training: the attack is real."""
  reference = _mean_trainer(15, 2, 1)
  clean_state, clean_history = _run(reference, 0)
  attacked_state, attacked_history = _run(reference, 1)
  assert _relative(_flat(attacked_state), _flat(clean_state)) > 0.5
  assert min(m["deviation"] for m in attacked_history) > 1.0
  assert attacked_history[-1]["loss"] > 2 * clean_history[-1]["loss"]
  # NaN rows make the mean non-finite: ok is False, the step is skipped, nothing changes.
  nan_state, nan_history = _run(reference, 2)
  assert not any(m["ok"] for m in nan_history)
  assert int(nan_state.skipped) == STEPS and int(nan_state.step) == STEPS
  np.testing.assert_array_equal(_flat(nan_state), _flat(reference.init_state()))


@pytest.mark.parametrize("ok", [True, False])
def test_update_is_skipped_when_not_ok(ok):
  """ok = False leaves parameters and optimizer state untouched (adam would move on zeros)."""
  tx = optax.adam(0.1)
  params = {"w": jnp.arange(3.0)}
  opt_state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)[1]  # nonzero moments
  state = train.TrainState(jnp.int32(4), params, opt_state, jnp.int32(1))
  unravel = ravel_pytree(params)[1]
  new = step_lib._apply_update(tx, unravel, state, jnp.zeros(3), jnp.asarray(ok))
  assert int(new.step) == 5 and int(new.skipped) == 1 + (not ok)
  same = jax.tree.map(np.array_equal, (new.params, new.opt_state), (params, opt_state))
  assert all(jax.tree.leaves(same)) == (not ok)


def test_stragglers_avoid_adversaries():
  mask_P = jnp.arange(15) < 4
  chosen = [server._stragglers(jax.random.key(i), mask_P, 3) for i in range(20)]
  assert all(int(c.sum()) == 3 and not bool(jnp.any(c & mask_P)) for c in chosen)
  assert len({tuple(np.asarray(c)) for c in chosen}) > 1  # fresh each step


def test_step_keys_are_independent():
  keys = train.split_step_key(jax.random.key(0))
  data = {tuple(np.asarray(jax.random.key_data(k))) for k in keys}
  assert len(data) == len(train.StepKeys._fields)


def test_default_run_reaches_accuracy(tmp_path):
  """The offline default (cyclic code, 2 of 15 workers reversing gradients), shortened."""
  config = dataclasses.replace(TrainConfig(), steps=150, eval_every=75, log_every=25)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["test_accuracy"] >= 0.9
  assert results["flagged_fraction"] == 1.0
  assert results["deviation_max"] <= 1e-4  # float32 rounding, relative to a shrinking mean
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [25, 50, 75, 100, 125, 150]
  evals = [r for r in records if "test_accuracy" in r]
  assert [r["step"] for r in evals] == [75, 150]
  assert set(evals[-1]["timing_ms"]) == {
    "gradients",
    "encode",
    "attack",
    "combine",
    "update",
    "clean",
    "step",
  }
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["code"] == "cyclic" and saved["model_options"] == {"hidden": [64]}
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["100", "150"]
  assert os.listdir(tmp_path / "tensorboard")


def test_resume_equals_uninterrupted(tmp_path):
  config = dataclasses.replace(
    TINY, code="repetition", num_workers=9, num_adversaries=1, checkpoint_every=10, log_every=1
  )
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  part = tmp_path / "part"
  train.train_and_evaluate(dataclasses.replace(config, steps=15), str(part))
  shutil.rmtree(part / "checkpoints" / "15")  # killed after step 15, before its checkpoint
  with pytest.raises(train.WorkdirError, match=r"already holds .*checkpoints \(latest step 10\)"):
    train.train_and_evaluate(config, str(part))
  with pytest.raises(train.WorkdirError, match="different config: learning_rate"):
    train.train_and_evaluate(dataclasses.replace(config, resume=True, learning_rate=0.2), str(part))
  resumed = train.train_and_evaluate(dataclasses.replace(config, resume=True), str(part))
  assert resumed["steps_run"] == 10
  np.testing.assert_array_equal(_flat(resumed["state"]), _flat(whole["state"]))
  steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, STEPS + 1))


def _config_error(**changes):
  with pytest.raises(ValueError) as error:
    validate(dataclasses.replace(TrainConfig(), **changes))
  return str(error.value)


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"code": "bogus"}, "unknown code 'bogus'; valid codes: cyclic, cyclic_paper, repetition"),
    ({"attack": "bogus"}, "unknown attack 'bogus'; valid attacks: .*label_flip"),
    ({"placement": "bogus"}, "unknown placement 'bogus'"),
    ({"model": "bogus"}, "unknown model 'bogus'; valid models: .*mlp"),
    ({"dataset": "bogus"}, "unknown dataset 'bogus'; valid datasets: .*digits"),
    ({"optimizer": "bogus"}, "unknown optimizer 'bogus'; valid optimizers: adam, momentum, sgd"),
    ({"aggregator": "krum"}, "code 'cyclic' is decoded by 'draco'; got aggregator 'krum'"),
    ({"code": "uncoded"}, "baseline aggregator; got aggregator 'draco'; valid aggregators: .*mean"),
    ({"code": "uncoded", "aggregator": "bogus"}, "got aggregator 'bogus'"),
    ({"code": "repetition", "num_workers": 8, "num_adversaries": 1}, "FRC needs 2S\\+1"),
    ({"num_stragglers": 1}, "2t \\+ e <= 2S; got t=2 .* e=1 .*--max_adversaries to at least 3"),
    ({"num_adversaries": 3, "max_adversaries": 2}, "2t \\+ e = 6 > 4.*--over_capacity"),
    ({"resume": True, "overwrite": True}, "resume .* and overwrite .* exclude each other"),
    ({"max_refused_fraction": 1.5}, "max_refused_fraction must be in \\[0, 1\\]; got 1.5"),
    ({"num_adversaries": 3, "num_workers": 5}, "needs P >= R = 2S\\+1"),
    ({"steps": 0}, "steps must be an integer >= 1; got 0"),
    ({"learning_rate": -1.0}, "learning_rate must be > 0; got -1.0"),
  ],
)
def test_bad_configs_are_rejected(changes, message):
  error = _config_error(**changes)
  assert re.search(message, error), error


def test_no_attack_needs_no_budget():
  validate(dataclasses.replace(TrainConfig(), attack="none", num_stragglers=4))


def test_over_capacity_is_allowed_on_request():
  config = dataclasses.replace(TrainConfig(), num_adversaries=3, max_adversaries=1)
  assert validate(dataclasses.replace(config, over_capacity=True)).beyond_capacity
  assert not TrainConfig().beyond_capacity
  with pytest.raises(ValueError, match="num_adversaries \\+ num_stragglers must be <= num"):
    validate(dataclasses.replace(config, over_capacity=True, num_stragglers=13))


def _snapshot(path):
  return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_workdir_of_an_early_interrupted_run(tmp_path):
  """config.json and metrics.jsonl but no checkpoint (a run killed early, mid-line): refused
  untouched without --resume or with another config; resumed from step 0 with the same one."""
  config = dataclasses.replace(TINY, code="repetition", num_workers=9, num_adversaries=1, steps=3)
  (tmp_path / "config.json").write_text(config.to_json())
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.3}\n{"step": 2, "lo')
  (tmp_path / "notes.txt").write_text("not the run's")
  before = _snapshot(tmp_path)
  for changes, message in [
    ({}, r"already holds another run's files \(config.json, metrics.jsonl\); pass --resume"),
    ({"resume": True, "seed": 1}, "different config: seed: saved 0, now 1"),
  ]:
    with pytest.raises(train.WorkdirError, match=message):
      train.train_and_evaluate(dataclasses.replace(config, **changes), str(tmp_path))
    assert _snapshot(tmp_path) == before
  resumed = train.train_and_evaluate(dataclasses.replace(config, resume=True), str(tmp_path))
  assert (resumed["steps_run"], resumed["final_step"]) == (3, 3)
  assert resumed["warnings"] == [] and not resumed["no_step_applied"]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [3]  # the old lines were past step 0
  assert (tmp_path / "notes.txt").read_text() == "not the run's"


@pytest.mark.parametrize(
  "files, resume, message",
  [
    ({}, True, "nothing to resume in workdir"),
    ({"config.json": "{"}, True, "its config.json is not valid JSON"),
    ({"results.json": "{}"}, False, r"already holds another run's files \(results.json\)"),
  ],
)
def test_check_workdir_refuses(tmp_path, files, resume, message):
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  (tmp_path / "tensorboard").mkdir()  # an empty run directory is not a run's file
  with pytest.raises(train.WorkdirError, match=message):
    train.check_workdir(dataclasses.replace(TINY, resume=resume), str(tmp_path))


@pytest.mark.parametrize(
  "steps_run, skipped, final_step, total_skipped, no_step_applied, warning",
  [
    (10, 0, 10, 0, False, None),
    (10, 1, 10, 1, False, None),  # 10% is not more than 0.1
    (10, 2, 10, 2, False, "2 of 10 steps run now \\(20%\\) were refused"),
    (10, 10, 10, 10, True, "no step was applied: all 10 steps run now"),
    (5, 5, 15, 5, True, "no step was applied: all 5 steps run now"),  # resumed
    (0, 0, 15, 15, True, "all 15 steps in all"),  # resumed with nothing left to run
    (0, 0, 15, 0, False, None),
  ],
)
def test_refused_steps_verdict(
  steps_run, skipped, final_step, total_skipped, no_step_applied, warning
):
  results = dict(
    steps_run=steps_run,
    skipped_steps=skipped,
    final_step=final_step,
    total_skipped_steps=total_skipped,
  )
  none, warnings = summary.refusals(results, 0.1)
  assert none == no_step_applied
  assert len(warnings) == (warning is not None)
  assert warning is None or re.search(warning, warnings[0]), warnings


@pytest.mark.parametrize(
  "argv",
  [
    ["train.py", "--steps=5", "--workdir=/old", "--overwrite", "--seed=1"],
    ["train.py", "--steps=5", "--workdir", "/old", "--noresume", "--seed=1"],
    ["train.py", "--steps=5", "-workdir=/old", "--resume", "--seed=1"],
  ],
)
def test_resume_command(argv):
  command = cli._resume_command(argv, "/runs/a b")
  expected = [sys.executable, "-m", "draco_jax.train", "--steps=5", "--seed=1", "--resume"]
  assert shlex.split(command) == [*expected, "--workdir=/runs/a b"]


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"num_devices": 8}, "got 8 devices for P=15 workers"),
    ({"model_options": {"bogus": 1}}, "unknown options \\['bogus'\\]"),
  ],
)
def test_impossible_setups_are_rejected_before_training(changes, message):
  with pytest.raises(ValueError, match=message):
    train.make_trainer(dataclasses.replace(TINY, **changes))


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--code=bogus"], "unknown code 'bogus'"),
    (["--num_stragglers=1"], "decodes only when 2t + e <= 2S"),
    (["--model_options=[1]"], "--model_options must be a JSON object"),
  ],
)
def test_bad_flags_exit_cleanly(tmp_path, flags, message):
  result = subprocess.run(
    [sys.executable, "-m", "draco_jax.train", f"--workdir={tmp_path}", *flags],
    capture_output=True,
    text=True,
    timeout=120,
  )
  output = result.stdout + result.stderr
  assert result.returncode != 0
  assert message in output
  assert "Traceback" not in output
