"""Corpora shipped with the package, so that examples and benchmarks run on a fresh clone
with no download.

  debref  the Debian Reference manual in 7 languages (GPL-2+, see debref/COPYRIGHT and
          debref/README.md), one xz-compressed text file per language
"""

import os

DEBREF_LANGUAGES = ("en", "fr", "ja", "id", "de", "es", "zh-cn")
_HERE = os.path.dirname(os.path.abspath(__file__))


def debref(language: str) -> str:
  """The path of the embedded Debian Reference in `language` (a `text_files` path)."""
  if language not in DEBREF_LANGUAGES:
    raise ValueError(f"debref has no language {language!r}; it has {DEBREF_LANGUAGES}")
  return os.path.join(_HERE, "debref", f"{language}.txt.xz")
