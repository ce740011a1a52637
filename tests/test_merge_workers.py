"""A coordinator of several processes (merge workers on jax.distributed, gloo on CPU).

Real processes on localhost: the same committed site updates merged by 1, 2 and 4
coordinator processes give bit-identical global rounds; a worker SIGKILLed mid-merge
leaves the round uncommitted, and the restarted coordinator redoes it bit-identically.
The merge block size (federation.merge_block_mib) does not change the bits either.
"""
import functools
import os
import re
import signal
import subprocess
import sys
import time

import portpicker
import pytest

import fed_fakes

from tapestry_jax import audit
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import merge as merge_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 2

_DRIVER = """
import sys
from tapestry_jax import distributed
address, n, pid, workdir, heartbeat, clip, download = sys.argv[1:8]
group = distributed.initialize(address, int(n), int(pid), heartbeat_timeout_s=int(heartbeat))
import test_merge_workers
cfg = test_merge_workers.config(float(clip), download)
coordinator = test_merge_workers.fed_fakes.coordinator(cfg, workdir)
records = coordinator.run()
print("process", group.process_id, "merged", coordinator.workers.items_merged, flush=True)
distributed.shutdown()
"""


def config(clip: float, download: str = "float32"):
  """The fake federation under DiLoCo's Nesterov; `clip` > 0 also clips each site's update
  (declared norms checked against the values) and the merged pseudo-gradient (a global
  norm reduced across the workers); `download` is federation.download_dtype."""
  c = fed_fakes.config(rounds=ROUNDS, download_dtype=download)
  c.federation.outer.name = "nesterov"
  c.federation.robust.clip_norm = clip
  c.federation.outer.clip_norm = clip / 2
  return c


def _publish_updates(cfg, workdir) -> None:
  for r in range(1, ROUNDS + 1):
    for i, site in enumerate(fed_fakes.SITES):
      fed_fakes.publish(cfg, workdir, site, r, fed_fakes.delta(100 * r + i))


def _start(workdir, n: int, clip: float, *, heartbeat: int = 100,
           env_extra=None, download: str = "float32") -> list[subprocess.Popen]:
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  script = _DRIVER
  env = dict(os.environ, JAX_PLATFORMS="cpu", TAPESTRY_TEST_KEYS=fed_fakes.KEYS,
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), **(env_extra or {}))
  logs = [open(os.path.join(workdir, f"coordinator_{i}.log"), "w") for i in range(n)]
  return [subprocess.Popen([sys.executable, "-c", script, address, str(n), str(i), str(workdir),
                            str(heartbeat), str(clip), download], env=env, stdout=logs[i], stderr=subprocess.STDOUT,
                           cwd=ROOT) for i in range(n)]


def _wait(procs, timeout=240) -> list[int]:
  deadline = time.monotonic() + timeout
  codes = []
  try:
    for p in procs:
      codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return codes


def _log(workdir, i: int) -> str:
  with open(os.path.join(workdir, f"coordinator_{i}.log")) as f:
    return f.read()


def _round_arrays(cfg, workdir) -> dict[int, dict[str, str]]:
  """Per committed global round, each array's digest (the bits, not the attempt name)."""
  glob = fed_fakes.bucket(cfg, workdir, federation.GLOBAL)
  out = {}
  for r in exchange.committed_rounds(glob, "global"):
    m = exchange.read_manifest(glob, exchange.global_prefix(r))
    out[r] = {n: rec["digest"] for n, rec in m["arrays"].items()}
  return out


# Packed 4-bit downloads: blocks cut at whole bytes (int8's are merged bit for bit in
# tests/test_downloads.py).
@pytest.mark.parametrize("clip, download", [
    (0.0, "float32"), pytest.param(0.05, "float32", marks=pytest.mark.slow),
    pytest.param(0.0, "int4", marks=pytest.mark.slow)])
