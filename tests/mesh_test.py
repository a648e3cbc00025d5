"""Tests for draco_jax.mesh: device selection, the worker mesh, per-worker mapping.

conftest.py simulates 8 CPU devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from draco_jax import mesh


def test_eight_simulated_devices():
  assert len(jax.devices()) == 8


@pytest.mark.parametrize(
  "num_devices, num_workers, expected",
  [(0, None, 8), (0, 16, 8), (0, 15, 5), (0, 7, 7), (0, 9, 3), (1, 15, 1), (8, 8, 8), (3, 9, 3)],
)
def test_select_devices(num_devices, num_workers, expected):
  assert mesh.select_devices(num_devices, num_workers) == jax.devices()[:expected]


@pytest.mark.parametrize("num_devices", [-1, 9])
def test_select_devices_rejects_impossible_counts(num_devices):
  with pytest.raises(ValueError, match=f"num_devices must be in 0..8.*got {num_devices}"):
    mesh.select_devices(num_devices)


@pytest.mark.parametrize(
  "num_workers, num_devices, message",
  [
    (15, 8, "got 8 devices for P=15 workers; usable device counts: 1, 3, 5"),
    (12, 8, "got 8 devices for P=12 workers; usable device counts: 1, 2, 3, 4, 6"),
    (3, 8, "got 8 devices for P=3 workers; usable device counts: 1, 3"),
  ],
)
def test_devices_must_divide_workers(num_workers, num_devices, message):
  with pytest.raises(ValueError, match=message):
    mesh.make_worker_mesh(num_workers, jax.devices()[:num_devices])


@pytest.mark.parametrize("num_workers, num_devices", [(8, 8), (16, 8), (15, 1), (6, 3)])
def test_worker_mesh_shape(num_workers, num_devices):
  m = mesh.make_worker_mesh(num_workers, jax.devices()[:num_devices])
  assert m.axis_names == (mesh.WORKER_AXIS,)
  assert m.shape[mesh.WORKER_AXIS] == num_devices
  assert mesh.workers_per_device(m, num_workers) == num_workers // num_devices


def _loss(params, x_F):
  return jnp.sum(jnp.tanh(x_F @ params["w"] + params["b"]) ** 2)


def _per_worker(params, x_F, scale):
  """A per-worker gradient (with respect to replicated params) and a per-worker output."""
  return jax.grad(_loss)(params, x_F), scale * jnp.sum(x_F)


@pytest.mark.parametrize("num_workers, num_devices", [(8, 8), (16, 8), (16, 1), (6, 3)])
@pytest.mark.parametrize("gather", [False, True])
def test_map_workers_equals_vmap(num_workers, num_devices, gather):
  """Each worker's own gradient: not summed over the devices (jax-environment.md §4)."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
  x_PxF = jnp.asarray(rng.normal(size=(num_workers, 5)), jnp.float32)
  scale_P = jnp.arange(num_workers, dtype=jnp.float32)
  m = mesh.make_worker_mesh(num_workers, jax.devices()[:num_devices])
  mapped = mesh.map_workers(_per_worker, m, per_worker_args=(False, True, True), gather=gather)
  params = jax.device_put(params, mesh.replicated(m))
  got = jax.jit(mapped)(params, x_PxF, scale_P)
  want = jax.vmap(_per_worker, (None, 0, 0))(params, x_PxF, scale_P)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6), got, want)
  expected = mesh.replicated(m) if gather else NamedSharding(m, PartitionSpec(mesh.WORKER_AXIS))
  assert got[1].sharding.is_equivalent_to(expected, 1)
