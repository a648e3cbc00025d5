r"""Runs a preset's grid of training runs and writes one tidy results file.

    python -m experiments.run PRESET [--tiny] [--out DIR] [--data_dir DIR]

PRESET is a key of ``experiments.PRESETS`` (``offline``, ``mnist_fc``, ``cifar10_resnet18``,
``cifar10_vgg``); ``--tiny`` runs the preset's shrunken grid (tests). Each run trains in its own
workdir ``DIR/runs/NN-method-attack-sS`` (``draco_jax.train.train_and_evaluate``: metrics.jsonl,
config.json, results.json, checkpoint); a finished run (``run.json`` with the same config) is
not run again, so an interrupted grid resumes. Then ``DIR/results.jsonl`` gets one JSON line
per (run, evaluation step) with the fields of :data:`ROW_FIELDS`.

Time accounting. On one host the P simulated workers share the processors, so time is
reported twice:

1. ``wall_time``: measured seconds spent in training steps up to this step on this host (the
   jitted step plus the host loop around it; evaluation and phase-timing pauses excluded; the
   first step's compilation replaced by the run's median step time). With
   ``worker_compute="shared"`` (the default) the host evaluates the K partition gradients once
   per step for every method and forms all P messages from them; with ``"per_worker"`` it
   evaluates the R x P partition gradients of every simulated worker plus K for the
   clean-gradient diagnostic, which a real cluster would not compute.
2. ``projected_time``: a cluster projection, ``step x projected_ms_per_step``, with
   ``projected_ms_per_step = R x t_partition + encode_ms / P + combine_ms + update_ms``:
   the slowest worker's compute (its R partition gradients, R = 1 uncoded, R = 2S+1 for DRACO,
   plus its share of the encoding) followed by the server's combine (decode or aggregation of
   the received messages; the attack, the adversaries' own work, is timed apart as
   ``attack_ms`` and not counted) and optimizer update. ``t_partition`` is one partition's
   gradient time: the median over the uncoded runs of the file of ``grad_ms / P`` (the same
   for every method, so DRACO pays exactly R times it). An uncoded run's gradients phase
   evaluates K = P partition gradients in either mode (shared: the K once; per_worker: one
   per worker), so ``t_partition`` is one partition's gradient either way, and a worker is
   charged R of them, R/K of the shared K-gradient phase. Runs under a data attack are left
   out of it when others exist: in shared mode their gradients phase also evaluates the
   poisoners' gradients again. Phase times are the run's medians over its evaluations
   (``draco_jax.train.time_phases``: the step run phase by phase, each phase waited for).
   Communication is not modelled. It is a projection, labelled as such in every plot and table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from draco_jax import coding
from draco_jax import metrics as m
from draco_jax.config import DATA_ATTACKS
from draco_jax.train import train_and_evaluate
from experiments import grid
from experiments.presets import get_preset

__all__ = ["ROW_FIELDS", "PHASES", "run_preset", "run_grid", "eval_rows", "add_projection", "main"]

# The step's timed phases (draco_jax.metrics) -> the results file's columns.
PHASES = {
  m.GRADIENTS: "grad_ms",
  m.ENCODE: "encode_ms",
  m.ATTACK: "attack_ms",
  m.COMBINE: "combine_ms",
  m.UPDATE: "update_ms",
}
ROW_FIELDS = (
  "preset",
  "method",
  "code",
  "aggregator",
  "attack",
  "S",
  "P",
  "R",
  "D",
  "step",
  "accuracy",  # test accuracy
  "loss",  # mean training loss over the steps since the previous row
  "train_accuracy",  # mean training-batch accuracy over the same steps
  "wall_time",  # s, measured step time (see the module docstring)
  "wall_time_total",  # s, everything since the run started (evaluation and timing included)
  *PHASES.values(),  # ms, phases measured at this step
  "step_ms",  # ms, the whole jitted step measured at this step
  "projected_ms_per_step",
  "projected_time",  # s, the cluster projection (see the module docstring)
  "flagged_fraction",  # adversarial rows flagged / adversarial rows, since the previous row
  "honest_flagged_fraction",
  "deviation",  # max relative deviation from the clean mean since the previous row
  "skipped",  # steps skipped so far (combiner not ok)
  "iterations",  # mean combiner iterations since the previous row (geometric median)
  "target_accuracy",
)


def _workdir(out: str, index: int, run: grid.Run) -> str:
  c = run.config
  return os.path.join(out, "runs", f"{index:02d}-{run.method}-{c.attack}-s{c.active_adversaries}")


def _num_params(state) -> int:
  return int(sum(leaf.size for leaf in jax.tree.leaves(state.params)))


def _train(run: grid.Run, workdir: str) -> dict:
  """Trains ``run`` in ``workdir`` (unless it already finished there); returns its record."""
  record_path = os.path.join(workdir, "run.json")
  config_json = run.config.to_json()
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record["config"] == config_json:
      return record
  shutil.rmtree(workdir, ignore_errors=True)  # an interrupted or outdated run starts again
  results = train_and_evaluate(run.config, workdir)
  code = coding.make_code(run.config.code, run.config.num_workers, run.config.tolerance)
  record = {
    "method": run.method,
    "config": config_json,
    "R": code.redundancy,
    "D": _num_params(results.pop("state")),
    "results": results,
  }
  with open(record_path, "w") as f:
    json.dump(record, f, indent=2)
  return record


def _read_lines(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  steps = [line[m.STEP] for line in lines]
  if steps != list(range(1, len(lines) + 1)):
    raise ValueError(f"{workdir}: time accounting needs a metrics line per step (log_every=1)")
  return lines


def _step_seconds(lines: list[dict]) -> np.ndarray:
  """Measured seconds per step; step 1 (compilation) counts as the run's median step."""
  ms = np.asarray([line[m.MS_PER_STEP] for line in lines], float)
  if len(ms) > 1:
    ms[0] = np.median(ms[1:])
  return ms / 1e3


