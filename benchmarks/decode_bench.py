r"""Decode / aggregation cost as ratios to a plain sum, measured side by side in one run.

For each P and D, every combiner (DRACO decoders and the baseline aggregators) is timed on the
same float32 array of received messages (S rows reversed x(-100)), and its median time is divided
by the median time of the plain-sum floor, timed in the same round (five rounds of 25 calls
per timing, at most 1 s each; the table gives the median ratio): the faster of
``np.sum(x, 0)`` and a jitted ``jnp.ones(P) @ x`` (a jitted ``jnp.sum(x, 0)`` is 55-100x slower
on XLA CPU and would flatter every ratio). Absolute times are noisy on shared machines; the
ratios are the result.

"two reads" is the cost of the two passes over the messages that any decoder of this kind
needs (a projection, then a weighted sum whose weights depend on it), with nothing else: a
jitted one-column projection and one weighted row sum. It bounds from below what a decoder can
reach at each size.

The repetition code needs (2S+1) | P, which no power of two allows, so it is measured at the
nearest P with a divisor 3 (9, 15, 33, 63) with S = 1; the cyclic code uses S = max(1, P // 8).

Usage:
  python -m benchmarks.decode_bench                      # the README table (several minutes)
  python -m benchmarks.decode_bench --quick              # P in {8, 16}, D = 2^16
  python -m benchmarks.decode_bench --aggregators=all    # add every (jitted) baseline aggregator
  python -m benchmarks.decode_bench --stages             # each decoder split into its stages

``--stages`` times each stage of both decoders as its own jitted call, against the same floor:
"dispatch" (a jitted call that does nothing), "one row x2" (a jitted op that reads and writes one
row: the fixed cost of one D-sized op), the projection with the decoder's C columns and
with one, the P-sized solve, the combination, and the whole decoder. The stages' sum exceeds
the whole by about one dispatch per extra call.
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from draco_jax import coding, decode
from experiments.combine_timing import interleaved_ratios, received_messages

_FRC_P = {8: 9, 16: 15, 32: 33, 64: 63}


def _codes(p: int) -> tuple[coding.Code, coding.Code]:
  """The two codes benchmarked at size P: cyclic with S = max(1, P/8), repetition at _FRC_P."""
  return coding.make_code("cyclic", p, max(1, p // 8)), coding.make_code("repetition", _FRC_P[p], 1)


@jax.jit
def _two_reads(x_PxD: jax.Array):
  """The two passes a decoder cannot avoid, and nothing else: a one-column projection and a
  weighted sum of the rows (the weights depend on the projection, so they are two reads)."""
  p, d = x_PxD.shape
  return x_PxD @ jnp.ones(d, x_PxD.dtype), jnp.ones(p, x_PxD.dtype) @ x_PxD


def _aggregators(names, p: int, s: int):
  if not names:
    return {}
  from draco_jax import aggregators  # noqa: PLC0415 (optional part of the table)

  out = {}
  for name in names:
    try:
      out[name] = aggregators.make_aggregator(name, p, s)
    except ValueError as err:  # precondition (e.g. Bulyan needs P >= 4S+3)
      out[name] = str(err)
  return out


def run(ps, ds, aggregator_names, rounds: int, calls: int = 25):
  rows = []
  key = jax.random.key(0)
  for p in ps:
    cyclic, frc = _codes(p)
    s = cyclic.num_adversaries
    for d in ds:
      x_PxD = received_messages(cyclic, d, seed=p + d)
      candidates = {
        "cyclic": (decode.make_decoder(cyclic), (x_PxD, key)),
        "two_reads": (_two_reads, (x_PxD,)),
      }
      skipped = []
      if aggregator_names:
        x_unc = received_messages(coding.make_code("uncoded", p, s), d, seed=p + 7 * d)
      for name, agg in _aggregators(aggregator_names, p, s).items():
        if isinstance(agg, str):
          skipped.append(name)
        else:
          candidates[name] = (agg, (x_unc, key))
      ratios, floor = interleaved_ratios(candidates, x_PxD, rounds=rounds, calls=calls)
      x_frc = received_messages(frc, d, seed=p * d)
      frc_ratios, _ = interleaved_ratios(
        {"repetition": (decode.make_decoder(frc), (x_frc, key))}, x_frc, rounds=rounds, calls=calls
      )
      row = {"P": p, "S": s, "D": d, "floor_ms": floor, **ratios, **frc_ratios}
      row["repetition_P"] = frc.num_workers
      for name in aggregator_names:
        row[name + "_vs_cyclic"] = None if name in skipped else row[name] / row["cyclic"]
        row.setdefault(name, None)
      rows.append(row)
      print(_format_row(row, aggregator_names), flush=True)
  return rows


def _stages(code: coding.Code, x_PxD: jax.Array, key) -> dict:
  """(fn, args) per stage of ``code``'s decoder, each its own jitted call (see --stages)."""
  parts = decode.decoder_parts(code)
  d = x_PxD.shape[1]
  project = jax.jit(decode.project, static_argnums=2)
  projection = project(x_PxD, key, parts.num_columns)
  solve = jax.jit(lambda pr: parts.solve(pr, x_PxD.dtype, d))
  weights_P, erased_P, report = solve(projection)
  combine = jax.jit(lambda w, e, ok, x: decode.combine(parts, w, e, ok, x))
  return {
    "dispatch": (jax.jit(lambda k: k), (key,)),
    "one row x2": (jax.jit(lambda x: x[0] * 2), (x_PxD,)),
    f"project C={parts.num_columns}": (project, (x_PxD, key, parts.num_columns)),
    "project C=1": (project, (x_PxD, key, 1)),
    "solve": (solve, (projection,)),
    "combine": (combine, (weights_P, erased_P, report.ok, x_PxD)),
    "decode": (decode.make_decoder(code), (x_PxD, key)),
  }


