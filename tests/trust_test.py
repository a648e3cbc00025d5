"""Exact or refused, everywhere: every decoder, code, P, message dtype and x64 mode it accepts.

Shape legend: P workers, K = P partitions, S adversaries, D parameters.

A combined gradient is either within the precision of its messages (1e-5 relative for 32-bit
messages, 1e-12 for 64-bit, against the float64 mean of the honest partition gradients) or
refused (``report.ok`` False); inputs the combiners cannot decode exactly (the paper code
outside its numerical envelope, half precision, integers) are rejected with a ValueError that
names the rule, and 64-bit messages that jit would truncate draw a warning.

The decoders under ``jax.enable_x64(True)`` compile once per (code, dtype): 5-10 s each on 2
cores, so the default suite runs one S per P and one case per code, the full table under -m
slow.
"""

import functools
import itertools
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from draco_jax import aggregators, coding, config, decode
from draco_jax import testing as reference

D = 128
GROSS = ("rev_grad", "constant", "huge", "nan", "mixed")
ATTACKS = (*GROSS, "tiny")
PRECISION = {"float32": 1e-5, "float64": 1e-12}  # by the messages' real dtype
# The message dtypes each decoder accepts: those its code's encoder emits.
MESSAGE_DTYPES = {
  "cyclic": ("float32", "float64"),
  "repetition": ("float32", "float64"),
  "cyclic_paper": ("complex64", "complex128"),
}
# The paper code's envelope: the largest P at which its certified answers were exact, by message
# dtype (measured, see coding.PAPER_ENVELOPE).
PAPER_ENVELOPE = {"complex64": 16, "complex128": 28}
ENVELOPE_MESSAGE = (
  r"cyclic_paper with P={p} is outside its numerical envelope.*\(P <= 16 for complex64 "
  r"messages.*; P <= 28 for complex128.*\): .*use the default code 'cyclic'"
)


# --------------------------------------------------------------------------- set-up


@functools.cache
def _code(name, p, s):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # the centred code's float32 envelope
    return coding.make_code(name, p, s)


@functools.cache
def _decoder(name, p, s):
  return decode.make_decoder(_code(name, p, s))


def _messages(code, dtype, rng, d=D):
  """(sent_PxD in ``dtype``, the float64 mean of the partition gradients) for fresh gradients.

  32-bit messages are encoded from float32 gradients, 64-bit ones from float64 gradients; both
  in float64 numpy (W @ G), rounded once to ``dtype``.
  """
  grads_KxD = rng.standard_normal((code.num_workers, d))
  if jnp.finfo(dtype).bits == 32:
    grads_KxD = grads_KxD.astype(np.float32).astype(np.float64)
  return (code.matrix @ grads_KxD).astype(dtype), grads_KxD.mean(0)


def _attack(name, sent_PxD, mask_P, rng):
  """decode_test's attacks, plus `mixed`: one bad row 1e30·N(0,1), the others z − 100z."""
  if name != "mixed":
    return reference.attack(name, sent_PxD, mask_P, rng)
  rows = np.flatnonzero(mask_P)
  received_PxD = reference.attack("rev_grad", sent_PxD, mask_P, rng)
  return reference.attack("huge", received_PxD, reference.mask(len(mask_P), rows[:1]), rng)


def _placements(p, s, rng):
  return {"random": reference.random_rows(rng, p, s), "contiguous": reference.contiguous(p, s, 1)}


def _outcome(decoder, received_PxD, sent_PxD, truth_D, mask_P, key):
  """(ok, relative error, bad rows changed but not flagged, honest rows flagged)."""
  mean_D, report = decoder(jnp.asarray(received_PxD), key)
  flagged_P = np.asarray(report.flagged)
  missed = mask_P & reference.changed(sent_PxD, received_PxD) & ~flagged_P
  honest_flagged = ~mask_P & flagged_P
  err = reference.relative_error(np.asarray(mean_D), truth_D)
  return bool(report.ok), err, np.flatnonzero(missed).tolist(), np.flatnonzero(honest_flagged)


# --------------------------------------------------------------------------- the paper code


@pytest.mark.parametrize("p, s", [(48, 8), (56, 7), (64, 6), (64, 8)])
def test_paper_code_beyond_its_envelope_is_refused_at_build(p, s):
  """At P = 48-64 the paper code's rounding gain (6e5-9e7) left its certificate vacuous with
  complex64 messages (20 of 20 trials at P = 64, S = 8 certified x(-100) off by 4.6e8) and its
  complex128 answers off by 8e-10 to 2e-8. It is not built there."""
  with pytest.raises(ValueError, match=ENVELOPE_MESSAGE.format(p=p)):
    coding.make_code("cyclic_paper", p, s)


def test_paper_envelope_is_the_measured_one():
  assert coding.PAPER_ENVELOPE == PAPER_ENVELOPE