def _window(lines: list[dict]) -> dict:
  """Training statistics over the steps since the previous evaluation."""
  adversaries = sum(line[m.ADVERSARIES] for line in lines)
  honest = sum(line[m.HONEST] for line in lines)
  applied = [line[m.DEVIATION] for line in lines if line[m.OK]]
  return {
    "loss": float(np.mean([line[m.LOSS] for line in lines])),
    "train_accuracy": float(np.mean([line[m.ACCURACY] for line in lines])),
    "flagged_fraction": sum(line[m.FLAGGED_ADVERSARIES] for line in lines) / adversaries
    if adversaries
    else None,
    "honest_flagged_fraction": sum(line[m.FLAGGED_HONEST] for line in lines) / honest,
    "deviation": max(applied) if applied else None,
    "iterations": float(np.mean([line[m.ITERATIONS] for line in lines])),
  }


def _run_fields(record: dict, preset: str, target: float) -> dict:
  config = json.loads(record["config"])
  return {
    "preset": preset,
    "method": record["method"],
    "code": config["code"],
    "aggregator": config["aggregator"],
    "attack": config["attack"],
    "S": config["num_adversaries"],
    "P": config["num_workers"],
    "R": record["R"],
    "D": record["D"],
    "target_accuracy": target,
  }


def eval_rows(record: dict, lines: list[dict], *, preset: str, target: float) -> list[dict]:
  """One row per evaluation step of a run (projection fields still None)."""
  fields = _run_fields(record, preset, target)
  wall_seconds = np.cumsum(_step_seconds(lines))
  rows, start, skipped = [], 0, 0
  for i, line in enumerate(lines):
    skipped += int(not line[m.OK])
    if m.TEST_ACCURACY not in line:
      continue
    timing = line.get(m.TIMING) or {}
    rows.append(
      {
        **fields,
        "step": line[m.STEP],
        "accuracy": line[m.TEST_ACCURACY],
        **_window(lines[start : i + 1]),
        "wall_time": float(wall_seconds[i]),
        "wall_time_total": line[m.WALL_TIME],
        **{column: timing.get(phase) for phase, column in PHASES.items()},
        "step_ms": timing.get(m.WHOLE_STEP),
        "projected_ms_per_step": None,
        "projected_time": None,
        "skipped": skipped,
      }
    )
    start = i + 1
  return [{name: row[name] for name in ROW_FIELDS} for row in rows]


