"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 from their canonical archives, without TensorFlow.

On first use :func:`prepare` downloads a dataset's archives (:data:`SOURCES`: the same URLs,
sizes and SHA-256 checksums as tensorflow-datasets 4.9.10's ``url_checksums``), verifies them,
parses them with numpy (IDX gz files for MNIST and Fashion-MNIST, the CIFAR binary batches
inside the tar.gz) and writes one ``NAME.npz``; later runs read only that file. Files live in::

    DATA_DIR/draco_jax/NAME/   the archives, as downloaded, and NAME.npz

with ``DATA_DIR`` the ``data_dir`` argument, else :func:`default_data_dir` (``$TFDS_DATA_DIR``,
else ``$XDG_CACHE_HOME/draco_jax``, else ``~/.cache/draco_jax``).

Nothing unverified is ever trusted: a download goes to a temporary ``.part`` name and is renamed
only once its size and SHA-256 match; a mismatching file is deleted and the error says so; the
``.npz`` is written the same way and records the checksums of the archives it came from. An
archive placed in the directory by hand (a machine without network access) is used after the same
check. Setting ``DRACO_JAX_OFFLINE=1`` forbids downloads (the tests set it); a dataset that
cannot be downloaded raises :class:`DownloadError` naming the URLs, file names, sizes, checksums
and the directory to place the files in.

Arrays match the tensorflow-datasets builders: uint8 images [N, H, W, C] (28x28x1 or 32x32x3),
int32 labels in ``[0, num_classes)`` (CIFAR-100: the 100 fine labels).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import tarfile
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from http.client import HTTPException
from typing import BinaryIO, NamedTuple

import numpy as np
from absl import logging

__all__ = [
  "Archive",
  "Source",
  "SOURCES",
  "OFFLINE_ENV",
  "DownloadError",
  "default_data_dir",
  "dataset_dir",
  "prepare",
  "load",
]

OFFLINE_ENV = "DRACO_JAX_OFFLINE"
_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20
_SPLIT_KEYS = ("train_images", "train_labels", "test_images", "test_labels")

Splits = dict[str, np.ndarray]


class Archive(NamedTuple):
  """One file to download: where from, and its exact size and SHA-256 (hex)."""

  url: str
  num_bytes: int
  sha256: str

  @property
  def filename(self) -> str:
    return os.path.basename(urllib.parse.urlparse(self.url).path)


class Source(NamedTuple):
  """A dataset's archives and ``parse(paths) -> Splits`` (paths in archive order)."""

  archives: tuple[Archive, ...]
  parse: Callable[[Sequence[str]], Splits]


class DownloadError(OSError):
  """A dataset's archives are neither in its directory nor downloadable (one-line message)."""


