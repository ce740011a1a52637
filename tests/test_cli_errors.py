"""Bad input at the command line is one `error:` line and exit status 2, never a
traceback: a missing config file, a workdir under a regular file, a directory given as
data files, and a bucket that cannot be reached (which must fail in bounded time)."""
import os
import subprocess
import sys
import time

import portpicker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  t0 = time.monotonic()
  r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=timeout)
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert len(errors) == 1, r.stderr[-3000:]
  return errors[0], time.monotonic() - t0


def test_a_missing_config_file_is_one_line():
  for module in ("launch.train", "launch.federate"):
    line, _ = _run(module, "--config=experiments/configs/nope.py:tiny", "--workdir=/tmp/unused")
    assert line == ("error: --config: cannot load the config file: No such file or directory: "
                    "'experiments/configs/nope.py'"), line


def test_a_workdir_under_a_regular_file_is_one_line(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  line, _ = _run("launch.train", "--config=experiments/configs/lm.py:tiny",
                 f"--workdir={tmp_path / 'file' / 'run'}", "--config.train.steps=2")
  assert line.startswith("error: not a directory: ") and "a part of that path is a file" in line


def test_a_directory_as_data_paths_suggests_its_files(tmp_path):
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "a.txt").write_text("some text " * 100)
  line, _ = _run("launch.train", "--config=experiments/configs/lm.py:tiny",
                 f"--workdir={tmp_path / 'run'}", "--config.data.source=text_files",
                 f"--config.data.paths={tmp_path / 'texts'}")
  assert "is a directory" in line and f"{tmp_path / 'texts' / '*.txt'}" in line, line


def test_an_unreachable_bucket_fails_in_bounded_time(tmp_path):
  """launch.audit with its default --round=-1 lists the global bucket: with nothing
  listening at the S3 endpoint it gives up after federation.storage_retries (6) retries,
  about 12 s, instead of TensorStore's default of many minutes."""
  port = portpicker.pick_unused_port()
  line, seconds = _run("launch.audit", "--config=experiments/configs/federation.py:tiny",
                       f"--workdir={tmp_path}",
                       f"--config.federation.global_bucket=s3://global/fed?endpoint="
                       f"http://127.0.0.1:{port}", timeout=300)
  assert "cannot reach endpoint" in line and "6 retry attempts failed" in line, line
  assert seconds < 60, seconds


def test_a_bad_update_codec_setting_is_one_line(tmp_path):
  line, _ = _run("launch.federate", "--config=experiments/configs/federation.py:tiny",
                 f"--workdir={tmp_path}", "--config.federation.topk_density=1.5",
                 "--mode=simulate")
  assert line == ("error: federation.topk_density must be 0 (off) or a fraction in (0, 1]; "
                  "got 1.5"), line
