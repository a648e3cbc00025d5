"""Datasets, per-step partitioned batches and the label-flipping data attack.

Shape legend: N examples, H x W x C image, K partitions (one per worker, K = P), B examples per
partition, T = K * B examples per step.

Datasets (:data:`DATASETS`), all held fully in host memory as numpy arrays:

* ``digits`` (offline default): ``sklearn.datasets.load_digits``, 1797 8x8 grey images with
  values 0..16, stored as uint8 [N, 8, 8, 1]. The split is fixed: the examples are permuted once
  with ``np.random.default_rng(0)``; the first 1437 form "train", the last 360 form "test".
* ``mnist``, ``fashion_mnist`` (28x28x1), ``cifar10`` and ``cifar100`` (32x32x3; the 100 fine
  labels): no preparation and no TensorFlow. A copy prepared for tensorflow-datasets in
  array_record format under ``data_dir`` (tfds default when None: ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``) is read first, through ``tfds.data_source`` (pillow decodes the
  PNGs)::

      tfds build mnist --file_format=array_record --data_dir=DIR   # optional, needs TensorFlow

  Otherwise :mod:`draco_jax.downloads` fetches the canonical archives once (the files and
  SHA-256 checksums tensorflow-datasets uses), verifies and parses them with numpy, and keeps a
  ``.npz`` under ``data_dir`` (default ``$TFDS_DATA_DIR``, else ``$XDG_CACHE_HOME/draco_jax``,
  else ``~/.cache/draco_jax``). :func:`check_available` does that download, so a failure is one
  :class:`DatasetNotPreparedError` before anything is built; offline (or with
  ``DRACO_JAX_OFFLINE=1``) it names the URLs, file names, checksums and the directory in which to
  place the files by hand.

Images stay in their stored dtype (uint8); :func:`normalize` maps them to float32 by scaling to
[0, 1] and then standardising with the dataset's per-channel mean/std (train-split statistics).
:func:`partition_batch` and :func:`eval_batches` apply it, so model inputs are always normalised
the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from draco_jax import downloads

__all__ = [
  "Dataset",
  "DatasetSpec",
  "DatasetNotPreparedError",
  "DATASETS",
  "SPLITS",
  "load_dataset",
  "check_available",
  "normalize",
  "partition_indices",
  "partition_batch",
  "eval_batches",
  "flip_labels",
]

SPLITS = ("train", "test")
_DIGITS_SPLIT_SEED = 0
_DIGITS_NUM_TRAIN = 1437


class DatasetNotPreparedError(FileNotFoundError):
  """A dataset is neither prepared for tfds under ``data_dir`` nor cached nor downloadable."""


class Dataset(NamedTuple):
  """One split of a dataset, in host memory.

  Attributes:
    images: [N, H, W, C] numpy array in the stored dtype (uint8; use :meth:`normalize`).
    labels: int32 [N] class ids in ``[0, num_classes)``.
    num_classes: number of classes.
    name: the :data:`DATASETS` key, which selects the normalisation constants.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str

  @property
  def num_examples(self) -> int:
    """N, the number of examples (``len(dataset)`` is the NamedTuple's field count)."""
    return int(self.labels.shape[0])

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """The per-example image shape (H, W, C)."""
    return tuple(self.images.shape[1:])

  def normalize(self, images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """Normalises images of this dataset to float32 (see :func:`normalize`)."""
    return normalize(images, self.name)


class DatasetSpec(NamedTuple):
  """How to load a dataset and normalise its images.

  Attributes:
    load: ``load(split, data_dir) -> (images_NxHxWxC, labels_N)``.
    num_classes: number of classes.
    max_value: largest stored pixel value; images are divided by it to reach [0, 1].
    mean_C: per-channel mean of the [0, 1]-scaled train images.
    std_C: per-channel standard deviation of the [0, 1]-scaled train images.
    check: ``check(split, data_dir)`` raises :class:`DatasetNotPreparedError` when the split
      cannot be loaded, without reading it.
  """

  load: Callable[[str, str | None], tuple[np.ndarray, np.ndarray]]
  num_classes: int
  max_value: float
  mean_C: tuple[float, ...]
  std_C: tuple[float, ...]
  check: Callable[[str, str | None], None]


@functools.cache
def _digits_all() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 sklearn digits, permuted once with the fixed split seed (read-only arrays)."""
  from sklearn.datasets import load_digits  # lazy: sklearn import is slow

  raw = load_digits()
  order_N = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(raw.target.shape[0])
  images = raw.images[order_N].astype(np.uint8)[..., None]
  labels = raw.target[order_N].astype(np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def _load_digits(split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """The fixed digits split: first 1437 permuted examples train, last 360 test."""
  del data_dir  # bundled with scikit-learn
  images, labels = _digits_all()
  part = slice(None, _DIGITS_NUM_TRAIN) if split == "train" else slice(_DIGITS_NUM_TRAIN, None)
  return images[part].copy(), labels[part].copy()


def _not_prepared_message(name: str, split: str, data_dir: str | None, err: Exception) -> str:
  """One line: what is missing, where it was looked for, and what tfds said."""
  where = data_dir or "the tfds default ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  cause = (str(err).strip().splitlines() or [""])[0]
  return (
    f"tfds dataset {name!r} (split {split!r}) is not prepared in array_record format under "
    f"{where} [tfds said: {type(err).__name__}: {cause}]"
  )


class _NoVariantFolderWarning(logging.Filter):
  """Drops tfds's "Variant folder ... has no dataset_info.json": most runs have no tfds copy."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Variant folder")


_NO_VARIANT_FOLDER_WARNING = _NoVariantFolderWarning()


def _tfds_source(name: str, split: str, data_dir: str | None):
  """The split's tfds data source (opened, not read); DatasetNotPreparedError if missing."""
  import tensorflow_datasets as tfds  # lazy: only these datasets need it

  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_NO_VARIANT_FOLDER_WARNING)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (NotImplementedError, KeyError, FileNotFoundError, OSError, AssertionError) as err:
    raise DatasetNotPreparedError(_not_prepared_message(name, split, data_dir, err)) from err
  finally:
    absl_logger.removeFilter(_NO_VARIANT_FOLDER_WARNING)


