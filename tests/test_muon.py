"""Muon as the inner optimizer (train.optimizer muon, MuLoCo): it trains, it orthogonalizes
every layer's matrix on its own, the rest takes the AdamW recipe, bad settings are one line."""
import dataclasses

import jax
import numpy as np
import pytest

import test_loop
import test_trainer
from experiments.configs import federation as fed_config
from experiments.configs import lm
from tapestry_jax import federation
from tapestry_jax import loop
from tapestry_jax import model as model_lib
from tapestry_jax import train as train_lib
from tapestry_jax import validate
from tapestry_jax.validate import ConfigError

ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)


def test_muon_trains_differs_from_adamw_and_is_the_same_on_8_devices():
  muon, p_muon = test_trainer._run(ONE_DEVICE, jax.devices()[:1], steps=4, optimizer="muon")
  adamw, _ = test_trainer._run(ONE_DEVICE, jax.devices()[:1], steps=4)
  assert muon[-1] < muon[0]  # it trains
  assert np.abs(muon[2:] - adamw[2:]).max() > 1e-3  # and not as AdamW (warmup: steps 0, 1 alike)
  eight, p_eight = test_trainer._run(dict(data=2, fsdp=2, tensor=2), jax.devices(), steps=4,
                                     optimizer="muon")
  np.testing.assert_allclose(eight, muon, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               p_eight, p_muon)


def _first_update(model_cfg, grads, params, **tkw):
  tcfg = test_trainer._tcfg(optimizer="muon", schedule="constant", warmup_steps=0, grad_clip=0.0,
                            muon_lr=0.02, **tkw)
  tx = train_lib.make_optimizer(tcfg, model_cfg)
  return jax.device_get(jax.jit(tx.update)(grads, tx.init(params), params)[0])


def test_each_layer_is_orthogonalized_on_its_own_and_the_rest_takes_adamw():
  """The update of a stacked (layers, ...) leaf is, layer by layer, the update of a
  one-layer model holding that layer (orthogonalizing the stacked tensor as one matrix
  would mix the layers), and each is near-orthogonal: 5 Newton-Schulz steps leave its
  singular values around 1, times the lr and Muon's width scaling."""
  cfg = dataclasses.replace(test_trainer.TINY, n_layers=3)
  params = model_lib.init_params(cfg, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in
                                       zip(keys, leaves)])
  update = _first_update(cfg, grads, params)
  one = dataclasses.replace(cfg, n_layers=1)
  dims = train_lib.muon_dimension_numbers(cfg)
  assert dims["embed"] is None and dims["layers"]["attn_norm"] is None
  assert dims["layers"]["wo"].reduction_axis == (1, 2)  # (layers, heads, head_dim) -> embed
  for l in range(cfg.n_layers):
    layer = lambda t: {**t, "layers": jax.tree.map(lambda x: x[l:l + 1], t["layers"])}
    alone = _first_update(one, layer(grads), layer(params))
    for name, u in update["layers"].items():
      np.testing.assert_allclose(u[l:l + 1], alone["layers"][name], rtol=2e-5, atol=1e-8,
                                 err_msg=name)
      if dims["layers"][name] is None:
        continue
      fan_in = int(np.prod([u.shape[a] for a in dims["layers"][name].reduction_axis]))
      sv = np.linalg.svd(u[l].reshape(fan_in, -1), compute_uv=False)
      sv /= 0.02 * np.sqrt(max(1.0, u[l].size / fan_in ** 2))  # lr x Muon's width scaling
      assert 0.75 < np.median(sv) < 1.25 and sv.max() < 1.5, (name, sv)
  # Embeddings, output layer and norm scales: exactly train's AdamW (same lr, decay mask).
  adamw = train_lib.make_optimizer(test_trainer._tcfg(schedule="constant", warmup_steps=0,
                                                      grad_clip=0.0), cfg)
  want = jax.device_get(jax.jit(adamw.update)(grads, adamw.init(params), params)[0])
  for name in ("embed", "unembed", "final_norm"):
    np.testing.assert_array_equal(update[name], want[name])
  np.testing.assert_array_equal(update["layers"]["attn_norm"], want["layers"]["attn_norm"])
  # With no gradient the matrices only decay, by lr x weight_decay as under AdamW (not by
  # muon_lr x weight_decay).
  zeros = jax.tree.map(np.zeros_like, grads)
  decay = _first_update(cfg, zeros, params)
  want = jax.device_get(jax.jit(adamw.update)(zeros, adamw.init(params), params)[0])
  np.testing.assert_allclose(decay["layers"]["wq"], want["layers"]["wq"], rtol=1e-5)
  assert np.abs(want["layers"]["wq"]).max() > 0


def test_muon_state_checkpoints_and_resumes_bit_identically(tmp_path):
  """Muon's state (its momentum, AdamW's moments, optax's masked placeholders) saves and
  restores: 8 steps straight == 5 steps, stop, resume from the step-4 checkpoint."""
  config = lambda: test_loop._config(optimizer="muon")
  straight = loop.train_and_evaluate(config(), str(tmp_path / "straight"))
  loop.train_and_evaluate(config(), str(tmp_path / "resumed"), stop_at_step=5)
  resumed = loop.train_and_evaluate(config(), str(tmp_path / "resumed"))
  assert resumed["step"] == straight["step"] == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               (resumed["state"].params, resumed["state"].opt_state),
               (straight["state"].params, straight["state"].opt_state))


@pytest.mark.parametrize("field,value,match", [
    ("muon_lr", 0.0, r"train.muon_lr must be > 0; got 0.0"),
    ("muon_momentum", 1.0, r"train.muon_momentum must be in \[0, 1\); got 1.0"),
])
def test_bad_muon_settings_are_one_clear_line(field, value, match):
  c = lm.get_config("tiny")
  c.train.optimizer = "muon"
  validate.check_site_config(c)
  c.train[field] = value
  with pytest.raises(ConfigError, match=match):
    validate.check_site_config(c)


def test_shared_moments_refuse_a_muon_inner_optimizer():
  c = fed_config.get_config("tiny+moments/latin,cyrillic")
  c.federation.inner.optimizer = "muon"
  with pytest.raises(ConfigError, match="inner optimizer must be adamw .*not muon"):
    federation.check_federation_config(c)
  c = fed_config.get_config("tiny+fedavg/latin,cyrillic")
  c.federation.inner.optimizer = "muon"
  c.federation.outer.name = "nesterov"
  federation.check_federation_config(c)  # MuLoCo: Muon inside, Nesterov outside.
