"""Turns a known bad-input error into one clear line on stderr and exit status 2.

Entry points wrap their library call in `exit_on_bad_input()` so that a bad config,
missing file or unreachable bucket never ends in a library traceback.
"""

from __future__ import annotations

import contextlib
import sys

from data_pipelines import DataError
from tapestry_jax.validate import ConfigError

BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError)


@contextlib.contextmanager
def exit_on_bad_input():
  try:
    yield
  except BAD_INPUT_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