def test_paper_code_beyond_its_complex64_envelope_is_refused_when_traced():
  """Inside the complex128 envelope but outside the complex64 one: the dtype is static under
  jit, so the decoder refuses complex64 messages at trace time and decodes complex128 ones."""
  p = PAPER_ENVELOPE["complex64"] + 1
  code, decoder = _code("cyclic_paper", p, 3), _decoder("cyclic_paper", p, 3)
  rng = np.random.default_rng(0)
  sent_PxD, _ = _messages(code, np.complex64, rng)
  message = ENVELOPE_MESSAGE.format(p=p).replace("envelope", "envelope for complex64 messages")
  with pytest.raises(ValueError, match=message):
    decoder(sent_PxD, jax.random.key(0))
  with jax.enable_x64(True):
    sent_PxD, truth_D = _messages(code, np.complex128, rng)
    ok, err, _, flagged = _outcome(
      decoder, sent_PxD, sent_PxD, truth_D, np.zeros(p, bool), jax.random.key(0)
    )
  assert ok and err <= PRECISION["float64"] and not flagged.size, (ok, err, flagged)


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"num_workers": 64, "num_adversaries": 8}, ENVELOPE_MESSAGE.format(p=64)),
    (  # training sends complex64 messages (float32 gradients)
      {"num_workers": 20, "num_adversaries": 3},
      ENVELOPE_MESSAGE.format(p=20).replace("envelope", "envelope for complex64 messages"),
    ),
  ],
)
def test_config_refuses_the_paper_code_outside_its_envelope(fields, message):
  with pytest.raises(ValueError, match=message):
    config.validate(config.TrainConfig(code="cyclic_paper", **fields))


