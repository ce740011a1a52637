"""The site training loop: it learns, logs, resumes bit-for-bit and re-shards checkpoints."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import lm
from tapestry_jax import checkpoint as checkpoint_lib
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import federation
from tapestry_jax import loop
from tapestry_jax import train as train_lib
from tapestry_jax import trees
from tapestry_jax import trust
from tapestry_jax.validate import ConfigError

import fed_fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**train):
  c = lm.get_config("tiny")
  c.data.seq_len = 64
  c.data.synthetic.num_documents = 400
  c.train.update(dict(global_batch_size=8, steps=8, warmup_steps=2, log_every=1, eval_every=0,
                      eval_batches=2, checkpoint_every=4, progress_bar=False, peak_flops=1e11))
  c.train.update(train)
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_trains_logs_and_evaluates(tmp_path):
  result = loop.train_and_evaluate(_config(steps=30, log_every=5, eval_every=15),
                                   str(tmp_path))
  records = _metrics(tmp_path)
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
  for key in ("grad_norm", "lr", "tokens_per_s", "mfu", "tokens"):
    assert key in train[-1]
  # From ~log(384) = 5.95 nats at init to well below the ~4.0 of a unigram byte model.
  # (Single batches are noisy: languages differ in bytes per character, so compare the
  # fixed eval set over time rather than consecutive train batches.)
  assert train[-1]["loss"] < 3.5, "the model did not learn"
  assert [r["step"] for r in evals] == [15, 30]
  assert evals[-1]["eval_bits_per_byte"] > 0
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert np.isclose(evals[-1]["eval_perplexity"], np.exp(evals[-1]["eval_loss"]))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  assert result["eval"]["eval_loss"] == evals[-1]["eval_loss"]


def test_interrupted_and_resumed_training_is_bit_identical(tmp_path):
  """2N steps straight == N steps, kill, rerun with the same workdir for N more."""
  straight = loop.train_and_evaluate(_config(), str(tmp_path / "straight"))
  loop.train_and_evaluate(_config(), str(tmp_path / "resumed"), stop_at_step=5)
  # The "killed" run had checkpointed step 4 only; step 5 is redone from there.
  assert checkpoint_lib.Checkpointer(str(tmp_path / "resumed" / "checkpoints"), 4, 2).latest_step() == 4
  resumed = loop.train_and_evaluate(_config(), str(tmp_path / "resumed"))
  assert resumed["step"] == straight["step"] == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               resumed["state"].params, straight["state"].params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               resumed["state"].opt_state, straight["state"].opt_state)
  loss = lambda wd: {r["step"]: r["loss"] for r in _metrics(wd) if "loss" in r}
  straight_loss, resumed_loss = loss(tmp_path / "straight"), loss(tmp_path / "resumed")
  for step in range(5, 9):
    assert resumed_loss[step] == straight_loss[step], step
  assert resumed["eval"]["eval_loss"] == straight["eval"]["eval_loss"]


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  """Saved on 8-way fsdp, restored onto data=2 x tensor=4, and training goes on."""
  c = _config(steps=4)
  c.model.n_kv_heads = 4  # tensor=4 must divide the kv heads
  c.mesh.update(data=1, fsdp=8, tensor=1)
  saved = loop.train_and_evaluate(c, str(tmp_path))
  c.mesh.update(data=2, fsdp=1, tensor=4)
  mesh, trainer = loop.site_setup(c)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), 4, 2)
  restored = ckpt.restore_state(4, trainer.abstract_state())
  wq = restored.params["layers"]["wq"]
  assert wq.sharding.mesh.shape == {"data": 2, "fsdp": 1, "tensor": 4}
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, saved["state"])
  c.train.steps = 6
  more = loop.train_and_evaluate(c, str(tmp_path))  # resumes at 4 on the new mesh
  assert more["step"] == 6 and np.isfinite(more["train"]["loss"])


def test_init_from_starts_from_another_runs_params_on_any_mesh(tmp_path):
  """A base run's params (8-way fsdp) start a new run on data=2 x tensor=4 with a fresh
  optimizer, step and data position; the coordinator's host copy is the same."""
  b = _config(steps=4)
  b.model.n_kv_heads = 4  # tensor=4 must divide the kv heads
  b.mesh.update(data=1, fsdp=8, tensor=1)
  base = loop.train_and_evaluate(b, str(tmp_path / "base"))
  c = _config(steps=2, init_from=str(tmp_path / "base"))
  c.model.n_kv_heads = 4
  c.mesh.update(data=2, fsdp=1, tensor=4)
  _, trainer = loop.site_setup(c)
  state = trainer.init_state(7)
  assert int(state.step) == 0
  assert state.params["layers"]["wq"].sharding.mesh.shape["tensor"] == 4
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(same, state.params, base["state"].params)
  jax.tree.map(lambda m: np.testing.assert_array_equal(np.asarray(m), 0),
               state.opt_state[1][0].mu)  # fresh Adam moments
  host = train_lib.initial_params(trainer.model_cfg, 0, _config(
      init_from=str(tmp_path / "base" / "checkpoints")).train)
  jax.tree.map(same, host, base["state"].params)
  more = loop.train_and_evaluate(c, str(tmp_path / "derived"))
  c.train.init_from = ""
  cold = loop.train_and_evaluate(c, str(tmp_path / "cold"))
  assert more["step"] == cold["step"] == 2
  assert more["eval"]["eval_loss"] < cold["eval"]["eval_loss"] - 0.1  # 6 steps beat 2


