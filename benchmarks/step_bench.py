r"""Step cost of the worker-compute modes: whole training steps as ratios to the uncoded mean's.

For each model and (P, S) every method trains the same digits batch: the uncoded mean (the
denominator) and geometric median, and DRACO's cyclic and repetition codes with
``worker_compute="shared"`` (the K partition gradients once per step) and ``"per_worker"``
(every worker's R gradients, plus K for the diagnostic). t = S adversaries reverse their
gradients (placement random), so every DRACO step decodes. The repetition code needs
(2S+1) | P: at P = 45 it runs with the largest valid S below the row's (4 for 5, 7 for 10).

Each round times every method's jitted step (the median of ``calls`` blocked calls, at most
1 s) and its combine phase (the trainer's own jitted ``combine`` on that step's received
messages), one after the other; "x mean" is the step time over the uncoded mean's step of the
same round and "combine share" the combine time over the method's own step time of that round,
both the median over the rounds (the load of a shared machine drifts within seconds).
"peak MiB" is the compiled step's ``memory_analysis()`` per device: arguments + outputs +
temporaries - aliased. "faults" is the process's minor page faults per step call: XLA:CPU
allocates a program's temporaries as one buffer at each call, and glibc serves a buffer above
32 MiB with a fresh ``mmap`` whose 4 KiB pages the kernel faults in and zeroes one by one
(about 1 ms per 1,000 here), so a step whose temporaries cross 32 MiB pays some 8,000 faults
per call that one just under it does not: compare ratios with this column in view.
"per_worker / shared" is the per-worker step over the shared one.

Usage (docs/benchmarks.md has both tables):
  python -m benchmarks.step_bench --num_devices 1  # MLP, LeNet; P = 15 (S = 2), 45 (S = 5, 10)
  python -m benchmarks.step_bench                  # the same on the default mesh (5 devices)
  python -m benchmarks.step_bench --quick          # MLP, P = 15 (S = 2) only
  python -m benchmarks.step_bench --models mlp --num_devices 1   # one model
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import time
import warnings

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from draco_jax import train  # noqa: E402
from draco_jax.config import TrainConfig  # noqa: E402

# The offline experiment's MLP (D = 85,002 on digits) and LeNet-5 (D = 21,386).
MODELS = {"mlp": {"hidden": (256, 256)}, "lenet": {}}
CASES = ((15, 2), (45, 5), (45, 10))
BASELINE = "mean"
# (label, code, aggregator, worker_compute)
METHODS = (
  (BASELINE, "uncoded", "mean", "shared"),
  ("geometric_median", "uncoded", "geometric_median", "shared"),
  ("cyclic", "cyclic", "draco", "shared"),
  ("cyclic", "cyclic", "draco", "per_worker"),
  ("repetition", "repetition", "draco", "shared"),
  ("repetition", "repetition", "draco", "per_worker"),
)


def _tolerance(code: str, p: int, s: int) -> int:
  """S itself, or for the repetition code the largest S' <= S with (2S'+1) | P."""
  if code != "repetition":
    return s
  return max(v for v in range(1, s + 1) if p % (2 * v + 1) == 0)


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _median_ms(fn, *args, calls: int) -> tuple[float, float]:
  """The median milliseconds of blocked calls, and the minor page faults per call."""
  times, faults = [], _minor_faults()
  while len(times) < calls and (len(times) < 3 or sum(times) < 1.0):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times)), (_minor_faults() - faults) / len(times)


def _peak_mib(compiled) -> float:
  stats = compiled.memory_analysis()
  total = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )
  return total / 2**20


def _method(base: TrainConfig, code: str, aggregator: str, compute: str) -> dict:
  """A method's trainer, its step's inputs, the received messages and its peak memory."""
  s = _tolerance(code, base.num_workers, base.num_adversaries)
  config = dataclasses.replace(
    base,
    code=code,
    aggregator=aggregator,
    worker_compute=compute,
    num_adversaries=s,
  )
  trainer = train.make_trainer(config)
  state = trainer.init_state()
  batch, key = trainer.step_inputs(0)
  phases = trainer.phases

  @jax.jit  # the phases up to the combiner's input, as one program (one compilation)
  def receive(state, batch, key):
    mask_P, straggle_P, poison_P = phases.masks(key, state.step, batch.attack)
    sent = phases.encode(phases.gradients(state.params, poison_P, batch.x, batch.y))
    return phases.attack(key, sent, mask_P, straggle_P, batch.attack)

  received = receive(state, batch, key)
  step = trainer.update_fn.lower(state, batch, key).compile()  # the jitted step, compiled
  jax.block_until_ready(step(state, batch, key))
  jax.block_until_ready(phases.combine(key, received))
  return {
    "S": s,
    "R": trainer.code.redundancy,
    "devices": trainer.mesh.size,
    "D": int(sum(leaf.size for leaf in jax.tree.leaves(state.params))),
    "peak_mib": _peak_mib(step),
    "step": (step, (state, batch, key)),
    "combine": (phases.combine, (key, received)),
  }


def group_rows(
  model: str, p: int, s: int, *, rounds: int, calls: int, options=None, devices=0, methods=METHODS
):
  """One row per method of ``methods`` (the first is the baseline) at (model, P, S), timed side
  by side in ``rounds`` rounds."""
  base = TrainConfig(
    model=model,
    model_options=MODELS[model] if options is None else options,
    num_workers=p,
    num_adversaries=s,
    attack="reverse_gradient",
    placement="random",
    num_devices=devices,
    timing=False,
  )
  built = {(label, compute): _method(base, *rest, compute) for label, *rest, compute in methods}
  ratios = {name: [] for name in built}
  shares = {name: [] for name in built}
  steps = {name: [] for name in built}
  faults = {name: [] for name in built}
  for _ in range(rounds):
    ms = {}
    for name, m in built.items():
      ms[name], step_faults = _median_ms(m["step"][0], *m["step"][1], calls=calls)
      faults[name].append(step_faults)
    for name, m in built.items():
      combine_ms, _ = _median_ms(m["combine"][0], *m["combine"][1], calls=calls)
      steps[name].append(ms[name])
      ratios[name].append(ms[name] / ms[BASELINE, "shared"])
      shares[name].append(combine_ms / ms[name])
  rows = []
  for (label, compute), m in built.items():
    shared = ratios.get((label, "shared"))
    row = {
      "model": model,
      "P": p,
      "S": m["S"],
      "R": m["R"],
      "D": m["D"],
      "devices": m["devices"],
      "method": label,
      "compute": compute,
      "step_ms": float(np.median(steps[label, compute])),
      "x_mean": float(np.median(ratios[label, compute])),
      "combine_share": float(np.median(shares[label, compute])),
      "peak_mib": m["peak_mib"],
      "faults": float(np.median(faults[label, compute])),
      "per_worker_over_shared": None,
    }
    if compute == "per_worker" and shared:
      row["per_worker_over_shared"] = float(
        np.median(np.asarray(ratios[label, compute]) / np.asarray(shared))
      )
    rows.append(row)
  return rows


HEADER = (
  "| model | P | S | R | D | method | compute | step ms | x mean | combine share | peak MiB "
  "| faults | per_worker / shared |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(row: dict) -> str:
  vs = row["per_worker_over_shared"]
  versus = "" if vs is None else f"{vs:.2f} (R+1 = {row['R'] + 1})"
  return (
    f"| {row['model']} | {row['P']} | {row['S']} | {row['R']} | {row['D']:,} | {row['method']} "
    f"| {row['compute']} | {row['step_ms']:.1f} | {row['x_mean']:.2f} "
    f"| {row['combine_share']:.2f} | {row['peak_mib']:.1f} | {row['faults']:,.0f} | {versus} |"
  )


def run(models, cases, *, rounds: int = 5, calls: int = 5, options=None, devices: int = 0):
  """Prints the table (header, then each group's rows as they are measured); returns rows."""
  print(HEADER, flush=True)
  rows = []
  for model in models:
    for p, s in cases:
      group = group_rows(model, p, s, rounds=rounds, calls=calls, options=options, devices=devices)
      for row in group:
        print(format_row(row), flush=True)
      rows += group
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="MLP, P = 15 (S = 2) only")
  parser.add_argument(
    "--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}"
  )
  parser.add_argument("--rounds", type=int, default=5, help="timing rounds (median ratio)")
  parser.add_argument("--calls", type=int, default=5, help="blocked calls per timing")
  parser.add_argument(
    "--num_devices", type=int, default=0, help="devices on the mesh (0: the most dividing P)"
  )
  args = parser.parse_args(argv)
  models = tuple(args.models.split(","))
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    parser.error(f"--models: unknown {unknown}; valid: {', '.join(MODELS)}")
  models, cases = (("mlp",), CASES[:1]) if args.quick else (models, CASES)
  warnings.filterwarnings("ignore", message=".*outside the validated float32 envelope.*")
  run(models, cases, rounds=args.rounds, calls=args.calls, devices=args.num_devices)


if __name__ == "__main__":
  main()
