"""What every entry point under launch/ shares.

`exit_on_bad_input()` turns a known bad-input error into one clear line on stderr and
exit status 2, so a bad config, missing file or unreachable bucket never ends in a
library traceback. `quiet_library_logs()` keeps Orbax's per-save INFO chatter out of
the console (warnings and errors still show).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys

from absl import flags

from data_pipelines import DataError
from tapestry_jax.buckets import BucketError
from tapestry_jax.validate import ConfigError

# TimeoutError: a site that gave up waiting for the coordinator's bucket.
# NotADirectoryError, IsADirectoryError, PermissionError: a --workdir (or a path in the
# config) that cannot be a directory or cannot be written.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, FileNotFoundError, BucketError, TimeoutError, NotADirectoryError,
    IsADirectoryError, PermissionError)


def bad_input_errors() -> tuple[type[BaseException], ...]:
  """BAD_INPUT_ERRORS and the federation's own (a round that fails verification, a round
  without its quorum), a model spec naming nothing loadable, the plots' (not a
  finished run) and a failed checkpoint save (full disk, lost mount: one line naming
  the step and the checkpoint still kept), imported only when needed: their modules
  import jax."""
  from tapestry_jax.buckets import BucketError
  from tapestry_jax.checkpoint import CheckpointDirError, CheckpointSaveError, InitError
  from tapestry_jax.coordinator import QuorumError
  from tapestry_jax.exchange import ExchangeError
  from tapestry_jax.model_source import ModelSourceError
  from tapestry_jax.plots import PlotError
  from tapestry_jax.trust import TrustError

  return BAD_INPUT_ERRORS + (ExchangeError, QuorumError, TrustError, BucketError, InitError,
                             CheckpointDirError, ModelSourceError, PlotError, CheckpointSaveError)


def define_party_flags():
  """The --private_key and --credentials flags of a party's process (site, coordinator)."""
  private_key = flags.DEFINE_string(
      "private_key", None, "This party's Ed25519 private key file (python -m launch.keygen); "
      "default WORKDIR/keys/PARTY.key.")
  credentials = flags.DEFINE_string(
      "credentials", None, "Where this party's own S3 credentials come from: 'env' "
      "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY of this process), a credentials file "
      "(optionally PATH#PROFILE), or unset for TensorStore's default chain.")
  return private_key, credentials


def define_process_flags():
  """--coordinator_address, --num_processes and --process_id: the processes of one party.

  Unset inside SLURM, Cloud TPU VMs or Kubernetes (JAX reads their environment) and
  for a single process; set all three for a local multi-process run."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0's JAX "
                      "coordination service (multi-process runs outside a cluster manager).")
  flags.DEFINE_integer("num_processes", None, "How many processes form this party "
                       "(1 = single process even inside a cluster environment).")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.DEFINE_integer("heartbeat_timeout_s", 100, "A process silent this long fails the "
                       "whole job (all processes stop; restart the job to resume).")


def join_processes():
  """Starts this party's multi-process job from the process flags (before any device
  is touched); a bad setting ends in one line, exit status 2."""
  from tapestry_jax import distributed

  f = flags.FLAGS
  try:
    return distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                                  heartbeat_timeout_s=f.heartbeat_timeout_s)
  except distributed.DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(..., flags_parser=parse_flags)`: a bad flag or a
  `--config.a.b=value` override naming no field ends in one line, not a traceback."""
  try:
    argv = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      # ml_collections loads the config file lazily, on first use: load it now, so that
      # a missing or broken file is this one line, not a traceback from deep in a run.
      # (A file that failed to load is a stand-in that raises on first attribute use.)
      getattr(flags.FLAGS["config"].value, "keys")
    return argv
  except OSError as e:  # The config file cannot be read (missing, a directory, ...).
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    reason = re.sub(r"^\[Errno \d+\] ", "", lines[-1])
    message = f"--config: cannot load the config file: {reason}"
  except flags.Error as e:
    message = str(e)
    if "Traceback (most recent call last)" in message:
      # A config file's get_config() raised: keep the flag and the exception's last line.
      lines = [l for l in message.splitlines() if l.strip()]
      message = f"{lines[0]} {lines[-1]}"
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e)
    name = re.search(r"'([A-Za-z_][\w.]*)", text)
    hint = re.search(r'Did you mean "[^"]+"', text)
    if isinstance(e, (AttributeError, KeyError)) and name:
      # ml_collections reports a typo'd override as a nested Key/AttributeError.
      message = f"bad --config override: no config field {name.group(1)!r}"
      message += f" ({hint.group(0)}?)" if hint else ""
    else:
      message = f"bad --config override: {text}"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


@contextlib.contextmanager
def exit_on_bad_input():
  try:
    yield
  except Exception as e:  # noqa: BLE001
    if not isinstance(e, bad_input_errors()):
      raise
    message = str(e)
    if isinstance(e, OSError) and e.filename and e.strerror:
      message = f"{e.strerror.lower()}: {e.filename}"
      if isinstance(e, NotADirectoryError):
        message += " (a part of that path is a file, not a directory)"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class _DropLibraryInfo(logging.Filter):
  _NOISY = ("/orbax/", "/grain/")

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in self._NOISY)


def quiet_library_logs() -> None:
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_DropLibraryInfo())
