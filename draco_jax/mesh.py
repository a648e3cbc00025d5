"""The worker mesh: P logical workers spread over N devices.

Shape legend: P workers, N devices on the mesh, p = P/N workers per device.

A 1-D mesh with axis :data:`WORKER_AXIS` holds the devices; every device simulates p consecutive
logical workers (device d runs workers d·p, ..., d·p + p - 1). :func:`map_workers` runs a
per-worker function over all P workers: ``jax.shard_map`` across devices and ``jax.vmap`` over
the p workers of each device. The same program runs on 1 device and on many.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
  "WORKER_AXIS",
  "select_devices",
  "make_worker_mesh",
  "workers_per_device",
  "replicated",
  "put_replicated",
  "map_workers",
]

WORKER_AXIS = "workers"


def select_devices(num_devices: int = 0, num_workers: int | None = None) -> list[jax.Device]:
  """The first ``num_devices`` devices of ``jax.devices()``.

  ``num_devices = 0`` takes them all, or, given ``num_workers``, the most that divide it
  (e.g. 5 of 8 devices for P = 15), so that the default always builds a mesh. In a
  multi-process run the mesh holds every device of every process, so ``num_devices`` is 0
  (or that total) and the total must divide ``num_workers``.
  """
  available = jax.devices()
  if jax.process_count() > 1:
    return _all_processes_devices(available, num_devices, num_workers)
  if num_devices < 0 or num_devices > len(available):
    raise ValueError(
      f"num_devices must be in 0..{len(available)} (0 = all {len(available)} available "
      f"{available[0].platform} devices); got {num_devices}"
    )
  if num_devices == 0:
    num_devices = len(available)
    if num_workers:
      num_devices = max(n for n in range(1, num_devices + 1) if num_workers % n == 0)
  return list(available[:num_devices])


def _all_processes_devices(available, num_devices, num_workers):
  """Every device of every process: a multi-process run leaves no process off the mesh."""
  n, processes = len(available), jax.process_count()
  if num_devices not in (0, n):
    raise ValueError(
      f"a run of {processes} processes puts all {n} devices on the mesh: num_devices must be "
      f"0 or {n}; got {num_devices}"
    )
  if num_workers and num_workers % n:
    raise ValueError(
      f"a run of {processes} processes puts all {n} devices on the mesh, so {n} must divide "
      f"the number of workers; got P={num_workers}"
    )
  return list(available)


def make_worker_mesh(num_workers: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all) for ``num_workers`` logical workers.

  Raises:
    ValueError: the number of devices does not divide ``num_workers``.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if n == 0 or num_workers < 1 or num_workers % n:
    valid = [d for d in range(1, n + 1) if num_workers % d == 0]
    raise ValueError(
      f"the number of devices must divide the number of workers; got {n} devices for "
      f"P={num_workers} workers; usable device counts: {', '.join(map(str, valid)) or 'none'}"
    )
  # Auto axes: shard_map then slices replicated inputs (host batches, code constants) itself;
  # jax.make_mesh's default Explicit axes would demand every input be pre-sharded.
  return jax.make_mesh((n,), (WORKER_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def workers_per_device(mesh: Mesh, num_workers: int) -> int:
  """p = P / N, the logical workers simulated by each device."""
  return num_workers // mesh.shape[WORKER_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of a value every device holds in full (params, optimizer state, keys)."""
  return NamedSharding(mesh, P())


def put_replicated(tree, mesh: Mesh):
  """Places a host value, held identically by every process, in full on every mesh device.

  Works across processes (``jax.make_array_from_process_local_data``: every process passes
  the whole value, no cross-process check); PRNG key leaves keep their implementation.
  """
  sharding = replicated(mesh)

  def put(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      data = put(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, tree)


def map_workers(
  per_worker: Callable, mesh: Mesh, *, per_worker_args: Sequence[bool], gather: bool = False
) -> Callable:
  """Runs ``per_worker`` for every logical worker: shard_map over devices, vmap within one.

  Args:
    per_worker: a function of one worker's arguments.
    mesh: a mesh from :func:`make_worker_mesh`.
    per_worker_args: per positional argument, True if it has a leading worker axis [P, ...]
      (each worker gets its own slice) or False if every worker gets the whole value (e.g.
      the parameters).
    gather: if True, every device returns the full [P, ...] outputs (an all-gather, so the
      server side sees all messages); otherwise the outputs stay sharded over the worker axis.

  Returns:
    A function of the same arguments returning outputs with a leading [P] axis.

  Replicated arguments are cast to device-varying values before ``per_worker`` runs, so that a
  gradient with respect to them is each worker's own and is not summed over devices (inside
  ``jax.shard_map`` with the default ``check_vma=True``, ``jax.grad`` with respect to a
  replicated input returns the gradient already summed over the axis).
  """
  per_worker_args = tuple(per_worker_args)
  vmapped = jax.vmap(per_worker, in_axes=tuple(0 if s else None for s in per_worker_args))

  def local(*args):
    args = [
      a if s else jax.lax.pcast(a, WORKER_AXIS, to="varying") for a, s in zip(args, per_worker_args)
    ]
    out = vmapped(*args)
    if gather:
      out = jax.lax.all_gather(out, WORKER_AXIS, tiled=True, to="invarying")
    return out

  specs = tuple(P(WORKER_AXIS) if s else P() for s in per_worker_args)
  return jax.shard_map(
    local, mesh=mesh, in_specs=specs, out_specs=P() if gather else P(WORKER_AXIS)
  )
