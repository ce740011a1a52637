"""A site of many processes: real `launch.train` jobs of 1 and 2 processes on localhost.

1 process x 8 devices and 2 processes x 4 devices run the same mesh on the same global
batches (data.shards=2), so they agree to float rounding (the cross-process all-reduce,
gloo, sums in another order than the in-process one); a checkpoint moves between them;
a SIGTERM to one process stops both at one step with a checkpoint, and the rerun is
bit-identical to a run never stopped.
"""

import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

import multiproc
from experiments.configs import lm
from tapestry_jax import checkpoint as checkpoint_lib
from tapestry_jax import loop

STEPS = 8
FLAGS = ("--config.data.shards=2", f"--config.train.steps={STEPS}",
         "--config.train.checkpoint_every=4", "--config.train.keep_checkpoints=3")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _metrics(workdir)}


def _tokens(workdir):
  return {r["step"]: r["tokens"] for r in _metrics(workdir)}


def _params(workdir, step):
  """The params a run saved at `step`, restored here (8 devices) as numpy arrays."""
  c = lm.get_config("tiny")
  c.data.seq_len = 64
  c.train.global_batch_size = 8
  _, trainer = loop.site_setup(c)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 4, 3)
  try:
    state = ckpt.restore_state(step, trainer.abstract_state())
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, state.params)


def _resume_from(src, step, dst):
  """A workdir holding only `src`'s checkpoint of `step`: a run stopped there."""
  os.makedirs(os.path.join(dst, "checkpoints"))
  shutil.copytree(os.path.join(src, "checkpoints", str(step)),
                  os.path.join(dst, "checkpoints", str(step)))


def _close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol), a, b)


def test_one_and_two_processes_train_alike_and_checkpoints_move_between_them(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  multiproc.run(one, 1, 8, *FLAGS)
  multiproc.run(two, 2, 4, *FLAGS)
  # One writer: every step logged once (process 0 only), and its one-off files.
  assert [r["step"] for r in _metrics(two)] == list(range(1, STEPS + 1))
  for name in ("config.json", "final_metrics.json"):
    assert os.path.exists(os.path.join(two, name)), name
  # Orbax under jax.distributed: each process wrote its own shards (its OCDBT tree) and
  # its own streams' positions; process 0 committed the step.
  step4 = os.path.join(two, "checkpoints", "4")
  assert {"ocdbt.process_0", "ocdbt.process_1", "commit_success.txt"} <= set(
      os.listdir(os.path.join(step4, "state")))
  assert {"stream_0-of-2.json", "stream_1-of-2.json"} <= set(
      os.listdir(os.path.join(step4, "streams")))
  # The same global batches (token counts exactly) and the same model.
  assert _tokens(one) == _tokens(two)
  assert _losses(one)[1] == pytest.approx(_losses(two)[1], abs=1e-6)
  assert abs(_losses(one)[1] - _losses(one)[2]) > 0.01  # Batches differ: the check can fail.
  for step in (4, STEPS):
    _close(_params(one, step), _params(two, step))
  assert not np.allclose(_params(one, 4)["embed"], _params(one, STEPS)["embed"], atol=1e-3)

  # A checkpoint of 2 processes resumes on 1, and the reverse, on the uninterrupted
  # runs' batches (every stream's position restored by whichever process reads it now).
  for src, dst, processes, devices in ((two, "two_to_one", 1, 8), (one, "one_to_two", 2, 4)):
    dst = str(tmp_path / dst)
    _resume_from(src, 4, dst)
    multiproc.run(dst, processes, devices, *FLAGS)
    assert sorted(_losses(dst)) == list(range(5, STEPS + 1)), dst
    assert _tokens(dst) == {s: t for s, t in _tokens(one).items() if s > 4}, dst
    for s, loss in _losses(dst).items():
      assert loss == pytest.approx(_losses(one)[s], abs=1e-5), (dst, s)
    _close(_params(dst, STEPS), _params(one, STEPS))


def _wait_for_step(workdir, step, job, timeout_s=180):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if os.path.exists(path) and any(r["step"] >= step for r in _metrics(workdir)):
      return
    if any(p.poll() is not None for p in job.procs):
      raise AssertionError(f"a process ended before step {step}")
    time.sleep(0.05)
  raise AssertionError(f"no step {step} within {timeout_s} s")


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes_bit_identically(tmp_path):
  # 2 processes x 1 device: fast steps, and enough of them that the signal lands mid-run.
  steps, flags = 20, ("--config.data.shards=2", "--config.train.steps=20",
                      "--config.train.checkpoint_every=100")
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  multiproc.run(straight, 2, 1, *flags)
  with multiproc.Job(stopped, 2, 1, *flags) as job:
    _wait_for_step(stopped, 1, job)
    job.signal(1)  # Only process 1 (not the one that logs) is told.
    results = job.wait()
  lines = [r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:]
           for r in results]
  assert [r.returncode for r in results] == [0, 0], lines
  step = int(lines[0].split()[3].rstrip(":"))
  assert lines == [f"preempted at step {step}: checkpoint saved, rerun the same command to "
                   "resume"] * 2
  assert 1 < step < steps
  ckpt = checkpoint_lib.Checkpointer(os.path.join(stopped, "checkpoints"), 4, 3)
  assert ckpt.latest_step() == step
  ckpt.close()
  assert not os.path.exists(os.path.join(stopped, "final_metrics.json"))

  multiproc.run(stopped, 2, 1, *flags)  # The same command again.
  jax.tree.map(np.testing.assert_array_equal, _params(stopped, steps), _params(straight, steps))
  straight_losses = _losses(straight)
  assert {s: l for s, l in _losses(stopped).items() if s > step} == {
      s: l for s, l in straight_losses.items() if s > step}


@pytest.mark.parametrize("processes,flags,message", [
    (1, ("--num_processes=2", "--process_id=5", "--coordinator_address=127.0.0.1:1"),
     "error: process_id must be in [0, 2), got 5"),
    (1, ("--num_processes=2", "--process_id=0"),
     "error: multi-process run: also set coordinator_address"),
    (2, ("--config.data.shards=3",),
     "error: data.shards=3 is not a multiple of the 2 processes"),
    (1, ("--config.train.checkpoint_dir=s3://site-fr/ckpt",),
     "error: checkpoint directory 's3://site-fr/ckpt': s3:// is not supported"),
])
def test_bad_process_settings_are_one_line_and_exit_2(tmp_path, processes, flags, message):
  with multiproc.Job(str(tmp_path), processes, 4, *flags, timeout_s=120) as job:
    results = job.wait()
  for r in results:
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith(message), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