def test_init_from_a_missing_or_foreign_checkpoint_is_one_clear_error(tmp_path):
  loop.train_and_evaluate(_config(steps=1), str(tmp_path / "base"))
  with pytest.raises(ConfigError, match="no such directory"):  # before anything compiles
    loop.site_setup(_config(init_from=str(tmp_path / "nothing")))
  cases = [(tmp_path, "no checkpoint in"),
           (tmp_path / "base", "params of another model")]
  for path, message in cases:
    c = _config(init_from=str(path))
    if message == "params of another model":
      c.model.d_ff = 2 * c.model.d_ff
    _, trainer = loop.site_setup(c)
    with pytest.raises(checkpoint_lib.InitError, match=message):
      trainer.init_state(0)


def test_init_from_a_federations_global_bucket_verifies_the_round(tmp_path):
  """A derivative model on the shared base: a global round read from the global bucket
  into this run's mesh, its coordinator's signature checked with the given key."""
  cfg = fed_fakes.config()
  coord = fed_fakes.coordinator(cfg, tmp_path / "fed")
  coord.publish_initial()
  want, _ = coord_lib.initial_round(cfg)
  url = federation.bucket_urls(cfg, str(tmp_path / "fed"))[federation.GLOBAL]
  c = federation.site_config(cfg, "latin")
  c.train.update(init_from=url, init_public_key=cfg.federation.trust.public_keys.coordinator)
  c.mesh.update(data=2, fsdp=4, tensor=1)
  _, trainer = loop.site_setup(c)
  got = trees.flatten(trainer.init_state(0).params)
  assert got.keys() == want.keys()
  for n, a in got.items():
    np.testing.assert_array_equal(np.asarray(a), want[n], err_msg=n)
  # Another party's key: the coordinator's signature does not verify under it (the
  # trust root's refusal, word for word), a round that does not exist, a bucket with no rounds.
  keys = cfg.federation.trust.public_keys
  c.train.init_public_key = keys.latin
  key_ids = {p: trust.key_id(trust.parse_public_key(keys[p])) for p in ("coordinator", "latin")}
  with pytest.raises(checkpoint_lib.InitError) as e:
    loop.site_setup(c)[1].init_state(0)
  assert str(e.value) == (
      f"train.init_from={url!r}: global round 0: manifest of 'coordinator' is signed by "
      f"unknown key {key_ids['coordinator'][:16]!r}, not 'coordinator''s key {key_ids['latin']}")
  c.train.update(init_public_key="", init_round=3)
  with pytest.raises(checkpoint_lib.InitError, match="global round 3 is not committed"):
    loop.site_setup(c)[1].init_state(0)
  c.train.update(init_from="file://" + str(tmp_path / "empty"), init_round=-1)
  with pytest.raises(checkpoint_lib.InitError, match="no committed global round"):
    loop.site_setup(c)[1].init_state(0)
  c.train.update(init_from=str(tmp_path), init_public_key=cfg.federation.trust.public_keys.latin)
  with pytest.raises(ConfigError, match="needs train.init_from to be a global bucket"):
    loop.site_setup(c)


@pytest.mark.parametrize("override,message", [
    ("--config.mesh.data=3", "mesh:"),
    ("--config.train.global_batch_size=12", "not divisible by the data axes"),
    ("--config.data.source=nope", "nope"),
    ("--config.train.stepz=3", "stepz"),
    ("--config.train.init_from=/nonexistent/run", "train.init_from='/nonexistent/run': no such"),
])
def test_bad_config_is_one_clear_line(tmp_path, override, message):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=experiments/configs/lm.py:tiny",
       f"--workdir={tmp_path}", override],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert message in proc.stderr
  assert not os.path.exists(tmp_path / "checkpoints")
