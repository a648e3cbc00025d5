"""Tests for draco_jax.downloads: the real download code against a local HTTP server.

Every dataset is served by an ``http.server`` on 127.0.0.1 (port 0, a thread, shut down after each
test and by a watchdog) as small archives in the exact on-disk formats (IDX gz files; the CIFAR
binary tar.gz), with the registry's URLs, sizes and SHA-256 pointed at them. Any connection to
another address fails the test.
"""

import dataclasses
import gzip
import hashlib
import http.server
import io
import pathlib
import socket
import tarfile
import threading
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow_datasets as tfds

from draco_jax import data, downloads, train
from draco_jax.config import TrainConfig

NUM_TRAIN, NUM_TEST = 25, 12
# name: (H, W, C, num_classes)
SHAPES = {
  "mnist": (28, 28, 1, 10),
  "fashion_mnist": (28, 28, 1, 10),
  "cifar10": (32, 32, 3, 10),
  "cifar100": (32, 32, 3, 100),
}
_CIFAR10_BIN = "cifar-10-batches-bin/"


def _idx(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def _cifar_records(images_NxHxWxC: np.ndarray, labels_NxL: np.ndarray) -> bytes:
  """Label byte(s), then the image channel-major (R plane, G plane, B plane), per record."""
  planes = images_NxHxWxC.transpose(0, 3, 1, 2).reshape(len(images_NxHxWxC), -1)
  return np.concatenate([labels_NxL.astype(np.uint8), planes], axis=1).tobytes()


def _tar_gz(members: dict[str, bytes]) -> bytes:
  """The same bytes on every call (gzip's header time fixed), so checksums hold."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    for member, payload in members.items():
      info = tarfile.TarInfo(member)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return gzip.compress(buffer.getvalue(), mtime=0)


def _fake(name: str, seed: int = 0):
  """``(files {filename: bytes}, expected {split: (images, labels)})`` for one dataset."""
  height, width, channels, num_classes = SHAPES[name]
  rng = np.random.default_rng((seed, len(name)))
  expected = {}
  for split, n in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    images = rng.integers(0, 256, (n, height, width, channels), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int32) * 7 % num_classes  # every class id up to n
    expected[split] = (images, labels)
  (train_x, train_y), (test_x, test_y) = expected["train"], expected["test"]
  if name in ("mnist", "fashion_mnist"):
    files = {
      "train-images-idx3-ubyte.gz": _idx(train_x[..., 0]),
      "train-labels-idx1-ubyte.gz": _idx(train_y),
      "t10k-images-idx3-ubyte.gz": _idx(test_x[..., 0]),
      "t10k-labels-idx1-ubyte.gz": _idx(test_y),
    }
  elif name == "cifar10":  # the train split spread over 5 batches of unequal size
    cuts = np.array_split(np.arange(NUM_TRAIN), 5)
    members = {
      f"{_CIFAR10_BIN}data_batch_{i + 1}.bin": _cifar_records(train_x[c], train_y[c, None])
      for i, c in enumerate(cuts)
    }
    members[f"{_CIFAR10_BIN}test_batch.bin"] = _cifar_records(test_x, test_y[:, None])
    members[f"{_CIFAR10_BIN}batches.meta.txt"] = b"airplane\nautomobile\n"
    files = {"cifar-10-binary.tar.gz": _tar_gz(members)}
  else:  # cifar100: coarse label, then fine label; the coarse one differs from the fine one
    coarse = lambda y: (y // 5 + 1) % 20  # noqa: E731
    members = {
      f"cifar-100-binary/{split}.bin": _cifar_records(x, np.stack([coarse(y), y], 1))
      for split, (x, y) in expected.items()
    }
    files = {"cifar-100-binary.tar.gz": _tar_gz(members)}
  return files, expected


@dataclasses.dataclass
class Server:
  """The local HTTP server: files by URL path, the paths requested, and fault injection."""

  files: dict[str, bytes]
  requests: list[str] = dataclasses.field(default_factory=list)
  truncate: bool = False  # send the full Content-Length but only half of the body, then close
  port: int = 0

  def url(self, path: str) -> str:
    return f"http://127.0.0.1:{self.port}{path}"


def _start(server: Server) -> Callable[[], None]:
  """Serves ``server`` from a thread on a free port; returns the function that stops it."""

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      server.requests.append(self.path)
      body = server.files.get(self.path)
      if body is None:
        self.send_error(404)
        return
      self.send_response(200)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body[: len(body) // 2] if server.truncate else body)
      self.close_connection = True

    def log_message(self, *args):
      pass

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  httpd.daemon_threads = True
  server.port = httpd.server_address[1]
  threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
  watchdog = threading.Timer(120, httpd.shutdown)  # stops by itself even if a test hangs
  watchdog.daemon = True
  watchdog.start()

  def stop() -> None:
    watchdog.cancel()
    httpd.shutdown()
    httpd.server_close()

  return stop


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
  """Downloads on (conftest.py turns them off), and only to 127.0.0.1."""
  real_connect = socket.socket.connect

  def connect(sock, address):
    assert address[0] == "127.0.0.1", f"network access attempted: {address}"
    return real_connect(sock, address)

  monkeypatch.setattr(socket.socket, "connect", connect)
  monkeypatch.delenv(downloads.OFFLINE_ENV, raising=False)


@pytest.fixture
def served(monkeypatch):
  """Serves every fake dataset and points the registry at it; yields (server, expected)."""
  server, expected = Server({}), {}
  stop = _start(server)
  for name in SHAPES:
    files, expected[name] = _fake(name)
    archives = []
    for filename, payload in files.items():
      server.files[f"/{name}/{filename}"] = payload
      digest = hashlib.sha256(payload).hexdigest()
      archives.append(downloads.Archive(server.url(f"/{name}/{filename}"), len(payload), digest))
    source = downloads.SOURCES[name]
    assert [a.filename for a in archives] == [a.filename for a in source.archives]
    monkeypatch.setitem(downloads.SOURCES, name, source._replace(archives=tuple(archives)))
  yield server, expected
  stop()


def _archives(name: str) -> tuple[downloads.Archive, ...]:
  return downloads.SOURCES[name].archives


def _files(directory) -> list[str]:
  """Every file left under ``directory`` (names only), sorted."""
  return sorted(p.name for p in pathlib.Path(directory).rglob("*") if p.is_file())


def test_registry_matches_the_checksums_tensorflow_datasets_ships():
  """URLs, sizes and SHA-256 are those of the installed tfds's url_checksums files."""
  checksums = pathlib.Path(tfds.__file__).parent / "url_checksums"
  for name, source in downloads.SOURCES.items():
    rows = [line.split("\t") for line in (checksums / f"{name}.txt").read_text().splitlines()]
    shipped = {url: (int(size), sha) for url, size, sha, *_ in rows}
    assert {a.url: (a.num_bytes, a.sha256) for a in source.archives} == shipped
  assert set(downloads.SOURCES) <= set(data.DATASETS)


@pytest.mark.parametrize("name", list(SHAPES))
def test_first_use_downloads_and_prepares_then_no_network(name, served, tmp_path):
  server, expected = served
  data.check_available(name, data_dir=str(tmp_path))  # downloads and prepares
  archives = downloads.SOURCES[name].archives
  assert server.requests == [f"/{name}/{a.filename}" for a in archives]
  directory = downloads.dataset_dir(name, str(tmp_path))
  assert _files(directory) == sorted([f"{name}.npz", *(a.filename for a in archives)])
  server.files.clear()  # the next run must not need the server
  height, width, channels, num_classes = SHAPES[name]
  for split, (images, labels) in expected[name].items():
    dataset = data.load_dataset(name, split, data_dir=str(tmp_path))
    assert dataset.images.dtype == np.uint8 and dataset.labels.dtype == np.int32
    assert dataset.input_shape == (height, width, channels) and dataset.num_classes == num_classes
    np.testing.assert_array_equal(dataset.images, images)
    np.testing.assert_array_equal(dataset.labels, labels)
    assert 0 <= dataset.labels.min() and dataset.labels.max() < num_classes
  data.check_available(name, data_dir=str(tmp_path))
  assert len(server.requests) == len(archives)
  # Normalisation: the documented train statistics, channel by channel, float32.
  x = dataset.normalize(dataset.images)
  spec = data.DATASETS[name]
  assert x.dtype == np.float32 and x.shape == dataset.images.shape
  for c in range(channels):
    reference = (dataset.images[..., c] / 255.0 - spec.mean_C[c]) / spec.std_C[c]
    np.testing.assert_allclose(x[..., c], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SHAPES))