def _read_idx(path: str) -> np.ndarray:
  """An IDX file of unsigned bytes (gzip): 2 zero bytes, 0x08, ndim, big-endian uint32 dims."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[:3] != b"\0\0\x08":
    raise ValueError(f"{path} is not an IDX file of unsigned bytes")
  ndim = raw[3]
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if body.size != np.prod(shape):
    raise ValueError(f"{path}: header says {shape}, body holds {body.size} bytes")
  return body.reshape(shape)


def _parse_idx(paths: Sequence[str]) -> Splits:
  """MNIST-format files: train images, train labels, test images, test labels."""
  images_train, labels_train, images_test, labels_test = (_read_idx(p) for p in paths)
  return {
    "train_images": images_train[..., None],
    "train_labels": labels_train.astype(np.int32),
    "test_images": images_test[..., None],
    "test_labels": labels_test.astype(np.int32),
  }


def _read_cifar(tar: tarfile.TarFile, member: str, label_index: int, num_label_bytes: int):
  """One CIFAR binary batch: records of label byte(s) then a 3x32x32 channel-major image."""
  try:
    raw = np.frombuffer(tar.extractfile(member).read(), np.uint8)
  except (KeyError, AttributeError):
    raise ValueError(f"{tar.name} holds no file {member}") from None
  record_bytes = num_label_bytes + 3 * 32 * 32
  if raw.size % record_bytes:
    raise ValueError(f"{tar.name}:{member} is not a whole number of {record_bytes}-byte records")
  rows = raw.reshape(-1, record_bytes)
  images_NxHxWxC = rows[:, num_label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images_NxHxWxC), rows[:, label_index].astype(np.int32)


def _parse_cifar(
  paths: Sequence[str],
  *,
  train: Sequence[str],
  test: Sequence[str],
  label_index: int = 0,
  num_label_bytes: int = 1,
) -> Splits:
  """The CIFAR binary tar.gz: train and test batches read in order, never extracted to disk."""
  (path,) = paths
  splits = {}
  with tarfile.open(path, "r:gz") as tar:
    for split, members in (("train", train), ("test", test)):
      parts = [_read_cifar(tar, m, label_index, num_label_bytes) for m in members]
      splits[f"{split}_images"] = np.concatenate([images for images, _ in parts])
      splits[f"{split}_labels"] = np.concatenate([labels for _, labels in parts])
  return splits


def _idx_source(base_url: str, sizes_and_sha256: Sequence[tuple[int, str]]) -> Source:
  names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte")
  urls = [f"{base_url}{name}.gz" for name in (*names, "t10k-labels-idx1-ubyte")]
  return Source(tuple(Archive(u, *s) for u, s in zip(urls, sizes_and_sha256)), _parse_idx)


_CIFAR10_BATCHES = tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6))

# From tensorflow_datasets/url_checksums/{mnist,fashion_mnist,cifar10,cifar100}.txt (4.9.10).
SOURCES: dict[str, Source] = {
  "mnist": _idx_source(
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    [
      (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
      (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
      (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
      (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ],
  ),
  "fashion_mnist": _idx_source(
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    [
      (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
      (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
      (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
      (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    ],
  ),
  "cifar10": Source(
    (
      Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        170052171,
        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
      ),
    ),
    functools.partial(
      _parse_cifar, train=_CIFAR10_BATCHES, test=("cifar-10-batches-bin/test_batch.bin",)
    ),
  ),
  "cifar100": Source(
    (
      Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        168513733,
        "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
      ),
    ),
    functools.partial(  # records: coarse label, fine label, image; tfds's "label" is the fine one
      _parse_cifar,
      train=("cifar-100-binary/train.bin",),
      test=("cifar-100-binary/test.bin",),
      label_index=1,
      num_label_bytes=2,
    ),
  ),
}


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR``, else ``$XDG_CACHE_HOME/draco_jax``, else ``~/.cache/draco_jax``."""
  if os.environ.get("TFDS_DATA_DIR"):
    return os.environ["TFDS_DATA_DIR"]
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "draco_jax")


def _source(name: str) -> Source:
  if name not in SOURCES:
    raise ValueError(f"no download source for dataset {name!r}; valid: {sorted(SOURCES)}")
  return SOURCES[name]


def dataset_dir(name: str, data_dir: str | None = None) -> str:
  """The directory holding dataset ``name``'s archives and ``NAME.npz``."""
  _source(name)
  return os.path.join(os.path.expanduser(data_dir or default_data_dir()), "draco_jax", name)


def _offline() -> bool:
  return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _by_hand(name: str, source: Source, directory: str) -> str:
  """The sentence telling a user which files to place where."""
  files = "; ".join(
    f"{a.filename} ({a.num_bytes} bytes, sha256 {a.sha256}) from {a.url}" for a in source.archives
  )
  return f"To install {name!r} by hand, place these files in {directory}: {files}"


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def _mismatch(archive: Archive, num_bytes: int, sha256: str) -> str | None:
  """Why a file of ``num_bytes`` bytes and digest ``sha256`` is not ``archive`` (None: it is)."""
  if num_bytes != archive.num_bytes:
    return f"{num_bytes} bytes, expected {archive.num_bytes}"
  if sha256 != archive.sha256:
    return f"sha256 {sha256}, expected {archive.sha256}"
  return None


@contextlib.contextmanager
def _atomic_write(path: str) -> Iterator[BinaryIO]:
  """A new temporary file next to ``path``, renamed to ``path`` only if the block succeeds."""
  part = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
  try:
    with open(part, "xb") as f:
      yield f
    os.replace(part, path)
  finally:
    if os.path.exists(part):
      os.remove(part)


