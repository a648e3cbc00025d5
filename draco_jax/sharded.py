"""Sharded decoding: the parameter server's work spread over the devices of the worker mesh.

Shape legend: P workers, N devices on the worker axis (shards), p = P/N workers per device,
D parameters, W = ⌈D/N⌉ columns per slice (D is padded with zero columns to N·W), C projection
columns.

Replicated combining all-gathers the P messages onto every device, which then all run the same
combiner: each device receives (N−1)/N·P·D values. Sharded combining moves about P·D/N:

1. ``all_to_all``: device i sends column slice j of its p messages to device j, and receives
   slice i of every worker's message, [P, W] (:func:`to_slices`).
2. The server on slices (:func:`make_slice_combiner`):

   * DRACO decoders: each device projects the slice it received with ``decode.project(...,
     shard_index=i, num_shards=N)`` and the [P, C] projections, [P, C] scales and [P, P] Gram
     estimate are psum'd. The projection is thus computed from the data the devices actually
     received, never reported by a worker, so an adversary cannot lie about it. The small
     solve (locate, certify, weights, the noise gates) runs on every device on the same psum'd
     values, and each device combines its slice with the weights (or skips it if refused).
   * Baselines (``aggregators.make_sliced_aggregator``): coordinate-wise rules (mean, median,
     trimmed mean, Bulyan's second stage) run per slice; geometric median, Krum, Multi-Krum,
     Bulyan's selection and centered clipping psum partial squared norms and Gram matrices.

   Flagged rows and ok come from psum'd values only, so every device holds the same Report.
3. ``all_gather`` of the [W] mean slices (:func:`gather_slices`), or, with ``gather=False``,
   the mean stays sharded (e.g. for a sharded optimizer state).

Per device and step that is (N−1)/N·(P·W + N·W) ≈ P·D/N + D values plus an all-reduce of
P·(2C+P) values, against (N−1)/N·P·D: the ratio is about 1/N + 1/P (``benchmarks/sharded_bench.py``
counts both from the collectives' shapes). Flagged rows and ok are device-invariant by type:
shard_map's replication check (check_vma) accepts them as replicated outputs.

The projection F of a sharded decoder is Kronecker-structured per slice, so it equals the
replicated decoder's F only when D and D/N factor alike (e.g. D a multiple of 2048·N);
otherwise it is another fresh secret Gaussian projection. The decoded result depends on F only
through its decisions (erasures, agreeing rows, the certificate), so both give the same answer
up to rounding (tests/sharded_test.py checks every code, aggregator and attack).
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from draco_jax import aggregators, contract, decode
from draco_jax.coding import Code
from draco_jax.mesh import WORKER_AXIS

__all__ = [
  "slice_width",
  "to_slices",
  "clear_padding",
  "gather_slices",
  "make_slice_combiner",
  "make_sharded_combiner",
  "make_mesh_combiner",
]


def _num_shards(num_workers: int, num_shards) -> int:
  """N as an int; raises ValueError unless it is a positive integer dividing P."""
  try:
    n = operator.index(num_shards)
  except TypeError:
    raise ValueError(f"num_shards must be an integer; got {num_shards!r}") from None
  if n < 1 or num_workers % n:
    raise ValueError(
      f"num_shards (devices on the worker axis) must be a positive divisor of the number of "
      f"workers; got num_shards={n} for P={num_workers}"
    )
  return n


def slice_width(num_features: int, num_shards: int) -> int:
  """W = ⌈D/N⌉: the columns of each device's slice."""
  return -(-num_features // num_shards)


def to_slices(rows_pxD: jax.Array, num_shards: int, axis_name: str = WORKER_AXIS) -> jax.Array:
  """Inside shard_map: this device's p rows in, column slice i of all P rows out, [P, W].

  D is padded with zero columns to N·W; worker order is kept (device j's rows come j-th).
  """
  d = rows_pxD.shape[1]
  pad = num_shards * slice_width(d, num_shards) - d
  padded_pxD = jnp.pad(rows_pxD, ((0, 0), (0, pad))) if pad else rows_pxD
  return jax.lax.all_to_all(padded_pxD, axis_name, 1, 0, tiled=True)


def clear_padding(
  slice_PxW: jax.Array, num_features: int, axis_name: str = WORKER_AXIS
) -> jax.Array:
  """Inside shard_map: zeroes the padding columns (global index >= D) of this device's slice.

  For a slice something (an attack) may have rewritten: padding must stay zero, or it would
  count in norms, distances and projections though it is not part of any message.
  """
  w = slice_PxW.shape[1]
  real_W = jax.lax.axis_index(axis_name) * w + jnp.arange(w) < num_features
  return jnp.where(real_W[None, :], slice_PxW, jnp.zeros((), slice_PxW.dtype))


def gather_slices(mean_W: jax.Array, num_features: int, axis_name: str = WORKER_AXIS):
  """Inside shard_map: the whole [D] vector on every device from its [W] slices."""
  return jax.lax.all_gather(mean_W, axis_name, tiled=True, to="invarying")[:num_features]


def _slice_decoder(code: Code, num_shards: int, axis_name: str, **options):
  """The DRACO decoder of ``code`` on column slices (steps 2 of the module docstring)."""
  parts = decode.decoder_parts(code, **options)
  p = code.num_workers

  def decode_slices(slice_PxW: jax.Array, key: jax.Array):
    dtypes = decode.message_dtypes(code)
    contract.check_received(slice_PxW, p, dtypes, f"{code.name} decoder")
    partial = decode.project(
      slice_PxW,
      key,
      parts.num_columns,
      shard_index=jax.lax.axis_index(axis_name),
      num_shards=num_shards,
    )
    weights_P, erased_P, report = parts.solve(
      jax.lax.psum(partial, axis_name), slice_PxW.dtype, num_shards * slice_PxW.shape[1]
    )
    return decode.combine(parts, weights_P, erased_P, report.ok, slice_PxW), report

  return decode_slices


def make_slice_combiner(
  code: Code,
  num_shards: int,
  *,
  aggregator: str | None = None,
  axis_name: str = WORKER_AXIS,
  **options,
):
  """The server on column slices, to be called inside ``jax.shard_map`` over ``axis_name``.

  Args:
    code: the gradient code; with ``aggregator=None`` its DRACO decoder is used, otherwise the
      baseline ``aggregator`` with P = ``code.num_workers`` and S = ``code.num_adversaries``
      (on the ``uncoded`` scheme).
    num_shards: N, the size of ``axis_name``; must divide P.
    aggregator: None for the DRACO decoder, or a name in ``aggregators.AGGREGATORS``.
    axis_name: the mesh axis holding the slices.
    **options: decoder or aggregator options (as for the replicated combiner).

  Returns:
    ``combine_slices(slice_PxW, key) -> (mean_W, report)``: this device's W columns of the mean
    (zeros when not ok) and the Report, identical on every device.

  Raises:
    ValueError: N does not divide P, or an unknown code, aggregator or option.
  """
  n = _num_shards(code.num_workers, num_shards)
  if aggregator is None:
    return _slice_decoder(code, n, axis_name, **options)
  return aggregators.make_sliced_aggregator(
    aggregator, code.num_workers, code.num_adversaries, axis_name=axis_name, **options
  )


def make_sharded_combiner(
  code: Code,
  num_shards: int,
  *,
  aggregator: str | None = None,
  axis_name: str = WORKER_AXIS,
  gather: bool = True,
  **options,
):
  """A combiner whose server role is spread over the devices, to be called inside shard_map.

  Each device passes its own p = P/N workers' messages, rows_pxD (worker order: device j holds
  workers j·p, ..., j·p + p − 1, as :func:`draco_jax.mesh.map_workers` lays them out).

  Args:
    code, num_shards, aggregator, axis_name, **options: as for :func:`make_slice_combiner`.
    gather: return the whole [D] mean on every device (an all-gather), or only this device's
      [W] slice of the zero-padded mean (it stays sharded).

  Returns:
    ``combine(rows_pxD, key) -> (mean_D or mean_W, report)``; the contract of
    :mod:`draco_jax.contract` (the same mean and Report as the replicated combiner, up to
    rounding), the Report identical on every device.
  """
  combine_slices = make_slice_combiner(
    code, num_shards, aggregator=aggregator, axis_name=axis_name, **options
  )
  local = code.num_workers // num_shards

  def combine(rows_pxD: jax.Array, key: jax.Array):
    shape = jnp.shape(rows_pxD)
    if len(shape) != 2 or shape[0] != local:
      raise ValueError(
        f"each of the N={num_shards} devices passes its own P/N = {local} rows of the "
        f"P={code.num_workers} messages, [P/N, D]; got shape {shape}"
      )
    mean_W, report = combine_slices(to_slices(rows_pxD, num_shards, axis_name), key)
    return (gather_slices(mean_W, shape[1], axis_name) if gather else mean_W), report

  return combine


def make_mesh_combiner(code: Code, mesh: Mesh, *, aggregator: str | None = None, **options):
  """The sharded combiner on ``mesh``, with the replicated combiner's call.

  Returns:
    A jitted ``combiner(received_PxD, key) -> (mean_D, report)``: ``received_PxD`` is (or is
    resharded to be) split over the workers of ``mesh``'s worker axis; the outputs are
    replicated.
  """
  n = mesh.shape[WORKER_AXIS]
  local = make_sharded_combiner(code, n, aggregator=aggregator, **options)
  mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(WORKER_AXIS), P()), out_specs=(P(), P()))

  what = f"{code.name} decoder" if aggregator is None else f"aggregator {aggregator!r}"
  dtypes = decode.message_dtypes(code) if aggregator is None else contract.REAL_DTYPES

  def combiner(received_PxD: jax.Array, key: jax.Array):
    contract.check_received(received_PxD, code.num_workers, dtypes, what)
    return mapped(received_PxD, key)

  return contract.jit_combiner(combiner, what)
