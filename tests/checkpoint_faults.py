"""Faults injected into Orbax's background checkpoint writes, for the checkpoint-failure
tests. (Not a test module: pytest collects only test_*.py.)

The hook sits where a full disk or a lost mount hits an async save: it adds one commit
future to the train-state item of every save, which Orbax awaits in its background
thread after `save` has returned. Run as a script, it makes the save of one step hang
(after writing a marker file) and runs `launch.train` with the remaining arguments:

  python tests/checkpoint_faults.py STEP MARKER --config=... --workdir=...
"""

import concurrent.futures
import errno
import os
import re
import runpy
import sys
import time

import orbax.checkpoint as ocp

_STEP_DIR = re.compile(r"/(\d+)\.orbax-checkpoint-tmp")
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt_fault")


def hook_state_writes(fn, monkeypatch=None) -> None:
  """Every train-state save also waits, in Orbax's background thread, on `fn(step)`
  run in a thread of its own: its exception fails that save, its sleep delays it."""
  original = ocp.PyTreeCheckpointHandler.async_save

  async def async_save(self, directory, *args, **kwargs):
    futures = list(await original(self, directory, *args, **kwargs) or [])
    match = _STEP_DIR.search(str(directory))
    assert match, f"the fault hook cannot tell the step of {directory}"
    return futures + [_POOL.submit(fn, int(match.group(1)))]

  if monkeypatch is not None:
    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", async_save)
  else:
    ocp.PyTreeCheckpointHandler.async_save = async_save


def disk_full_at(*steps: int):
  """A `hook_state_writes` fn: the saves of `steps` fail as a full disk would."""
  def fn(step: int) -> None:
    if step in steps:
      raise OSError(errno.ENOSPC, f"No space left on device (injected at step {step})")
  return fn


def hang_at(step: int, marker: str):
  """A `hook_state_writes` fn: the save of `step` writes `marker`, then never finishes."""
  def fn(s: int) -> None:
    if s == step:
      with open(marker, "w") as f:
        f.write(str(step))
      time.sleep(3600)
  return fn


if __name__ == "__main__":
  step, marker = int(sys.argv[1]), sys.argv[2]
  hook_state_writes(hang_at(step, marker))
  sys.argv = ["launch.train"] + sys.argv[3:]
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  runpy.run_module("launch.train", run_name="__main__", alter_sys=True)
