"""`python -m launch.coordinator` with named pause points, for the chaos tests.

  PYTHONPATH=. python tests/chaos_coordinator.py --config=... --workdir=... [launch flags]

Runs the real coordinator entry point (the same flags and code) in a process of its own.
TAPESTRY_CHAOS_PAUSE=POINT@ROUND makes it stop at a named point of global round ROUND,
print one line `chaos: paused at POINT, round ROUND` to stderr and wait there forever,
for the test to SIGKILL it:
  merging        the merge has written its first block of the round's arrays (in a fresh
                 attempt directory), and not its manifest
  before-commit  the round's arrays and manifest are written; its COMMIT is not
TAPESTRY_CHAOS_BARRIER=DIR,N makes every create of a global COMMIT wait until N
processes have reached the create of the same round (files in DIR), so that N racing
coordinators all get past every earlier check and only the create-only write decides.
"""

import os
import sys
import time

from absl import app

from launch import coordinator as launch_coordinator
from launch.common import parse_flags
from tapestry_jax import buckets
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import exchange

POINTS = ("merging", "before-commit")


def _pause(point: str, round_: int) -> None:
  print(f"chaos: paused at {point}, round {round_}", file=sys.stderr, flush=True)
  while True:
    time.sleep(3600)


def _install_pause(point: str, round_: int) -> None:
  if point not in POINTS:
    raise SystemExit(f"error: TAPESTRY_CHAOS_PAUSE point {point!r} is not one of {POINTS}")
  if point == "merging":
    merging = {}
    merge, record = coord_lib.Coordinator._merge, buckets.Bucket.record_transfer

    def _merge(self, job, *args, **kwargs):
      merging["round"] = job["round"]
      try:
        return merge(self, job, *args, **kwargs)
      finally:
        merging.pop("round", None)

    def record_transfer(self, *, written=0, read=0):
      record(self, written=written, read=read)
      if written and merging.get("round") == round_:
        _pause(point, round_)

    coord_lib.Coordinator._merge = _merge
    buckets.Bucket.record_transfer = record_transfer
  else:
    create = buckets.Bucket.create

    def paused_create(self, key, data):
      if key == f"{exchange.global_prefix(round_)}/{exchange.COMMIT}":
        _pause(point, round_)
      return create(self, key, data)

    buckets.Bucket.create = paused_create


def _install_barrier(directory: str, n: int) -> None:
  create = buckets.Bucket.create

  def racing_create(self, key, data):
    if key.startswith("rounds/") and key.endswith(f"/{exchange.COMMIT}"):
      tag = key.split("/")[1]
      with open(os.path.join(directory, f"{tag}.{os.getpid()}"), "w"):
        pass
      t0 = time.monotonic()
      while len([f for f in os.listdir(directory) if f.startswith(tag + ".")]) < n:
        if time.monotonic() - t0 > 120:
          raise SystemExit(f"error: chaos barrier: fewer than {n} coordinators reached {key}")
        time.sleep(0.005)
      print(f"chaos: {n} coordinators at the create of {key}", file=sys.stderr, flush=True)
    return create(self, key, data)

  buckets.Bucket.create = racing_create


def main() -> None:
  pause = os.environ.get("TAPESTRY_CHAOS_PAUSE")
  if pause:
    point, _, round_ = pause.partition("@")
    _install_pause(point, int(round_))
  barrier = os.environ.get("TAPESTRY_CHAOS_BARRIER")
  if barrier:
    directory, _, n = barrier.rpartition(",")
    _install_barrier(directory, int(n))
  app.run(launch_coordinator.main, flags_parser=parse_flags)


if __name__ == "__main__":
  main()
