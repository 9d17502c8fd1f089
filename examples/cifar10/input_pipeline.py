"""CIFAR-10 on the device: loading, class-balanced subsets, augmentation and normalization in JAX.

The arrays come from ``cifar10.npz`` (``x_train`` (50000, 32, 32, 3) uint8, ``y_train`` (50000,),
``x_test`` (10000, 32, 32, 3) uint8, ``y_test`` (10000,)) found in, in this order, the ``data_dir``
argument, ``$PADAM_DATA_DIR``, or the cache folder (``$PADAM_CACHE_DIR``, else
``~/.cache/padam_jax``), where it is made once from the official CIFAR-10 python archive,
downloaded and checked against its published md5.

Augmentation is the reference's: a random 32x32 crop of the image zero-padded by 4 pixels on each
side, then a horizontal flip with probability 1/2, both in pixel space before normalization with
the reference's mean and std.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pickle
import tarfile
import tempfile
import urllib.request
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NPZ_NAME = "cifar10.npz"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
# The normalization constants of the authors' reference PyTorch code.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
PAD = 4
NUM_CLASSES = 10
TRAIN_IMAGES = 50_000  # CIFAR-10's training and test sets
TEST_IMAGES = 10_000
_SHAPES = {"x_train": (32, 32, 3), "x_test": (32, 32, 3)}


class DataError(RuntimeError):
  """The CIFAR-10 data is missing, unreadable or malformed; the message says how to fix it."""


class Split(NamedTuple):
  images: np.ndarray  # (n, 32, 32, 3) uint8
  labels: np.ndarray  # (n,) int32


def cache_dir() -> pathlib.Path:
  return pathlib.Path(
    os.environ.get("PADAM_CACHE_DIR", pathlib.Path.home() / ".cache" / "padam_jax")
  )


def resolve_data_file(data_dir: str | os.PathLike | None, *, download: bool = True) -> pathlib.Path:
  """Finds ``cifar10.npz``: in ``data_dir``, else ``$PADAM_DATA_DIR``, else the cache (downloaded).

  Args:
    data_dir: a folder holding ``cifar10.npz``, or None.
    download: whether, with neither a folder nor ``$PADAM_DATA_DIR``, to fetch the official archive
      into the cache when it is not there yet.

  Returns:
    The path of ``cifar10.npz``.

  Raises:
    DataError: when the file is not where it was looked for.
  """
  for source, folder in (
    ("--data-dir", data_dir),
    ("$PADAM_DATA_DIR", os.environ.get("PADAM_DATA_DIR")),
  ):
    if folder:
      path = pathlib.Path(folder).expanduser() / NPZ_NAME
      if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(
          f"CIFAR-10 not found: {source} is {folder!r} but {path} {what}. Point {source} "
          f"at a folder holding {NPZ_NAME} (arrays x_train, y_train, x_test, y_test), or leave "
          f"both --data-dir and $PADAM_DATA_DIR unset to download the official archive into "
          f"{cache_dir()}."
        )
      return path
  path = cache_dir() / NPZ_NAME
  if not path.is_file():
    if not download:
      raise DataError(f"CIFAR-10 not found at {path} and downloading is off.")
    download_and_convert(path)
  return path


def download_and_convert(
  npz_path: pathlib.Path, url: str | None = None, md5: str | None = None
) -> None:
  """Downloads the official python archive, checks its md5 and converts it to ``npz_path`` once."""
  url = ARCHIVE_URL if url is None else url
  md5 = ARCHIVE_MD5 if md5 is None else md5
  npz_path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=npz_path.parent) as tmp:
    archive = pathlib.Path(tmp) / "cifar-10-python.tar.gz"
    print(f"Downloading {url} to {archive} ...", flush=True)
    try:
      urllib.request.urlretrieve(url, archive)
    except OSError as e:
      raise DataError(
        f"could not download CIFAR-10 from {url} ({e}). Download cifar-10-python.tar.gz by hand "
        f"and run `python -m examples.cifar10.input_pipeline ARCHIVE DIR`, then pass --data-dir "
        f"DIR, or pass --data-dir pointing at a folder that already holds {NPZ_NAME}."
      ) from e
    convert_archive(archive, npz_path, md5=md5)


def _md5(path: pathlib.Path) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def convert_archive(
  archive: str | os.PathLike, npz_path: str | os.PathLike, *, md5: str | None = ARCHIVE_MD5
) -> None:
  """Converts the official ``cifar-10-python.tar.gz`` (pickled batches) to ``cifar10.npz``.

  The pickles hold ``data`` as (n, 3072) uint8 rows of 1024 red, 1024 green and 1024 blue values and
  ``labels`` as a list; batches ``data_batch_1`` to ``data_batch_5`` make the training split, in that
  order, ``test_batch`` the test split. The file is written to a temporary name and renamed, so an
  interrupted conversion never leaves a partial ``npz_path``.

  Args:
    archive: path of the tar.gz archive.
    npz_path: where to write the arrays.
    md5: the archive's expected md5 (the official one by default), or None to skip the check.

  Raises:
    DataError: on a checksum mismatch or an archive without the expected members.
  """
  archive, npz_path = pathlib.Path(archive), pathlib.Path(npz_path)
  if md5 is not None and (actual := _md5(archive)) != md5:
    raise DataError(
      f"{archive} has md5 {actual}, expected {md5}: the download is corrupt or not the official archive; delete it and retry."
    )
  batches = {}
  try:
    with tarfile.open(archive, "r:gz") as tar:
      for member in tar.getmembers():
        name = pathlib.PurePosixPath(member.name).name
        if member.isfile() and (name.startswith("data_batch_") or name == "test_batch"):
          batches[name] = pickle.load(tar.extractfile(member), encoding="bytes")
  except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as e:
    raise DataError(f"{archive} is not a readable CIFAR-10 python archive: {e}") from e
  expected = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  if missing := [name for name in expected if name not in batches]:
    raise DataError(f"{archive} lacks the batches {missing}; is it cifar-10-python.tar.gz?")

  def arrays(names):
    data = np.concatenate([np.asarray(batches[n][b"data"], np.uint8) for n in names])
    labels = np.concatenate([np.asarray(batches[n][b"labels"], np.int64) for n in names])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

  x_train, y_train = arrays(expected[:5])
  x_test, y_test = arrays(expected[5:])
  class_names = np.array(
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
  )
  npz_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = npz_path.with_name(npz_path.name + ".partial")
  with open(tmp, "wb") as f:
    np.savez_compressed(
      f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=class_names
    )
  os.replace(tmp, npz_path)


def load_npz(path: str | os.PathLike) -> tuple[Split, Split]:
  """Reads and checks ``cifar10.npz``; returns the train and test splits.

  Raises:
    DataError: when the file is unreadable, lacks a key, or holds arrays of the wrong shape, dtype
      or label range; the message names the file and the problem.
  """
  path = pathlib.Path(path)
  fix = f"Replace {path} with a good copy (or delete it if it is the download cache)."
  try:
    # Opened here, not by np.load, so that the file is closed even when it is not a zip archive.
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
      missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data.files]
      if missing:
        raise DataError(f"{path} lacks the arrays {missing} (it has {data.files}). {fix}")
      arrays = {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")}
  except DataError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation) as e:
    raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}). {fix}") from e
  splits = []
  for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
    x, y = arrays[x_key], arrays[y_key]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != _SHAPES[x_key]:
      raise DataError(
        f"{path}: {x_key} should be uint8 of shape (n, 32, 32, 3), got {x.dtype} {x.shape}. {fix}"
      )
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
      raise DataError(
        f"{path}: {y_key} should be integer labels of shape ({x.shape[0]},), got {y.dtype} {y.shape}. {fix}"
      )
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
      raise DataError(f"{path}: {y_key} has labels outside 0..9 ({y.min()}..{y.max()}). {fix}")
    splits.append(Split(x, y.astype(np.int32)))
  return splits[0], splits[1]


def balanced_subset(split: Split, size: int | None, seed: int) -> Split:
  """A fixed, seeded, class-balanced subset of ``size`` examples, in the split's original order.

  Each class gets ``size // 10`` examples, and the first ``size % 10`` classes one more. ``None``
  or the split's full size returns the split unchanged.

  Raises:
    ValueError: if a class has fewer examples than its share.
  """
  n = split.labels.shape[0]
  if size is None or size == n:
    return split
  if not 0 < size <= n:
    raise ValueError(f"subset size must be in 1..{n}, got {size}")
  rng = np.random.default_rng(seed)
  chosen = []
  for label in range(NUM_CLASSES):
    members = np.flatnonzero(split.labels == label)
    share = size // NUM_CLASSES + (label < size % NUM_CLASSES)
    if share > members.size:
      raise ValueError(
        f"class {label} has {members.size} examples, fewer than the {share} asked for"
      )
    chosen.append(rng.choice(members, share, replace=False))
  index = np.sort(np.concatenate(chosen))
  return Split(split.images[index], split.labels[index])


def load(
  data_dir: str | os.PathLike | None,
  train_size: int | None = None,
  test_size: int | None = None,
  seed: int = 0,
) -> tuple[Split, Split]:
  """The train and test splits (optionally class-balanced subsets), as NumPy arrays."""
  train, test = load_npz(resolve_data_file(data_dir))
  # Different seeds for the two splits so a subset of one says nothing about the other.
  return balanced_subset(train, train_size, seed), balanced_subset(test, test_size, seed + 1)


def load_splits(
  data_dir: str | os.PathLike | None,
  train_size: int | None = None,
  test_size: int | None = None,
  seed: int = 0,
  *,
  val_size: int | None = None,
) -> tuple[Split, Split, Split | None]:
  """The train, test and (with ``val_size``) validation splits, as NumPy arrays.

  Without ``val_size`` the train and test splits are :func:`load`'s and the validation split is
  None. With it, a class-balanced validation split of ``val_size`` images is held out of the
  training set first (seeded by ``seed + 2``), and the training subset of ``train_size`` is drawn
  from the images left, so the two never share an image.

  Raises:
    ValueError: if a class has too few images for its share of the splits.
  """
  if val_size is None:
    train, test = load(data_dir, train_size, test_size, seed)
    return train, test, None
  full_train, full_test = load_npz(resolve_data_file(data_dir))
  val, rest = holdout(full_train, val_size, seed + 2)
  train = balanced_subset(rest, train_size, seed)
  return train, balanced_subset(full_test, test_size, seed + 1), val


def holdout(split: Split, size: int, seed: int) -> tuple[Split, Split]:
  """A class-balanced, seeded subset of ``size`` examples and the examples left, both in order."""
  n = split.labels.shape[0]
  if not 0 < size < n:
    raise ValueError(f"validation size must be in 1..{n - 1}, got {size}")
  chosen = balanced_subset(Split(np.arange(n), split.labels), size, seed).images
  kept = np.setdiff1d(np.arange(n), chosen)
  return (
    Split(split.images[chosen], split.labels[chosen]),
    Split(split.images[kept], split.labels[kept]),
  )


def normalize(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 ``(x / 255 - mean) / std`` per channel."""
  mean = jnp.asarray(MEAN, jnp.float32).reshape((1,) * (images.ndim - 1) + (3,))
  std = jnp.asarray(STD, jnp.float32).reshape((1,) * (images.ndim - 1) + (3,))
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def random_crop_flip(images: jax.Array, rng: jax.Array) -> jax.Array:
  """Random 32x32 crops of the images zero-padded by 4 pixels, then random horizontal flips.

  Args:
    images: (batch, height, width, channels) pixels of any dtype.
    rng: a JAX random key; each image gets its own offsets and flip.

  Returns:
    An array of the same shape and dtype.
  """
  batch, height, width, _ = images.shape
  offset_key, flip_key = jax.random.split(rng)
  offsets = jax.random.randint(offset_key, (batch, 2), 0, 2 * PAD + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
  padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
    return jnp.where(flip, crop[:, ::-1, :], crop)

  return jax.vmap(one)(padded, offsets, flips)


if __name__ == "__main__":
  import sys

  if len(sys.argv) != 3:
    sys.exit("usage: python -m examples.cifar10.input_pipeline cifar-10-python.tar.gz OUT_DIR")
  convert_archive(sys.argv[1], pathlib.Path(sys.argv[2]) / NPZ_NAME)
  print(f"wrote {pathlib.Path(sys.argv[2]) / NPZ_NAME}")
