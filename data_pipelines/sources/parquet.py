"""`parquet` source: Parquet files with a string column named by `data.field`.

Data flow: data.paths globs -> each file's `data.field` column read with pyarrow ->
the last `eval_fraction` of each file's rows are eval, the rest train -> non-empty,
non-null strings are the documents -> pipeline.
"""

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines import files
from data_pipelines import registry
from data_pipelines.errors import DataError


@registry.register("parquet")
class ParquetSource(files.FileSource):
  """Parquet; the `data.field` column must hold strings."""

  def read_file(self, path: str) -> tuple[list[str], list[str]]:
    field = self.data_cfg.field
    try:
      parquet_file = pq.ParquetFile(path)
      schema = parquet_file.schema_arrow
    except (pa.ArrowException, OSError) as e:
      raise DataError(f"{path} is not a readable Parquet file: {e}") from e
    if field not in schema.names:
      raise DataError(f"{path} has no column {field!r} (data.field); columns: "
                      f"{', '.join(schema.names)}")
    column_type = schema.field(field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
      raise DataError(f"{path}: column {field!r} has type {column_type}, not string")
    try:
      rows = parquet_file.read(columns=[field]).column(field).to_pylist()
    except (pa.ArrowException, OSError) as e:
      raise DataError(f"{path}: cannot read column {field!r}: {e}") from e
    n_eval = files.eval_record_count(len(rows), self.data_cfg.eval_fraction)
    n_train = len(rows) - n_eval
    return ([r for r in rows[:n_train] if r], [r for r in rows[n_train:] if r])
