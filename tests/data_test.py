"""Tests for draco_jax.data: datasets, normalisation, per-step partitions, label flipping."""

import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from draco_jax import data


def _indexed_dataset(num_examples):
  """A fake 'digits' dataset whose image i is filled with the value i (labels i % 10)."""
  images = np.broadcast_to(
    np.arange(num_examples, dtype=np.uint8)[:, None, None, None], (num_examples, 2, 2, 1)
  )
  labels = (np.arange(num_examples) % 10).astype(np.int32)
  return data.Dataset(np.array(images), labels, 10, "digits")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
  """Any attempt to open a network connection fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def test_digits_shapes_classes_and_fixed_split():
  from sklearn.datasets import load_digits

  train = data.load_dataset("digits", "train")
  test = data.load_dataset("digits", "test")
  assert train.images.shape == (1437, 8, 8, 1) and test.images.shape == (360, 8, 8, 1)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  assert train.num_classes == 10 and train.name == "digits" and train.input_shape == (8, 8, 1)
  assert set(np.unique(train.labels)) == set(range(10)) == set(np.unique(test.labels))
  assert train.images.max() == 16
  # The documented recipe, computed independently: permute with default_rng(0), 1437 / 360.
  raw = load_digits()
  order = np.random.default_rng(0).permutation(1797)
  np.testing.assert_array_equal(train.images[..., 0], raw.images[order[:1437]])
  np.testing.assert_array_equal(test.labels, raw.target[order[1437:]])
  again = data.load_dataset("digits", "train")
  np.testing.assert_array_equal(again.images, train.images)
  np.testing.assert_array_equal(again.labels, train.labels)


def test_normalize_uses_train_statistics_and_runs_under_jit():
  train = data.load_dataset("digits", "train")
  x = train.normalize(train.images)
  assert x.dtype == np.float32 and x.shape == train.images.shape
  assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-3
  x_jit = jax.jit(lambda images: data.normalize(images, "digits"))(jnp.asarray(train.images[:4]))
  np.testing.assert_allclose(x_jit, x[:4], rtol=1e-6, atol=1e-6)
  rgb = data.normalize(np.full((2, 3, 3, 3), 255, np.uint8), "cifar10")
  np.testing.assert_allclose(
    rgb[0, 0, 0], (1 - np.array([0.4914, 0.4822, 0.4465])) / [0.2470, 0.2435, 0.2616], rtol=1e-5
  )


def test_partition_batch_shapes_values_and_determinism():
  train = data.load_dataset("digits", "train")
  kwargs = dict(num_partitions=4, batch_per_partition=5, seed=3, step=7)
  x, y = data.partition_batch(train, **kwargs)
  assert x.shape == (4, 5, 8, 8, 1) and x.dtype == np.float32
  assert y.shape == (4, 5) and y.dtype == np.int32
  x_again, y_again = data.partition_batch(train, **kwargs)
  np.testing.assert_array_equal(x, x_again)
  np.testing.assert_array_equal(y, y_again)
  index = data.partition_indices(train.num_examples, **kwargs)
  np.testing.assert_array_equal(x, train.normalize(train.images[index]))
  np.testing.assert_array_equal(y, train.labels[index])
  _, y_other_seed = data.partition_batch(train, **{**kwargs, "seed": 4})
  assert not np.array_equal(y, y_other_seed)


def test_partition_indices_follow_epoch_permutations_and_wrap():
  num_examples, kwargs = 20, dict(num_partitions=2, batch_per_partition=3, seed=5)
  steps = [data.partition_indices(num_examples, step=s, **kwargs) for s in range(7)]
  # Reference: the stream is perm(epoch 0), perm(epoch 1), ... read in slices of K * B = 6.
  perms = [np.random.default_rng((5, epoch)).permutation(num_examples) for epoch in range(3)]
  stream = np.concatenate(perms)
  for step, index_KxB in enumerate(steps):
    np.testing.assert_array_equal(index_KxB.ravel(), stream[6 * step : 6 * step + 6])
  # Steps 0-2 lie inside epoch 0: all 18 examples distinct, partitions disjoint.
  epoch0 = np.concatenate([index_KxB.ravel() for index_KxB in steps[:3]])
  assert len(np.unique(epoch0)) == 18
  # Step 3 wraps: 2 examples end epoch 0, 4 start epoch 1; epoch 0 is covered exactly once.
  np.testing.assert_array_equal(
    np.sort(np.concatenate([epoch0, steps[3].ravel()[:2]])), np.arange(20)
  )
  assert not np.array_equal(perms[0], perms[1])
  # K * B > N: one step spans several epochs.
  big = data.partition_indices(
    num_examples, num_partitions=5, batch_per_partition=9, seed=5, step=0
  )
  np.testing.assert_array_equal(big.ravel(), stream[:45])


def test_partition_batch_of_indexed_data_is_disjoint_within_a_step():
  dataset = _indexed_dataset(30)
  x, y = data.partition_batch(dataset, num_partitions=3, batch_per_partition=4, seed=0, step=1)
  raw = np.rint((x * 0.3760 + 0.3054) * 16).astype(int)[:, :, 0, 0, 0]  # undo normalize
  assert len(np.unique(raw)) == 12
  np.testing.assert_array_equal(y, raw % 10)


@pytest.mark.parametrize("batch_size", [7, 360, 500])
def test_eval_batches_cover_every_example_once(batch_size):
  test = data.load_dataset("digits", "test")
  batches = list(data.eval_batches(test, batch_size))
  assert len(batches) == -(-360 // batch_size)
  for x, y, mask in batches:
    assert x.shape == (batch_size, 8, 8, 1) and x.dtype == np.float32
    assert y.shape == mask.shape == (batch_size,) and mask.dtype == bool
  labels = np.concatenate([y[mask] for _, y, mask in batches])
  np.testing.assert_array_equal(labels, test.labels)
  x_last, _, mask_last = batches[-1]
  np.testing.assert_array_equal(x_last[mask_last], test.normalize(test.images[-mask_last.sum() :]))


@pytest.mark.parametrize(
  "name,image_shape",
  [
    ("mnist", (28, 28, 1)),
    ("cifar10", (32, 32, 3)),
    ("fashion_mnist", (28, 28, 1)),
    ("cifar100", (32, 32, 3)),
  ],
)
def test_tfds_datasets_through_data_source_under_mock_data(name, image_shape, tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    data.check_available(name, data_dir=str(tmp_path))  # a tfds copy is found first
    train = data.load_dataset(name, "train", data_dir=str(tmp_path))
  num_classes = 100 if name == "cifar100" else 10
  assert train.images.shape == (12, *image_shape) and train.images.dtype == np.uint8
  assert train.labels.shape == (12,) and train.labels.dtype == np.int32
  assert train.labels.min() >= 0 and train.labels.max() < num_classes
  assert train.num_classes == num_classes
  x, y = data.partition_batch(train, num_partitions=2, batch_per_partition=4, seed=0, step=0)
  assert x.shape == (2, 4, *image_shape) and x.dtype == np.float32 and y.shape == (2, 4)


@pytest.mark.parametrize(
  "name, archive",
  [("mnist", "train-images-idx3-ubyte.gz"), ("cifar10", "cifar-10-binary.tar.gz")],
)
@pytest.mark.parametrize("check", [True, False])
def test_missing_dataset_offline_names_both_ways_to_install_it(name, archive, check, tmp_path):
  """conftest.py turns downloads off: the error names the archives and the tfds route, and
  nothing is created (the download path itself is tested in downloads_test.py)."""
  with pytest.raises(data.DatasetNotPreparedError) as info:
    if check:
      data.check_available(name, data_dir=str(tmp_path))
    else:
      data.load_dataset(name, "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert isinstance(info.value, FileNotFoundError) and "\n" not in message
  assert f"dataset {name!r} is not available" in message and "downloads are off" in message
  assert f"{archive} (" in message and str(tmp_path / "draco_jax" / name) in message
  assert f"tfds build {name} --file_format=array_record" in message
  assert list(tmp_path.iterdir()) == []  # nothing downloaded or created


def test_unknown_dataset_and_split():
  with pytest.raises(ValueError, match=r"unknown dataset 'svhn'.*cifar10.*digits.*mnist"):
    data.load_dataset("svhn", "train")
  with pytest.raises(ValueError, match=r"unknown split 'validation'.*\('train', 'test'\)"):
    data.load_dataset("digits", "validation")
  with pytest.raises(ValueError, match="unknown dataset"):
    data.normalize(np.zeros((1, 2, 2, 1)), "svhn")
  with pytest.raises(ValueError, match="num_partitions"):
    data.partition_indices(10, num_partitions=0, batch_per_partition=1, seed=0, step=0)


def test_flip_labels_changes_only_masked_partitions_without_recompiling():
  traces = []

  @jax.jit
  def flip(y_KxB, mask_K):
    traces.append(None)
    return data.flip_labels(y_KxB, mask_K, 10)

  y_KxB = jnp.arange(12, dtype=jnp.int32).reshape(4, 3) % 10
  mask_K = jnp.array([False, True, False, True])
  flipped = flip(y_KxB, mask_K)
  assert flipped.dtype == jnp.int32 and flipped.shape == (4, 3)
  np.testing.assert_array_equal(flipped[~mask_K], y_KxB[~mask_K])
  np.testing.assert_array_equal(flipped[mask_K], 9 - y_KxB[mask_K])
  np.testing.assert_array_equal(flip(y_KxB, ~mask_K)[~mask_K], 9 - y_KxB[~mask_K])
  np.testing.assert_array_equal(flip(y_KxB, jnp.zeros(4, bool)), y_KxB)
  assert len(traces) == 1
