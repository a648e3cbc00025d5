"""Smoke tests for benchmarks/: the decode benchmark runs end to end at a tiny size.

The ratios themselves are measurements, not test results (timed tests would be flaky on a
shared machine); what is checked is that every column is produced, finite and positive, so
the README's benchmark command keeps working.
"""

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import certificate_probe, decode_bench, device_check, step_bench
from draco_jax import decode
from experiments.combine_timing import received_messages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project_stage(code) -> str:
  return f"project C={decode.decoder_parts(code).num_columns}"


def test_table_row_has_every_combiner(capsys):
  (row,) = decode_bench.run([8], [2**10], ["krum"], rounds=1, calls=3)
  for name in ("two_reads", "cyclic", "repetition", "krum", "krum_vs_cyclic"):
    assert math.isfinite(row[name]) and row[name] > 0, (name, row[name])
  assert (row["P"], row["S"], row["D"], row["repetition_P"]) == (8, 1, 2**10, 9)
  line = capsys.readouterr().out.strip()
  assert line.startswith("|   8 |  1 | 2^10 |") and line.count("|") == 9


def test_stages_cover_both_decoders(capsys):
  decode_bench.run_stages([8], [2**10], rounds=1, calls=3)
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split()[0] for line in lines] == ["cyclic", "repetition"]
  for line, code in zip(lines, decode_bench._codes(8)):
    for stage in ("dispatch", _project_stage(code), "project C=1", "solve", "combine", "decode"):
      assert f"{stage} " in line, (stage, line)


def test_stages_stage_results_match_the_decoder():
  """The stages are the decoder split at its passes: recombined, they give its answer."""
  code = decode_bench._codes(8)[0]
  x_PxD = received_messages(code, 2**10, seed=3)
  key = jax.random.key(1)
  stages = decode_bench._stages(code, x_PxD, key)
  project, project_args = stages[_project_stage(code)]
  solve, _ = stages["solve"]
  combine, _ = stages["combine"]
  weights_P, erased_P, report = solve(project(*project_args))
  mean_D = combine(weights_P, erased_P, report.ok, x_PxD)
  expected_D, expected_report = stages["decode"][0](x_PxD, key)
  assert bool(report.ok) and bool(expected_report.ok)
  assert jnp.allclose(mean_D, expected_D, rtol=1e-6, atol=1e-6)


def test_stages_refuse_aggregators(monkeypatch):
  monkeypatch.setattr("sys.argv", ["decode_bench", "--stages", "--aggregators=krum"])
  with pytest.raises(SystemExit):
    decode_bench.main()


def test_certificate_probe_within_capacity_is_exact_and_over_it_refused():
  """Both probe modes run; at P = 8 (exact, tested exhaustively) and P = 16, S = 7 (over
  capacity: every one of 3000 fresh trials refused, README) their lines state just that."""
  (within,) = certificate_probe.probe_within([(8, 3)], trials=16, seed=0)
  assert within.startswith("within cyclic P= 8 S= 3: 16 trials, accepted 1.000, silent 0"), within
  (over,) = certificate_probe.probe_over([(16, 7)], trials=4, seed=0, alphas=(1e-3,))
  assert over.startswith("over P=16 S= 7 alpha=1e-03: 4 trials, accepted 0.000, silent 0"), over


def test_certificate_probe_top_runs_every_dtype():
  """The top mode's line for a 32-bit and a 64-bit (x64) case; the cheap repetition code
  stands in for the codes at their largest P, which the README's command runs."""
  cases = (("repetition", 9, (1,), "float32"), ("repetition", 9, (1, 4), "float64"))
  lines = certificate_probe.probe_top(trials=8, seed=0, cases=cases)
  assert lines[0].startswith("top repetition P=9 float32 S=1: 8 trials, refused 0.000, "), lines
  assert lines[1].startswith("top repetition P=9 float64 S=1,4: 8 trials, refused 0.000, "), lines
  for line in lines:
    assert "wrong>1e-3 0, wrong>1e-5 0 (0 tiny)" in line, line


def test_certificate_probe_envelope_runs_the_unguarded_paper_decoder():
  """The envelope mode builds and decodes the paper code past the library's refusal."""
  (line,) = certificate_probe.probe_envelope("complex64", [5], trials=4, seed=0)
  assert line.startswith("envelope cyclic_paper P= 5 complex64 S=1..2: 8 trials, refused 0.000, ")
  assert "wrong>1e-3 0, wrong>1e-5 0 (0 tiny)" in line, line


def test_step_bench_times_every_method_in_both_modes(capsys):
  """A tiny MLP at P = 6, S = 1 on one device: every method's row, each column produced."""
  rows = step_bench.run(["mlp"], [(6, 1)], rounds=1, calls=1, options={"hidden": (8,)}, devices=1)
  assert [(r["method"], r["compute"]) for r in rows] == [m[::3] for m in step_bench.METHODS]
  for row in rows:
    for name in ("step_ms", "x_mean", "combine_share", "peak_mib"):
      assert math.isfinite(row[name]) and row[name] > 0, (row["method"], name, row[name])
    assert math.isfinite(row["faults"]) and row["faults"] >= 0
    assert (row["per_worker_over_shared"] is None) == (row["compute"] == "shared")
  assert rows[0]["x_mean"] == 1.0 and rows[2]["R"] == rows[4]["R"] == 3
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 + len(rows) and all(line.count("|") == 14 for line in lines[2:])


def test_step_bench_rejects_an_unknown_model():
  with pytest.raises(SystemExit):
    step_bench.main(["--models", "mlp,resnet"])


def test_device_check_runs_end_to_end_on_cpu():
  """`python -m benchmarks.device_check --quick` on CPU (4 devices): every check passes, the
  table lists them all, the environment is printed, and the exit status is 0."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run(
    [sys.executable, "-m", "benchmarks.device_check", "--quick"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  table = result.stdout[result.stdout.index("| check | result |") :]
  for name in (
    "environment",
    "tests",
    "train cyclic",
    "train repetition",
    "train cyclic_paper",
    "decode benchmark",
    "step benchmark",
  ):
    assert re.search(rf"^\| {name} \| PASS \|", table, re.M), (name, table)
  assert "64-bit steps: device" in table and "on 4 device(s)" in table
  assert "jaxlib:" in result.stdout and "device_check: all checks passed" in result.stdout


def test_device_check_reports_a_failure_and_exits_non_zero(monkeypatch, capsys):
  """A failing check is a FAIL row with its error, and main returns 1 (the others still run)."""

  def broken(*_):
    raise RuntimeError("pytest exit 1: 1 failed")

  monkeypatch.setattr(device_check, "run_tests", broken)
  monkeypatch.setattr(device_check, "CODES", ())
  monkeypatch.setattr(device_check, "decode_benchmark", lambda quick: "x floor: stub")
  monkeypatch.setattr(device_check, "step_benchmark", lambda quick: "x mean: stub")
  assert device_check.main(["--quick"]) == 1
  out = capsys.readouterr().out
  assert "| tests | FAIL |" in out and "RuntimeError: pytest exit 1: 1 failed" in out
  assert "| decode benchmark | PASS |" in out and "device_check: FAILED" in out