def test_cli_refuses_the_paper_code_at_p64_in_one_line_before_set_up(tmp_path):
  """`--code=cyclic_paper --num_workers=64`: one configuration error, nothing built."""
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "draco_jax.train", "--code=cyclic_paper"]
  command += ["--num_workers=64", f"--workdir={workdir}"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=120)
  output = result.stdout + result.stderr
  assert result.returncode != 0 and "Traceback" not in output, output[-2000:]
  fatal = [line for line in output.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and re.search(ENVELOPE_MESSAGE.format(p=64), fatal[0]), output
  assert not workdir.exists()


# --------------------------------------------------------------------------- 64-bit mode


def _x64_params():
  """(code, P, S, message dtype): P = 9, 10, 15, 31 (float64 refused honest sets there)."""
  default = {
    ("cyclic", 9, 1, "float64"),
    ("cyclic", 10, 1, "float64"),
    ("cyclic", 10, 1, "float32"),
    ("cyclic", 15, 1, "float64"),
    ("cyclic", 31, 3, "float64"),
    ("repetition", 9, 1, "float32"),
    ("repetition", 9, 1, "float64"),
    ("cyclic_paper", 7, 2, "complex64"),
    ("cyclic_paper", 16, 3, "complex128"),
  }
  cases = [("cyclic", p, s) for p, s in [(9, 1), (9, 4), (10, 1), (10, 3), (15, 1), (15, 2)]]
  cases += [("cyclic", p, s) for p, s in [(15, 7), (31, 1), (31, 3), (31, 15)]]
  cases += [("repetition", 9, 1), ("repetition", 9, 4), ("repetition", 15, 2)]
  cases += [("cyclic_paper", p, s) for p, s in [(7, 2), (9, 1), (16, 3)]]
  params = []
  for name, p, s in [*cases, ("cyclic_paper", PAPER_ENVELOPE["complex128"], 3)]:
    for dtype in MESSAGE_DTYPES[name]:
      if name == "cyclic_paper" and p > PAPER_ENVELOPE[dtype]:
        continue
      slow = () if (name, p, s, dtype) in default else (pytest.mark.slow,)
      params.append(pytest.param(name, p, s, dtype, marks=slow, id=f"{name}-{p}-{s}-{dtype}"))
  return params


@pytest.mark.parametrize("name, p, s, dtype", _x64_params())
def test_decoders_are_exact_with_x64_on_for_every_message_dtype(name, p, s, dtype):
  """Honest messages: ok, nothing flagged; S bad rows (random and contiguous, gross attacks and
  `tiny`): ok, every changed row flagged. Within 1e-12 (64-bit) or 1e-5 (32-bit) of the float64
  mean. Before: the projection drew uint64 bits under x64 (NaN Gaussians, every row erased,
  every decode refused), and the float64 tolerances refused honest sets at P = 9-31."""
  code, decoder = _code(name, p, s), _decoder(name, p, s)
  precision = PRECISION[jnp.finfo(dtype).dtype.name]
  rng = np.random.default_rng(p * 100 + s)
  keys = iter(jax.random.split(jax.random.key(s), 32))
  failures = []
  with jax.enable_x64(True):
    sent_PxD, truth_D = _messages(code, dtype, rng)
    for _ in range(2):
      ok, err, _, flagged = _outcome(
        decoder, sent_PxD, sent_PxD, truth_D, np.zeros(p, bool), next(keys)
      )
      if not (ok and err <= precision and not flagged.size):
        failures.append(f"honest: ok={ok} err={err:.1e} flagged={flagged.tolist()}")
    for (kind, rows), attack in itertools.product(_placements(p, s, rng).items(), ATTACKS):
      mask_P = reference.mask(p, rows)
      received_PxD = _attack(attack, sent_PxD, mask_P, rng)
      ok, err, missed, _ = _outcome(decoder, received_PxD, sent_PxD, truth_D, mask_P, next(keys))
      if not (ok and err <= precision and not missed):
        failures.append(f"{kind} {attack} rows={list(rows)}: ok={ok} err={err:.1e} {missed=}")
  assert not failures, "; ".join(failures)


def test_repetition_vote_tolerates_float64_jitter():
  """Honest float64 copies 1e-15 apart (reductions in another order) still agree."""
  code, decoder = _code("repetition", 9, 1), _decoder("repetition", 9, 1)
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    sent_PxD, truth_D = _messages(code, np.float64, rng)
    jittered_PxD = sent_PxD * (1 + 1e-15 * rng.standard_normal(sent_PxD.shape))
    mean_D, report = decoder(jittered_PxD, jax.random.key(0))
    assert bool(report.ok) and not np.any(report.flagged)
    assert reference.relative_error(np.asarray(mean_D), truth_D) <= PRECISION["float64"]


# --------------------------------------------------------------------------- other dtypes

COMBINERS = {
  "cyclic": lambda: _decoder("cyclic", 9, 2),
  "repetition": lambda: _decoder("repetition", 9, 1),
  "cyclic_paper": lambda: _decoder("cyclic_paper", 9, 2),
  "krum": lambda: aggregators.make_aggregator("krum", 9, 2),
  "geometric_median": lambda: aggregators.make_aggregator("geometric_median", 9, 2),
}
WHAT = {name: f"{name} decoder" for name in decode.DECODERS} | {
  name: f"aggregator '{name}'" for name in aggregators.AGGREGATORS
}


@pytest.mark.parametrize("x64", [False, True], ids=["x64_off", "x64_on"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int32", "uint8"])
@pytest.mark.parametrize("name", list(COMBINERS))
def test_unsupported_dtypes_are_refused_by_name(name, dtype, x64):
  """Half precision and integers: a ValueError naming the dtype and the supported ones (the
  decoders raised KeyError: 2 for half precision, keyed their tolerances by byte size)."""
  supported = "complex64, complex128" if name == "cyclic_paper" else "float32, float64"
  message = re.escape(
    f"{WHAT[name]}: messages of dtype {dtype} are not supported; supported dtypes: {supported}"
  )
  if jnp.issubdtype(dtype, jnp.floating):
    message += r" \(half precision cannot be combined exactly: cast the messages to float32\)"
  with jax.enable_x64(x64), pytest.raises(ValueError, match=message):
    COMBINERS[name]()(jnp.zeros((9, 16), dtype), jax.random.key(0))


@pytest.mark.parametrize(
  "name, dtype, supported",
  [
    ("cyclic", "complex64", "float32, float64"),
    ("repetition", "complex64", "float32, float64"),
    ("cyclic_paper", "float32", "complex64, complex128"),
    ("krum", "complex64", "float32, float64"),
  ],
)
def test_messages_of_the_wrong_kind_are_refused(name, dtype, supported):
  """A real code's decoder never sees complex messages, nor the paper code's real ones."""
  message = f"{WHAT[name]}: messages of dtype {dtype} are not supported; supported dtypes: "
  with pytest.raises(ValueError, match=re.escape(message + supported)):
    COMBINERS[name]()(jnp.zeros((9, 16), dtype), jax.random.key(0))


@pytest.mark.parametrize(
  "name, given, used",
  [
    ("cyclic", "float64", "float32"),
    ("cyclic_paper", "complex128", "complex64"),
    ("krum", "float64", "float32"),
  ],
)
def test_64_bit_messages_with_x64_off_warn(name, given, used):
  """jit casts 64-bit arguments to 32 bits without a word when x64 is off; the combiner warns,
  naming the dtype it was given and the one it combines in, and still decodes."""
  code = _code("uncoded" if name == "krum" else name, 9, 2)
  sent_PxD, truth_D = _messages(code, np.dtype(given), np.random.default_rng(5))
  message = f"{WHAT[name]}: got {given} messages, but jax_enable_x64 is off, so they are "
  message += f"combined in {used}"
  with pytest.warns(UserWarning, match=re.escape(message)):
    mean_D, report = COMBINERS[name]()(sent_PxD, jax.random.key(0))
  assert mean_D.dtype == jnp.float32 and bool(report.ok)
  if name != "krum":
    assert reference.relative_error(np.asarray(mean_D), truth_D) <= PRECISION["float32"]


def test_32_bit_messages_do_not_warn():
  sent_PxD, _ = _messages(_code("cyclic", 9, 2), np.float32, np.random.default_rng(5))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    COMBINERS["cyclic"]()(sent_PxD, jax.random.key(0))
