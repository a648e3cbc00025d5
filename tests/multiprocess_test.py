"""Tests for draco_jax.distributed and multi-process training.

The end-to-end test launches ``python -m draco_jax.train`` as 2 processes on 127.0.0.1, each
with 4 simulated CPU devices (gloo CPU collectives, the default in this JAX), and checks the
parameters against a single-process run on the 8 devices conftest.py simulates. Every
subprocess runs under ``timeout -s KILL``: after ``jax.distributed.initialize`` a process
catches SIGTERM (a plain ``timeout`` would not stop a hung run).
"""

import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.flatten_util import ravel_pytree

from draco_jax import distributed, mesh, train
from draco_jax.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_AFTER_S = 240
# A short DRACO run under attack: cyclic code, P = 8, S = 1, one worker reversing its gradient.
CONFIG = TrainConfig(
  code="cyclic",
  num_workers=8,
  num_adversaries=1,
  attack="reverse_gradient",
  placement="random",
  model_options={"hidden": (16,)},
  optimizer="sgd",
  learning_rate=0.1,
  batch_per_partition=4,
  steps=3,
  eval_every=3,
  log_every=1,
  checkpoint_every=3,
  timing=False,
)
CONFIG_FLAGS = [
  "--code=cyclic",
  "--num_workers=8",
  "--num_adversaries=1",
  "--attack=reverse_gradient",
  "--placement=random",
  '--model_options={"hidden": [16]}',
  "--optimizer=sgd",
  "--learning_rate=0.1",
  "--batch_per_partition=4",
  "--steps=3",
  "--eval_every=3",
  "--log_every=1",
  "--checkpoint_every=3",
  "--notiming",
]
NO_ENV: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# Settings: explicit values, environment variables, validation.


def test_nothing_set_is_one_process():
  settings = distributed.resolve_settings(environ=NO_ENV)
  assert settings == distributed.DistributedSettings()
  assert not settings.is_multi_process
  assert distributed.resolve_settings(num_processes=1, process_id=0, environ=NO_ENV) == settings


def test_settings_from_environment():
  environ = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
    "JAX_LOCAL_DEVICE_IDS": "0, 1",
  }
  assert distributed.resolve_settings(environ=environ) == distributed.DistributedSettings(
    "10.0.0.1:1234", 4, 3, (0, 1)
  )


def test_explicit_values_win_over_environment():
  environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4"}
  environ["JAX_PROCESS_ID"] = "3"
  settings = distributed.resolve_settings("node7:999", 2, 1, [2], environ=environ)
  assert settings == distributed.DistributedSettings("node7:999", 2, 1, (2,))
  # An unset value still comes from the environment; an empty variable counts as unset.
  environ["JAX_PROCESS_ID"] = ""
  settings = distributed.resolve_settings(process_id=0, environ=environ)
  assert settings == distributed.DistributedSettings("10.0.0.1:1234", 4, 0)


def test_auto_leaves_unset_values_to_jax():
  settings = distributed.resolve_settings(num_processes=distributed.AUTO, environ=NO_ENV)
  assert settings.is_auto and settings.is_multi_process
  assert settings.coordinator_address is settings.process_id is None