def _download(archive: Archive, path: str) -> None:
  """Streams ``archive.url`` into ``path``, hashing as it goes; keeps it only if it matches."""
  from tqdm.auto import tqdm  # lazy: only a download needs it

  digest = hashlib.sha256()
  with (
    _atomic_write(path) as f,
    urllib.request.urlopen(archive.url, timeout=_TIMEOUT_S) as response,
    tqdm(
      total=archive.num_bytes, unit="B", unit_scale=True, desc=archive.filename, disable=None
    ) as bar,
  ):
    while chunk := response.read(_CHUNK_BYTES):
      f.write(chunk)
      digest.update(chunk)
      bar.update(len(chunk))
    if problem := _mismatch(archive, f.tell(), digest.hexdigest()):
      raise DownloadError(f"downloaded {archive.url} but got {problem}; deleted the file")


def _fetch(name: str, source: Source, archive: Archive, directory: str) -> str:
  """The verified local copy of ``archive``: the one in ``directory``, else a fresh download."""
  path = os.path.join(directory, archive.filename)
  deleted = ""
  if os.path.exists(path):
    problem = _mismatch(archive, os.path.getsize(path), _sha256(path))
    if problem is None:
      return path
    os.remove(path)
    deleted = f" (deleted the copy there: {problem})"
    logging.warning("deleted %s: %s", path, problem)
  if _offline():
    raise DownloadError(
      f"dataset {name!r} is not available: {archive.filename} is not in {directory}{deleted} "
      f"and downloads are off ({OFFLINE_ENV}={os.environ[OFFLINE_ENV]}; it would fetch "
      f"{archive.url}). " + _by_hand(name, source, directory)
    )
  os.makedirs(directory, exist_ok=True)
  try:
    _download(archive, path)
  except DownloadError as err:
    raise DownloadError(
      f"dataset {name!r} is not available: {err}. {_by_hand(name, source, directory)}"
    ) from err
  except (OSError, HTTPException) as err:  # URLError, timeouts, resets, truncated responses
    raise DownloadError(
      f"dataset {name!r} is not available: downloading {archive.url} failed "
      f"({type(err).__name__}: {err}). " + _by_hand(name, source, directory)
    ) from err
  return path


def _npz_path(name: str, data_dir: str | None) -> str:
  return os.path.join(dataset_dir(name, data_dir), f"{name}.npz")


def _is_current(path: str, source: Source) -> bool:
  """The ``.npz`` at ``path`` opens and was made from exactly ``source``'s archives."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return set(_SPLIT_KEYS) <= set(npz.files) and list(npz["sha256"]) == [
        a.sha256 for a in source.archives
      ]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing or truncated
    return False


def _write_npz(path: str, splits: Splits, source: Source) -> None:
  with _atomic_write(path) as f:
    np.savez(f, sha256=np.asarray([a.sha256 for a in source.archives]), **splits)


def prepare(name: str, data_dir: str | None = None) -> str:
  """Makes dataset ``name`` ready: downloads and verifies its archives, then writes ``NAME.npz``.

  Does nothing (reads one small array) when a current ``NAME.npz`` exists.

  Args:
    name: a key of :data:`SOURCES`.
    data_dir: the data directory (:func:`default_data_dir` when None).

  Returns:
    The path of ``NAME.npz``.

  Raises:
    ValueError: no source for ``name``, or an archive with the right checksum that does not
      parse.
    DownloadError: an archive is missing and cannot be downloaded, or its download does not
      match its size and SHA-256 (the file is deleted).
  """
  source = _source(name)
  path = _npz_path(name, data_dir)
  if _is_current(path, source):
    return path
  directory = dataset_dir(name, data_dir)
  paths = [_fetch(name, source, archive, directory) for archive in source.archives]
  splits = source.parse(paths)
  for split in ("train", "test"):
    images, labels = splits[f"{split}_images"], splits[f"{split}_labels"]
    if images.ndim != 4 or labels.shape != images.shape[:1]:
      raise ValueError(f"{name} {split}: images {images.shape} and labels {labels.shape}")
  _write_npz(path, splits, source)
  return path


def load(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(images_NxHxWxC uint8, labels_N int32)`` of one split, prepared first if needed."""
  with np.load(prepare(name, data_dir), allow_pickle=False) as npz:
    return npz[f"{split}_images"], npz[f"{split}_labels"]
