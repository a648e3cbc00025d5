r"""Combiner cost vs P and vs D: every DRACO decoder and baseline aggregator on one array.

Each combiner is timed (median of ``repeats`` jitted, blocked calls) on float32 received
messages in which S rows are reversed x(-100), next to the plain-sum floor: the faster of
``np.sum(x, 0)`` and a jitted ``jnp.ones(P) @ x`` (a jitted ``jnp.sum(x, 0)`` is 55-100x slower
on XLA CPU and would flatter every ratio). Two sweeps: P at fixed D, and D at fixed P, with
S = 1 so that the repetition code (R = 3) fits every P of the sweep.

Command (1-2 minutes on 2 CPU cores; ``--quick`` in a few seconds):

    python -m experiments.combine_timing --out results/offline/combine_timing.jsonl

(``python -m experiments.report`` runs it when its output directory has no such file.)
Output: one JSON line per (combiner, P, D): ``combiner, P, S, D, ms, floor_ms, ratio``
(ratio = ms / floor_ms). Expected result (measured on 2 shared CPU cores): from D = 2^16 up the
DRACO decoders cost 2.5-7x the floor, like the plain mean, while the robust aggregators cost
8-120x it; at P = 15, D = 2^20: DRACO 5-6 ms, Krum 55-83 ms, geometric median 86-179 ms,
Bulyan 158-241 ms; at P = 45, D = 2^16: DRACO 0.9 ms, Krum 5.9 ms, geometric median 8.6 ms.
Below D = 2^14 fixed per-call overheads dominate every combiner.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from draco_jax import aggregators, coding, decode

__all__ = [
  "COMBINERS",
  "SWEEP",
  "QUICK_SWEEP",
  "make_combiner",
  "median_ms",
  "floor_ms",
  "interleaved_ratios",
  "received_messages",
  "time_combiner",
  "sweep",
  "main",
]

# DRACO decoders (by code) and baseline aggregators (uncoded messages).
COMBINERS = (
  "draco_repetition",
  "draco_cyclic",
  "mean",
  "coordinate_median",
  "trimmed_mean",
  "geometric_median",
  "krum",
  "bulyan",
)
_S = 1
# (P values at D = fixed_d, D values at P = fixed_p); every P is a multiple of R = 3.
SWEEP = {
  "ps": (9, 15, 21, 33, 45),
  "ds": (2**12, 2**14, 2**16, 2**18, 2**20),
  "fixed_p": 15,
  "fixed_d": 2**16,
  "combiners": COMBINERS,
}
QUICK_SWEEP = {
  "ps": (9, 15),
  "ds": (2**10, 2**12),
  "fixed_p": 9,
  "fixed_d": 2**10,
  "combiners": ("draco_cyclic", "geometric_median"),
}


def _code_name(combiner: str) -> str:
  return combiner.removeprefix("draco_") if combiner.startswith("draco_") else "uncoded"


def make_combiner(name: str, num_workers: int, num_adversaries: int) -> Callable:
  """The jitted combiner ``name`` (a key of :data:`COMBINERS`) for P workers and S adversaries."""
  if name not in COMBINERS:
    raise ValueError(f"unknown combiner {name!r}; valid combiners: {', '.join(COMBINERS)}")
  code = coding.make_code(_code_name(name), num_workers, num_adversaries)
  if name.startswith("draco_"):
    return decode.make_decoder(code)
  return jax.jit(aggregators.make_aggregator(name, num_workers, num_adversaries))


def received_messages(code: coding.Code, d: int, seed: int) -> jax.Array:
  """Encoded float32 messages of random N(0, 1) gradients, S random rows reversed x(-100)."""
  rng = np.random.default_rng(seed)
  p, s = code.num_workers, code.num_adversaries
  grads_KxD = jnp.asarray(rng.standard_normal((p, d)), jnp.float32)
  sent_PxD = np.array(coding.encode(code, grads_KxD))
  sent_PxD[rng.choice(p, s, replace=False)] *= -100.0
  return jnp.asarray(sent_PxD)


def median_ms(fn: Callable, *args, repeats: int, budget_s: float = float("inf")) -> float:
  """Median milliseconds of ``repeats`` blocked calls after a warm-up call (which compiles).

  Stops early, after at least 3 calls, once the calls have taken ``budget_s`` seconds.
  """
  jax.block_until_ready(fn(*args))
  times = []
  while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def floor_ms(x_PxD: jax.Array, repeats: int) -> float:
  """The plain-sum floor: the faster of np.sum(x, 0) and a jitted ones(P) @ x."""
  x_np = np.asarray(x_PxD)
  ones = jax.jit(lambda x: jnp.ones(x.shape[0], x.dtype) @ x)
  numpy_ms = median_ms(lambda: np.sum(x_np, 0), repeats=repeats)
  return min(numpy_ms, median_ms(ones, x_PxD, repeats=repeats))


def interleaved_ratios(
  candidates: dict, x_PxD: jax.Array, *, rounds: int = 5, calls: int = 5
) -> tuple[dict, float]:
  """Median over ``rounds`` of (median time of each candidate / the floor of the same round).

  Args:
    candidates: name -> (fn, args); each timed on its args after one warm-up call.
    x_PxD: the array whose plain-sum floor (:func:`floor_ms`) each ratio is taken against.
    rounds: how many times the floor and every candidate are timed in turn; the load of a
      shared machine drifts within seconds, so a ratio is only taken within one round.
    calls: blocked calls per timing (their median is the timing).

  Returns:
    ({name: median ratio}, median floor ms).
  """
  if rounds < 1 or calls < 1:
    raise ValueError(f"rounds and calls must be >= 1; got rounds={rounds}, calls={calls}")
  for fn, args in candidates.values():
    jax.block_until_ready(fn(*args))
  ratios, floors = {name: [] for name in candidates}, []
  for _ in range(rounds):
    floor = floor_ms(x_PxD, calls)
    floors.append(floor)
    for name, (fn, args) in candidates.items():
      ratios[name].append(median_ms(fn, *args, repeats=calls, budget_s=1.0) / floor)
  return {name: float(np.median(r)) for name, r in ratios.items()}, float(np.median(floors))


def time_combiner(name: str, p: int, s: int, d: int, *, repeats: int = 5) -> dict:
  """One row: the median time of combiner ``name`` at (P, S, D), and the plain-sum floor."""
  x_PxD = received_messages(coding.make_code(_code_name(name), p, s), d, seed=p * d + s)
  ms = median_ms(make_combiner(name, p, s), x_PxD, jax.random.key(0), repeats=repeats)
  floor = floor_ms(x_PxD, repeats)
  return {
    "combiner": name,
    "P": p,
    "S": s,
    "D": d,
    "ms": ms,
    "floor_ms": floor,
    "ratio": ms / floor,
  }


def _points(grid: dict) -> list[tuple[int, int]]:
  points = [(p, grid["fixed_d"]) for p in grid["ps"]]
  points += [(grid["fixed_p"], d) for d in grid["ds"] if (grid["fixed_p"], d) not in points]
  return points


def sweep(grid: dict | None = None, *, repeats: int = 5) -> Iterator[dict]:
  """Rows of :func:`time_combiner` over the P sweep and the D sweep of ``grid``."""
  grid = grid or SWEEP
  for p, d in _points(grid):
    for name in grid["combiners"]:
      yield time_combiner(name, p, _S, d, repeats=repeats)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/combine_timing.jsonl", help="JSON lines file")
  parser.add_argument("--quick", action="store_true", help="tiny sweep (tests)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  warnings.simplefilter("ignore", UserWarning)  # float32 envelope warnings of large codes
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    for row in sweep(QUICK_SWEEP if args.quick else SWEEP, repeats=args.repeats):
      f.write(json.dumps(row) + "\n")
      f.flush()
      print(
        f"{row['combiner']:>18} P={row['P']:<3} D=2^{int(np.log2(row['D'])):<3}"
        f" {row['ms']:9.3f} ms  {row['ratio']:8.1f} x floor",
        flush=True,
      )


if __name__ == "__main__":
  main()
