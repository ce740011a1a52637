"""`text_files` source: plain UTF-8 text files.

Data flow: data.paths globs -> each file read as strict UTF-8 -> split at the line start
nearest after (1 - eval_fraction) of its bytes (train before, eval after) -> documents:
paragraphs separated by blank lines (data.text_documents="paragraphs") or one document
per file part ("files") -> pipeline.
"""

import re

from data_pipelines import files
from data_pipelines import registry
from data_pipelines.errors import DataError

# A blank line is one holding only spaces/tabs (and a CR for Windows line ends).
_BLANK_LINE = re.compile(r"\r?\n[ \t\r]*\n")


def split_paragraphs(text: str) -> list[str]:
  """Paragraphs of `text` (separated by blank lines), without their outer newlines."""
  paragraphs = (p.strip("\r\n") for p in _BLANK_LINE.split(text))
  return [p for p in paragraphs if p.strip()]


def text_documents(text: str, mode: str) -> list[str]:
  """The documents of `text` under data.text_documents `mode`: its paragraphs, or the
  whole text as one document ("files"; none if it is blank)."""
  if mode == "paragraphs":
    return split_paragraphs(text)
  if mode == "files":
    return [text] if text.strip() else []
  raise DataError(f"unknown data.text_documents {mode!r}; expected paragraphs or files")


@registry.register("text_files")
class TextFilesSource(files.FileSource):
  """UTF-8 text files; eval is the last `eval_fraction` of each file's bytes."""

  def read_file(self, path: str) -> tuple[list[str], list[str]]:
    text = files.read_utf8(path)  # Validates the whole file (byte offset on error).
    data = text.encode("utf-8")
    cut = files.eval_cut_bytes(data, self.data_cfg.eval_fraction)
    # The cut is just after a newline, so both halves are valid UTF-8.
    parts = (data[:cut].decode("utf-8"), data[cut:].decode("utf-8"))
    mode = self.data_cfg.text_documents
    train, eval_ = (text_documents(p, mode) for p in parts)
    return train, eval_
