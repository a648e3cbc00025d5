r"""How often the cyclic decoder certifies a wrong answer: fresh random trials, large P.

Every trial draws new float32 gradients (D = 512), a new placement, attack and key, and
compares the decoded mean with the float64 mean of the honest partition gradients, using the
test suite's own references and attacks (``tests/decode_test.py``). "silent" counts accepted
answers (``ok``) off by more than 1e-3, relative: the issue's "never a silent error above
1e-3".

Two modes:
  within   at most S bad rows (random or contiguous), every attack of the tests, for the
           cyclic code or (``--code repetition``) the repetition code;
  over     S+1 contiguous bad rows, each carrying Gaussian errors of ``alpha`` x its rms
           (the tests' ``tiny`` attack at scale alpha),
           for alpha in {1e-3, 3e-3, 1e-2}: errors near the certificate's resolution, beyond
           the code's capacity (see README, "More than S bad rows").

Usage (from the repository root):
  python -m benchmarks.certificate_probe --mode within --trials 4000
  python -m benchmarks.certificate_probe --mode within --trials 4000 --code repetition
  python -m benchmarks.certificate_probe --mode over --trials 1000

Each line: the case, trials, the fraction accepted, how many accepted answers were off by more
than 1e-3, and the largest accepted error.
"""

from __future__ import annotations

import argparse
import warnings

import jax
import numpy as np

from tests import decode_test as reference

WITHIN_CASES = {
  "cyclic": ((31, 3), (31, 15), (32, 4), (32, 8), (63, 4), (63, 8), (64, 2), (64, 16)),
  "repetition": ((33, 1), (33, 16), (45, 7), (63, 1), (63, 10), (63, 31)),
}
OVER_CASES = ((16, 7), (31, 3), (32, 4), (32, 8), (64, 2))
ALPHAS = (1e-3, 3e-3, 1e-2)
D = 512


def _trial(p, s, rows, make_received, rng, name="cyclic"):
  """One fresh trial of code ``name``: (ok, relative error of the mean)."""
  setup = reference._setup(name, p, s, seed=int(rng.integers(2**31)), d=D)
  mask_P = reference._mask(p, rows)
  received_PxD = make_received(setup.sent_PxD, mask_P)
  out = reference._decode(setup, received_PxD, jax.random.key(int(rng.integers(2**31))), mask_P)
  return bool(out.ok), float(out.err)


def _summary(label, outcomes):
  errors = np.array([err for ok, err in outcomes if ok])
  worst = errors.max() if errors.size else 0.0
  silent = int(np.sum(errors > reference.LOOSE))
  accepted = errors.size / len(outcomes)
  return (
    f"{label}: {len(outcomes)} trials, accepted {accepted:.3f}, silent {silent}, max {worst:.1e}"
  )


def probe_within(cases, trials: int, seed: int, name: str = "cyclic") -> list[str]:
  """At most S bad rows: half random, half contiguous placements, every attack in turn."""
  rng = np.random.default_rng(seed)
  lines = []
  for p, s in cases:
    outcomes = []
    for trial in range(trials):
      size = int(rng.integers(1, s + 1))
      start = int(rng.integers(p))
      rows = (
        reference._contiguous(p, size, start) if trial % 2 else reference._random_rows(rng, p, size)
      )
      attack = reference.ATTACKS[(trial // 2) % len(reference.ATTACKS)]
      outcomes.append(
        _trial(
          p,
          s,
          rows,
          lambda sent, mask, attack=attack: reference._attack(attack, sent, mask, rng),
          rng,
          name,
        )
      )
    lines.append(_summary(f"within {name} P={p:2d} S={s:2d}", outcomes))
    print(lines[-1], flush=True)
  return lines


def probe_over(cases, trials: int, seed: int, alphas=ALPHAS) -> list[str]:
  """S+1 contiguous bad rows with errors of alpha x their rms."""
  rng = np.random.default_rng(seed)
  lines = []
  for (p, s), alpha in ((case, alpha) for case in cases for alpha in alphas):
    outcomes = [
      _trial(
        p,
        s,
        reference._contiguous(p, s + 1, int(rng.integers(p))),
        lambda sent, mask, alpha=alpha: reference._attack(
          "tiny", sent, mask, rng, tiny_scale=alpha
        ),
        rng,
      )
      for _ in range(trials)
    ]
    lines.append(_summary(f"over P={p:2d} S={s:2d} alpha={alpha:.0e}", outcomes))
    print(lines[-1], flush=True)
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mode", choices=("within", "over"), required=True)
  parser.add_argument("--code", choices=tuple(WITHIN_CASES), help="within only (default cyclic)")
  parser.add_argument("--trials", type=int, default=300, help="fresh trials per case")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.trials < 1:
    raise ValueError(f"--trials must be >= 1, got {args.trials}")
  if args.mode == "over" and args.code is not None:
    raise ValueError(f"--code {args.code} applies to --mode within only (over probes cyclic)")
  warnings.filterwarnings("ignore")
  if args.mode == "within":
    code = args.code or "cyclic"
    probe_within(WITHIN_CASES[code], args.trials, args.seed, code)
  else:
    probe_over(OVER_CASES, args.trials, args.seed)


if __name__ == "__main__":
  main()
