r"""How often the cyclic decoder certifies a wrong answer: fresh random trials, large P.

Every trial draws new gradients (float32; float64 for 64-bit messages; D = 512), a new
placement, attack and key, and compares the decoded mean with the float64 mean of the honest
partition gradients, using the references and attacks the tests use
(:mod:`draco_jax.testing`). "silent" counts accepted answers (``ok``) off by more than 1e-3,
relative: the issue's "never a silent error above 1e-3".

Four modes:
  within   at most S bad rows (random or contiguous), every attack of the tests, for the
           cyclic code or (``--code repetition``) the repetition code;
  small    errors near the certificate's resolution only: t <= S random rows (what the
           secret row assignment makes of any placement), each x(1 + 1e-3) or `tiny`, at
           P = 32-64 (:data:`SMALL_CASES`);
  over     S+1 contiguous bad rows, each carrying Gaussian errors of ``alpha`` x its rms
           (the tests' ``tiny`` attack at scale alpha),
           for alpha in {1e-3, 3e-3, 1e-2}: errors near the certificate's resolution, beyond
           the code's capacity (see README, "More than S bad rows");
  top      every code at the largest P it accepts (:data:`TOP_CASES`): the cyclic code at
           P = 64, the repetition code at P = 63 (float32 messages), the paper code at the top
           of its envelope for complex64 (P = 16) and complex128 messages (P = 28, x64 on);
           ``--trials`` fresh trials per code, spread over its S values, at most S bad rows
           (random or contiguous) and every attack of the tests plus ``mixed``;
  envelope the paper code at each P of ``--p`` (beyond its envelope too, bypassing the check
           that refuses it there), every S, ``--trials`` fresh trials per S: how the envelope
           of coding.PAPER_ENVELOPE was found.

Usage (from the repository root):
  python -m benchmarks.certificate_probe --mode within --trials 4000
  python -m benchmarks.certificate_probe --mode within --trials 4000 --code repetition
  python -m benchmarks.certificate_probe --mode within --trials 500 --assignment random \
    --solver host
  python -m benchmarks.certificate_probe --mode small --trials 600
  python -m benchmarks.certificate_probe --mode over --trials 1000
  python -m benchmarks.certificate_probe --mode top --trials 10000
  python -m benchmarks.certificate_probe --mode envelope --dtype complex64 --p 14-20 --trials 40

Each within/over line: the case, trials, the fraction accepted, how many accepted answers were
off by more than 1e-3, and the largest accepted error. Each top line: the code, P, message
dtype and S values, trials, the fraction refused, accepted answers off by more than 1e-3 and
by more than 1e-5 (how many of those under the ``tiny`` attack, which is held to 1e-3), and
the largest accepted error (with and without ``tiny``).
"""

from __future__ import annotations

import argparse
import collections
import warnings

import jax
import numpy as np

from draco_jax import coding, decode
from draco_jax import testing as reference

WITHIN_CASES = {
  "cyclic": ((31, 3), (31, 15), (32, 4), (32, 8), (63, 4), (63, 8), (64, 2), (64, 16)),
  "repetition": ((33, 1), (33, 16), (45, 7), (63, 1), (63, 10), (63, 31)),
}
OVER_CASES = ((16, 7), (31, 3), (32, 4), (32, 8), (64, 2))
# (code, the largest P it accepts, S values, message dtype). The repetition code needs
# (2S+1) | P; 63 is the largest P its tests and the within probe use.
TOP_CASES = (
  ("cyclic", 64, (2, 8, 16, 31), "float32"),
  ("repetition", 63, (1, 10, 31), "float32"),
  ("cyclic_paper", coding.PAPER_ENVELOPE["complex64"], (3, 7), "complex64"),
  ("cyclic_paper", coding.PAPER_ENVELOPE["complex128"], (3, 7), "complex128"),
)
TOP_ATTACKS = (*reference.ATTACKS, "mixed")
ALPHAS = (1e-3, 3e-3, 1e-2)
D = 512


def _trial(p, s, rows, make_received, rng, name="cyclic", solver="auto"):
  """One fresh trial of code ``name``: (ok, relative error of the mean)."""
  setup = reference.setup(name, p, s, seed=int(rng.integers(2**31)), d=D, solver=solver)
  mask_P = reference.mask(p, rows)
  received_PxD = make_received(setup.sent_PxD, mask_P)
  out = reference.decode_outcome(
    setup, received_PxD, jax.random.key(int(rng.integers(2**31))), mask_P
  )
  return bool(out.ok), float(out.err)


def _summary(label, outcomes):
  errors = np.array([err for ok, err in outcomes if ok])
  worst = errors.max() if errors.size else 0.0
  silent = int(np.sum(errors > reference.LOOSE))
  accepted = errors.size / len(outcomes)
  return (
    f"{label}: {len(outcomes)} trials, accepted {accepted:.3f}, silent {silent}, max {worst:.1e}"
  )


