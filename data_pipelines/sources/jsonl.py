"""`jsonl` source: JSON Lines files, one JSON object per line, text in `data.field`.

Data flow: data.paths globs -> each file parsed line by line (blank lines skipped) ->
the last `eval_fraction` of each file's records are eval, the rest train -> the
`data.field` strings are the documents (empty strings dropped) -> pipeline.
"""

import json

from data_pipelines import files
from data_pipelines import registry
from data_pipelines.errors import DataError


@registry.register("jsonl")
class JsonlSource(files.FileSource):
  """JSON Lines; every line must be an object with a string `data.field`."""

  def read_file(self, path: str) -> tuple[list[str], list[str]]:
    field = self.data_cfg.field
    records = []
    for lineno, line in enumerate(files.read_utf8(path).split("\n"), start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column "
                        f"{e.colno})") from e
      if not isinstance(record, dict) or field not in record:
        found = (f"keys: {', '.join(map(str, record))}" if isinstance(record, dict)
                 else f"a JSON {type(record).__name__}, not an object")
        raise DataError(f"{path}:{lineno}: no field {field!r} (data.field); {found}")
      if not isinstance(record[field], str):
        raise DataError(f"{path}:{lineno}: field {field!r} is a JSON "
                        f"{type(record[field]).__name__}, not a string")
      records.append(record[field])
    n_eval = files.eval_record_count(len(records), self.data_cfg.eval_fraction)
    n_train = len(records) - n_eval
    # Split by record position first, then drop empty texts, so the split does not
    # depend on which records happen to be empty.
    return ([r for r in records[:n_train] if r], [r for r in records[n_train:] if r])
