"""`python -m launch.site` that stops for good at one named point, for tests that kill it there.

  PAUSE_AT=train:36 PAUSE_FILE=/tmp/x python tests/paused_site.py --config=... --site=latin

PAUSE_AT names the point (the site's own code runs unchanged up to it):
  train:STEP       in the inner steps of the phase that starts at step STEP, after half of them;
  publish:ROUND    in the write of update ROUND's arrays, after half of them (by name), before
                   its manifest and COMMIT;
  checkpoint:STEP  in the checkpoint of step STEP, after its data position is written into
                   Orbax's temporary directory, before the step is finalised.
There the thread writes PAUSE_FILE (JSON: the point and what was done) and waits forever:
the test SIGKILLs the process once the file appears, so the kill lands in that phase on
every run instead of where a timer happens to fall.
"""
import json
import os
import sys
import threading

from absl import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch import site as launch_site  # noqa: E402
from launch.common import parse_flags  # noqa: E402
from tapestry_jax import checkpoint as checkpoint_lib  # noqa: E402
from tapestry_jax import site as site_lib  # noqa: E402
from tapestry_jax.exchange import store  # noqa: E402


def _pause(report: dict) -> None:
  """Says where this thread stopped (written whole, then renamed), then never returns."""
  path = os.environ["PAUSE_FILE"]
  with open(path + ".tmp", "w") as f:
    json.dump(report, f)
  os.replace(path + ".tmp", path)
  threading.Event().wait()


def _install(point: str, at: int) -> None:
  if point == "train":
    train = site_lib.SiteWorker.train

    def paused_train(self, steps, **kwargs):
      start = int(self.state.step)
      if start == at and steps > 1:
        train(self, steps // 2, **kwargs)
        _pause({"point": point, "phase_start": start, "step": int(self.state.step),
                "phase_steps": steps})
      return train(self, steps, **kwargs)

    site_lib.SiteWorker.train = paused_train
  elif point == "publish":
    write_arrays = store.write_arrays

    def paused_write_arrays(bucket, prefix, arrays, **kwargs):
      if prefix.startswith(store.update_prefix(at) + "/"):
        names = sorted(arrays)
        half = names[:len(names) // 2]
        write_arrays(bucket, prefix, {n: arrays[n] for n in half}, **kwargs)
        _pause({"point": point, "round": at, "written": half, "arrays": names})
      return write_arrays(bucket, prefix, arrays, **kwargs)

    store.write_arrays = paused_write_arrays
  elif point == "checkpoint":
    save = checkpoint_lib.StreamsHandler.save

    def paused_save(self, directory, args):
      save(self, directory, args)
      step_dir = os.path.dirname(os.fspath(directory))
      if os.path.basename(step_dir).split(".")[0] == str(at):
        _pause({"point": point, "step": at, "directory": step_dir,
                "written": sorted(os.listdir(directory))})

    checkpoint_lib.StreamsHandler.save = paused_save
  else:
    raise ValueError(f"PAUSE_AT={point}:{at}: the point must be train, publish or checkpoint")


if __name__ == "__main__":
  name, number = os.environ["PAUSE_AT"].split(":")
  _install(name, int(number))
  app.run(launch_site.main, flags_parser=parse_flags)
