"""The attention kernels against the reference: splash (Pallas, interpret mode on CPU) in
values and gradients, alone and in the model on a mesh; cuDNN's packed layout rebuilt
from segment ids and lowered for CUDA; which kernel `auto` picks."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_lib

from tapestry_jax import attention
from tapestry_jax import model as model_lib
from tapestry_jax import sharding
from tapestry_jax import train as train_lib


def _packed_segments(rng, B, L, max_docs):
  """Rows of 1..k contiguous documents of random lengths, then padding (0)."""
  seg = np.zeros((B, L), np.int32)
  for b in range(B):
    t, doc = 0, 1
    while t < L and doc <= max_docs:
      n = int(rng.integers(1, L // 2))
      seg[b, t:t + n] = doc
      t, doc = t + n, doc + 1
    if rng.random() < 0.5:  # Some rows end in padding, some are full.
      seg[b, L - int(rng.integers(1, L // 4)):] = 0
  return seg


def _qkv(B, L, H, K, Dh, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, L, H, Dh), dtype)
  k = jax.random.normal(ks[1], (B, L, K, Dh), dtype)
  v = jax.random.normal(ks[2], (B, L, K, Dh), dtype)
  return q, k, v, jax.random.normal(ks[3], (B, L, H, Dh), jnp.float32)


def _loss(impl, seg, ct):
  def f(q, k, v):
    o = attention.attend(impl, attention.prepare(impl, seg, 8), q, k, v)
    # Padding rows' outputs are never used (their loss is masked): compare real tokens.
    return jnp.sum(o.astype(jnp.float32) * ct * (seg > 0)[..., None, None])
  return f


def test_splash_matches_the_reference_in_values_and_gradients():
  B, L, H, K, Dh = 2, 256, 4, 2, 32
  q, k, v, ct = _qkv(B, L, H, K, Dh)
  seg = jnp.asarray(_packed_segments(np.random.default_rng(0), B, L, 5))
  real = (seg > 0)[..., None, None]
  want = attention.attend("reference", attention.prepare("reference", seg, 8), q, k, v)
  got = jax.jit(lambda q, k, v: attention.attend("splash", attention.prepare("splash", seg, 8),
                                                 q, k, v))(q, k, v)
  np.testing.assert_allclose(got * real, want * real, atol=2e-5)
  g_want = jax.grad(_loss("reference", seg, ct), (0, 1, 2))(q, k, v)
  g_got = jax.jit(jax.grad(_loss("splash", seg, ct), (0, 1, 2)))(q, k, v)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_the_model_with_splash_on_a_mesh_matches_the_reference():
  """The whole loss and its gradients, batch over fsdp and heads over tensor (shard_map)."""
  ref_cfg = model_lib.ModelConfig(attention="reference")
  splash_cfg = model_lib.ModelConfig(attention="splash")
  B, L = 4, 128
  rng = np.random.default_rng(1)
  seg = _packed_segments(rng, B, L, 4)
  pos = np.zeros_like(seg)
  for b in range(B):
    for t in range(1, L):
      pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
  tokens = rng.integers(3, 259, (B, L + 1)).astype(np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg, positions=pos)
  params = model_lib.init_params(ref_cfg, jax.random.key(0))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])

  def loss(cfg):
    return lambda p, b: model_lib.token_losses(p, b, cfg)[0].sum()

  with jax.set_mesh(mesh):
    batch_sh = {k: jax.device_put(v, sharding.named_sharding(mesh, ("batch", "length")))
                for k, v in batch.items()}
    p_sh = jax.device_put(params, model_lib.param_shardings(ref_cfg, mesh))
    want, g_want = jax.jit(jax.value_and_grad(loss(ref_cfg)))(p_sh, batch_sh)
    got, g_got = jax.jit(jax.value_and_grad(loss(splash_cfg)))(p_sh, batch_sh)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), g_got, g_want)


def test_splash_refuses_a_length_that_is_not_a_multiple_of_its_block():
  q, k, v, _ = _qkv(1, 600, 2, 1, 8)
  seg = jnp.ones((1, 600), jnp.int32)
  with pytest.raises(ValueError, match="multiple of 512"):
    attention.attend("splash", attention.prepare("splash", seg, 8), q, k, v)


def _mask_from_runs(lengths, offsets, L):
  """The mask cuDNN's packed layout means: causal within each (offset, length) run."""
  B = lengths.shape[0]
  run = np.full((B, L), -1)
  for b in range(B):
    for i, (o, n) in enumerate(zip(offsets[b], lengths[b])):
      if o >= 0:
        run[b, o:o + n] = i
  assert (run >= 0).all(), "every position lies in one run"
  same = run[:, :, None] == run[:, None, :]
  return (same & np.tril(np.ones((L, L), bool)))[:, None]