def _load_tfds(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """Reads every record of a prepared array_record tfds split into numpy arrays."""
  source = _tfds_source(name, split, data_dir)
  # A plain loop: tfds 4.9.10's mock_data breaks ``__getitems__``, and PNG decoding dominates.
  records = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(r["image"]) for r in records])
  labels = np.asarray([r["label"] for r in records], dtype=np.int32)
  return images, labels


def _check_tfds(name: str, split: str, data_dir: str | None) -> None:
  _tfds_source(name, split, data_dir)


@contextlib.contextmanager
def _download_errors(name: str, data_dir: str | None) -> Iterator[None]:
  """Turns a failed download into one DatasetNotPreparedError that also names the tfds route."""
  try:
    yield
  except downloads.DownloadError as err:
    where = data_dir or "the tfds default ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    raise DatasetNotPreparedError(
      f"{err}. Or prepare it for tensorflow-datasets once, with TensorFlow (no array_record copy "
      f"is prepared under {where}): `tfds build {name} --file_format=array_record "
      f"--data_dir=DIR`, then pass --data_dir=DIR"
    ) from err


def _load_prepared(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """The tfds-prepared split if there is one, else the downloaded archives (fetched once)."""
  try:
    return _load_tfds(name, split, data_dir)
  except DatasetNotPreparedError:
    pass
  with _download_errors(name, data_dir):
    return downloads.load(name, split, data_dir)


def _check_prepared(name: str, split: str, data_dir: str | None) -> None:
  """Opens the tfds-prepared split, else downloads and prepares the archives now."""
  try:
    return _check_tfds(name, split, data_dir)
  except DatasetNotPreparedError:
    pass
  with _download_errors(name, data_dir):
    downloads.prepare(name, data_dir)


def _check_bundled(split: str, data_dir: str | None) -> None:
  del split, data_dir  # shipped inside an installed package


DATASETS: dict[str, DatasetSpec] = {
  "digits": DatasetSpec(_load_digits, 10, 16.0, (0.3054,), (0.3760,), _check_bundled),
  **{
    name: DatasetSpec(
      functools.partial(_load_prepared, name),
      num_classes,
      255.0,
      mean_C,
      std_C,
      functools.partial(_check_prepared, name),
    )
    for name, num_classes, mean_C, std_C in [
      ("mnist", 10, (0.1307,), (0.3081,)),
      ("fashion_mnist", 10, (0.2860,), (0.3530,)),
      ("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
      ("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ]
  },
}


def _spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid datasets: {sorted(DATASETS)}")
  return DATASETS[name]


def load_dataset(name: str, split: str, *, data_dir: str | None = None) -> Dataset:
  """Loads one split of a registered dataset into host memory.

  Args:
    name: a key of :data:`DATASETS` ("digits", "mnist", "fashion_mnist", "cifar10",
      "cifar100").
    split: "train" or "test".
    data_dir: data directory: a tfds-prepared array_record copy there is read first, else the
      downloaded archives kept there (see the module docstring for the defaults); ignored by
      "digits".

  Returns:
    A :class:`Dataset` with uint8 images [N, H, W, C] and int32 labels [N].

  Raises:
    ValueError: unknown dataset or split.
    DatasetNotPreparedError: the dataset is not prepared for tfds and cannot be downloaded.
  """
  spec = _spec(name)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} for dataset {name!r}; valid splits: {SPLITS}")
  images, labels = spec.load(split, data_dir)
  if images.ndim != 4 or labels.shape != images.shape[:1]:
    raise ValueError(
      f"{name}: expected images [N,H,W,C] and labels [N], got {images.shape}, {labels.shape}"
    )
  return Dataset(images, labels.astype(np.int32), spec.num_classes, name)


def check_available(name: str, *, data_dir: str | None = None) -> None:
  """Makes a registered dataset loadable, or raises before anything else is built.

  A tfds-prepared dataset is opened without reading its records (fast); otherwise the archives
  are downloaded and prepared now (once: later calls only find the ``.npz``), so a run fails or
  shows its download progress before it builds anything.

  Raises:
    ValueError: unknown dataset.
    DatasetNotPreparedError: the dataset is not prepared for tfds and cannot be downloaded (one
      line naming the URLs, files, checksums and the directory to place them in by hand).
  """
  spec = _spec(name)
  for split in SPLITS:
    spec.check(split, data_dir)


def normalize(images: np.ndarray | jax.Array, name: str) -> np.ndarray | jax.Array:
  """Scales stored pixels to [0, 1], then standardises with the dataset's channel mean/std.

  Works on numpy arrays (host) and on jax arrays (inside jit); the result is float32.

  Args:
    images: [..., H, W, C] images in the dataset's stored range (0..max_value).
    name: a key of :data:`DATASETS`.

  Returns:
    float32 array of the same shape: ``(images / max_value - mean_C) / std_C``.
  """
  spec = _spec(name)
  channel_shape = (1,) * (images.ndim - 1) + (len(spec.mean_C),)
  mean = np.asarray(spec.mean_C, np.float32).reshape(channel_shape)
  inv_std = (1.0 / np.asarray(spec.std_C, np.float32)).reshape(channel_shape)
  scaled = images.astype(np.float32) * np.float32(1.0 / spec.max_value)
  return (scaled - mean) * inv_std


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  order_N = np.random.default_rng((seed, epoch)).permutation(num_examples)
  order_N.flags.writeable = False
  return order_N


def partition_indices(
  num_examples: int, *, num_partitions: int, batch_per_partition: int, seed: int, step: int
) -> np.ndarray:
  """Example indices of one step, split into K partitions of B consecutive examples.

  Global position ``t = step * K * B + j`` (j < K * B) reads example
  ``perm(epoch)[t % N]`` with ``epoch = t // N`` and
  ``perm(epoch) = np.random.default_rng((seed, epoch)).permutation(N)``. The stream is thus an
  endless sequence of epochs, each a fresh permutation, and a step that crosses an epoch
  boundary wraps into the next one. Within a step the indices are distinct unless the step
  crosses an epoch boundary (or K * B > N).

  Args:
    num_examples: N, the dataset size.
    num_partitions: K.
    batch_per_partition: B.
    seed: non-negative data-order seed.
    step: non-negative training step.

  Returns:
    int64 [K, B] indices into the dataset; a pure function of the arguments.
  """
  if min(num_examples, num_partitions, batch_per_partition) < 1 or min(seed, step) < 0:
    raise ValueError(
      f"need positive num_examples/num_partitions/batch_per_partition and non-negative "
      f"seed/step, got {num_examples=}, {num_partitions=}, {batch_per_partition=}, {seed=}, "
      f"{step=}"
    )
  num_per_step = num_partitions * batch_per_partition
  position_T = step * num_per_step + np.arange(num_per_step, dtype=np.int64)
  epoch_T, offset_T = np.divmod(position_T, num_examples)
  index_T = np.empty(num_per_step, dtype=np.int64)
  for epoch in np.unique(epoch_T):
    in_epoch_T = epoch_T == epoch
    index_T[in_epoch_T] = _epoch_permutation(num_examples, seed, int(epoch))[offset_T[in_epoch_T]]
  return index_T.reshape(num_partitions, batch_per_partition)


def partition_batch(
  dataset: Dataset, *, num_partitions: int, batch_per_partition: int, seed: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
  """The normalised examples of one training step, one row per partition.

  Args:
    dataset: the training split.
    num_partitions: K, the number of gradient partitions (= workers).
    batch_per_partition: B, examples per partition.
    seed: data-order seed.
    step: training step; the order is that of :func:`partition_indices`.

  Returns:
    ``(x_KxBxHxWxC, y_KxB)``: float32 normalised images and int32 labels (numpy, host).
  """
  index_KxB = partition_indices(
    dataset.num_examples,
    num_partitions=num_partitions,
    batch_per_partition=batch_per_partition,
    seed=seed,
    step=step,
  )
  return dataset.normalize(dataset.images[index_KxB]), dataset.labels[index_KxB]


def eval_batches(
  dataset: Dataset, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Every example once, in order, in batches of a fixed shape.

  The last batch is padded to ``batch_size`` (zero images, label 0) so a jitted evaluation
  compiles once; the mask marks the real examples. Accuracy = sum(mask * correct) / N.

  Args:
    dataset: the split to evaluate.
    batch_size: examples per batch.

  Yields:
    ``(x_BxHxWxC, y_B, mask_B)``: float32 normalised images, int32 labels, bool mask.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  for start in range(0, dataset.num_examples, batch_size):
    images = dataset.images[start : start + batch_size]
    labels = dataset.labels[start : start + batch_size]
    num_pad = batch_size - labels.shape[0]
    mask_B = np.arange(batch_size) < labels.shape[0]
    images = np.concatenate([images, np.zeros((num_pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros((num_pad,), labels.dtype)])
    yield dataset.normalize(images), labels, mask_B


def flip_labels(y_KxB: jax.Array, partition_mask_K: jax.Array, num_classes: int) -> jax.Array:
  """Label-flipping data attack: ``y -> num_classes - 1 - y`` on the controlled partitions.

  Pure jnp, so it runs inside jit; changing the mask never recompiles.

  Args:
    y_KxB: int labels of the K partitions.
    partition_mask_K: bool, True where the adversary controls the partition's data.
    num_classes: number of classes.

  Returns:
    Labels of the same shape and dtype, flipped on the masked rows only.
  """
  y_KxB = jnp.asarray(y_KxB)
  flipped_KxB = (num_classes - 1 - y_KxB).astype(y_KxB.dtype)
  return jnp.where(jnp.asarray(partition_mask_K, bool)[:, None], flipped_KxB, y_KxB)
