"""The server's side of a step: who is adversarial, what the server receives, how it combines.

Shape legend: P workers, N devices on the worker axis, D flattened parameters, W = ⌈D/N⌉.

Two choices are made here, once, from the configuration (:func:`make_server`):

* the combiner: the DRACO decoder of a coded scheme, or a baseline aggregator on the uncoded
  scheme (:func:`_combiner`);
* where the server's work runs (``config.combine_sharding``):

  - ``replicated``: the workers' messages are all-gathered; every device holds all of them,
    [P, D], and runs the attack and the whole combiner;
  - ``sharded``: an all_to_all leaves each device a [P, W] column slice of every message
    (:mod:`draco_jax.sharded`; the server's array is [P, N·W], zero-padded, split over the
    columns); the attack and the stragglers rewrite each device's slice, with the attack key
    folded with the device's index: coordinate-wise attacks (reverse_gradient, constant,
    sign_flip, alie, ipm) send exactly what they send in a replicated step, while random
    payloads (gaussian, nan, huge, ...) are other draws and ``small`` scales its noise by each
    slice's rms. The sliced combiner runs on every device and the mean is all-gathered; the
    Report is the same on every device.

Rows, not workers. With ``config.assignment="random"`` (the default for coded schemes) the
server assigns code rows to workers afresh each step with a secret permutation
(:func:`assign_rows`): worker k computes row ``rows_P[k]``. Computing every message in row
order and moving the masks to rows (:func:`to_rows`) is the same computation as letting
worker k compute row ``rows_P[k]`` and reordering the messages into row order, without moving
any message; so the step runs in row order and only the masks are permuted.

Every function of a :class:`Server` takes the step's key and splits it itself
(:func:`split_step_key`): the attack never sees the combine key, nor the assignment.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from draco_jax import aggregators, attacks, coding, contract, decode, placements
from draco_jax import mesh as mesh_lib
from draco_jax import sharded as sharded_lib
from draco_jax.config import DATA_ATTACKS, TrainConfig

__all__ = ["StepKeys", "split_step_key", "assign_rows", "to_rows", "Server", "make_server"]

_WORKERS = PartitionSpec(mesh_lib.WORKER_AXIS)
_COLUMNS = PartitionSpec(None, mesh_lib.WORKER_AXIS)
_WHOLE = PartitionSpec()


class StepKeys(NamedTuple):
  placement: jax.Array
  straggler: jax.Array
  attack: jax.Array
  combine: jax.Array
  assignment: jax.Array  # last: adding it left the other keys unchanged


def split_step_key(key: jax.Array) -> StepKeys:
  """Independent keys for one step; the attack never sees the combine or assignment keys."""
  return StepKeys(*jax.random.split(key, len(StepKeys._fields)))


class Server(NamedTuple):
  """The server's side of one step (pure functions, to be jitted by the caller).

  Attributes:
    masks: ``(key, step, attack_index) -> (mask_P, straggle_P, poison_P)``: the adversarial
      workers, the missing (straggling) honest ones, and the workers poisoning their data,
      indexed by the code row each one computes this step (:func:`assign_rows`). The metrics
      built on them are counts, the same in worker and in row order.
    deliver: ``sent_PxD -> held``: messages sharded over the workers in, the server's copy
      out (replicated [P, D], or sharded column slices [P, N·W]).
    attack: ``(key, held, mask_P, straggle_P, attack_index) -> received`` (same layout): the
      chosen attack on masked rows, NaN rows for stragglers.
    combine: ``(key, received) -> (mean_D, report)``, both replicated.
  """

  masks: Callable
  deliver: Callable
  attack: Callable
  combine: Callable


def _stragglers(key: jax.Array, mask_P: jax.Array, num_stragglers: int) -> jax.Array:
  """bool [P]: ``num_stragglers`` workers drawn uniformly among the non-adversarial ones."""
  if num_stragglers == 0:
    return jnp.zeros_like(mask_P)
  score_P = jnp.where(mask_P, jnp.inf, jax.random.uniform(key, mask_P.shape))
  return jnp.zeros_like(mask_P).at[jnp.argsort(score_P)[:num_stragglers]].set(True)


def _corrupt(attack_fns, num_rows: int, key, sent_PxD, mask_P, straggle_P, attack_index):
  """What the server receives: the chosen attack on masked rows, NaN rows for stragglers.

  An attack changes only its masked rows, so the rows it and the stragglers change, at most
  ``num_rows`` = t + e of them as the ``masks`` phase draws them, are written over the messages
  in place (a scatter): no second [P, D] buffer and no pass over the honest rows.
  """
  received_PxD = jax.lax.switch(attack_index, attack_fns, key, sent_PxD, mask_P)
  missing = jnp.asarray(jnp.nan, received_PxD.dtype)
  received_PxD = jnp.where(straggle_P[:, None], missing, received_PxD)
  p = sent_PxD.shape[0]
  if num_rows >= p:
    return received_PxD
  (rows_m,) = jnp.nonzero(mask_P | straggle_P, size=num_rows, fill_value=p)
  changed_mxD = jnp.take(received_PxD, rows_m, axis=0, mode="clip")  # computes m rows only
  return sent_PxD.at[rows_m].set(changed_mxD, mode="drop")


def assign_rows(key: jax.Array, num_workers: int) -> jax.Array:
  """int32 [P]: worker k computes code row ``rows_P[k]``, a uniformly random permutation.

  The server draws it each step from a key no attack sees, so adversaries chosen by any rule
  (consecutive workers of a compromised rack included) hold uniformly random rows of the code:
  the worst-case placement decodes like the average one (docs/math.md §5.6).
  """
  return jax.random.permutation(key, num_workers).astype(jnp.int32)


def to_rows(worker_mask_P: jax.Array, rows_P: jax.Array) -> jax.Array:
  """The mask over code rows of a mask over workers (worker k computes row ``rows_P[k]``)."""
  return jnp.zeros_like(worker_mask_P).at[rows_P].set(worker_mask_P)


def _make_masks(config: TrainConfig, code: coding.Code, names: Sequence[str]) -> Callable:
  placement = placements.make_placement(config.placement, code.num_workers, config.num_adversaries)
  is_data_attack = jnp.asarray([name in DATA_ATTACKS for name in names])
  assigned = config.is_coded and config.assignment == "random"

  def masks(key, step, attack_index):
    keys = split_step_key(key)
    mask_P = placement(keys.placement, step)
    straggle_P = _stragglers(keys.straggler, mask_P, config.num_stragglers)
    worker_masks = (mask_P, straggle_P, mask_P & is_data_attack[attack_index])
    if not assigned:
      return worker_masks
    rows_P = assign_rows(keys.assignment, code.num_workers)
    return tuple(to_rows(m, rows_P) for m in worker_masks)

  return masks


def _attack_fns(config: TrainConfig, code: coding.Code, names: Sequence[str]) -> tuple:
  """One message attack per name; data attacks send their (poisoned) messages unchanged."""
  return tuple(
    attacks.make_attack("none", code=code)
    if name in DATA_ATTACKS
    else attacks.make_attack(name, code=code, **config.attack_options)
    for name in names
  )


def _combiner(config: TrainConfig, code: coding.Code, num_shards: int | None):
  """The run's combiner: the one place that picks decoder or aggregator.

  ``num_shards=None``: ``combiner(received_PxD, key)`` on whole rows; otherwise the sliced
  combiner ``combine_slices(slice_PxW, key)`` of :func:`draco_jax.sharded.make_slice_combiner`.
  """
  aggregator = None if config.is_coded else config.aggregator
  options = config.combiner_options
  if num_shards is not None:
    return sharded_lib.make_slice_combiner(code, num_shards, aggregator=aggregator, **options)
  if aggregator is None:
    return decode.make_decoder(code, **options)
  return aggregators.make_aggregator(aggregator, code.num_workers, code.num_adversaries, **options)


def _replicated(config, code, mesh, corrupt) -> tuple[Callable, Callable, Callable]:
  combiner = _combiner(config, code, None)

  def gather(rows_pxD):
    return jax.lax.all_gather(rows_pxD, mesh_lib.WORKER_AXIS, tiled=True, to="invarying")

  def attack(key, sent_PxD, mask_P, straggle_P, attack_index):
    keys = split_step_key(key)
    return corrupt(keys.attack, sent_PxD, mask_P, straggle_P, attack_index)

  def combine(key, received_PxD) -> tuple[jax.Array, contract.Report]:
    return combiner(received_PxD, split_step_key(key).combine)

  deliver = jax.shard_map(gather, mesh=mesh, in_specs=_WORKERS, out_specs=_WHOLE)
  if mesh.shape[mesh_lib.WORKER_AXIS] == 1:
    # One device holds every row already; XLA would copy [P, D] for the one-device all-gather
    # (a third [P, D] buffer at the step's peak).
    deliver = lambda rows_PxD: rows_PxD  # noqa: E731
  return deliver, attack, combine


def _sharded(config, code, mesh, corrupt, num_features: int):
  n = mesh.shape[mesh_lib.WORKER_AXIS]
  combine_slices = _combiner(config, code, n)

  def slices(rows_pxD):
    return sharded_lib.to_slices(rows_pxD, n)

  def attack(key, slice_PxW, mask_P, straggle_P, attack_index):
    device = jax.lax.axis_index(mesh_lib.WORKER_AXIS)
    attack_key = jax.random.fold_in(split_step_key(key).attack, device)
    received_PxW = corrupt(attack_key, slice_PxW, mask_P, straggle_P, attack_index)
    return sharded_lib.clear_padding(received_PxW, num_features)

  def combine(key, slice_PxW):
    mean_W, report = combine_slices(slice_PxW, split_step_key(key).combine)
    return sharded_lib.gather_slices(mean_W, num_features), report

  whole = (_WHOLE,) * 3
  return (
    jax.shard_map(slices, mesh=mesh, in_specs=_WORKERS, out_specs=_COLUMNS),
    jax.shard_map(attack, mesh=mesh, in_specs=(_WHOLE, _COLUMNS, *whole), out_specs=_COLUMNS),
    jax.shard_map(combine, mesh=mesh, in_specs=(_WHOLE, _COLUMNS), out_specs=(_WHOLE, _WHOLE)),
  )


def make_server(
  config: TrainConfig,
  code: coding.Code,
  mesh: jax.sharding.Mesh,
  attack_names: Sequence[str],
  num_features: int,
) -> Server:
  """The server of a run (see the module docstring).

  Args:
    config: a validated configuration.
    code: the gradient code (``uncoded`` for the baselines).
    mesh: the worker mesh.
    attack_names: the attacks ``attack_index`` chooses from (one program: ``lax.switch``).
    num_features: D, the length of a message.

  Raises:
    ValueError: an unknown attack, placement, decoder or aggregator option.
  """
  # The rows an attack and the stragglers may change: t + e, as the masks phase draws them.
  num_rows = config.num_adversaries + config.num_stragglers
  corrupt = functools.partial(_corrupt, _attack_fns(config, code, attack_names), num_rows)
  if config.combine_sharding == "sharded":
    parts = _sharded(config, code, mesh, corrupt, num_features)
  else:
    parts = _replicated(config, code, mesh, corrupt)
  return Server(_make_masks(config, code, attack_names), *parts)
