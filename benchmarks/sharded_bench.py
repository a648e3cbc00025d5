r"""Replicated vs sharded combining: bytes moved per device per step and time, side by side.

Replicated: the P messages are all-gathered onto every device, which all run the combiner.
Sharded (draco_jax.sharded): all_to_all so that each device holds a D/N column slice of every
message, psums of the [P, C] projections (decoders) or of partial norms / Gram matrices
(baselines), and an all-gather of the [D] mean.

Bytes are counted from the collectives' shapes in the traced program (jaxpr), as the bytes each
device receives: all-gather (N-1)·|input|, all_to_all (N-1)/N·|input|, psum / pmax 2(N-1)/N·|x|
(ring all-reduce: reduce-scatter + all-gather). Where a cond's branches differ, the cheaper one
is counted (the overflow-rescaling branches run only when a squared norm overflows); collectives
inside while loops (Weiszfeld) are counted once per iteration run. Times are medians over
blocking calls on 8 simulated CPU devices (the messages are sharded over the workers before the
clock starts), so they show the cost of the extra collectives and of the per-device work, not a
network; bytes are the result that transfers to real interconnects.

Usage:
  python -m benchmarks.sharded_bench                # D = 2^18, plus full training steps
  python -m benchmarks.sharded_bench --quick        # D = 2^14, no training steps
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from draco_jax import aggregators, coding, decode, sharded, train  # noqa: E402
from draco_jax import mesh as mesh_lib  # noqa: E402
from draco_jax.config import TrainConfig  # noqa: E402

COMBINERS = ("cyclic", "mean", "coordinate_median", "krum", "geometric_median")


# --------------------------------------------------------------------------- bytes


def _nbytes(avals) -> int:
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in avals)


def _eqn_bytes(eqn, n: int) -> float:
  """Bytes one device receives for one collective equation (0 for anything else)."""
  name, size = eqn.primitive.name, _nbytes(v.aval for v in eqn.invars)
  if name.startswith("all_gather"):
    return (n - 1) * size
  if name.startswith("all_to_all"):
    return (n - 1) / n * size
  if name.startswith(("psum", "pmax", "pmin")):
    return 2 * (n - 1) / n * size
  return 0.0


def _sub_jaxprs(value):
  if hasattr(value, "eqns"):
    return [value]
  if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    return [value.jaxpr]
  if isinstance(value, tuple | list):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def collective_bytes(jaxpr, n: int) -> tuple[float, float]:
  """(bytes per call, bytes per loop iteration) received by one device."""
  fixed = per_iteration = 0.0
  for eqn in jaxpr.eqns:
    fixed += _eqn_bytes(eqn, n)
    name = eqn.primitive.name
    if name == "cond":
      costs = [collective_bytes(b.jaxpr, n) for b in eqn.params["branches"]]
      fixed += min(c[0] for c in costs)
      per_iteration += min(c[1] for c in costs)
    elif name == "while":
      body = collective_bytes(eqn.params["body_jaxpr"].jaxpr, n)
      per_iteration += sum(body)
    else:
      scale = eqn.params.get("length", 1) if name == "scan" else 1
      for sub in (j for v in eqn.params.values() for j in _sub_jaxprs(v)):
        inner = collective_bytes(sub, n)
        fixed += scale * inner[0]
        per_iteration += scale * inner[1]
  return fixed, per_iteration


# --------------------------------------------------------------------------- combiners


def _replicated(combiner, mesh):
  """Gather the worker-sharded messages onto every device, then combine (the current step)."""
  gather = jax.shard_map(
    lambda rows: jax.lax.all_gather(rows, mesh_lib.WORKER_AXIS, tiled=True, to="invarying"),
    mesh=mesh,
    in_specs=P(mesh_lib.WORKER_AXIS),
    out_specs=P(),
  )
  return jax.jit(lambda x, key: combiner(gather(x), key))


def _pair(name: str, p: int, s: int, mesh):
  """(code, replicated, sharded) combiners for a decoder or a baseline name."""
  if name in decode.DECODERS:
    code = coding.make_code(name, p, s)
    return (
      code,
      _replicated(decode.make_decoder(code), mesh),
      sharded.make_mesh_combiner(code, mesh),
    )
  code = coding.make_code("uncoded", p, s)
  replicated = _replicated(aggregators.make_aggregator(name, p, s), mesh)
  return code, replicated, sharded.make_mesh_combiner(code, mesh, aggregator=name)


def _received(code: coding.Code, d: int, mesh) -> jax.Array:
  rng = np.random.default_rng(code.num_workers + d)
  grads_KxD = rng.standard_normal((code.num_workers, d)).astype(np.float32)
  sent_PxD = np.array(coding.encode(code, jnp.asarray(grads_KxD)))
  sent_PxD[rng.choice(code.num_workers, code.num_adversaries, replace=False)] *= -100.0
  return jax.device_put(sent_PxD, NamedSharding(mesh, P(mesh_lib.WORKER_AXIS)))


def _median_ms(fn, *args, repeats: int):
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times)), out


def _bytes(fn, x, key, n: int, iterations: int) -> float:
  fixed, per_iteration = collective_bytes(jax.make_jaxpr(fn)(x, key).jaxpr, n)
  return fixed + iterations * per_iteration


def combine_rows(ps, d: int, repeats: int):
  key = jax.random.key(0)
  for p in ps:
    s = max(1, p // 8)
    mesh = mesh_lib.make_worker_mesh(p)
    n = mesh.shape[mesh_lib.WORKER_AXIS]
    for name in COMBINERS:
      code, replicated, shard = _pair(name, p, s, mesh)
      x = _received(code, d, mesh)
      rep_ms, (_, rep_report) = _median_ms(replicated, x, key, repeats=repeats)
      sh_ms, (_, sh_report) = _median_ms(shard, x, key, repeats=repeats)
      rep_b = _bytes(replicated, x, key, n, int(rep_report.iterations))
      sh_b = _bytes(shard, x, key, n, int(sh_report.iterations))
      yield {
        "combiner": name,
        "P": p,
        "S": s,
        "D": d,
        "dtype": str(x.dtype),
        "rep_mb": rep_b / 2**20,
        "sh_mb": sh_b / 2**20,
        "rep_ms": rep_ms,
        "sh_ms": sh_ms,
        "iterations": int(sh_report.iterations),
      }


def step_rows(ps, steps: int):
  """Full training steps (digits MLP, cyclic code, reversed gradients) in both modes."""
  for p in ps:
    ms = {}
    for mode in ("replicated", "sharded"):
      config = TrainConfig(
        num_workers=p,
        num_adversaries=max(1, p // 8),
        num_devices=8,
        timing=False,
        combine_sharding=mode,
      )
      trainer = train.make_trainer(config)
      state = trainer.init_state()
      state, _ = train.train_step(trainer, state, 0)  # compiles
      times = []
      for step in range(1, steps + 1):
        start = time.perf_counter()
        state, _ = train.train_step(trainer, state, step)  # blocks on the metrics
        times.append(time.perf_counter() - start)
      ms[mode] = 1e3 * float(np.median(times))
      d = int(sum(np.prod(v.shape) for v in jax.tree.leaves(trainer.init_params)))
    yield {"P": p, "D": d, "rep_ms": ms["replicated"], "sh_ms": ms["sharded"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="D = 2^14 and no training steps")
  parser.add_argument("--log2_d", type=int, default=None, help="D = 2^this (default 18)")
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  warnings.simplefilter("ignore", UserWarning)
  d = 2 ** (args.log2_d or (14 if args.quick else 18))
  print(f"{jax.device_count()} simulated {jax.devices()[0].platform} devices; D = {d}")
  print("MB = MiB received per device per call; time = median ms per blocking call\n")
  print(
    "| combiner | P | S | messages | replicated MB | sharded MB | bytes ratio "
    "| replicated ms | sharded ms | time ratio |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in combine_rows((8, 16), d, args.repeats):
    note = f" ({r['iterations']} it.)" if r["combiner"] == "geometric_median" else ""
    print(
      f"| {r['combiner']}{note} | {r['P']} | {r['S']} | {r['dtype']} | {r['rep_mb']:.2f} "
      f"| {r['sh_mb']:.2f} | {r['sh_mb'] / r['rep_mb']:.3f} | {r['rep_ms']:.2f} "
      f"| {r['sh_ms']:.2f} | {r['sh_ms'] / r['rep_ms']:.2f} |",
      flush=True,
    )
  if args.quick:
    return
  print("\nFull training step (digits MLP, cyclic code, S = P/8 reversing, 8 devices)\n")
  print("| P | D | replicated ms/step | sharded ms/step | time ratio |")
  print("|---|---|---|---|---|")
  for r in step_rows((8, 16), args.steps):
    print(
      f"| {r['P']} | {r['D']} | {r['rep_ms']:.2f} | {r['sh_ms']:.2f} "
      f"| {r['sh_ms'] / r['rep_ms']:.2f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
