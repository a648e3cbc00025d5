"""What the workers compute each step: their messages, and the step's diagnostic.

Shape legend: P workers (code rows), K = P partitions, R redundancy, N devices on the worker
axis, p = P/N rows (and partitions) per device, D flattened parameters, B examples per
partition, H x W x C one example, t data poisoners (at most ``config.num_adversaries``),
E partition gradients a device holds to encode its rows, M = N·⌈t·R/N⌉.

An honest worker's message is a fixed linear combination of partition gradients (row k of the
code: ``Σ_r coef[k, r] · g[support[k, r]]``) and every process runs the same SPMD program, so
the simulator may choose how it produces the P messages (``config.worker_compute``):

* ``shared`` (the default): the K partition gradients are evaluated once per step, sharded
  over the worker mesh (device d evaluates its p partitions, vmapped). Device d then holds the
  gradients its p rows need (its own and those it receives: :func:`_exchange_plan`) and
  encodes its rows. Cyclic codes: one dense product of its rows' coefficients over that table
  (:func:`_distinct_rows`), which sums each row's R terms in table order, so the messages equal
  the per-worker ones to within the rounding of a reordered sum (a few units in the last place
  of the terms' magnitudes; tests/compute_test.py). Repetition: each row's R gradients are
  gathered and encoded with ``coding.encode_rows``, a block of columns at a time
  (:func:`_encode_in_blocks`), the worker's own arithmetic, so the group's copies stay equal
  bit for bit (an uncoded message is its gradient, 1·g). The same K gradients give
  the step's loss, accuracy and clean mean. Data poisoners (``label_flip``) send the messages
  of gradients on their own flipped labels: only their rows' R partitions are evaluated again
  (t·R gradients, spread over the devices) and their messages replace the honest ones. A step
  evaluates K partition gradients (K + M under a data attack), and its ``gradients`` phase
  times them all.
* ``per_worker``: worker k evaluates its own R partition gradients and the diagnostic evaluates
  the K partitions again, K·(R+1) per step: the ``gradients`` phase then times what the P
  workers compute (P·R partition gradients), and the tests hold ``shared`` to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec

from draco_jax import coding, contract, data
from draco_jax import mesh as mesh_lib
from draco_jax.config import DATA_ATTACKS, TrainConfig

__all__ = ["WorkerPhases", "SharedGradients", "make_worker_phases"]

_WORKERS = PartitionSpec(mesh_lib.WORKER_AXIS)
_WHOLE = PartitionSpec()


class WorkerPhases(NamedTuple):
  """The workers' phases of a step (``draco_jax.step.StepPhases`` holds them).

  Attributes:
    gradients: ``(params, poison_P, x, y) -> grads``: the mode's partition gradients
      (``per_worker``: grads_PxRxD; ``shared``: :class:`SharedGradients`).
    encode: ``grads -> sent``: the P messages in code-row order, delivered to the server.
    clean: ``(params, x, y, grads) -> (loss, accuracy, clean_D)``: the means over the K
      partitions on their true labels.
  """

  gradients: Callable
  encode: Callable
  clean: Callable


class SharedGradients(NamedTuple):
  """What the ``shared`` gradients phase evaluates (the poisoners' fields are None when no
  attack of the run poisons data)."""

  grads_KxD: jax.Array  # every partition's gradient on its true labels, sharded over workers
  loss_K: jax.Array
  acc_K: jax.Array
  poisoned_txRxD: jax.Array | None  # the poisoners' R gradients on their flipped labels
  rows_t: jax.Array | None  # int32: their code rows, -1 where fewer than t poison this step


# ---------------------------------------------------------------------------------------------
# One worker or one partition.


def _loss(apply_fn: Callable, params, x_NxHxWxC: jax.Array, y_N: jax.Array):
  logits_NxC = apply_fn(params, x_NxHxWxC)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_NxC, y_N).mean()
  return loss, jnp.mean(jnp.argmax(logits_NxC, -1) == y_N)


def _flat_grad(apply_fn: Callable, params, x_BxHxWxC: jax.Array, y_B: jax.Array) -> jax.Array:
  grads = jax.grad(lambda p: _loss(apply_fn, p, x_BxHxWxC, y_B)[0])(params)
  return ravel_pytree(grads)[0]


def _worker_grads(apply_fn, num_classes, params, support_R, poison, x_KxBxHxWxC, y_KxB):
  """One worker's R partition gradients [R, D], on flipped labels if it poisons its data."""
  y_RxB = data.flip_labels(y_KxB[support_R], jnp.broadcast_to(poison, support_R.shape), num_classes)
  grad_fn = functools.partial(_flat_grad, apply_fn)
  return jax.vmap(grad_fn, (None, 0, 0))(params, x_KxBxHxWxC[support_R], y_RxB)


