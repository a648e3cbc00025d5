"""Tests for experiments/: the presets, the runner's time accounting and schema, the report.

Every preset runs end to end in tiny mode: ``offline`` with every method on the real digits,
the GPU presets under ``tfds.testing.mock_data``. The time accounting is checked on synthetic
metrics, where the expected numbers are known exactly.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from draco_jax.config import TrainConfig, validate
from experiments import combine_timing, grid, report, run
from experiments.presets import PRESETS, get_preset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy.png", "accuracy_projected.png", "accuracy_wall.png", "combine_timing.png")
MOCKED_PRESETS = ("mnist_fc", "cifar10_resnet18", "cifar10_vgg")


# ---------------------------------------------------------------------------------------------
# Presets: config files that override only what differs, with their command in the docstring.


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_is_a_documented_config_file(name):
  preset = PRESETS[name]
  doc = preset.doc
  assert f"python -m experiments.run {name}" in doc and "python -m experiments.report" in doc
  assert "Expected result" in doc and "Runtime" in doc
  default = TrainConfig()
  deltas = [
    f.name
    for f in dataclasses.fields(TrainConfig)
    if getattr(preset.base, f.name) != getattr(default, f.name)
  ]
  assert 0 < len(deltas) <= 8, deltas  # BASE overrides only what differs from the default
  assert 0 < preset.target_accuracy < 1


@pytest.mark.parametrize("name", list(PRESETS))
def test_full_grid_compares_every_method_on_every_panel(name):
  preset = PRESETS[name]
  runs = preset.grid()
  assert runs[0].method == grid.REFERENCE and runs[0].config.active_adversaries == 0
  panels = {(r.config.attack, r.config.num_adversaries) for r in runs[1:]}
  assert panels == {(a, s) for a in preset.attacks for s in preset.adversaries}
  for attack, s in panels:  # P = 15 allows every method for S in {1, 2}
    methods = {r.method for r in runs if (r.config.attack, r.config.num_adversaries) == (attack, s)}
    assert methods == set(grid.METHODS), (attack, s)
  for r in runs:
    validate(r.config)
    assert r.config.log_every == 1 and r.config.checkpoint_every == r.config.steps


def test_grid_leaves_out_what_the_number_of_workers_forbids():
  base = TrainConfig(num_workers=10)  # R = 3 does not divide 10; Bulyan needs P >= 4S+3 = 11
  runs = grid.comparison_grid(base, attacks=("constant",), adversaries=(1, 2))
  by_s = {s: {r.method for r in runs if r.config.num_adversaries == s} for s in (1, 2)}
  assert "draco_repetition" not in by_s[1] and "bulyan" in by_s[1]
  assert "bulyan" not in by_s[2] and "draco_cyclic" in by_s[2]
  assert grid.infeasible(grid.method_config(base, "draco_repetition", "constant", 1))
  with pytest.raises(ValueError, match="valid methods"):
    grid.method_config(base, "median", "constant", 1)
  with pytest.raises(ValueError, match="valid presets"):
    get_preset("imagenet")


# ---------------------------------------------------------------------------------------------
# Time accounting on synthetic metrics.


def _metrics(ms_per_step, evals):
  return [
    {
      "step": i + 1,
      "ms_per_step": ms,
      "wall_time": float(i + 1),
      "loss": 1.0,
      "accuracy": 0.5,
      "ok": 1.0,
      "adversaries": 2.0,
      "flagged_adversaries": 2.0,
      "honest": 13.0,
      "flagged_honest": 0.0,
      "deviation": 1e-7,
      "iterations": 0.0,
      **evals.get(i + 1, {}),
    }
    for i, ms in enumerate(ms_per_step)
  ]


def _record(method, code, r, attack="reverse_gradient"):
  config = TrainConfig(code=code, aggregator=grid.METHODS[method]["aggregator"], attack=attack)
  return {"method": method, "config": config.to_json(), "R": r, "D": 100}


def _timed_eval(accuracy, grad, combine):
  timing = {
    "gradients": grad,
    "encode": 1.5,
    "attack": 0.7,
    "combine": combine,
    "update": 0.5,
    "step": 9.0,
  }
  return {"test_accuracy": accuracy, "timing_ms": timing}


def test_wall_time_sums_step_times_without_the_compilation(tmp_path):
  evals = {2: _timed_eval(0.5, 15, 1), 4: _timed_eval(0.9, 15, 1)}
  lines = _metrics([1000.0, 2.0, 4.0, 2.0], evals)
  rows = run.eval_rows(_record("mean", "uncoded", 1), lines, preset="t", target=0.8)
  assert [r["step"] for r in rows] == [2, 4]
  assert rows[0]["wall_time"] == pytest.approx(0.004)  # step 1 counts as the median, 2 ms
  assert rows[1]["wall_time"] == pytest.approx(0.010)
  assert rows[1]["flagged_fraction"] == 1.0 and rows[1]["honest_flagged_fraction"] == 0.0
  assert list(rows[0]) == list(run.ROW_FIELDS)
  with open(tmp_path / "metrics.jsonl", "w") as f:  # a missing step breaks the accounting
    f.writelines(json.dumps(line) + "\n" for line in lines[:1] + lines[2:])
  with pytest.raises(ValueError, match="log_every=1"):
    run._read_lines(str(tmp_path))


def test_projection_is_R_partition_gradients_plus_encode_combine_update():
  evals = {1: _timed_eval(0.5, 15.0, 3.0), 2: _timed_eval(0.95, 15.0, 3.0)}
  uncoded = run.eval_rows(
    _record("krum", "uncoded", 1), _metrics([5, 5], evals), preset="t", target=0.9
  )
  evals = {1: _timed_eval(0.5, 60.0, 0.5), 2: _timed_eval(0.95, 60.0, 0.5)}
  coded = run.eval_rows(
    _record("draco_cyclic", "cyclic", 5), _metrics([5, 5], evals), preset="t", target=0.9
  )
  run.add_projection([uncoded, coded])
  # One partition's gradient: 15 ms / P = 1 ms, from the uncoded run, for every method.
  assert uncoded[0]["projected_ms_per_step"] == pytest.approx(1 * 1.0 + 1.5 / 15 + 3.0 + 0.5)
  assert coded[0]["projected_ms_per_step"] == pytest.approx(5 * 1.0 + 1.5 / 15 + 0.5 + 0.5)
  assert coded[1]["projected_time"] == pytest.approx(2 * coded[0]["projected_ms_per_step"] / 1e3)
  assert report.time_to_target(coded, 0.9, "step") == 2
  assert report.time_to_target(coded, 0.99, "step") is None
  # A label-flipping uncoded run's gradients phase also evaluates the poisoners' gradients
  # again (shared mode): it does not set one partition's gradient time.
  evals = {1: _timed_eval(0.5, 45.0, 3.0)}
  flipped = run.eval_rows(
    _record("krum", "uncoded", 1, "label_flip"), _metrics([5], evals), preset="t", target=0.9
  )
  run.add_projection([uncoded, flipped, coded])
  assert coded[0]["projected_ms_per_step"] == pytest.approx(5 * 1.0 + 1.5 / 15 + 0.5 + 0.5)


def test_speedups_are_the_baseline_time_over_the_method_time():
  rows = []
  for method, ms in (("geometric_median", 40.0), ("draco_cyclic", 10.0), ("mean", 1.0)):
    accuracy = 0.95 if method != "mean" else 0.1
    evals = {1: _timed_eval(accuracy, 15.0, ms)}
    code = grid.METHODS[method]["code"]
    rows += run.eval_rows(_record(method, code, 1), _metrics([3.0], evals), preset="t", target=0.9)
  for row in rows:  # a projection written by hand: 2 ms per step more than the combine
    row["projected_ms_per_step"] = row["combine_ms"] + 2.0
    row["projected_time"] = row["projected_ms_per_step"] / 1e3
  summary = {e["method"]: e for e in report.summarize(rows, 0.9)}
  assert summary["draco_cyclic"]["speedup_projected"] == pytest.approx(42.0 / 12.0)
  assert summary["draco_cyclic"]["speedup_wall"] == pytest.approx(1.0)
  assert summary["mean"]["speedup_projected"] is None  # never reaches the target


# ---------------------------------------------------------------------------------------------
# End to end: tiny grids, the results file and the report.


@pytest.fixture(scope="module")
def timing_file(tmp_path_factory):
  """A quick combiner-timing sweep shared by every report of this module."""
  path = str(tmp_path_factory.mktemp("timing") / "combine_timing.jsonl")
  combine_timing.main(["--quick", "--repeats", "2", "--out", path])
  return path


def _check_results(path, methods):
  rows = report.load_rows(path)
  assert rows and all(list(row) == list(run.ROW_FIELDS) for row in rows)
  assert {row["method"] for row in rows} == {grid.REFERENCE, *methods}
  for run_rows in report.curves(rows).values():
    steps = [row["step"] for row in run_rows]
    assert steps == sorted(set(steps)) and steps[-1] == max(steps)
    for row in run_rows:
      assert 0.0 <= row["accuracy"] <= 1.0 and row["D"] > 0 and row["R"] >= 1
      assert row["wall_time"] > 0 and row["wall_time_total"] >= row["wall_time"]
      for column in (*run.PHASES.values(), "step_ms", "projected_ms_per_step"):
        assert row[column] > 0, column
    times = [row["projected_time"] for row in run_rows]
    assert times == sorted(times) and times[0] > 0
  return rows


def _check_report(results, out, timing, methods):
  written = report.make_report(results, out, timing=timing)
  for name in PLOTS:
    with open(os.path.join(out, name), "rb") as f:
      data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  for method in methods:
    assert f"| {report._label(method)} |" in text, method
  for name in PLOTS:  # every figure is embedded in the report
    assert f"]({name})" in text, name
  assert "| ratio to floor |" in text
  assert len(written) == len(PLOTS) + 1
  return text


def test_offline_tiny_runs_every_method_and_reports(tmp_path, timing_file):
  path = run.run_preset("offline", str(tmp_path), tiny=True, progress=False)
  rows = _check_results(path, grid.METHODS)
  by_run = report.curves(rows)
  reference = by_run[grid.REFERENCE, "none", 0]
  for method in grid.DRACO_METHODS:  # DRACO's curve is the adversary-free curve
    draco = by_run[method, "reverse_gradient", 1]
    for mine, ref in zip(draco, reference, strict=True):
      assert abs(mine["accuracy"] - ref["accuracy"]) <= 2 / 360  # two test examples at most
      assert mine["flagged_fraction"] == 1.0 and mine["deviation"] < 1e-5
  undefended = by_run["mean", "reverse_gradient", 1]
  assert undefended[-1]["accuracy"] < reference[-1]["accuracy"] - 0.1
  assert by_run["draco_repetition", "reverse_gradient", 1][0]["R"] == 3
  text = _check_report(path, str(tmp_path), timing_file, grid.METHODS)
  assert "DRACO trains the adversary-free model" in text and "projection" in text
  # A second invocation finds every run finished and only rebuilds the results file.
  before = os.path.getmtime(os.path.join(tmp_path, "runs", "00-reference-none-s0", "run.json"))
  assert run.run_preset("offline", str(tmp_path), tiny=True, progress=False) == path
  after = os.path.getmtime(os.path.join(tmp_path, "runs", "00-reference-none-s0", "run.json"))
  assert before == after and report.load_rows(path) == rows


# cifar10_vgg shares cifar10_resnet18's data path and its model is covered by models_test; at
# 45-95 s it is the slowest default test, so it runs with the slow ones.
@pytest.mark.parametrize(
  "name",
  [pytest.param(n, marks=pytest.mark.slow) if n == "cifar10_vgg" else n for n in MOCKED_PRESETS],
)
def test_gpu_preset_runs_tiny_under_mock_data(name, tmp_path, timing_file):
  data_dir = str(tmp_path / "tfds")
  with tfds.testing.mock_data(num_examples=32):
    path = run.run_preset(name, str(tmp_path), tiny=True, data_dir=data_dir, progress=False)
  methods = PRESETS[name].tiny_methods
  rows = _check_results(path, methods)
  assert {row["attack"] for row in rows} == {"none", "reverse_gradient"}
  _check_report(path, str(tmp_path), timing_file, methods)


def test_every_method_has_its_own_colour_in_every_figure():
  colours = {method: report._color(method) for method in grid.METHODS}
  assert len(set(colours.values())) == len(grid.METHODS)
  assert set(combine_timing.COMBINERS) <= set(colours)  # the timing figure uses the same map


def test_combine_timing_rows_and_floor(timing_file):
  rows = report.load_rows(timing_file)
  names = combine_timing.QUICK_SWEEP["combiners"]
  assert {row["combiner"] for row in rows} == set(names)
  for row in rows:
    assert set(row) == {"combiner", "P", "S", "D", "ms", "floor_ms", "ratio"}
    assert row["ms"] > 0 and row["floor_ms"] > 0
    assert row["ratio"] == pytest.approx(row["ms"] / row["floor_ms"])
  with pytest.raises(ValueError, match="valid combiners"):
    combine_timing.make_combiner("median", 9, 1)


def test_interleaved_ratios_times_every_candidate_against_the_same_rounds():
  x_PxD = jnp.ones((4, 64), jnp.float32)
  calls = []

  def counted(x):
    calls.append(1)
    return x.sum()

  candidates = {"sum": (counted, (x_PxD,)), "half": (jax.jit(lambda x: x / 2), (x_PxD,))}
  ratios, floor = combine_timing.interleaved_ratios(candidates, x_PxD, rounds=3, calls=2)
  assert set(ratios) == {"sum", "half"}
  assert floor > 0 and all(np.isfinite(r) and r > 0 for r in ratios.values())
  assert len(calls) == 1 + 3 * (2 + 1)  # warm-up, then per round a warm-up and 2 timed calls
  with pytest.raises(ValueError, match="rounds=0"):
    combine_timing.interleaved_ratios(candidates, x_PxD, rounds=0)


def test_command_lines_reject_bad_arguments(capsys):
  with pytest.raises(SystemExit):
    run.main(["imagenet"])
  assert "valid presets: offline" in capsys.readouterr().err