def _median(rows: list[dict], column: str) -> float | None:
  values = [row[column] for row in rows if row[column] is not None]
  return float(np.median(values)) if values else None


def _partition_ms(runs: list[list[dict]]) -> float | None:
  """One partition's gradient time: the median over uncoded runs of grad_ms / P (runs without
  a data attack, when there are any: their gradients phase evaluates exactly K = P)."""
  uncoded = [rows for rows in runs if rows and rows[0]["code"] == "uncoded"]
  clean = [rows for rows in uncoded if rows[0]["attack"] not in DATA_ATTACKS]
  uncoded = clean or uncoded
  per_run = [(_median(rows, "grad_ms"), rows[0]["P"]) for rows in uncoded]
  per_run = [ms / p for ms, p in per_run if ms is not None]
  return float(np.median(per_run)) if per_run else None


def add_projection(runs: list[list[dict]]) -> list[list[dict]]:
  """Fills ``projected_ms_per_step`` and ``projected_time`` of every run's rows."""
  t_partition = _partition_ms(runs)
  for rows in runs:
    if not rows:
      continue
    p, r = rows[0]["P"], rows[0]["R"]
    phases = {column: _median(rows, column) for column in PHASES.values()}
    if t_partition is None or None in phases.values():
      continue  # a run without phase timings (config.timing=False) has no projection
    ms = r * t_partition + phases["encode_ms"] / p + phases["combine_ms"] + phases["update_ms"]
    for row in rows:
      row["projected_ms_per_step"] = ms
      row["projected_time"] = row["step"] * ms / 1e3
  return runs


def run_grid(
  runs: Sequence[grid.Run], out: str, *, preset: str, target: float, progress: bool = True
) -> list[dict]:
  """Trains every run (tqdm over the grid) and returns the rows of the results file."""
  per_run = []
  bar = tqdm(runs, desc=f"{preset} grid", unit="run", disable=not progress)
  for index, run in enumerate(bar):
    bar.set_postfix_str(f"{run.method} {run.config.attack} S={run.config.active_adversaries}")
    workdir = _workdir(out, index, run)
    record = _train(run, workdir)
    per_run.append(eval_rows(record, _read_lines(workdir), preset=preset, target=target))
  return [row for rows in add_projection(per_run) for row in rows]


def run_preset(
  name: str, out: str, *, tiny: bool = False, data_dir: str | None = None, progress: bool = True
) -> str:
  """Runs preset ``name`` into ``out``; returns the path of its ``results.jsonl``."""
  preset = get_preset(name)
  runs = preset.grid(tiny)
  if data_dir is not None:
    runs = [grid.Run(r.method, dataclasses.replace(r.config, data_dir=data_dir)) for r in runs]
  os.makedirs(out, exist_ok=True)
  rows = run_grid(runs, out, preset=name, target=preset.target_accuracy, progress=progress)
  path = os.path.join(out, "results.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return path


def _enable_compile_cache(path: str) -> None:
  """Caches every compiled program on disk (compilation is excluded from the time accounting)."""
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("preset", help="a key of experiments.PRESETS")
  parser.add_argument("--tiny", action="store_true", help="the preset's tiny grid (tests)")
  parser.add_argument("--out", default=None, help="output directory (default results/PRESET)")
  parser.add_argument(
    "--data_dir",
    default=None,
    help="data directory: downloaded datasets and tfds-prepared copies (default $TFDS_DATA_DIR, "
    "else $XDG_CACHE_HOME/draco_jax, else ~/.cache/draco_jax)",
  )
  parser.add_argument(
    "--compile_cache",
    default=None,
    help="JAX persistent compilation cache (default OUT/jax_cache; '' disables): runs that "
    "share a program (same model and code) then compile it once",
  )
  args = parser.parse_args(argv)
  try:
    get_preset(args.preset)
  except ValueError as err:
    parser.error(str(err))
  out = args.out or os.path.join("results", args.preset)
  cache = os.path.join(out, "jax_cache") if args.compile_cache is None else args.compile_cache
  if cache:
    _enable_compile_cache(cache)
  path = run_preset(args.preset, out, tiny=args.tiny, data_dir=args.data_dir)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