def test_same_shapes_and_dtypes_as_the_tfds_path(name, served, tmp_path):
  downloaded = data.load_dataset(name, "test", data_dir=str(tmp_path / "downloaded"))
  with tfds.testing.mock_data(num_examples=4):
    prepared = data.load_dataset(name, "test", data_dir=str(tmp_path / "tfds"))
  assert downloaded.input_shape == prepared.input_shape
  assert downloaded.images.dtype == prepared.images.dtype
  assert downloaded.labels.dtype == prepared.labels.dtype
  assert downloaded.num_classes == prepared.num_classes


def _corrupt(server: Server, name: str) -> None:
  for path, payload in server.files.items():
    if path.startswith(f"/{name}/"):
      server.files[path] = bytes([payload[0] ^ 1]) + payload[1:]  # same size, other bytes


@pytest.mark.parametrize("fault", ["corrupted", "truncated"])
def test_bad_download_is_refused_and_nothing_is_trusted(fault, served, tmp_path):
  server, expected = served
  name = "cifar10"
  if fault == "corrupted":
    _corrupt(server, name)
  server.truncate = fault == "truncated"
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.check_available(name, data_dir=str(tmp_path))
  message = str(info.value)
  assert "deleted the file" in message and "cifar-10-binary.tar.gz" in message
  if fault == "corrupted":
    assert f"sha256 {downloads.SOURCES[name].archives[0].sha256}" in message
  else:
    size = downloads.SOURCES[name].archives[0].num_bytes
    assert f"got {size // 2} bytes, expected {size}" in message
  assert _files(tmp_path) == []  # no archive, no .npz, no .part left behind
  files, _ = _fake(name)  # a later run with a good server recovers
  server.files[f"/{name}/cifar-10-binary.tar.gz"] = files["cifar-10-binary.tar.gz"]
  server.truncate = False
  dataset = data.load_dataset(name, "train", data_dir=str(tmp_path))
  np.testing.assert_array_equal(dataset.labels, expected[name]["train"][1])


