"""Multi-process runs: the settings of ``jax.distributed`` and its one initialization.

Beyond one host the engine is JAX's own multi-controller runtime: every process runs the same
program, :func:`initialize` calls ``jax.distributed.initialize`` once before any device is
used, and ``jax.devices()`` then lists the devices of every process, so the worker mesh spans
them all. One process (the default, nothing set) initializes nothing.

Each setting comes from an explicit value (the ``--coordinator_address``, ``--num_processes``,
``--process_id`` and ``--local_device_ids`` flags of ``draco_jax.train``) or else from its
environment variable (:data:`ENV_VARS`); an explicit value wins. ``num_processes = -1``
(:data:`AUTO`) hands every unset value to JAX's cluster detection (SLURM, Open MPI, Cloud
TPU, Kubernetes).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax

__all__ = ["AUTO", "ENV_VARS", "DistributedSettings", "resolve_settings", "initialize"]

# num_processes = AUTO: jax.distributed detects the unset settings from the cluster environment.
AUTO = -1
# The environment variable of each setting (JAX itself reads the first and the last).
ENV_VARS = {
  "coordinator_address": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
  "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
}


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """The multi-process settings of one process (see :func:`resolve_settings`).

  Attributes:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: processes in the run; 1 is a single-process run, :data:`AUTO` detects it.
    process_id: this process, in ``0 .. num_processes - 1`` (None: detected, AUTO only).
    local_device_ids: the local devices this process uses (None: all of them, or what the
      cluster detection picks).
  """

  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  @property
  def is_auto(self) -> bool:
    return self.num_processes == AUTO

  @property
  def is_multi_process(self) -> bool:
    """True when :func:`initialize` calls ``jax.distributed.initialize``."""
    return self.num_processes != 1


def _from_env(name: str, value, environ: Mapping[str, str]):
  """The explicit value, else the environment variable's text (empty counts as unset)."""
  if value is not None:
    return value
  return environ.get(ENV_VARS[name]) or None


def _as_int(name: str, value) -> int | None:
  if value is None or (isinstance(value, int) and not isinstance(value, bool)):
    return value
  try:
    return int(str(value).strip())
  except ValueError:
    raise ValueError(
      f"{name} (--{name} or {ENV_VARS[name]}) must be an integer; got {value!r}"
    ) from None


def _as_device_ids(value) -> tuple[int, ...] | None:
  if value is None:
    return None
  items = value.split(",") if isinstance(value, str) else list(value)
  try:
    ids = tuple(int(str(item).strip()) for item in items)
  except ValueError:
    ids = ()
  if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
    raise ValueError(
      "local_device_ids (--local_device_ids or JAX_LOCAL_DEVICE_IDS) must be distinct "
      f"integers >= 0, comma-separated (e.g. 0,1,2,3); got {value!r}"
    )
  return ids


def _check_address(address: str) -> None:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ValueError(
      f"coordinator_address must be host:port with a port in 1..65535 (e.g. 10.0.0.1:1234); "
      f"got {address!r}"
    )


def _check(settings: DistributedSettings) -> None:
  n, pid, address = settings.num_processes, settings.process_id, settings.coordinator_address
  if n != AUTO and n < 1:
    raise ValueError(f"num_processes must be >= 1, or {AUTO} to detect the cluster; got {n}")
  if pid is not None and pid < 0:
    raise ValueError(f"process_id must be >= 0; got {pid}")
  if address is not None:
    _check_address(address)
  if n == AUTO:
    return
  if pid is not None and pid >= n:
    raise ValueError(f"process_id must be < num_processes; got process_id={pid} for {n}")
  if n > 1 and address is None:
    raise ValueError(
      f"num_processes={n} needs coordinator_address (host:port of process 0): pass "
      f"--coordinator_address or set {ENV_VARS['coordinator_address']}"
    )
  if n > 1 and pid is None:
    raise ValueError(
      f"num_processes={n} needs this process's process_id (0..{n - 1}): pass --process_id "
      f"or set {ENV_VARS['process_id']}"
    )
  if n == 1 and (address is not None or settings.local_device_ids is not None):
    raise ValueError(
      f"coordinator_address={address!r} / local_device_ids={settings.local_device_ids!r} "
      f"are multi-process settings, but num_processes is 1: set num_processes (> 1, or "
      f"{AUTO} to detect the cluster)"
    )


def resolve_settings(
  coordinator_address: str | None = None,
  num_processes: int | str | None = None,
  process_id: int | str | None = None,
  local_device_ids: str | Sequence[int] | None = None,
  *,
  environ: Mapping[str, str] | None = None,
) -> DistributedSettings:
  """The settings of this process: explicit values, else :data:`ENV_VARS`, else one process.

  Args:
    coordinator_address: ``host:port`` of process 0 (required for ``num_processes > 1``).
    num_processes: processes in the run (default 1); :data:`AUTO` lets JAX detect the unset
      settings from the cluster environment.
    process_id: this process's index (required for ``num_processes > 1``).
    local_device_ids: ``"0,1"`` or a sequence of ints: the local devices this process uses.
    environ: the environment to read (default ``os.environ``).

  Raises:
    ValueError: a value is malformed or the settings are inconsistent, naming the value and
      the rule.
  """
  environ = os.environ if environ is None else environ
  get = lambda name, value: _from_env(name, value, environ)
  n = _as_int("num_processes", get("num_processes", num_processes))
  settings = DistributedSettings(
    coordinator_address=get("coordinator_address", coordinator_address),
    num_processes=1 if n is None else n,
    process_id=_as_int("process_id", get("process_id", process_id)),
    local_device_ids=_as_device_ids(get("local_device_ids", local_device_ids)),
  )
  if settings.num_processes == 1 and settings.process_id == 0:
    settings = dataclasses.replace(settings, process_id=None)
  _check(settings)
  return settings


def initialize(settings: DistributedSettings) -> bool:
  """Calls ``jax.distributed.initialize`` for a multi-process run; returns whether it did.

  Call it before anything touches a device. A single-process run initializes nothing; a
  second call after the runtime is up changes nothing.

  Raises:
    ValueError: ``num_processes = AUTO`` found no cluster environment, or the runtime is
      already up with another number of processes.
  """
  if not settings.is_multi_process:
    return False
  if jax.distributed.is_initialized():
    if not settings.is_auto and jax.process_count() != settings.num_processes:
      raise ValueError(
        f"jax.distributed is already initialized with {jax.process_count()} processes; "
        f"got num_processes={settings.num_processes}"
      )
    return True
  ids = None if settings.local_device_ids is None else list(settings.local_device_ids)
  try:
    jax.distributed.initialize(
      coordinator_address=settings.coordinator_address,
      num_processes=None if settings.is_auto else settings.num_processes,
      process_id=settings.process_id,
      local_device_ids=ids,
    )
  except ValueError as e:
    if not settings.is_auto:
      raise
    raise ValueError(
      f"num_processes={AUTO} detects the run from a cluster environment (SLURM, Open MPI, "
      f"Cloud TPU, Kubernetes), but found none ({e}); pass --coordinator_address, "
      "--num_processes and --process_id instead"
    ) from None
  return True