def _worker_encode(coef_R: jax.Array, grads_RxD: jax.Array) -> jax.Array:
  """One worker's message Σ_t coef[t] · grads[t]."""
  return coding.encode_rows(coef_R[None], grads_RxD[None])[0]


def _partition_stats(apply_fn, params, x_BxHxWxC, y_B):
  """(loss, accuracy, flattened gradient) of one partition on its true labels."""
  (loss, acc), grads = jax.value_and_grad(
    lambda p: _loss(apply_fn, p, x_BxHxWxC, y_B), has_aux=True
  )(params)
  return loss, acc, ravel_pytree(grads)[0]


def _poisoned_grad(apply_fn, num_classes, params, partition, x_KxBxHxWxC, y_KxB):
  """One partition's flattened gradient on flipped labels (a data poisoner's)."""
  y_1xB = data.flip_labels(y_KxB[partition][None], jnp.ones((1,), bool), num_classes)
  return _flat_grad(apply_fn, params, x_KxBxHxWxC[partition], y_1xB[0])


def _means(loss_K: jax.Array, acc_K: jax.Array, grads_KxD: jax.Array):
  """(loss, accuracy, clean_D): the plain means over the K partitions."""
  w_K = jnp.full(loss_K.shape, 1.0 / loss_K.shape[0])
  return w_K @ loss_K, w_K @ acc_K, contract.rows_dot(w_K, grads_KxD)


# ---------------------------------------------------------------------------------------------
# per_worker: every worker evaluates its own R gradients; the diagnostic evaluates K more.


def _per_worker(apply_fn, num_classes, mesh, code: coding.Code, deliver) -> WorkerPhases:
  support_PxR = jnp.asarray(code.support)
  coef_PxR = jnp.asarray(code.coef, coding.message_dtype(code, jnp.float32))
  grad_one = functools.partial(_worker_grads, apply_fn, num_classes)
  gradients = mesh_lib.map_workers(
    grad_one, mesh, per_worker_args=(False, True, True, False, False)
  )
  encode = mesh_lib.map_workers(_worker_encode, mesh, per_worker_args=(True, True))
  stats = mesh_lib.map_workers(
    functools.partial(_partition_stats, apply_fn), mesh, per_worker_args=(False, True, True)
  )

  def clean(params, x_KxBxHxWxC, y_KxB, grads_PxRxD):
    del grads_PxRxD  # poisoned rows' gradients are not the clean ones: a second pass
    return _means(*stats(params, x_KxBxHxWxC, y_KxB))

  return WorkerPhases(
    lambda params, poison_P, x, y: gradients(params, support_PxR, poison_P, x, y),
    lambda grads_PxRxD: deliver(encode(coef_PxR, grads_PxRxD)),
    clean,
  )


# ---------------------------------------------------------------------------------------------
# shared: the K partition gradients once, each device's rows encoded from them.


class _Exchange(NamedTuple):
  """How every device comes to hold the partition gradients its rows encode (host arrays).

  Attributes:
    gather_all: all-gather the K gradients (E = K); otherwise halos by ``ppermute``.
    shifts: per halo, j: device e sends to device (e - j) mod N.
    sends: per halo, int32 [N·h]: the h local rows each device sends (padded with row 0).
    index_PxR: int32: where row k's R partitions sit in its device's table of E gradients
      (its own p first, then each halo's h in order).
    received: the partition gradients each device receives per step.
  """

  gather_all: bool
  shifts: tuple[int, ...]
  sends: tuple[np.ndarray, ...]
  index_PxR: np.ndarray
  received: int