def run_stages(ps, ds, rounds: int, calls: int = 25):
  key = jax.random.key(0)
  for p in ps:
    for d in ds:
      for code in _codes(p):
        x_PxD = received_messages(code, d, seed=p + d)
        stages = _stages(code, x_PxD, key)
        ratios, floor = interleaved_ratios(stages, x_PxD, rounds=rounds, calls=calls)
        cells = " ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items())
        name = f"{code.name} P={code.num_workers} S={code.num_adversaries}"
        print(f"{name:>20} D=2^{int(np.log2(d)):<2} floor {floor:.3f} ms | {cells}", flush=True)


def _format_row(row, names) -> str:
  cells = [
    f"{row['P']:>3}",
    f"{row['S']:>2}",
    f"2^{int(np.log2(row['D'])):<2}",
    f"{row['floor_ms']:8.2f}",
    f"{row['two_reads']:6.2f}",
    f"{row['cyclic']:6.2f}",
    f"{row['repetition']:6.2f} (P={row['repetition_P']})",
  ]
  for name in names:
    value = row.get(name)
    cells.append("n/a" if value is None else f"{value:.1f} ({row[name + '_vs_cyclic']:.1f}x)")
  return "| " + " | ".join(cells) + " |"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="P in {8, 16}, D = 2^16")
  parser.add_argument(
    "--rounds", type=int, default=5, help="timing rounds (the floor is re-timed in each)"
  )
  parser.add_argument(
    "--calls", type=int, default=25, help="blocked calls per timing, at most 1 s (their median)"
  )
  parser.add_argument("--stages", action="store_true", help="time each decoder stage")
  parser.add_argument(
    "--aggregators", default="", help="comma-separated aggregator names, or 'all'"
  )
  args = parser.parse_args()
  warnings.simplefilter("ignore", UserWarning)
  names = [n for n in args.aggregators.split(",") if n]
  if names == ["all"]:
    from draco_jax import aggregators  # noqa: PLC0415

    names = list(aggregators.AGGREGATORS)
  ps, ds = ((8, 16), (2**16,)) if args.quick else ((8, 16, 32, 64), (2**16, 2**20))
  if args.stages:
    if names:
      parser.error(f"--stages times the DRACO decoders only; drop --aggregators={args.aggregators}")
    print("ratios = median time of each stage / plain-sum floor, same round")
    run_stages(ps, ds, args.rounds, args.calls)
    return
  header = ["P", "S", "D", "floor ms", "two reads", "cyclic", "repetition"] + [
    f"{n} (vs cyclic)" for n in names
  ]
  print("ratios = median time / plain-sum floor (faster of np.sum(x,0) and jnp.ones(P)@x)")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  run(ps, ds, names, args.rounds, args.calls)


if __name__ == "__main__":
  main()
