"""Built-in data sources. Importing this package registers them (see registry.py).

To add a source: create `data_pipelines/sources/NAME.py` with a `registry.Source`
subclass decorated `@registry.register("NAME")`, and add its import line below.
"""

# pylint: disable=unused-import
from data_pipelines.sources import array_record
from data_pipelines.sources import jsonl
from data_pipelines.sources import parquet
from data_pipelines.sources import synthetic
from data_pipelines.sources import text_files
