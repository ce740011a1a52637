"""SIGTERM in one process: the loop stops after the step, with a checkpoint, and resumes
bit-identically. (Several processes agreeing on the step: test_multiprocess.py.)"""
import os
import signal

import jax
import numpy as np

from experiments.configs import lm
from tapestry_jax import checkpoint as checkpoint_lib
from tapestry_jax import loop
from tapestry_jax import preemption as preemption_lib


def test_sigterm_is_caught_and_the_previous_handler_comes_back():
  before = signal.getsignal(signal.SIGTERM)
  p = preemption_lib.Preemption()
  assert p.mode == "signal" and not p.should_stop(1)
  p.close()
  assert signal.getsignal(signal.SIGTERM) is before
  p = preemption_lib.Preemption()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.should_stop(2) and p.should_stop(3) and p.stopped_at == 2
    p.close()  # Stopped: a repeated SIGTERM must not kill the process while it saves.
    os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is not before
  finally:
    signal.signal(signal.SIGTERM, before)


def _config():
  c = lm.get_config("tiny")
  c.data.seq_len = 64
  c.data.synthetic.num_documents = 400
  c.data.shards = 2
  c.train.update(dict(global_batch_size=8, steps=8, warmup_steps=2, log_every=1, eval_every=0,
                      eval_batches=2, checkpoint_every=100, progress_bar=False, peak_flops=1e11))
  return c


def test_the_loop_stops_at_the_signalled_step_and_resumes_bit_identically(tmp_path, monkeypatch):
  straight = loop.train_and_evaluate(_config(), str(tmp_path / "straight"))
  should_stop = preemption_lib.Preemption.should_stop

  def signal_at_step_3(self, step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return should_stop(self, step)

  monkeypatch.setattr(preemption_lib.Preemption, "should_stop", signal_at_step_3)
  stopped = loop.train_and_evaluate(_config(), str(tmp_path / "resumed"))
  monkeypatch.undo()
  assert stopped["preempted"] and stopped["step"] == 3 and "eval" not in stopped
  assert not os.path.exists(tmp_path / "resumed" / "final_metrics.json")
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "resumed" / "checkpoints"), 100, 2)
  assert ckpt.latest_step() == 3  # Saved at the stop (the interval alone would not).
  ckpt.close()
  resumed = loop.train_and_evaluate(_config(), str(tmp_path / "resumed"))
  assert resumed["step"] == 8 and not resumed["preempted"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               resumed["state"].params, straight["state"].params)
  assert resumed["eval"]["eval_loss"] == straight["eval"]["eval_loss"]
