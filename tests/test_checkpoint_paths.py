"""Which checkpoint directories a site can use: local paths, file://, gs:// (with gcsfs)."""
import importlib.util

import pytest

from tapestry_jax import checkpoint as checkpoint_lib


def test_local_paths_and_file_urls_are_absolute_directories(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert checkpoint_lib.checkpoint_path("ckpt") == str(tmp_path / "ckpt")
  assert checkpoint_lib.checkpoint_path(f"file://{tmp_path}/c") == str(tmp_path / "c")


@pytest.mark.parametrize("url,message", [
    ("s3://site-fr/ckpt", r"s3:// is not supported \(Orbax .* local paths and gs:// only\); "
                          r"mount the bucket"),
    ("http://host/ckpt", r"http:// is not supported"),
])
def test_unsupported_schemes_are_one_clear_line(url, message):
  with pytest.raises(checkpoint_lib.CheckpointDirError, match=message):
    checkpoint_lib.checkpoint_path(url)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs_says_what_to_install():
  with pytest.raises(checkpoint_lib.CheckpointDirError, match=r"needs gcsfs \(pip install gcsfs\)"):
    checkpoint_lib.checkpoint_path("gs://site-fr/ckpt")
