"""`array_record` source: pre-tokenized documents in ArrayRecord files.

Format: each record is the raw bytes of one document's token ids as a little-endian
int32 numpy array (`np.asarray(ids, "<i4").tobytes()`), WITHOUT BOS/EOS (the pipeline
adds them), tokenized with the tokenizer the run is configured with (its `token_bytes`
gives bits per byte). `write_array_record` writes such files.

Data flow: data.paths globs -> per file, the last `eval_fraction` of its records are
eval -> records read lazily by index (random access, so shuffling is cheap) -> decoded
and range-checked against the tokenizer's vocabulary -> pipeline (tokenizer bypassed).
"""

import bisect
import dataclasses
from typing import Sequence

from array_record.python import array_record_data_source
from array_record.python import array_record_module
import grain
import ml_collections
import numpy as np

from data_pipelines import files
from data_pipelines import registry
from data_pipelines import tokenizers
from data_pipelines.errors import DataError


def write_array_record(path: str, documents: Sequence[Sequence[int] | np.ndarray]) -> None:
  """Writes token-id documents as one ArrayRecord file (one int32 record each).

  Uses group_size 1 so any record can be read without decoding its neighbours, which
  is what random-access shuffling needs.
  """
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  try:
    for i, doc in enumerate(documents):
      ids = np.asarray(doc)
      if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise DataError(f"write_array_record({path}): document {i} is not a 1-D "
                        f"integer array (shape {ids.shape}, dtype {ids.dtype})")
      writer.write(ids.astype("<i4").tobytes())
  finally:
    writer.close()


@dataclasses.dataclass(frozen=True)
class _FileInstruction:
  """The slice of one file a split reads (the protocol ArrayRecordDataSource takes)."""
  filename: str
  skip: int
  take: int
  examples_in_shard: int


def decode_record(data: bytes, where: str, vocab_size: int) -> np.ndarray:
  """Token ids of one record, checked to be int32 ids in [0, vocab_size)."""
  if len(data) % 4:
    raise DataError(f"{where}: {len(data)}-byte record is not an int32 token array "
                    "(length not a multiple of 4); write files with write_array_record")
  ids = np.frombuffer(data, dtype="<i4").astype(np.int32)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
    raise DataError(f"{where}: token id {bad} outside the tokenizer's vocabulary "
                    f"[0, {vocab_size}); not int32 ids from this tokenizer?")
  return ids


class _TokenRecords:
  """Random-access view of one split's records across files, decoded to int32."""

  def __init__(self, instructions: list[_FileInstruction], vocab_size: int):
    self._instructions = instructions
    self._vocab_size = vocab_size
    self._starts = np.cumsum([0] + [fi.take for fi in instructions]).tolist()
    self._source = (array_record_data_source.ArrayRecordDataSource(instructions)
                    if instructions else None)

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int) -> np.ndarray:
    file_idx = bisect.bisect_right(self._starts, index) - 1
    fi = self._instructions[file_idx]
    where = f"{fi.filename} record {fi.skip + index - self._starts[file_idx]}"
    return decode_record(self._source[index], where, self._vocab_size)


@registry.register("array_record")
class ArrayRecordSource(registry.Source):
  """Pre-tokenized int32 documents in ArrayRecord files (see module docstring)."""

  pretokenized = True

  @classmethod
  def check_config(cls, data_cfg: ml_collections.ConfigDict) -> None:
    files.expand_paths(data_cfg.paths, what="data.paths (source 'array_record')")

  def __init__(self, data_cfg: ml_collections.ConfigDict):
    super().__init__(data_cfg)
    self.files = files.expand_paths(data_cfg.paths,
                                    what="data.paths (source 'array_record')")
    vocab_size = tokenizers.make_tokenizer(data_cfg).vocab_size
    instructions = {split: [] for split in registry.SPLITS}
    for path in self.files:
      reader = array_record_module.ArrayRecordReader(path)
      if not reader.ok():  # (close() would raise on such a reader.)
        raise DataError(f"{path} is not an ArrayRecord file")
      try:
        n = reader.num_records()
        if n:  # Fail fast on a wrong file format rather than mid-training.
          decode_record(reader.read([0])[0], f"{path} record 0", vocab_size)
      except RuntimeError as e:
        raise DataError(f"{path}: corrupt ArrayRecord file: {e}") from e
      finally:
        reader.close()
      n_eval = files.eval_record_count(n, data_cfg.eval_fraction)
      if n - n_eval:
        instructions["train"].append(_FileInstruction(path, 0, n - n_eval, n))
      if n_eval:
        instructions["eval"].append(_FileInstruction(path, n - n_eval, n_eval, n))
    if not any(instructions.values()):
      raise DataError(f"data.paths (source 'array_record'): no records in "
                      f"{len(self.files)} file(s) (first: {self.files[0]})")
    self._records = {split: _TokenRecords(instructions[split], vocab_size)
                     for split in registry.SPLITS}

  def documents(self, split: str) -> grain.MapDataset:
    registry.check_split(split)
    return grain.MapDataset.source(self._records[split])
