"""Async checkpoint failures: a failed background save stops the run with one line at the
next step, never silently; a process killed while a save is in flight resumes from the
checkpoint before it, bit-identically. Faults come from checkpoint_faults.py."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_pipelines
from experiments.configs import lm
from launch.common import exit_on_bad_input
from tapestry_jax import checkpoint as checkpoint_lib
from tapestry_jax import loop

import checkpoint_faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Config overrides shared by the in-process runs and the launch.train subprocess.
TRAIN = dict(global_batch_size=8, steps=8, warmup_steps=2, log_every=1, eval_every=0,
             eval_batches=2, checkpoint_every=2, progress_bar=False, peak_flops=1e11)
DATA = {"seq_len": 64, "synthetic.num_documents": 400, "shards": 2}


def _config(**train):
  c = lm.get_config("tiny")
  c.data.seq_len, c.data.shards = DATA["seq_len"], DATA["shards"]
  c.data.synthetic.num_documents = DATA["synthetic.num_documents"]
  c.train.update(dict(TRAIN, **train))
  return c


def _losses(workdir) -> dict[int, float]:
  """Train loss per step; a step trained twice (before a crash and after) keeps its last."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_a_failed_background_save_is_raised_by_the_next_call(tmp_path, monkeypatch):
  """The write of step 2 fails after `save` returned: the next call raises (even a call
  whose step is not due, where Orbax itself would say nothing), naming step 2 and step
  1, which is still kept and restores; a save still running is not waited for."""
  release = threading.Event()

  def full_disk_once_released(step):
    if step == 2:
      release.wait(60)
      checkpoint_faults.disk_full_at(2)(step)

  checkpoint_faults.hook_state_writes(full_disk_once_released, monkeypatch)
  c = _config()
  it = data_pipelines.make_iterator(c.data, split="train", seed=0, global_batch_size=8)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), save_every=2, keep=3)
  state = {"w": jnp.arange(4.0)}
  assert ckpt.save(1, state, it) and ckpt.save(2, {"w": jnp.ones(4)}, it)
  assert not ckpt.save(3, state, it)  # Step 2 still being written: no wait, no error.
  release.set()
  deadline = time.monotonic() + 60
  with pytest.raises(checkpoint_lib.CheckpointSaveError) as e:
    while time.monotonic() < deadline:
      ckpt.save(3, state, it)  # Not due: only checks.
      time.sleep(0.05)
  msg = str(e.value)
  assert msg.startswith("checkpoint at step 2 failed: OSError: [Errno 28] No space left on "
                        "device"), msg
  assert "the latest checkpoint kept is step 1" in msg and "\n" not in msg
  assert ckpt.latest_step() == 1
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  np.testing.assert_array_equal(ckpt.restore_state(1, abstract)["w"], np.arange(4.0))
  assert ckpt.save(4, state, it)  # The disk has room again: saving goes on.
  ckpt.wait()
  assert ckpt.latest_step() == 4
  ckpt.close()


def test_the_loop_stops_with_one_line_at_the_step_after_a_failed_save(tmp_path, monkeypatch,
                                                                       capsys):
  """The first save (step 1) fails in the background and no other save is due before the
  last step: the run stops with `error: checkpoint at step 1 failed: ...` (the launcher's
  one-line path) before that step, instead of training on without a checkpoint. Each
  step takes 0.5 s of host time, as a real one would, so the failure is known by the
  next step or so."""
  checkpoint_faults.hook_state_writes(checkpoint_faults.disk_full_at(1), monkeypatch)
  save = checkpoint_lib.Checkpointer.save

  def slow_step(self, step, *args, **kwargs):
    time.sleep(0.5)
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", slow_step)
  with pytest.raises(SystemExit) as e, exit_on_bad_input():
    loop.train_and_evaluate(_config(checkpoint_every=100), str(tmp_path))
  assert e.value.code == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and lines[0].startswith(
      "error: checkpoint at step 1 failed: OSError: [Errno 28] No space left on device"), lines
  assert "the latest checkpoint kept is none" in lines[0]
  # Stopped at a step after the failure, not at the last step's save (which would have
  # logged step 7 and waited for step 1's save, as Orbax alone does).
  assert max(_losses(tmp_path)) < 7, max(_losses(tmp_path))
  assert not os.path.exists(tmp_path / "final_metrics.json")


def test_a_kill_during_an_async_save_leaves_the_previous_checkpoint(tmp_path):
  """launch.train is SIGKILLed while step 4's checkpoint is being written in the
  background (its write hangs, checkpoint_faults.py): step 2 is the latest checkpoint,
  and a rerun from it ends with the same bits as a run never interrupted."""
  straight = loop.train_and_evaluate(_config(), str(tmp_path / "straight"))
  workdir, marker = tmp_path / "killed", tmp_path / "saving-step-4"
  flags = [f"--config.train.{k}={v}" for k, v in TRAIN.items()]
  flags += [f"--config.data.{k}={v}" for k, v in DATA.items()]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,  # and the compilations of `straight`:
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  log = open(tmp_path / "killed.log", "w")  # A file, not a pipe nobody reads: never full.
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "checkpoint_faults.py"), "4", str(marker),
       "--config=experiments/configs/lm.py:tiny", f"--workdir={workdir}", *flags],
      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    assert marker.exists(), (proc.poll(), (tmp_path / "killed.log").read_text()[-3000:])
    ckpts = workdir / "checkpoints"
    assert "2" in os.listdir(ckpts) and "4" not in os.listdir(ckpts)
    assert any(n.startswith("4.orbax-checkpoint-tmp") for n in os.listdir(ckpts))
    proc.send_signal(signal.SIGKILL)  # Mid-save: step 4's files are written, not committed.
  finally:
    proc.kill()
    proc.wait(60)
    log.close()
  assert proc.returncode == -signal.SIGKILL

  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), 2, 2)
  assert ckpt.latest_step() == 2
  ckpt.close()
  resumed = loop.train_and_evaluate(_config(), str(workdir))
  assert resumed["step"] == straight["step"] == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               resumed["state"].params, straight["state"].params)
  straight_loss, resumed_loss = _losses(tmp_path / "straight"), _losses(workdir)
  assert all(resumed_loss[s] == straight_loss[s] for s in range(1, 9))
  assert resumed["eval"]["eval_loss"] == straight["eval"]["eval_loss"]