@pytest.mark.parametrize("seed", range(4))
def test_cudnn_runs_describe_exactly_the_reference_mask(seed):
  B, L, M = 3, 64, 8
  seg = _packed_segments(np.random.default_rng(seed), B, L, M - 1)
  lengths, offsets = jax.jit(attention.segment_runs, static_argnums=1)(jnp.asarray(seg), M)
  lengths, offsets = np.asarray(lengths), np.asarray(offsets)
  assert lengths.shape == (B, M) and offsets.shape == (B, M + 1)
  assert (offsets[:, -1] == -1).all() and ((lengths > 0) == (offsets[:, :-1] >= 0)).all()
  np.testing.assert_array_equal(_mask_from_runs(lengths, offsets[:, :-1], L),
                                np.asarray(attention.mask(jnp.asarray(seg))))
  assert attention.count_runs(seg) == int((lengths > 0).sum(axis=1).max())


def test_cudnn_path_lowers_for_cuda_to_the_packed_flash_kernel_without_an_LxL_mask():
  """No GPU here: lower (not run) the forward and backward for CUDA, with cuDNN's version
  and device checks answered as an H100 would."""
  B, L, H, K, Dh, M = 2, 256, 4, 2, 64, 8
  shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in
            [(B, L, H, Dh), (B, L, K, Dh), (B, L, K, Dh)]]
  seg = jax.ShapeDtypeStruct((B, L), jnp.int32)

  def loss(q, k, v, s):
    return attention.attend("cudnn", attention.prepare("cudnn", s, M), q, k, v).sum()

  with mock.patch.object(cudnn_lib, "check_cudnn_version", return_value=91000), \
       mock.patch.object(cudnn_lib, "check_compute_capability", return_value=True), \
       mock.patch.object(cudnn_lib, "is_cuda_compute_capability_equal", return_value=False):
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(*shapes, seg).lower(
        lowering_platforms=("cuda",)).as_text()
  assert "__cudnn$fmhaSoftmax(" in text and "__cudnn$fmhaSoftmaxBackward(" in text
  assert "PADDING_CAUSAL" in text and '\\22max_seg_per_batch\\22: 8' in text
  assert f"x{L}x{L}x" not in text  # No B x 1 x L x L mask or bias anywhere.


def test_auto_picks_per_platform():
  assert attention.resolve("auto", "cpu") == "reference"
  assert attention.resolve("auto", "tpu") == "splash"
  with mock.patch.object(attention, "_hopper_or_newer", return_value=True):
    assert attention.resolve("auto", "gpu") == "cudnn"
  with mock.patch.object(attention, "_hopper_or_newer", return_value=False):
    assert attention.resolve("auto", "gpu") == "xla"
  assert attention.resolve("xla", "tpu") == "xla"
  with pytest.raises(ValueError, match="attention must be one of"):
    attention.resolve("flash")


def test_a_row_with_more_documents_than_cudnn_is_built_for_is_refused_on_the_host():
  import ml_collections
  from experiments.configs import lm
  config = lm.get_config("tiny")
  mcfg = model_lib.ModelConfig.from_config(config.model)
  mcfg = model_lib.ModelConfig(**{**mcfg.__dict__, "attention": "cudnn", "max_segments": 4})
  trainer = train_lib.Trainer(mcfg, ml_collections.ConfigDict(dict(config.train)),
                              sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1},
                                                 jax.devices()[:1]))
  B, L = 2, 16
  batch = {k: np.zeros((B, L), np.int32) for k in train_lib.BATCH_KEYS}
  batch["segment_ids"] = np.array([[1] * 4 + [2] * 4 + [3] * 4 + [0] * 4, [1] * 16], np.int32)
  trainer.shard_batch(batch)  # 4 runs: fits.
  batch["segment_ids"][0, -2:] = 4  # 5 runs.
  with pytest.raises(ValueError, match="5 documents and padding runs.*max_segments=4"):
    trainer.shard_batch(batch)


def test_site_config_with_cudnn_must_cap_the_documents_per_row():
  from experiments.configs import lm
  from tapestry_jax import validate
  config = lm.get_config("tiny")
  config.model.attention = "cudnn"
  validate.check_site_config(config)  # The presets cap the rows to fit.
  config.data.max_documents_per_row = 0
  with pytest.raises(validate.ConfigError, match=r"max_documents_per_row=0 must be in \[1, 31\]"):
    validate.check_site_config(config)
