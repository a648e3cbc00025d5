r"""Checks an accelerator machine end to end, in one command: tests, training, benchmarks.

On the default backend (GPU, TPU or CPU), in this order:

1. environment: the backend, its devices, and the route of the cyclic decoder's 64-bit steps
   (``device`` in the graph where the backend has 64-bit types, ``host`` through
   ``jax.pure_callback`` where it has not: docs/distributed.md);
2. tests: a short subset of the test suite (:data:`TESTS`), run by pytest on this backend;
3. training: for each code (cyclic, repetition, cyclic_paper), one short run on every local
   device (the worker mesh spans them all) with S workers reversing their gradients, and the
   same run without adversaries: no step may be refused, and the parameters must agree within
   1e-5 relative (DRACO's promise: the attacked run is the adversary-free run);
4. benchmarks: the decode benchmark (decoders against the plain-sum floor) and the step
   benchmark (whole training steps against the uncoded mean's), small sizes.

It prints a table (check, PASS/FAIL, seconds, detail), then ``jax.print_environment_info()``,
and exits 1 if any check failed (its traceback is printed). ``--quick`` shrinks every part
(the test suite runs it on CPU that way, tests/benchmarks_test.py).

Usage:
  python -m benchmarks.device_check            # ~5-10 minutes on one accelerator host
  python -m benchmarks.device_check --quick    # ~1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from draco_jax import cyclic_solve, train
from draco_jax.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The test subset: decoders exhaustively at P = 9, the routes of the 64-bit steps, sharded and
# replicated combining, the training guarantee on the mesh.
TESTS = (
  "tests/decode_test.py::test_exhaustive_placements_decode_exactly",
  "tests/sharded_test.py::test_sharded_decoder_matches_replicated_for_every_attack",
  "tests/train_test.py::test_draco_guarantee",
  "tests/contract_test.py",
)
QUICK_TESTS = ("tests/decode_test.py::test_exhaustive_placements_decode_exactly[cyclic-5-2-gross]",)
# (code, S): the repetition code needs (2S+1) | P, the paper code P <= 16 for complex64.
CODES = (("cyclic", 2), ("repetition", 1), ("cyclic_paper", 1))
RTOL = 1e-5


class Check:
  """The table's rows: each check's name, outcome, seconds and one line of detail."""

  def __init__(self):
    self.rows: list[tuple[str, bool, float, str]] = []

  def run(self, name: str, fn: Callable[[], str]) -> None:
    start = time.perf_counter()
    try:
      detail, passed = fn(), True
    except Exception as error:  # noqa: BLE001 - every failure is reported, then the exit code
      traceback.print_exc()
      detail, passed = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}", False
    self.rows.append((name, passed, time.perf_counter() - start, detail))
    print(f"[{'PASS' if passed else 'FAIL'}] {name}: {detail}", flush=True)

  def table(self) -> str:
    lines = ["| check | result | s | detail |", "|---|---|---|---|"]
    for name, passed, seconds, detail in self.rows:
      lines.append(f"| {name} | {'PASS' if passed else 'FAIL'} | {seconds:.1f} | {detail} |")
    return "\n".join(lines)

  @property
  def failed(self) -> bool:
    return not all(passed for _, passed, _, _ in self.rows)


def environment() -> str:
  devices = jax.local_devices()
  kinds = sorted({d.device_kind for d in devices})
  return (
    f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} local device(s) "
    f"({', '.join(kinds)}), {jax.device_count()} in all; 64-bit steps: "
    f"{cyclic_solve.resolve_solver()}"
  )


def run_tests(node_ids) -> str:
  """pytest on the default backend (conftest.py's CPU default overridden)."""
  env = dict(os.environ, JAX_PLATFORMS=jax.default_backend())
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider"]
  result = subprocess.run(
    [*cmd, *node_ids], cwd=REPO, env=env, capture_output=True, text=True, check=False
  )
  summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
  if result.returncode:
    print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
    raise RuntimeError(f"pytest exit {result.returncode}: {summary}")
  return summary


def _workers(code: str, s: int, devices: int) -> int:
  """The smallest P >= 8 that the devices divide and the code accepts."""
  step = math.lcm(devices, 2 * s + 1) if code == "repetition" else devices
  return step * max(1, -(-8 // step))


def train_code(code: str, s: int, steps: int) -> str:
  """One attacked and one adversary-free run on every local device: same parameters."""
  devices = len(jax.local_devices())
  p = _workers(code, s, devices)
  if code == "cyclic_paper" and p > 16:
    return f"skipped: P = {p} is beyond the paper code's complex64 envelope (16)"
  config = TrainConfig(
    code=code,
    num_workers=p,
    num_adversaries=s,
    model_options={"hidden": (32,)},
    steps=steps,
    eval_every=steps,
    log_every=steps,
    checkpoint_every=steps,
    timing=False,
    num_devices=devices,
  )
  results = {}
  for label, attack in (("attacked", "reverse_gradient"), ("clean", "none")):
    with tempfile.TemporaryDirectory() as workdir:
      results[label] = train.train_and_evaluate(dataclasses.replace(config, attack=attack), workdir)
  attacked, clean = (
    np.asarray(ravel_pytree(results[k]["state"].params)[0]) for k in ("attacked", "clean")
  )
  error = float(np.linalg.norm(attacked - clean) / np.linalg.norm(clean))
  skipped = results["attacked"]["skipped_steps"]
  detail = (
    f"P={p} S={s} on {devices} device(s), {steps} steps: skipped {skipped}, vs clean {error:.1e}"
  )
  if skipped or not error <= RTOL:
    raise AssertionError(detail)
  return detail


def decode_benchmark(quick: bool) -> str:
  from benchmarks import decode_bench  # noqa: PLC0415 - imports experiments/, only when run

  ps, d = ((8,), 2**12) if quick else ((8, 16, 32), 2**20)
  rows = decode_bench.run(ps, [d], [], rounds=1 if quick else 3, calls=5 if quick else 25)
  return "x floor: " + ", ".join(
    f"P={r['P']} cyclic {r['cyclic']:.2f} repetition {r['repetition']:.2f}" for r in rows
  )


def step_benchmark(quick: bool) -> str:
  from benchmarks import step_bench  # noqa: PLC0415

  options = {"hidden": (32,)} if quick else None
  methods = step_bench.METHODS[::2] if quick else step_bench.METHODS  # quick: shared only
  rows = step_bench.group_rows(
    "mlp",
    15,
    2,
    rounds=1 if quick else 3,
    calls=2 if quick else 5,
    options=options,
    methods=methods,
  )
  return "x mean: " + ", ".join(
    f"{r['method']}/{r['compute']} {r['x_mean']:.2f}" for r in rows if r["method"] != "mean"
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="shrink every part (~1 minute)")
  args = parser.parse_args(argv)
  warnings.filterwarnings("ignore", message=".*outside the validated float32 envelope.*")
  check = Check()
  check.run("environment", environment)
  check.run("tests", lambda: run_tests(QUICK_TESTS if args.quick else TESTS))
  for code, s in CODES:
    check.run(f"train {code}", lambda code=code, s=s: train_code(code, s, 3 if args.quick else 20))
  check.run("decode benchmark", lambda: decode_benchmark(args.quick))
  check.run("step benchmark", lambda: step_benchmark(args.quick))
  print()
  print(check.table())
  print()
  jax.print_environment_info()
  print("device_check:", "FAILED" if check.failed else "all checks passed")
  return 1 if check.failed else 0


if __name__ == "__main__":
  sys.exit(main())