def _dead_port() -> int:
  """A 127.0.0.1 port on which nothing listens (bound, never listened on, closed)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.parametrize("offline", [False, True])
def test_unreachable_server_names_urls_files_checksums_and_directory(
  offline, served, tmp_path, monkeypatch
):
  server, _ = served
  name = "mnist"
  if offline:
    monkeypatch.setenv(downloads.OFFLINE_ENV, "1")
  else:  # the server is down: every URL points at a port on which nothing listens
    port = f":{_dead_port()}/"
    moved = [a._replace(url=a.url.replace(f":{server.port}/", port)) for a in _archives(name)]
    monkeypatch.setitem(downloads.SOURCES, name, downloads.SOURCES[name]._replace(archives=moved))
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.check_available(name, data_dir=str(tmp_path))
  message = str(info.value)
  assert "\n" not in message and message.startswith(f"dataset {name!r} is not available")
  assert f"place these files in {tmp_path / 'draco_jax' / name}: " in message
  for archive in _archives(name):
    assert f"{archive.filename} ({archive.num_bytes} bytes, sha256 {archive.sha256})" in message
    assert archive.url in message
  assert ("downloads are off" in message) == offline
  assert ("Connection refused" in message) != offline
  assert "`tfds build mnist --file_format=array_record" in message
  assert server.requests == [] and _files(tmp_path) == []


def test_files_placed_by_hand_are_used_offline_and_bad_ones_replaced(served, tmp_path, monkeypatch):
  server, expected = served
  name = "fashion_mnist"
  directory = pathlib.Path(downloads.dataset_dir(name, str(tmp_path)))
  directory.mkdir(parents=True)
  for archive in _archives(name):
    (directory / archive.filename).write_bytes(server.files[f"/{name}/{archive.filename}"])
  (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the file")
  with monkeypatch.context() as offline:
    offline.setenv(downloads.OFFLINE_ENV, "1")
    with pytest.raises(data.DatasetNotPreparedError) as info:
      data.check_available(name, data_dir=str(tmp_path))  # the bad file is deleted
  assert f"t10k-labels-idx1-ubyte.gz is not in {directory} (deleted the copy there: 12 bytes" in (
    str(info.value)
  )
  assert "t10k-labels-idx1-ubyte.gz" not in _files(directory) and server.requests == []
  data.check_available(name, data_dir=str(tmp_path))  # online: only the missing file is fetched
  assert server.requests == [f"/{name}/t10k-labels-idx1-ubyte.gz"]
  test = data.load_dataset(name, "test", data_dir=str(tmp_path))
  np.testing.assert_array_equal(test.labels, expected[name]["test"][1])


def test_broken_or_stale_npz_is_rebuilt_from_the_verified_archives(served, tmp_path, monkeypatch):
  server, expected = served
  name = "mnist"
  path = downloads.prepare(name, str(tmp_path))
  pathlib.Path(path).write_bytes(pathlib.Path(path).read_bytes()[:1000])  # truncated
  assert downloads.prepare(name, str(tmp_path)) == path
  images, _ = downloads.load(name, "train", str(tmp_path))
  np.testing.assert_array_equal(images, expected[name]["train"][0])
  # An archive with another checksum (a new release) makes the old .npz stale.
  (archive, *rest) = _archives(name)
  newer = archive._replace(sha256="0" * 64)
  monkeypatch.setitem(
    downloads.SOURCES, name, downloads.SOURCES[name]._replace(archives=(newer, *rest))
  )
  with pytest.raises(downloads.DownloadError, match=f"got sha256 {archive.sha256}"):
    downloads.prepare(name, str(tmp_path))
  assert len(server.requests) == 5  # 4 first, then the archive whose checksum changed


def test_default_data_dir_follows_tfds_then_xdg_then_home(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  assert downloads.default_data_dir() == str(tmp_path / "tfds")
  monkeypatch.delenv("TFDS_DATA_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert downloads.default_data_dir() == str(tmp_path / "xdg" / "draco_jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert downloads.default_data_dir() == str(tmp_path / "home" / ".cache" / "draco_jax")
  assert downloads.dataset_dir("cifar10") == str(
    tmp_path / "home" / ".cache" / "draco_jax" / "draco_jax" / "cifar10"
  )
  with pytest.raises(ValueError, match="no download source for dataset 'digits'"):
    downloads.dataset_dir("digits")


@pytest.mark.parametrize("name", list(SHAPES))
def test_train_and_evaluate_on_a_downloaded_dataset(name, served, tmp_path):
  server, _ = served
  config = TrainConfig(
    dataset=name,
    data_dir=str(tmp_path / "data"),
    model_options={"hidden": (8,)},
    num_workers=3,
    num_adversaries=1,
    batch_per_partition=2,
    steps=2,
    eval_every=2,
    num_devices=1,
    timing=False,
  )
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert len(server.requests) == len(_archives(name))
  assert 0.0 <= results["test_accuracy"] <= 1.0 and results["skipped_steps"] == 0
