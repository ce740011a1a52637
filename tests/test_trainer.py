"""The compiled train step: mesh independence, gradient accumulation, schedules."""
import jax
import ml_collections
import numpy as np
import pytest

from tapestry_jax import model as model_lib
from tapestry_jax import sharding
from tapestry_jax import train as train_lib

TINY = model_lib.ModelConfig(**model_lib.PRESETS["tiny"])


def _tcfg(**kw):
  base = dict(steps=100, global_batch_size=16, microbatches=1, lr=3e-3, schedule="cosine",
              warmup_steps=2, decay_fraction=0.2, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9,
              b2=0.95, eps=1e-8, grad_clip=1.0)
  return ml_collections.ConfigDict({**base, **kw})


def _batches(n, B=16, L=32, seed=0):
  """Random packed batches with two documents per row (exercises segment masking)."""
  rng = np.random.default_rng(seed)
  for _ in range(n):
    tokens = rng.integers(3, 259, size=(B, L + 1)).astype(np.int32)
    cut = L // 3
    seg = np.where(np.arange(L) < cut, 1, 2).astype(np.int32)[None].repeat(B, 0)
    pos = np.where(np.arange(L) < cut, np.arange(L), np.arange(L) - cut).astype(np.int32)
    seg[:, -3:] = 0  # padding tail
    yield dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
               positions=pos[None].repeat(B, 0), target_bytes=(seg > 0).astype(np.int32))


def _run(mesh_shape, devices, steps=4, **tkw):
  mesh = sharding.make_mesh(mesh_shape, devices)
  trainer = train_lib.Trainer(TINY, _tcfg(**tkw), mesh)
  state = trainer.init_state(0)
  losses = []
  with jax.set_mesh(mesh):
    for batch in _batches(steps):
      state, m = trainer.train_step(state, trainer.shard_batch(batch))
      losses.append(float(m["loss"]))
  return np.array(losses), jax.tree.map(np.asarray, state.params)


def test_same_seed_same_loss_on_1_and_8_devices():
  one, p1 = _run(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  eight, p8 = _run(dict(data=2, fsdp=2, tensor=2), jax.devices())
  assert one[-1] < one[0]  # it trains
  np.testing.assert_allclose(eight, one, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p8, p1)


def test_gradient_accumulation_matches_one_big_batch():
  full, p_full = _run(dict(data=1, fsdp=-1, tensor=1), jax.devices(), steps=3)
  accum, p_accum = _run(dict(data=1, fsdp=-1, tensor=1), jax.devices(), steps=3, microbatches=2)
  np.testing.assert_allclose(accum, full, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p_accum, p_full)


def test_schedules():
  cos = train_lib.make_schedule(_tcfg(lr=1.0, warmup_steps=10, steps=100))
  assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
  assert float(cos(100)) == pytest.approx(0.1)
  wsd = train_lib.make_schedule(_tcfg(lr=1.0, warmup_steps=10, steps=100, schedule="wsd",
                                      decay_fraction=0.2))
  assert float(wsd(5)) == pytest.approx(0.5)
  assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(80)) == pytest.approx(1.0)
  assert float(wsd(90)) == pytest.approx(0.55) and float(wsd(100)) == pytest.approx(0.1)
  const = train_lib.make_schedule(_tcfg(lr=0.5, warmup_steps=0, schedule="constant"))
  assert float(const(0)) == 0.5 and float(const(1000)) == 0.5
  warm = train_lib.make_schedule(_tcfg(lr=0.5, warmup_steps=10, schedule="constant"))
  assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.25)
  assert float(warm(10)) == 0.5
  with pytest.raises(ValueError, match="cosine|wsd|constant"):
    train_lib.make_schedule(_tcfg(schedule="linear"))


def test_sgd_inner_optimizer_is_plain_sgd_on_the_schedule():
  tx = train_lib.make_optimizer(_tcfg(optimizer="sgd", lr=0.5, schedule="constant",
                                      warmup_steps=0, grad_clip=0.0))
  p = {"w": np.ones((3,), np.float32)}
  g = {"w": np.array([1.0, -2.0, 4.0], np.float32)}
  upd, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(np.asarray(upd["w"]), -0.5 * g["w"])  # no decay, no moments
  with pytest.raises(ValueError, match="train.optimizer must be one of adamw, sgd"):
    train_lib.make_optimizer(_tcfg(optimizer="lion"))


def test_weight_decay_skips_norm_scales():
  params = model_lib.init_params(TINY, jax.random.key(0))
  mask = train_lib._decay_mask(params)
  assert mask["layers"]["wq"] and mask["embed"]
  assert not mask["layers"]["attn_norm"] and not mask["final_norm"]


def test_initial_params_equal_the_sharded_init():
  """The federation's round 0 (built without a mesh) is exactly what every site's
  sharded trainer initialises, so a site alone and the federation start alike."""
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices())
  sharded = train_lib.Trainer(TINY, _tcfg(), mesh).init_state(7).params
  host = train_lib.initial_params(TINY, 7)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               sharded, host)
  other = train_lib.initial_params(TINY, 8)
  assert not np.array_equal(np.asarray(other["embed"]), np.asarray(host["embed"]))
