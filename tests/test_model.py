"""Model behaviour: causality through gradients, layout options, presets, sharded init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapestry_jax import attention
from tapestry_jax import model as model_lib
from tapestry_jax import sharding

TINY = model_lib.ModelConfig(**model_lib.PRESETS["tiny"])


def _inputs(B=2, L=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(3, 259, size=(B, L)), jnp.int32)
  positions = jnp.tile(jnp.arange(L, dtype=jnp.int32), (B, 1))
  return tokens, positions


@pytest.mark.parametrize("preset,low,high", [
    ("tiny", 0.7e6, 1.3e6), ("small", 15e6, 25e6), ("125m", 110e6, 140e6),
    ("350m", 320e6, 380e6), ("1b", 0.9e9, 1.2e9), ("7b", 6.0e9, 7.5e9)])
def test_preset_sizes(preset, low, high):
  cfg = model_lib.ModelConfig(**model_lib.PRESETS[preset])
  cfg.validate()
  assert low <= model_lib.count_params(cfg) <= high


def test_no_position_sees_the_future_or_another_document():
  """d logits[i] / d x[j] must be exactly zero for j > i and across documents."""
  params = model_lib.init_params(TINY, jax.random.key(0))
  tokens, positions = _inputs(B=1, L=12)
  segments = jnp.asarray([[1] * 7 + [2] * 5], jnp.int32)
  positions = jnp.asarray([list(range(7)) + list(range(5))], jnp.int32)
  x = model_lib.embed(params, tokens, TINY)

  def summed_logits_L(x):
    return model_lib.forward_embeddings(params, x, positions, segments, TINY)[0].sum(-1)

  jac_LxLxD = jax.jit(jax.jacrev(summed_logits_L))(x)[:, 0]
  influence_LxL = np.abs(np.asarray(jac_LxLxD)).sum(-1)  # [output i, input j]
  for i in range(12):
    for j in range(12):
      visible = j <= i and int(segments[0, j]) == int(segments[0, i])
      if visible:
        assert influence_LxL[i, j] > 0, (i, j)
      else:
        assert influence_LxL[i, j] == 0, f"position {i} depends on position {j}"


def test_scan_unrolled_and_remat_agree():
  params = model_lib.init_params(TINY, jax.random.key(1))
  tokens, positions = _inputs()
  seg = jnp.ones_like(tokens)
  ref = model_lib.forward(params, tokens, positions, seg, TINY)
  for kw in [dict(scan_layers=False), dict(remat="full"), dict(remat="dots_no_batch", scan_layers=False)]:
    cfg = model_lib.ModelConfig(**{**TINY.__dict__, **kw})
    out = jax.jit(model_lib.forward, static_argnums=4)(params, tokens, positions, seg, cfg)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_tied_embeddings_and_bf16_compute():
  cfg = model_lib.ModelConfig(**{**TINY.__dict__, "tie_embeddings": True,
                                 "compute_dtype": "bfloat16", "z_loss": 1e-4})
  params = model_lib.init_params(cfg, jax.random.key(0))
  assert "unembed" not in params
  assert params["embed"].dtype == jnp.float32
  tokens, positions = _inputs()
  targets, _ = _inputs(seed=1)
  batch = dict(inputs=tokens, targets=targets, positions=positions, segment_ids=jnp.ones_like(tokens))
  ce, z, mask = model_lib.token_losses(params, batch, cfg)
  assert np.isfinite(np.asarray(ce)).all() and float(z.sum()) > 0
  # At init logits are ~N(0, 1) (unit-RMS features, 1/sqrt(D) weights), so the loss is
  # about log(vocab) + 1/2 nats.
  assert abs(float(ce.mean()) - np.log(cfg.vocab_size) - 0.5) < 0.3


def test_sharded_init_matches_unsharded_and_is_sharded():
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  shardings = model_lib.param_shardings(TINY, mesh)
  init = jax.jit(model_lib.init_params, static_argnums=0, out_shardings=shardings)
  sharded = init(TINY, jax.random.key(3))
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  plain = jax.jit(model_lib.init_params, static_argnums=0, out_shardings=one_device)(
      TINY, jax.random.key(3))
  wq = sharded["layers"]["wq"]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert wq.addressable_shards[0].data.shape == (4, 128 // 4, 4 // 2, 32)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               sharded, plain)


def test_logical_rules_never_reuse_a_mesh_axis():
  assert sharding.logical_to_spec(("batch", "length", "embed")) == jax.sharding.PartitionSpec(
      ("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("vocab", "embed")) == jax.sharding.PartitionSpec("tensor", "fsdp")


@pytest.mark.parametrize("shape,n,err", [
    (dict(data=1, fsdp=-1, tensor=3), 8, "not divisible"),
    (dict(data=2, fsdp=2, tensor=1), 8, "4 devices, but 8"),
    (dict(data=-1, fsdp=-1, tensor=1), 8, "at most one axis"),
])
def test_bad_mesh_shapes(shape, n, err):
  with pytest.raises(sharding.MeshError, match=err):
    sharding.resolve_mesh_shape(shape, n)


def _plain_swiglu(h_BxLxD, w_gate, w_up, w_down):
  gate = jnp.einsum("bld,df->blf", h_BxLxD, w_gate)
  up = jnp.einsum("bld,df->blf", h_BxLxD, w_up)
  return jnp.einsum("blf,fd->bld", jax.nn.silu(gate) * up, w_down)


def test_swiglu_mlp_gradients_match_autodiff_of_the_plain_block():
  """The hand-written backward of `swiglu_mlp` equals jax.grad of the einsum version."""
  ks = jax.random.split(jax.random.key(0), 5)
  B, L, D, F = 2, 8, 16, 48
  args = (jax.random.normal(ks[0], (B, L, D)), jax.random.normal(ks[1], (D, F)) / D**0.5,
          jax.random.normal(ks[2], (D, F)) / D**0.5, jax.random.normal(ks[3], (F, D)) / F**0.5)
  ct = jax.random.normal(ks[4], (B, L, D))
  out = jax.jit(model_lib.swiglu_mlp)(*args)
  np.testing.assert_allclose(out, _plain_swiglu(*args), rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(model_lib.swiglu_mlp(*a) * ct), argnums=(0, 1, 2, 3)))(*args)
  ref = jax.grad(lambda *a: jnp.sum(_plain_swiglu(*a) * ct), argnums=(0, 1, 2, 3))(*args)
  for g, r in zip(grads, ref):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_gradients_agree_across_scan_unrolled_and_remat():
  params = model_lib.init_params(TINY, jax.random.key(2))
  tokens, positions = _inputs()
  targets, _ = _inputs(seed=3)
  batch = dict(inputs=tokens, targets=targets, positions=positions, segment_ids=jnp.ones_like(tokens))

  def grads(cfg):
    loss = lambda p: model_lib.token_losses(p, batch, cfg)[0].sum()
    return jax.jit(jax.grad(loss))(params)

  ref = grads(TINY)
  for kw in [dict(scan_layers=False), dict(remat="full"), dict(remat="dots"),
             dict(remat="dots_no_batch", scan_layers=False)]:
    got = grads(model_lib.ModelConfig(**{**TINY.__dict__, **kw}))
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6), got, ref)


def test_grouped_attention_matches_jax_nn_attention_and_its_gradients():
  B, L, H, K, Dh = 2, 12, 4, 2, 8
  ks = jax.random.split(jax.random.key(4), 4)
  q = jax.random.normal(ks[0], (B, L, H, Dh))
  k = jax.random.normal(ks[1], (B, L, K, Dh))
  v = jax.random.normal(ks[2], (B, L, K, Dh))
  ct = jax.random.normal(ks[3], (B, L, H, Dh))
  segments = jnp.asarray([[1] * 7 + [2] * 5, [1] * 3 + [2] * 6 + [0] * 3], jnp.int32)
  mask = attention.mask(segments)
  bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)

  def ours(q, k, v):
    return jnp.sum(attention.grouped_attention(q, k, v, bias) * ct)

  def ref(q, k, v):
    return jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla") * ct)

  np.testing.assert_allclose(jax.jit(attention.grouped_attention)(q, k, v, bias),
                             jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"),
                             rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