WITHIN_ATTACKS = (*reference.ATTACKS, "scale", "mixed_noise")


def probe_within(
  cases, trials: int, seed: int, name: str = "cyclic", assignment: str = "fixed", solver="auto"
) -> list[str]:
  """At most S bad workers: half random, half contiguous, every attack in turn. With
  ``assignment="random"`` the workers hold code rows drawn by a fresh permutation per trial
  (the training step's default, docs/math.md §5.6); with ``fixed``, row = worker. ``solver``:
  the route of the decoder's 64-bit steps (``host``: NumPy through jax.pure_callback, the
  route of backends without 64-bit types)."""
  rng = np.random.default_rng(seed)
  lines = []
  for p, s in cases:
    outcomes = []
    for trial in range(trials):
      size = int(rng.integers(1, s + 1))
      start = int(rng.integers(p))
      rows = (
        reference.contiguous(p, size, start) if trial % 2 else reference.random_rows(rng, p, size)
      )
      if assignment == "random":
        rows = tuple(sorted(rng.permutation(p)[list(rows)].tolist()))
      attack = WITHIN_ATTACKS[(trial // 2) % len(WITHIN_ATTACKS)]
      outcomes.append(
        _trial(
          p,
          s,
          rows,
          lambda sent, mask, attack=attack: reference.attack(attack, sent, mask, rng),
          rng,
          name,
          solver,
        )
      )
    assigned = " (rows assigned)" if assignment == "random" else ""
    route = f" solver={solver}" if solver != "auto" else ""
    lines.append(_summary(f"within {name}{assigned}{route} P={p:2d} S={s:2d}", outcomes))
    print(lines[-1], flush=True)
  return lines


SMALL_CASES = ((32, 8), (48, 12), (63, 8), (64, 4), (64, 8), (64, 16))
SMALL_ATTACKS = ("scale", "tiny")


def probe_small(cases, trials: int, seed: int, solver: str = "auto") -> list[str]:
  """Small errors only: t <= S random rows (the rows a secret assignment gives any placement),
  each x(1 + 1e-3) or `tiny`, near the certificate's resolution."""
  rng = np.random.default_rng(seed)
  lines = []
  for p, s in cases:
    outcomes = []
    for trial in range(trials):
      rows = reference.random_rows(rng, p, int(rng.integers(1, s + 1)))
      attack = SMALL_ATTACKS[trial % len(SMALL_ATTACKS)]
      ok, err = _trial(
        p,
        s,
        rows,
        lambda sent, mask, a=attack: reference.attack(a, sent, mask, rng),
        rng,
        solver=solver,
      )
      outcomes.append((attack, ok, err))
    lines.append(_top_summary(f"small cyclic P={p:2d} S={s:2d}", outcomes))
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
        reference.contiguous(p, s + 1, int(rng.integers(p))),
        lambda sent, mask, alpha=alpha: reference.attack("tiny", sent, mask, rng, tiny_scale=alpha),
        rng,
      )
      for _ in range(trials)
    ]
    lines.append(_summary(f"over P={p:2d} S={s:2d} alpha={alpha:.0e}", outcomes))
    print(lines[-1], flush=True)
  return lines


def _top_received(attack, sent_PxD, mask_P, rng):
  """The tests' attacks, plus `mixed`: one bad row 1e30·N(0,1), the others z − 100z."""
  if attack != "mixed":
    return reference.attack(attack, sent_PxD, mask_P, rng)
  received_PxD = reference.attack("rev_grad", sent_PxD, mask_P, rng)
  first_P = reference.mask(len(mask_P), np.flatnonzero(mask_P)[:1])
  return reference.attack("huge", received_PxD, first_P, rng)