def _exchange_plan(support_PxR: np.ndarray, num_devices: int) -> _Exchange:
  """The collective that brings each device the partition gradients its rows need.

  Device d evaluates partitions d·p, ..., d·p + p - 1 and encodes the same rows; a row needs
  its support. The cyclic support wraps around (row k needs k, ..., k + R - 1 mod P), so a
  device needs R - 1 partitions of its successors; a repetition group may straddle two
  devices; uncoded rows need only their own partition. Received per device and step, in
  partition gradients of D floats: a halo exchange moves the h_j partitions device d needs
  from device d + j, Σ_j h_j (cyclic: min(R - 1, P - p)); an all-gather of the K gradients
  moves (N - 1)·p. The halo moves fewer bytes whenever some device needs less than everything
  (cyclic P = 45, S = 5 on 5 devices: 10 against 36; repetition with R | p: none), so it is
  chosen then; when it would move as much, the one all-gather replaces N - 1 ppermutes.
  """
  num_rows, r = support_PxR.shape
  n = num_devices
  p = num_rows // n
  owner = lambda i: int(i) // p
  positions = [{d * p + i: i for i in range(p)} for d in range(n)]
  shifts, sends, size = [], [], p
  for shift in range(1, n):
    needed = [
      sorted(
        {int(i) for i in support_PxR[d * p : (d + 1) * p].ravel() if owner(i) == (d + shift) % n}
      )
      for d in range(n)
    ]
    h = max(map(len, needed))
    if h == 0:
      continue
    send_Nxh = np.zeros((n, h), np.int32)
    for d, partitions in enumerate(needed):
      source = (d + shift) % n
      send_Nxh[source, : len(partitions)] = np.asarray(partitions, np.int32) - source * p
      positions[d].update({i: size + slot for slot, i in enumerate(partitions)})
    shifts.append(shift)
    sends.append(send_Nxh.reshape(-1))
    size += h
  if n > 1 and size - p >= (n - 1) * p:
    return _Exchange(True, (), (), support_PxR.astype(np.int32), (n - 1) * p)
  index_PxR = np.asarray(
    [[positions[k // p][int(i)] for i in support_PxR[k]] for k in range(num_rows)], np.int32
  ).reshape(num_rows, r)
  return _Exchange(False, tuple(shifts), tuple(sends), index_PxR, size - p)


def _table(exchange: _Exchange, n: int, grads_pxD: jax.Array, *sends_h) -> jax.Array:
  """Inside shard_map: the E partition gradients this device's rows encode."""
  if exchange.gather_all:
    return jax.lax.all_gather(grads_pxD, mesh_lib.WORKER_AXIS, tiled=True)
  halos = [
    jax.lax.ppermute(grads_pxD[send_h], mesh_lib.WORKER_AXIS, [(e, (e - j) % n) for e in range(n)])
    for j, send_h in zip(exchange.shifts, sends_h)
  ]
  return jnp.concatenate([grads_pxD, *halos])


# Columns per block of the shared encoding (a multiple of every SIMD width).
_BLOCK_COLUMNS = 2048


def _encode_in_blocks(coef_pxR: jax.Array, table_ExD: jax.Array, index_pxR: jax.Array):
  """Inside shard_map: ``coding.encode_rows(coef, table[index])``, a block of columns at a time.

  A message entry is a sum over its own column only, so each block gives the same numbers as
  the whole-width call (column offsets stay multiples of :data:`_BLOCK_COLUMNS`, so every
  column meets the same vector lanes; the last block is the same remainder), while the
  gathered [p, R, D] operand is never materialized: on XLA CPU at P = 45, R = 11, D = 85k,
  gather-then-encode took 180 ms and the blocked loop 28 ms (the worker's own encode of its
  gradients, 26 ms).
  """
  num_blocks, rest = divmod(table_ExD.shape[1], _BLOCK_COLUMNS)

  def block(start, width):
    columns_ExW = jax.lax.dynamic_slice_in_dim(table_ExD, start, width, axis=1)
    return coding.encode_rows(coef_pxR, columns_ExW[index_pxR])

  if num_blocks == 0:
    return block(0, rest)

  def body(i, sent_pxD):
    start = i * _BLOCK_COLUMNS
    return jax.lax.dynamic_update_slice_in_dim(sent_pxD, block(start, _BLOCK_COLUMNS), start, 1)

  sent_pxD = jnp.zeros((coef_pxR.shape[0], table_ExD.shape[1]), coef_pxR.dtype)
  sent_pxD = jax.lax.pcast(sent_pxD, mesh_lib.WORKER_AXIS, to="varying")  # the loop's carry
  sent_pxD = jax.lax.fori_loop(0, num_blocks, body, sent_pxD)
  if rest:
    start = num_blocks * _BLOCK_COLUMNS
    sent_pxD = jax.lax.dynamic_update_slice_in_dim(sent_pxD, block(start, rest), start, 1)
  return sent_pxD


class _Rows(NamedTuple):
  """Each device's distinct rows, u of them (host arrays, u·N rows: device d's from d·u).

  A repetition group's R equal rows are encoded once and copied (so the copies are equal bit
  for bit and cost one encoding); cyclic rows are all distinct.

  Attributes:
    dense_NuxE: each distinct row as coefficients over its device's table of E gradients.
    coef_NuxR: its R coefficients, in the worker's support order (zero rows pad).
    index_NuxR: where its R partitions sit in the table, in the same order.
    pick_P: int32, row k's distinct row on its device.
    all_distinct: every row is its own distinct row (u = p, pick = 0..p-1 on every device).
  """

  dense_NuxE: np.ndarray
  coef_NuxR: np.ndarray
  index_NuxR: np.ndarray
  pick_P: np.ndarray
  all_distinct: bool


def _distinct_rows(exchange: _Exchange, coef_PxR: np.ndarray, n: int) -> _Rows:
  num_rows, r = coef_PxR.shape
  p = num_rows // n
  dense_PxE = np.zeros((num_rows, p + exchange.received), coef_PxR.dtype)
  for k in range(num_rows):
    for i in range(r):
      dense_PxE[k, exchange.index_PxR[k, i]] += coef_PxR[k, i]
  firsts, picks = [], []
  for d in range(n):
    _, first, pick = np.unique(
      dense_PxE[d * p : (d + 1) * p], axis=0, return_index=True, return_inverse=True
    )
    # In order of first appearance, so distinct rows keep their places (no gather).
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    firsts.append(d * p + first[order])
    picks.append(rank[pick.reshape(-1)])
  u = max(len(f) for f in firsts)
  rows_Nu = np.concatenate([np.pad(f, (0, u - len(f)), constant_values=-1) for f in firsts])
  real = rows_Nu >= 0
  take = lambda a: np.where(real.reshape(-1, *[1] * (a.ndim - 1)), a[np.maximum(rows_Nu, 0)], 0)
  all_distinct = u == p and all(np.array_equal(pick, np.arange(p)) for pick in picks)
  return _Rows(
    take(dense_PxE),
    take(coef_PxR),
    take(exchange.index_PxR).astype(np.int32),
    np.concatenate(picks).astype(np.int32),
    all_distinct,
  )


def _substitute(sent_pxD: jax.Array, poisoned_txD: jax.Array, rows_t: jax.Array) -> jax.Array:
  """Inside shard_map: this device's messages with the poisoners' rows replaced."""
  p = sent_pxD.shape[0]
  rows_p = jax.lax.axis_index(mesh_lib.WORKER_AXIS) * p + jnp.arange(p)
  match_pxt = rows_p[:, None] == rows_t[None, :]
  poisoned_pxD = poisoned_txD[jnp.argmax(match_pxt, axis=1)]
  return jnp.where(jnp.any(match_pxt, axis=1)[:, None], poisoned_pxD, sent_pxD)


def _shared_encode(code: coding.Code, mesh, num_poisoners: int) -> Callable:
  """``grads -> sent_PxD`` sharded over the workers: each device encodes its rows."""
  n = mesh.shape[mesh_lib.WORKER_AXIS]
  exchange = _exchange_plan(np.asarray(code.support), n)
  dtype = coding.message_dtype(code, jnp.float32)
  coef_PxR = jnp.asarray(code.coef, dtype)
  # Cyclic codes: one dense product of each device's rows over its table (5-9x faster than R
  # gathered gradients per row at P = 45 on CPU). It adds a row's R terms in table order, not
  # the worker's support order, so the messages are the per-worker ones to within the
  # rounding of a reordered sum. Repetition: each group's sum once, in the worker's own
  # arithmetic (coding.encode_rows), copied to its R rows: equal bit for bit, across devices
  # too (where a group's table order differs).
  dense = code.name != "repetition"
  rows = _distinct_rows(exchange, np.asarray(code.coef, dtype), n)
  tables = tuple(jnp.asarray(a) for a in (rows.dense_NuxE, rows.coef_NuxR, rows.index_NuxR))
  pick_P = jnp.asarray(rows.pick_P)
  sends = tuple(jnp.asarray(s) for s in exchange.sends)
  rows_P = np.arange(code.num_workers)
  identity = code.redundancy == 1 and np.array_equal(code.support[:, 0], rows_P)
  identity = identity and bool(np.all(code.coef == 1))

  def honest(grads_pxD, dense_uxE, coef_uxR, index_uxR, pick_p, *sends_h):
    if identity:  # uncoded: 1·g is g, without a pass over [P, D]
      return grads_pxD.astype(dtype)
    table_ExD = _table(exchange, n, grads_pxD, *sends_h)
    if dense:
      precision = jax.lax.Precision.HIGHEST
      sent_uxD = jnp.matmul(dense_uxE, table_ExD.astype(dtype), precision=precision)
    else:
      sent_uxD = _encode_in_blocks(coef_uxR, table_ExD, index_uxR)
    return sent_uxD if rows.all_distinct else sent_uxD[pick_p]

  def poisoned(grads_pxD, dense_uxE, coef_uxR, index_uxR, pick_p, *rest):
    coef_txR, poisoned_txRxD, rows_t, *sends_h = rest
    sent_pxD = honest(grads_pxD, dense_uxE, coef_uxR, index_uxR, pick_p, *sends_h)
    return _substitute(sent_pxD, coding.encode_rows(coef_txR, poisoned_txRxD), rows_t)

  poisoner_specs = (_WHOLE,) * 3 if num_poisoners else ()
  specs = (_WORKERS,) * 5 + poisoner_specs + (_WORKERS,) * len(sends)
  local = jax.shard_map(
    poisoned if num_poisoners else honest, mesh=mesh, in_specs=specs, out_specs=_WORKERS
  )

  def encode(grads: SharedGradients) -> jax.Array:
    if not num_poisoners:
      return local(grads.grads_KxD, *tables, pick_P, *sends)
    coef_txR = coef_PxR[jnp.maximum(grads.rows_t, 0)]
    extra = (coef_txR, grads.poisoned_txRxD, grads.rows_t)
    return local(grads.grads_KxD, *tables, pick_P, *extra, *sends)

  return encode


def _shared(apply_fn, num_classes, mesh, code: coding.Code, deliver, num_poisoners: int):
  n = mesh.shape[mesh_lib.WORKER_AXIS]
  support_PxR = jnp.asarray(code.support)
  r = code.redundancy
  stats = mesh_lib.map_workers(
    functools.partial(_partition_stats, apply_fn), mesh, per_worker_args=(False, True, True)
  )
  # The t·R poisoned gradients, ⌈t·R/N⌉ per device, then all-gathered (every device holds
  # the t messages it may have to substitute).
  per_device = -(-num_poisoners * r // n)
  poisoned = mesh_lib.map_workers(
    functools.partial(_poisoned_grad, apply_fn, num_classes),
    mesh,
    per_worker_args=(False, True, False, False),
    gather=True,
  )
  encode = _shared_encode(code, mesh, num_poisoners)

  def gradients(params, poison_P, x_KxBxHxWxC, y_KxB) -> SharedGradients:
    loss_K, acc_K, grads_KxD = stats(params, x_KxBxHxWxC, y_KxB)
    if not num_poisoners:
      return SharedGradients(grads_KxD, loss_K, acc_K, None, None)
    # Fewer than t poisoners (another attack this step): rows -1, never substituted; their
    # gradients (of the last row's partitions) are evaluated all the same.
    (rows_t,) = jnp.nonzero(poison_P, size=num_poisoners, fill_value=-1)
    partitions_M = jnp.zeros(n * per_device, jnp.int32)
    partitions_M = partitions_M.at[: num_poisoners * r].set(support_PxR[rows_t].reshape(-1))
    grads_MxD = poisoned(params, partitions_M, x_KxBxHxWxC, y_KxB)
    poisoned_txRxD = grads_MxD[: num_poisoners * r].reshape(num_poisoners, r, -1)
    return SharedGradients(grads_KxD, loss_K, acc_K, poisoned_txRxD, rows_t.astype(jnp.int32))

  def clean(params, x_KxBxHxWxC, y_KxB, grads: SharedGradients):
    del params, x_KxBxHxWxC, y_KxB  # the gradients phase evaluated them: no second pass
    return _means(grads.loss_K, grads.acc_K, grads.grads_KxD)

  return WorkerPhases(gradients, lambda grads: deliver(encode(grads)), clean)


def make_worker_phases(
  config: TrainConfig,
  code: coding.Code,
  mesh: jax.sharding.Mesh,
  apply_fn: Callable,
  *,
  num_classes: int,
  deliver: Callable,
  attack_names: Sequence[str],
) -> WorkerPhases:
  """The workers' phases of a run, mapped over all P workers of the mesh.

  Args:
    config: a validated configuration (``worker_compute`` chooses the mode).
    code: the gradient code (``uncoded`` for the baselines).
    mesh: the worker mesh.
    apply_fn: ``apply_fn(params, x_NxHxWxC) -> logits``.
    num_classes: for label flipping.
    deliver: the server's ``sent_PxD -> held`` (``draco_jax.server.Server.deliver``).
    attack_names: the run's attacks; if one poisons data, the shared mode evaluates up to
      ``config.num_adversaries`` poisoners' gradients again each step.
  """
  if config.worker_compute == "per_worker":
    return _per_worker(apply_fn, num_classes, mesh, code, deliver)
  poisons = any(name in DATA_ATTACKS for name in attack_names)
  num_poisoners = min(config.num_adversaries, code.num_workers) if poisons else 0
  return _shared(apply_fn, num_classes, mesh, code, deliver, num_poisoners)