@pytest.mark.parametrize(
  "values, environ, message",
  [
    ({"num_processes": 0}, {}, "num_processes must be >= 1, or -1 to detect the cluster; got 0"),
    ({"num_processes": -2}, {}, "num_processes must be >= 1, or -1.*got -2"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "num_processes .*JAX_NUM_PROCESSES.*integer; got 'two'"),
    ({"process_id": "x1"}, {}, "process_id .*must be an integer; got 'x1'"),
    (
      {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
      {},
      "process_id must be < num_processes; got process_id=2 for 2",
    ),
    ({"num_processes": -1, "process_id": -1}, {}, "process_id must be >= 0; got -1"),
    ({"num_processes": 2, "process_id": 0}, {}, "num_processes=2 needs coordinator_address"),
    ({"coordinator_address": "h:1", "num_processes": 2}, {}, "needs this process's process_id"),
    ({"process_id": 1}, {}, "process_id must be < num_processes; got process_id=1 for 1"),
    ({"coordinator_address": "h:1"}, {}, "multi-process settings, but num_processes is 1"),
    ({"coordinator_address": "10.0.0.1", "num_processes": -1}, {}, "host:port.*got '10.0.0.1'"),
    ({"coordinator_address": "h:70000", "num_processes": -1}, {}, "port in 1..65535"),
    ({"num_processes": -1, "local_device_ids": "0,0"}, {}, "distinct integers >= 0.*'0,0'"),
    ({"num_processes": -1}, {"JAX_LOCAL_DEVICE_IDS": "gpu0"}, "local_device_ids.*'gpu0'"),
  ],
)
def test_bad_settings_name_the_value_and_the_rule(values, environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve_settings(**values, environ=environ)


def test_initialize_calls_jax_only_for_several_processes(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  assert not distributed.initialize(distributed.DistributedSettings())
  assert calls == []
  assert distributed.initialize(distributed.DistributedSettings("h:1", 2, 1, (0, 1)))
  assert distributed.initialize(distributed.DistributedSettings(num_processes=-1))
  assert calls == [
    dict(coordinator_address="h:1", num_processes=2, process_id=1, local_device_ids=[0, 1]),
    dict(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None),
  ]


def test_initialize_twice_changes_nothing(monkeypatch):
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("called twice"))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert distributed.initialize(distributed.DistributedSettings("h:1", 2, 0))
  with pytest.raises(ValueError, match="already initialized with 2 processes; got num_pro.*=4"):
    distributed.initialize(distributed.DistributedSettings("h:1", 4, 0))


# ---------------------------------------------------------------------------------------------
# The mesh of a multi-process run, and placing host values on it.


def test_mesh_of_several_processes_holds_every_device(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert mesh.select_devices(0, 16) == jax.devices()
  assert mesh.select_devices(8, 8) == jax.devices()
  with pytest.raises(ValueError, match="2 processes.*num_devices must be 0 or 8; got 4"):
    mesh.select_devices(4, 8)
  with pytest.raises(
    ValueError, match="2 processes.*8 must divide the number of workers; got P=12"
  ):
    mesh.select_devices(0, 12)


def test_put_replicated_keeps_values_and_key_type():
  m = mesh.make_worker_mesh(8)
  key = jax.random.fold_in(jax.random.key(3), 5)
  tree = {"x": np.arange(6.0, dtype=np.float32).reshape(2, 3), "n": np.int32(4), "key": key}
  placed = mesh.put_replicated(tree, m)
  for leaf in jax.tree.leaves(placed):
    assert leaf.sharding.is_equivalent_to(mesh.replicated(m), leaf.ndim)
  np.testing.assert_array_equal(placed["x"], tree["x"])
  assert int(placed["n"]) == 4
  assert jax.random.key_impl(placed["key"]) == jax.random.key_impl(key)
  np.testing.assert_array_equal(jax.random.key_data(placed["key"]), jax.random.key_data(key))


# ---------------------------------------------------------------------------------------------
# Real processes on 127.0.0.1.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _process_env(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra
  )
  return env


def _without_gloo(text: str) -> str:
  """A process's stdout without gloo's "[Gloo] Rank k is connected ..." lines."""
  return "".join(line for line in text.splitlines(True) if not line.startswith("[Gloo]"))


@contextlib.contextmanager
def _processes(commands: list[tuple[list[str], dict[str, str]]], log_prefix: str):
  """Starts ``python ARGS`` per (ARGS, env) under ``timeout -s KILL``.

  Yields a function that waits for all and returns their stdouts without gloo's lines, or
  fails showing their stderr. On the way out, a process still running is killed with its
  process group.
  """
  prefixes = [f"{log_prefix}{i}" for i in range(len(commands))]
  procs = []
  for (args, env), prefix in zip(commands, prefixes):
    with open(prefix + ".out", "w") as out, open(prefix + ".err", "w") as err:
      cmd = ["timeout", "-s", "KILL", str(KILL_AFTER_S), sys.executable, *args]
      procs.append(
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
      )

  def wait_all() -> list[str]:
    codes = [p.wait(timeout=KILL_AFTER_S + 30) for p in procs]
    if any(codes):
      errs = [open(prefix + ".err").read()[-3000:] for prefix in prefixes]
      pytest.fail(f"exit codes {codes} (137: killed after {KILL_AFTER_S} s); stderr: {errs}")
    return [_without_gloo(open(prefix + ".out").read()) for prefix in prefixes]

  try:
    yield wait_all
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_cluster_detection_through_slurm_variables(tmp_path):
  """num_processes = -1 takes every setting from (here simulated) SLURM variables."""
  script = (
    "from draco_jax import distributed; import jax; "
    "distributed.initialize(distributed.resolve_settings(num_processes=-1)); "
    "print(jax.process_index(), jax.process_count(), jax.device_count())"
  )
  slurm = dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2")
  slurm.update(JAX_COORDINATOR_PORT=str(_free_port()), SLURM_LOCALID="0")
  commands = [(["-c", script], _process_env(2, SLURM_PROCID=str(i), **slurm)) for i in range(2)]
  with _processes(commands, str(tmp_path / "slurm")) as wait_all:
    outs = wait_all()
  assert [out.split() for out in outs] == [["0", "2", "4"], ["1", "2", "4"]]


def _restore_params(checkpoints: str, step: int, like: train.TrainState) -> np.ndarray:
  target = {
    "state": jax.tree.map(np.asarray, like._asdict()),
    "rng": np.asarray(jax.random.key_data(jax.random.key(CONFIG.seed))),
  }
  with ocp.CheckpointManager(checkpoints) as manager:
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  return np.asarray(ravel_pytree(restored["state"]["params"])[0])


@pytest.mark.parametrize(
  "combine_sharding, solver",
  [
    ("replicated", "auto"),
    ("sharded", "host"),
    pytest.param("sharded", "auto", marks=pytest.mark.slow),
    pytest.param("replicated", "host", marks=pytest.mark.slow),
  ],
)
def test_two_processes_train_like_one(tmp_path, combine_sharding, solver):
  """2 processes x 4 devices end a DRACO run under attack with the parameters of 1 process x 8
  devices (measured: bit-identical); only process 0 writes metrics, TensorBoard and summary.
  ``solver="host"``: the decoder's P-sized steps run on each process's host (jax.pure_callback,
  the route of backends without 64-bit types), the single-process run in the graph."""
  workdir = str(tmp_path / "multi")
  address = f"127.0.0.1:{_free_port()}"
  args = ["-m", "draco_jax.train", *CONFIG_FLAGS, f"--combine_sharding={combine_sharding}"]
  args.append(f'--combiner_options={{"solver": "{solver}"}}')
  args.append(f"--workdir={workdir}")
  commands = [  # process 0 gets flags, process 1 the environment variables
    (
      [*args, f"--coordinator_address={address}", "--num_processes=2", "--process_id=0"],
      _process_env(4),
    ),
    (
      args,
      _process_env(4, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1"),
    ),
  ]
  log_prefix = str(tmp_path / "process")
  # The single-process run on 8 devices first, so the 2 processes have the cores to themselves.
  single = train.train_and_evaluate(
    dataclasses.replace(CONFIG, num_devices=8, combine_sharding=combine_sharding),
    str(tmp_path / "single"),
  )
  with _processes(commands, log_prefix) as wait_all:
    outs = wait_all()

  multi = _restore_params(os.path.join(workdir, "checkpoints"), CONFIG.steps, single["state"])
  want = np.asarray(ravel_pytree(single["state"].params)[0])
  np.testing.assert_allclose(multi, want, rtol=1e-6, atol=1e-7)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert (results["devices"], results["processes"]) == (8, 2)
  assert (single["devices"], single["processes"]) == (8, 1)
  for name in ("test_accuracy", "flagged_fraction", "skipped_steps", "final_step"):
    assert results[name] == pytest.approx(single[name]), name
  assert results["flagged_fraction"] == 1.0 and results["skipped_steps"] == 0

  assert "== DRACO run summary: " in outs[0] and "8 in 2 process(es)" in outs[0]
  # gloo's "[Gloo] Rank k is connected to ... peer ranks" lines can arrive split by other
  # writes, so process 1's stdout is checked for our output, not for emptiness.
  assert "DRACO run summary" not in outs[1] and "test accuracy" not in outs[1]
  assert "%|" in open(log_prefix + "0.err").read()  # the progress bar of process 0 ...
  assert "%|" not in open(log_prefix + "1.err").read()  # ... and of no other
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, CONFIG.steps + 1))
  event_files = glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
  assert len(event_files) == int(importlib.util.find_spec("tensorboardX") is not None)