def _top_trial(decoder, code, dtype, rng, trial):
  """One fresh trial: new gradients, placement (<= S rows), attack and key; (attack, ok, err)."""
  p, s = code.num_workers, code.num_adversaries
  grads_KxD = rng.standard_normal((p, D))
  if np.finfo(dtype).bits == 32:
    grads_KxD = grads_KxD.astype(np.float32).astype(np.float64)
  sent_PxD = (code.matrix @ grads_KxD).astype(dtype)
  size, start = int(rng.integers(1, s + 1)), int(rng.integers(p))
  rows = reference.contiguous(p, size, start) if trial % 2 else reference.random_rows(rng, p, size)
  attack = TOP_ATTACKS[(trial // 2) % len(TOP_ATTACKS)]
  received_PxD = _top_received(attack, sent_PxD, reference.mask(p, rows), rng)
  mean_D, report = decoder(received_PxD, jax.random.key(int(rng.integers(2**31))))
  return attack, bool(report.ok), reference.relative_error(np.asarray(mean_D), grads_KxD.mean(0))


def _top_summary(label, outcomes, precision=1e-5):
  """One line: refused fraction, accepted answers off by > 1e-3 and > ``precision``, largest
  errors."""
  accepted = [(attack, err) for attack, ok, err in outcomes if ok]
  wrong = collections.Counter(attack == "tiny" for attack, err in accepted if err > precision)
  worst = max((err for _, err in accepted), default=0.0)
  worst_gross = max((err for attack, err in accepted if attack != "tiny"), default=0.0)
  bound = f"{precision:.0e}".replace("e-0", "e-")  # 1e-5, not 1e-05
  return (
    f"{label}: {len(outcomes)} trials, refused {1 - len(accepted) / len(outcomes):.3f}, "
    f"wrong>1e-3 {sum(err > reference.LOOSE for _, err in accepted)}, "
    f"wrong>{bound} {sum(wrong.values())} ({wrong[True]} tiny), "
    f"max {worst:.1e} (without tiny {worst_gross:.1e})"
  )


def probe_top(trials: int, seed: int, cases=TOP_CASES) -> list[str]:
  """Every code at its largest P: ``trials`` fresh trials per code, split over its S values."""
  rng = np.random.default_rng(seed)
  lines = []
  for name, p, s_values, dtype in cases:
    outcomes = []
    with jax.enable_x64(np.finfo(dtype).bits == 64):
      for s in s_values:
        code = reference.cached_code(name, p, s)
        decoder = decode.make_decoder(code)
        per_s = -(-trials // len(s_values))
        outcomes += [_top_trial(decoder, code, np.dtype(dtype), rng, i) for i in range(per_s)]
    s_list = ",".join(map(str, s_values))
    lines.append(_top_summary(f"top {name} P={p} {dtype} S={s_list}", outcomes))
    print(lines[-1], flush=True)
  return lines


def _unguarded_decoder(code):
  """The cyclic decoder of ``code`` without the envelope check of decode.check_messages."""
  parts = decode.DECODERS[code.name](code)

  def run(received_PxD, key):
    projection = decode.project(received_PxD, key, parts.num_columns)
    weights_P, erased_P, report = parts.solve(projection, received_PxD.dtype, D)
    return decode.combine(parts, weights_P, erased_P, report.ok, received_PxD), report

  return jax.jit(run)


def probe_envelope(dtype: str, p_values, trials: int, seed: int) -> list[str]:
  """The paper code at each P (also beyond the envelope, where the library refuses it): every
  S, ``trials`` fresh trials per S; wrong means off by more than 1e-5 (complex64) or 1e-12."""
  rng = np.random.default_rng(seed)
  precision = 1e-5 if np.finfo(dtype).bits == 32 else 1e-12
  lines = []
  for p in p_values:
    outcomes = []
    with jax.enable_x64(precision < 1e-5):
      for s in range(1, (p - 1) // 2 + 1):
        code = coding._cyclic("cyclic_paper", p, s)
        decoder = _unguarded_decoder(code)
        outcomes += [_top_trial(decoder, code, np.dtype(dtype), rng, i) for i in range(trials)]
    label = f"envelope cyclic_paper P={p:2d} {dtype} S=1..{(p - 1) // 2}"
    lines.append(_top_summary(label, outcomes, precision))
    print(lines[-1], flush=True)
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--mode", choices=("within", "small", "over", "top", "envelope"), required=True
  )
  parser.add_argument("--code", choices=tuple(WITHIN_CASES), help="within only (default cyclic)")
  parser.add_argument("--trials", type=int, default=300, help="fresh trials per case")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--assignment",
    choices=("fixed", "random"),
    default="fixed",
    help="within only: row = worker, or rows by a fresh secret permutation per trial",
  )
  parser.add_argument(
    "--solver",
    choices=("auto", "device", "host"),
    default="auto",
    help="within, small: where the decoder's 64-bit steps run (host: the route of TPUs)",
  )
  parser.add_argument(
    "--dtype", choices=("complex64", "complex128"), default="complex64", help="envelope only"
  )
  parser.add_argument("--p", default="14-20", help="envelope only: P values, FIRST-LAST")
  args = parser.parse_args()
  if args.trials < 1:
    raise ValueError(f"--trials must be >= 1, got {args.trials}")
  if args.mode != "within" and args.code is not None:
    raise ValueError(
      f"--code {args.code} applies to --mode within only (over probes cyclic, top every code)"
    )
  warnings.filterwarnings("ignore")
  if args.mode == "within":
    code = args.code or "cyclic"
    probe_within(WITHIN_CASES[code], args.trials, args.seed, code, args.assignment, args.solver)
  elif args.mode == "small":
    probe_small(SMALL_CASES, args.trials, args.seed, args.solver)
  elif args.mode == "over":
    probe_over(OVER_CASES, args.trials, args.seed)
  elif args.mode == "top":
    probe_top(args.trials, args.seed)
  else:
    first, last = (int(v) for v in args.p.split("-"))
    probe_envelope(args.dtype, range(first, last + 1), args.trials, args.seed)


if __name__ == "__main__":
  main()
