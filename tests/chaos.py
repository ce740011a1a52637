"""A longer chaos run: the storage-fault federation of tests/test_chaos.py, again and
again, each time under another fault schedule, for a bounded time. Not part of the
default suite.

  python -m tests.chaos --minutes=10 [--rate=0.2]

Run i uses seed i and `--rate` (the share of requests that get a fault; the default
suite runs seed 1 at 0.1). It stops at the first failing run (printing its output) and
starts no run after `--minutes`, so it ends within that plus one run (at most 10 min).
Exit status 0 when every run passed.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST = "tests/test_chaos.py::test_parties_under_transient_storage_faults_retry_and_lose_nothing"
RUN_TIMEOUT_S = 600


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minutes", type=float, default=10.0, help="start no run after this")
  parser.add_argument("--rate", type=float, default=0.2, help="share of requests faulted")
  args = parser.parse_args()
  if not 0.0 < args.rate < 1.0 or args.minutes <= 0:
    parser.error("--rate must be in (0, 1) and --minutes > 0")
  deadline = time.monotonic() + 60.0 * args.minutes
  seed = 1
  while time.monotonic() < deadline:
    env = dict(os.environ, PYTHONPATH=ROOT, TAPESTRY_CHAOS_SEED=str(seed),
               TAPESTRY_CHAOS_RATE=str(args.rate))
    t0 = time.monotonic()
    try:
      run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
                           cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT_S)
      ok, out = run.returncode == 0, run.stdout + run.stderr
    except subprocess.TimeoutExpired as e:
      ok, out = False, f"run timed out after {RUN_TIMEOUT_S} s\n{e.stdout or ''}"
    print(f"chaos: seed {seed}, rate {args.rate}: {'passed' if ok else 'FAILED'} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    if not ok:
      print(out[-6000:])
      return 1
    seed += 2  # Each run's two proxies use seeds i and i + 1.
  return 0


if __name__ == "__main__":
  sys.exit(main())