def test_one_two_and_four_workers_commit_bit_identical_rounds(tmp_path, clip, download):
  """(With downloads on, the encoded downloads are written by the workers too.)"""
  cfg = config(clip, download)
  one = tmp_path / "one"
  _publish_updates(cfg, one)
  fed_fakes.coordinator(cfg, one).run()
  want = _round_arrays(cfg, one)
  assert sorted(want) == list(range(ROUNDS + 1))
  assert any(n.startswith(exchange.DOWN) for n in want[1]) == (download != "float32")
  for n in (2, 4):
    workdir = tmp_path / f"m{n}"
    _publish_updates(cfg, workdir)
    codes = _wait(_start(workdir, n, clip, download=download))
    assert codes == [0] * n, [_log(workdir, i)[-2000:] for i in range(n)]
    assert _round_arrays(cfg, workdir) == want, f"{n} workers merged other bits"
    # Every process merged a share of the blocks.
    for i in range(n):
      merged = int(re.search(rf"process {i} merged (\d+)", _log(workdir, i)).group(1))
      assert merged > 0, _log(workdir, i)[-2000:]


def test_a_worker_killed_mid_merge_is_redone_bit_identically(tmp_path):
  cfg = config(0.05)
  one = tmp_path / "one"
  _publish_updates(cfg, one)
  fed_fakes.coordinator(cfg, one).run()
  want = _round_arrays(cfg, one)

  workdir = tmp_path / "m2"
  _publish_updates(cfg, workdir)
  # Worker 1 sleeps before it merges round 1's range: SIGKILL it there, mid-merge.
  procs = _start(workdir, 2, 0.05, heartbeat=5,
                 env_extra={"TAPESTRY_FAULT_WORKER_MERGE_DELAY_S": "60"})
  deadline = time.monotonic() + 120
  while "fault injection, sleeping" not in _log(workdir, 1):
    assert time.monotonic() < deadline and procs[1].poll() is None, _log(workdir, 1)[-2000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  codes = _wait(procs, timeout=120)
  assert codes[0] != 0, "the leader must not finish a round a worker never merged"
  glob = fed_fakes.bucket(cfg, workdir, federation.GLOBAL)
  assert exchange.read_manifest(glob, exchange.global_prefix(1)) is None, "partial commit"
  assert exchange.uncommitted_attempts(glob, exchange.global_prefix(1)), "nothing was merged"

  # The restarted job (both processes, as a cluster manager restarts it) redoes round 1.
  codes = _wait(_start(workdir, 2, 0.05))
  assert codes == [0, 0], [_log(workdir, i)[-2000:] for i in range(2)]
  assert _round_arrays(cfg, workdir) == want



def test_a_small_merge_block_commits_the_same_bits_and_audits_identically(tmp_path,
                                                                          monkeypatch):
  # 1 KiB chunks everywhere (the tiny model's arrays are otherwise one chunk each), so that
  # the block size decides how many blocks the merge has.
  write_arrays = exchange.write_arrays
  monkeypatch.setattr(exchange, "write_arrays", functools.partial(write_arrays,
                                                                  max_chunk_bytes=1024))
  plan_round, work_items = merge_lib.plan_round, []

  def counting_plan_round(*args, **kwargs):
    plan = plan_round(*args, **kwargs)
    work_items.append(len(plan.work))
    return plan

  monkeypatch.setattr(merge_lib, "plan_round", counting_plan_round)
  runs = {}
  for mib in (16, 2 / 1024):  # The default, and 2 KiB blocks.
    cfg = config(0.05)  # The outer clip sums per-block squares: the blocks must not show.
    cfg.federation.merge_block_mib = mib
    workdir = tmp_path / f"block_{mib}"
    _publish_updates(cfg, workdir)
    fed_fakes.coordinator(cfg, workdir).run()
    runs[mib] = (cfg, workdir, _round_arrays(cfg, workdir), work_items[-1])
  (big, _, want, big_items), (small, workdir, got, small_items) = runs.values()
  assert small_items > 10 * big_items, (small_items, big_items)
  assert got == want, "the merge block size changed the bits"
  for r in range(1, ROUNDS + 1):
    for c in (small, big):  # Audited with its own block size and with the default one.
      report = audit.audit_round(c, str(workdir), r)
      assert report["identical"], report["mismatches"]
