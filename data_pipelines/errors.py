"""The one exception type for bad data inputs.

Sits at the edge of the data flow: every check on user-provided configuration or files
(config.validate, the sources, the tokenizers, the pipeline's size checks) raises
`DataError` with a one-line message that names the offending file, line or field, so a
misconfigured run fails before any compilation and without a deep library traceback.
"""


class DataError(ValueError):
  """A data configuration or input file is unusable; the message says which and why."""
