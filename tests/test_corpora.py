"""The embedded corpus: the Debian Reference in 7 languages, xz-compressed in the package,
with its licence, read by the text_files source as any text file."""
import os

import pytest

from data_pipelines import corpora
from data_pipelines import files
from data_pipelines.errors import DataError
from experiments.configs import federation as fed_config


def test_every_language_is_shipped_with_its_licence():
  for lang in corpora.DEBREF_LANGUAGES:
    text = files.read_utf8(corpora.debref(lang))
    assert len(text) > 200_000 and "Debian" in text, lang
  licence = os.path.join(os.path.dirname(corpora.debref("en")), "COPYRIGHT")
  assert "GPL" in open(licence).read()


def test_the_debref_federation_reads_the_embedded_corpus():
  c = fed_config.get_config("debref")
  assert {n: c.sites[n].paths for n in c.sites.keys()} == {
      n: corpora.debref(n) for n in ("en", "fr", "ja", "id")}
  with pytest.raises(ValueError, match="no language 'xx'"):
    corpora.debref("xx")


def test_a_corrupt_xz_file_is_a_data_error(tmp_path):
  bad = tmp_path / "bad.txt.xz"
  bad.write_bytes(b"not xz at all")
  with pytest.raises(DataError, match="not a valid .xz file"):
    files.read_utf8(str(bad))
