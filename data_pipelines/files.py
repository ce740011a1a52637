"""Local-file helpers shared by the file-backed sources.

Data flow: `data.paths` (comma-separated globs) -> `expand_paths` -> per-file reads
(`read_utf8`) -> the per-file train/eval split rule (`eval_cut_bytes` for byte-addressed
text, `eval_record_count` for record-addressed formats). Keeping the split rule in one
place is what makes every file source hold out "the last `eval_fraction` of each file".
"""

import abc
import glob
import lzma
import math
import os
from typing import Any

import grain
import ml_collections

from data_pipelines import registry
from data_pipelines.errors import DataError


def split_globs(paths: str) -> list[str]:
  """Splits a comma-separated `data.paths` string into non-empty globs."""
  return [g.strip() for g in paths.split(",") if g.strip()]


def expand_paths(paths: str, what: str) -> list[str]:
  """Resolves `data.paths` to a sorted, de-duplicated list of existing files.

  Args:
    paths: comma-separated file globs (`~` and `**` are expanded).
    what: names the setting in error messages, e.g. "data.paths (source 'jsonl')".

  Returns:
    Files in glob order, each glob's matches sorted so the order (and hence the data
    order) does not depend on the file system's listing order.

  Raises:
    DataError: if `paths` is empty or a glob matches no regular file.
  """
  globs = split_globs(paths)
  if not globs:
    raise DataError(f"{what} is empty: give comma-separated file globs")
  files: list[str] = []
  seen: set[str] = set()
  for pattern in globs:
    matches = sorted(
        m for m in glob.glob(os.path.expanduser(pattern), recursive=True)
        if os.path.isfile(m))
    if not matches:
      if os.path.isdir(os.path.expanduser(pattern)):
        suggestion = os.path.join(pattern.rstrip("/"), "*.txt")
        raise DataError(f"{what}: {pattern!r} is a directory; give file globs, e.g. "
                        f"{suggestion!r}")
      raise DataError(f"{what}: glob {pattern!r} matches no files")
    for m in matches:
      if m not in seen:
        seen.add(m)
        files.append(m)
  return files


def read_utf8(path: str) -> str:
  """Reads a whole file as strict UTF-8 (a `.xz` file decompressed first).

  Raises:
    DataError: naming the file and the byte offset of the first invalid byte, or why a
      `.xz` file does not decompress.
  """
  try:
    with (lzma.open(path, "rb") if path.endswith(".xz") else open(path, "rb")) as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror}") from e
  except lzma.LZMAError as e:
    raise DataError(f"cannot read {path}: not a valid .xz file ({e})") from e
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{path} is not valid UTF-8: byte offset {e.start} "
        f"(byte 0x{data[e.start]:02x}): {e.reason}") from e


def eval_cut_bytes(data: bytes, eval_fraction: float) -> int:
  """Byte offset where a file's eval part starts.

  The eval part is the last `eval_fraction` of the file's bytes, moved forward to the
  next line start so no line is cut in two (the rule data_pipelines/corpora/debref/README.md
  prescribes, so every benchmark holds out the same text).

  Returns:
    An offset in [0, len(data)]; `len(data)` means the file contributes no eval text.
  """
  if eval_fraction <= 0:
    return len(data)
  target = int(len(data) * (1.0 - eval_fraction))
  if target <= 0:
    return 0
  if data[target - 1:target] == b"\n":
    return target
  newline = data.find(b"\n", target)
  return len(data) if newline < 0 else newline + 1


def eval_record_count(num_records: int, eval_fraction: float) -> int:
  """How many trailing records of a file are eval.

  Rounds up so any file with records gives at least one eval record when
  `eval_fraction > 0` (the small epsilon keeps 30 * 0.1 from rounding up to 4).
  """
  if eval_fraction <= 0 or num_records <= 0:
    return 0
  return min(num_records, math.ceil(num_records * eval_fraction - 1e-9))


class FileSource(registry.Source):
  """Base for sources that read whole local files into memory at construction.

  Subclasses implement `read_file(path) -> (train_docs, eval_docs)` applying the
  per-file split rule; this class resolves `data.paths`, concatenates the per-file
  documents in file order and serves them as a `grain.MapDataset`. Reading everything
  up front means every malformed line is reported before training starts; for corpora
  that do not fit in host memory, pre-tokenize to ArrayRecord (read lazily).
  """

  @classmethod
  def paths_setting(cls) -> str:
    return f"data.paths (source '{cls.source_name}')"

  @classmethod
  def check_config(cls, data_cfg: ml_collections.ConfigDict) -> None:
    expand_paths(data_cfg.paths, what=cls.paths_setting())

  def __init__(self, data_cfg: ml_collections.ConfigDict):
    super().__init__(data_cfg)
    self.files = expand_paths(data_cfg.paths, what=self.paths_setting())
    self._docs: dict[str, list[Any]] = {split: [] for split in registry.SPLITS}
    for path in self.files:
      train, eval_ = self.read_file(path)
      self._docs["train"].extend(train)
      self._docs["eval"].extend(eval_)
    if not any(self._docs.values()):
      raise DataError(f"{self.paths_setting()}: no documents in {len(self.files)} "
                      f"file(s) (first: {self.files[0]}); are they empty?")

  @abc.abstractmethod
  def read_file(self, path: str) -> tuple[list[Any], list[Any]]:
    """Reads one file; returns its (train, eval) documents, each in file order."""

  def documents(self, split: str) -> grain.MapDataset:
    registry.check_split(split)
    return grain.MapDataset.source(self._docs[split])
